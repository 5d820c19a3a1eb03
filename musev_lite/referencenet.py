"""ReferenceNet: an SD1.5 UNet cut after its mid block, run once on the reference image's latent.

Its feature maps (after conv_in, every down layer, every downsampler, and the mid block) are what
the video UNet fuses by attention (`refer_emb_attns`) so every frame can copy appearance from the
reference. The released ReferenceNet has no up path, plain SD ResNets, and uses the IP-Adapter image
tokens, not the text, as its cross-attention context, at timestep 0 (docs/method.md#referencenet-and-ip-adapter).
Keys are SD1.5's (`conv_in`, `time_embedding`, `down_blocks`, `mid_block`).
"""

from __future__ import annotations

import torch
from torch import nn

from .unet import (
    DownBlock,
    FrameContext,
    MidBlock,
    ReferenceFeatures,
    TimestepEmbedding,
    UNet3DConfig,
    check_context,
    sinusoidal_embedding,
)


class ReferenceNet(nn.Module):
    """Built from the sizes of a UNet3DConfig; its temporal / fusion / IP switches do not apply here."""

    def __init__(self, cfg: UNet3DConfig):
        super().__init__()
        self.config = cfg
        chs = cfg.block_out_channels
        levels = len(chs)
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chs[0], 4 * chs[0])
        self.down_blocks = nn.ModuleList(
            DownBlock(chs[max(i - 1, 0)], chs[i], cfg, attention=i < levels - 1, downsample=i < levels - 1,
                      temporal=False, refer=False, ip=False, skip_time_act=False)
            for i in range(levels)
        )
        self.mid_block = MidBlock(chs[-1], cfg, temporal=False, ip=False, skip_time_act=False)

    def forward(self, latent: torch.Tensor, timestep, context: torch.Tensor) -> ReferenceFeatures:
        """latent (B,4,h,w), context (B,n,D) -> 12 down-path maps and the mid-block map, batch B."""
        if latent.ndim != 4 or latent.shape[1] != self.config.in_channels:
            raise ValueError(f"latent must be (B, {self.config.in_channels}, h, w); got shape {tuple(latent.shape)}")
        check_context(context, latent.shape[0], self.config.cross_attention_dim, "context")
        dtype = self.conv_in.weight.dtype
        timestep = torch.as_tensor(timestep, device=latent.device).reshape(-1).expand(latent.shape[0])
        emb = self.time_embedding(sinusoidal_embedding(timestep, self.config.block_out_channels[0]).to(dtype))
        ctx = FrameContext(num_frames=1, condition_frames=0, text=context.to(dtype), frame_emb=None)
        x = self.conv_in(latent.to(dtype))
        down = [x]
        for block in self.down_blocks:
            x, skips = block(x, emb, ctx)
            down.extend(skips)
        return ReferenceFeatures(down, self.mid_block(x, emb, ctx))
