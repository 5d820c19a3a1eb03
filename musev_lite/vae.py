"""The Stable Diffusion VAE (AutoencoderKL): images <-> latents 8x smaller, 4 channels.

MuseV encodes the condition and reference images to the posterior *mean* (never a sample) times
0.18215, and decodes frame by frame, in float32 whatever the rest runs in (its diffusers fork upcasts the VAE).
`decode` takes a chunk size so memory stays flat however many frames a video has.
Keys are diffusers' (`encoder.*`, `decoder.*`, `quant_conv`, `post_quant_conv`); files with the older
attention names (`query`/`key`/`value`/`proj_attn`) go through `musev_lite.convert.sd15` first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DECODE_CHUNK = 8  # frames decoded at a time at most: the peak memory of decoding does not grow with the video
DECODE_PIXELS = 2 * 512 * 320  # and pixels at a time at most: 2 frames of 512x320, about 1 GB of float32 activations


def decode_chunk(height: int, width: int) -> int:
    """Frames of `height` x `width` pixels the pipeline decodes (and encodes) at a time: DECODE_CHUNK, fewer for
    frames larger than 256x160, so that a 512x320 video's decode adds about 1 GB, not 4 (bench/time_to_video.py)."""
    return max(1, min(DECODE_CHUNK, DECODE_PIXELS // (height * width)))


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=1e-6)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=1e-6)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class SelfAttention(nn.Module):
    """Single-head attention over all pixels, with its own GroupNorm and a residual."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(ch, ch), nn.Linear(ch, ch), nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])

    def forward(self, x):
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # b (h w) c
        q, k, v = (proj(tokens)[:, None] for proj in (self.to_q, self.to_k, self.to_v))  # b 1 (h w) c
        out = self.to_out[0](F.scaled_dot_product_attention(q, k, v)[:, 0])
        return out.transpose(1, 2).reshape(b, c, h, w) + x


class MidBlock(nn.Module):
    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, groups), ResnetBlock(ch, ch, groups)])
        self.attentions = nn.ModuleList([SelfAttention(ch, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right/bottom only, as SD's VAE


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class EncoderLevel(nn.Module):
    def __init__(self, in_ch, out_ch, layers, groups, downsample):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(in_ch if j == 0 else out_ch, out_ch, groups) for j in range(layers))
        self.downsamplers = nn.ModuleList([Downsample(out_ch)]) if downsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class DecoderLevel(nn.Module):
    def __init__(self, in_ch, out_ch, layers, groups, upsample):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(in_ch if j == 0 else out_ch, out_ch, groups) for j in range(layers))
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if upsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            EncoderLevel(chs[max(i - 1, 0)], chs[i], cfg.layers_per_block, g, downsample=i < n - 1) for i in range(n)
        )
        self.mid_block = MidBlock(chs[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, chs[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, chs[0], 3, padding=1)
        self.mid_block = MidBlock(chs[0], g)
        self.up_blocks = nn.ModuleList(
            DecoderLevel(chs[max(i - 1, 0)], chs[i], cfg.layers_per_block + 1, g, upsample=i < n - 1) for i in range(n)
        )
        self.conv_norm_out = nn.GroupNorm(g, chs[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chs[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    def encode(self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None):
        """(N,3,H,W) in [-1,1] -> latents (N,4,H/8,W/8) x scaling_factor: posterior mean, or a sample."""
        dtype = self.quant_conv.weight.dtype
        mean, logvar = self.quant_conv(self.encoder(images.to(dtype))).chunk(2, dim=1)
        if sample:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
            mean = mean + std * noise
        return mean * self.config.scaling_factor

    def decode(self, latents: torch.Tensor, chunk_size: int = DECODE_CHUNK) -> torch.Tensor:
        """Scaled latents (N,4,h,w) -> images (N,3,8h,8w) in about [-1,1], `chunk_size` at a time."""
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        dtype = self.post_quant_conv.weight.dtype
        z = latents.to(dtype) / self.config.scaling_factor
        return torch.cat([self.decoder(self.post_quant_conv(part)) for part in z.split(chunk_size)])
