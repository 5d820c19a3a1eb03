"""MuseV's ReferenceNet: the down and mid path of an SD1.5 UNet, run once on the reference image.

Its 12 down-path activations and the mid-block output are fused into the video UNet by the
ReferEmbFuseAttention layers (spec §7). It is SD1.5's UNet2DConditionModel without up path and
output head (same key names), with MuseV's transformer-block LayerNorm eps quirk (§4.4). The
pipeline calls it at timestep 0 with the IP-Adapter image tokens as cross-attention context.
The blocks are the video UNet's, built without temporal layers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .unet import (
    DownBlock,
    FrameConditioning,
    MidBlock,
    ReferenceFeatures,
    TimestepEmbedding,
    UNet3DConfig,
    sd_structure_from_diffusers,
    timestep_embedding,
)

__all__ = ["ReferenceNet", "ReferenceNetConfig", "ReferenceFeatures"]


@dataclass
class ReferenceNetConfig:
    in_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    num_heads: int = 8  # diffusers' "attention_head_dim" (SD1.5 naming quirk)
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    transformer_norm1_norm3_eps: float = 0.0  # see UNet3DConfig
    transformer_norm2_eps: float = 1e-5

    @classmethod
    def preset(cls, name: str) -> ReferenceNetConfig:
        """`musev_referencenet` (also used with `musev_referencenet_pose`) or `tiny` test sizes."""
        presets = {
            "musev_referencenet": {},
            "musev_referencenet_pose": {},
            "tiny": dict(block_out_channels=(32, 32, 32, 32), num_heads=2, norm_num_groups=16, cross_attention_dim=32),
        }
        if name not in presets:
            raise ValueError(f"unknown ReferenceNet preset {name!r}; choose one of {', '.join(presets)}")
        return cls(**presets[name])

    @classmethod
    def from_diffusers(cls, config: dict) -> ReferenceNetConfig:
        """From the `referencenet/config.json` of a checkpoint (SD1.5 UNet layout)."""
        structure = sd_structure_from_diffusers(config)
        return cls(**{k: v for k, v in structure.items() if k in {f.name for f in dataclasses.fields(cls)}})

    def block_config(self) -> UNet3DConfig:
        """The same values as a UNet3DConfig with every MuseV flag off (plain SD1.5 blocks)."""
        return UNet3DConfig(**dataclasses.asdict(self))


class ReferenceNet(nn.Module):
    def __init__(self, config: ReferenceNetConfig):
        super().__init__()
        self.config = config
        cfg = config.block_config()
        ch = cfg.block_out_channels
        last = len(ch) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], 4 * ch[0])
        self.down_blocks = nn.ModuleList(
            DownBlock(cfg, ch[max(i - 1, 0)], ch[i], attention=i < last, downsample=i < last, temporal=False)
            for i in range(len(ch))
        )
        self.mid_block = MidBlock(cfg, ch[-1], temporal=False)

    def forward(self, latent: torch.Tensor, timestep: torch.Tensor | float, context: torch.Tensor) -> ReferenceFeatures:
        """latent (B,4,h,w), context (B,n,D) -> 12 down features [conv_in, then every down-block
        layer and downsampler output] and the mid-block output, each (B,C,h',w')."""
        cfg = self.config
        if latent.ndim != 4 or latent.shape[1] != cfg.in_channels:
            raise ValueError(f"latent must be (B, {cfg.in_channels}, h, w); got {tuple(latent.shape)}")
        if context.ndim != 3 or context.shape[0] != latent.shape[0] or context.shape[2] != cfg.cross_attention_dim:
            raise ValueError(
                f"context must be (B={latent.shape[0]}, n, {cfg.cross_attention_dim}); got {tuple(context.shape)}"
            )
        b = latent.shape[0]
        timesteps = torch.as_tensor(timestep, device=latent.device).reshape(-1).expand(b)
        emb = timestep_embedding(timesteps, cfg.block_out_channels[0]).to(self.conv_in.weight.dtype)
        ctx = FrameConditioning(
            num_frames=1, temb=self.time_embedding(emb), text=context, femb=None, condition_frames=0, temporal=False
        )
        x = self.conv_in(latent)
        down = [x]
        for block in self.down_blocks:
            x, states = block(x, ctx)
            down += states
        return ReferenceFeatures(down=down, mid=self.mid_block(x, ctx))
