"""ControlNet for SD1.5: a trainable copy of the UNet's down path and mid block, steered by a control image.

A small convolutional encoder (`controlnet_cond_embedding`) turns the control image (a rendered pose,
depth map, edges, ...: RGB in [0, 1], 8x the latent's size) into a map that is added after `conv_in`.
The SD1.5 down path and mid block then run as usual, and one 1x1 convolution per skip tensor
(`controlnet_down_blocks`, 12 for SD1.5) and one after the mid block (`controlnet_mid_block`), all
zero-initialised in training, give residuals that the UNet adds to its skip connections and to its
mid-block output. MuseV runs it per frame inside every window, on the control frames as they are
(values in [0, 1], no normalisation; docs/method.md#video2video), and sums several ControlNets'
residuals, each with its own scale (`MultiControlNet`).

Unlike MuseV's UNet, the ControlNet is a stock diffusers model: its transformer LayerNorms use
eps 1e-5 (not MuseV's eps-0 quirk) and its ResNets apply SiLU to the time embedding. Module and
parameter names are the published diffusers keys (e.g. lllyasviel/control_v11p_sd15_openpose).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .unet import (
    ControlResiduals,
    LayoutFollowsDtype,
    MidBlock,
    SD15Sizes,
    TimestepEmbedding,
    check_context,
    memory_format,
    sd15_down_blocks,
    skip_channels,
)
from .weights import WeightsError

# diffusers ControlNetModel settings that change the computation; SD1.5 ControlNets use these values
SD15_SETTINGS = {
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn", "flip_sin_to_cos": True,
    "freq_shift": 0, "act_fn": "silu", "downsample_padding": 1, "mid_block_scale_factor": 1,
    "only_cross_attention": False, "transformer_layers_per_block": 1, "resnet_time_scale_shift": "default",
    "class_embed_type": None, "num_class_embeds": None, "encoder_hid_dim": None,
    "controlnet_conditioning_channel_order": "rgb", "global_pool_conditions": False,
}


def check_sd15_base(cross_attention_dim: int, linear_projection: bool, sdxl: bool, source: str) -> None:
    """Refuse a ControlNet made for another Stable Diffusion than 1.5, saying which one it is for."""
    base = ("SDXL" if sdxl or cross_attention_dim == 2048
            else "SD2.x" if linear_projection or cross_attention_dim == 1024 else None)
    if base is not None:
        raise WeightsError(
            f"{source}: this ControlNet is for {base} (cross-attention width {cross_attention_dim}"
            f"{', linear proj_in' if linear_projection else ''}{', added embeddings' if sdxl else ''}); "
            "MuseV is built on SD1.5: use an SD1.5 ControlNet (e.g. lllyasviel/control_v11p_sd15_openpose)"
        )


# ---------------------------------------------------------------------------------------------
# Config


@dataclass
class ControlNetConfig(SD15Sizes):
    """Sizes of an SD1.5 ControlNet: the UNet's down-path sizes (SD15Sizes) and its control-image encoder's;
    SD1.5's by default (those of control_v11p_sd15_*)."""

    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)

    def __post_init__(self):
        super().__post_init__()
        self.conditioning_embedding_out_channels = tuple(self.conditioning_embedding_out_channels)

    @property
    def image_scale(self) -> int:
        """Control image size / latent size: the conditioning encoder halves the size per step (8 for SD1.5)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: dict, source: str = "config.json") -> ControlNetConfig:
        """Sizes from a diffusers ControlNetModel config.json; a setting SD1.5 ControlNets do not use is an error."""
        cross_dim = config.get("cross_attention_dim", 1280)
        sdxl = config.get("addition_embed_type") is not None
        check_sd15_base(cross_dim, bool(config.get("use_linear_projection")), sdxl, source)

        def one(value):  # diffusers allows a per-level list of one value
            return value[0] if isinstance(value, list) and len(set(value)) == 1 else value

        heads = one(config.get("num_attention_heads") or config.get("attention_head_dim", 8))
        unsupported = [f"{k}={config[k]!r} (expected {v!r})" for k, v in SD15_SETTINGS.items()
                       if k in config and one(config[k]) != one(v)]
        if not isinstance(heads, int):
            unsupported.append(f"attention_head_dim={heads!r} (expected one value for every level)")
        if unsupported:
            raise WeightsError(f"{source}: not an SD1.5 ControlNet as MuseV uses it: {', '.join(unsupported)}")
        return cls(
            in_channels=config.get("in_channels", 4),
            conditioning_channels=config.get("conditioning_channels", 3),
            block_out_channels=config.get("block_out_channels", (320, 640, 1280, 1280)),
            layers_per_block=config.get("layers_per_block", 2),
            heads=heads,
            norm_num_groups=config.get("norm_num_groups", 32),
            norm_eps=config.get("norm_eps", 1e-5),
            cross_attention_dim=cross_dim,
            conditioning_embedding_out_channels=config.get("conditioning_embedding_out_channels", (16, 32, 96, 256)),
        )


# ---------------------------------------------------------------------------------------------
# Blocks


class ControlNetConditioningEmbedding(nn.Module):
    """conv_in, then per size step a conv and a stride-2 conv, SiLU after each; conv_out to conv_in's width."""

    def __init__(self, in_ch: int, out_ch: int, channels: tuple[int, ...]):
        super().__init__()
        self.conv_in = nn.Conv2d(in_ch, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for ch, next_ch in zip(channels, channels[1:]):
            self.blocks.append(nn.Conv2d(ch, ch, 3, padding=1))
            self.blocks.append(nn.Conv2d(ch, next_ch, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(channels[-1], out_ch, 3, padding=1)

    def forward(self, image):
        x = F.silu(self.conv_in(image))
        for conv in self.blocks:
            x = F.silu(conv(x))
        return self.conv_out(x)


# ---------------------------------------------------------------------------------------------
# The model


class ControlNet(LayoutFollowsDtype):  # bf16 convolutions channels-last, as the UNet's
    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        self.config = cfg
        blocks = cfg.plain_blocks(transformer_norm_eps=1e-5)  # diffusers' LayerNorm eps everywhere
        chs = cfg.block_out_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chs[0], 4 * chs[0])
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            cfg.conditioning_channels, chs[0], cfg.conditioning_embedding_out_channels)
        self.down_blocks = sd15_down_blocks(blocks, temporal=False)
        self.controlnet_down_blocks = nn.ModuleList(nn.Conv2d(ch, ch, 1) for ch in skip_channels(cfg))
        self.mid_block = MidBlock(chs[-1], blocks, temporal=False)
        self.controlnet_mid_block = nn.Conv2d(chs[-1], chs[-1], 1)

    def forward(self, sample: torch.Tensor, timestep, text: torch.Tensor, control_image: torch.Tensor,
                conditioning_scale: float = 1.0) -> ControlResiduals:
        """sample (N,4,h,w) latents, timestep (scalar or (N,)), text (N,L,D), control_image (N,3,8h,8w)
        in [0, 1] -> residuals for the UNet's 12 skips and mid block, times `conditioning_scale`."""
        self._check_inputs(sample, timestep, text, control_image)
        emb, ctx = self.still_inputs(sample, timestep, text)
        dtype = self.conv_in.weight.dtype
        layout = memory_format(dtype)
        x = (self.conv_in(sample.to(dtype).contiguous(memory_format=layout))
             + self.controlnet_cond_embedding(control_image.to(dtype).contiguous(memory_format=layout)))
        x, skips = self.down_path(x, emb, ctx)
        down = [conv(skip) * conditioning_scale for conv, skip in zip(self.controlnet_down_blocks, skips)]
        return ControlResiduals(down, self.controlnet_mid_block(x) * conditioning_scale)

    def _check_inputs(self, sample, timestep, text, control_image) -> None:
        cfg = self.config
        if sample.ndim != 4 or sample.shape[1] != cfg.in_channels:
            raise ValueError(f"sample must be (N, {cfg.in_channels}, h, w) latents; got shape {tuple(sample.shape)}")
        n, _, h, w = sample.shape
        check_context(text, n, cfg.cross_attention_dim, "text")
        steps = torch.as_tensor(timestep).numel()
        if steps not in (1, n):
            raise ValueError(f"timestep must be one value or one per sample (N={n}); got {steps} values")
        s = cfg.image_scale
        expected = (n, cfg.conditioning_channels, s * h, s * w)
        if tuple(control_image.shape) != expected:
            raise ValueError(
                f"control_image must be (N, {cfg.conditioning_channels}, {s}h, {s}w) = {expected} for latents "
                f"{tuple(sample.shape)}; got {tuple(control_image.shape)}: resize the control frames to the video size"
            )
        if control_image.min() < 0:
            raise ValueError(f"control_image values must be in [0, 1] (MuseV feeds control frames unnormalised); "
                             f"got a minimum of {control_image.min().item():.3g}: pass pixels / 255, not [-1, 1]")


class MultiControlNet(nn.Module):
    """Several ControlNets on the same latents (MuseV's MultiControlNetModel): each gets its own control
    image and scale, and their residuals are summed."""

    def __init__(self, nets: Sequence[ControlNet]):
        super().__init__()
        sizes = {(net.config.block_out_channels, net.config.cross_attention_dim) for net in nets}
        if not sizes:
            raise ValueError("MultiControlNet needs at least one ControlNet")
        if len(sizes) > 1:
            raise ValueError(f"ControlNets of different sizes (block_out_channels, cross_attention_dim) "
                             f"{sorted(sizes)} cannot be combined: their residuals go to the same UNet")
        self.nets = nn.ModuleList(nets)

    def forward(self, sample: torch.Tensor, timestep, text: torch.Tensor, control_images: Sequence[torch.Tensor],
                conditioning_scales: Sequence[float]) -> ControlResiduals:
        """As ControlNet.forward, with one control image and one scale per net, in the order of the nets."""
        if not len(control_images) == len(conditioning_scales) == len(self.nets):
            raise ValueError(f"{len(self.nets)} ControlNets need as many control images and scales; got "
                             f"{len(control_images)} images and {len(conditioning_scales)} scales")
        total = None
        for net, image, scale in zip(self.nets, control_images, conditioning_scales):
            res = net(sample, timestep, text, image, scale)
            total = res if total is None else ControlResiduals(
                [a + b for a, b in zip(total.down, res.down)], total.mid + res.mid)
        return total


def controlnet_keep(step: int, steps: int, start: float, end: float) -> float:
    """1.0 if sampler step `step` (0-based, of `steps`) lies inside [start, end] of the schedule, else 0.0:
    the factor on the conditioning scale for `control_guidance_start/end`, computed as diffusers and
    MuseV do (step / steps < start or (step + 1) / steps > end switches the ControlNet off)."""
    return 0.0 if step / steps < start or (step + 1) / steps > end else 1.0
