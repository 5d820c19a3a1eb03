"""ReferenceNet: an SD1.5 UNet cut after its mid block, run once on the reference image's latent.

Its feature maps (after conv_in, every down layer, every downsampler, and the mid block) are what
the video UNet fuses by attention (`refer_emb_attns`) so every frame can copy appearance from the
reference. The released ReferenceNet has no up path, plain SD ResNets, and uses the IP-Adapter image
tokens, not the text, as its cross-attention context, at timestep 0 (docs/method.md#referencenet-and-ip-adapter).
Keys are SD1.5's (`conv_in`, `time_embedding`, `down_blocks`, `mid_block`); the down path is unet.py's.
"""

from __future__ import annotations

import torch
from torch import nn

from .unet import (
    MidBlock,
    ReferenceFeatures,
    SD15DownPath,
    TimestepEmbedding,
    UNet3DConfig,
    check_context,
    sd15_down_blocks,
)


class ReferenceNet(SD15DownPath):
    """Built from the sizes of a UNet3DConfig (kept as its config); its MuseV switches do not apply here."""

    def __init__(self, cfg: UNet3DConfig):
        super().__init__()
        self.config = cfg
        blocks = cfg.plain_blocks(cfg.transformer_norm_eps)  # MuseV's LayerNorm eps quirk included
        chs = cfg.block_out_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chs[0], 4 * chs[0])
        self.down_blocks = sd15_down_blocks(blocks, temporal=False)
        self.mid_block = MidBlock(chs[-1], blocks, temporal=False)

    def forward(self, latent: torch.Tensor, timestep, context: torch.Tensor) -> ReferenceFeatures:
        """latent (B,4,h,w), context (B,n,D) -> 12 down-path maps and the mid-block map, batch B."""
        if latent.ndim != 4 or latent.shape[1] != self.config.in_channels:
            raise ValueError(f"latent must be (B, {self.config.in_channels}, h, w); got shape {tuple(latent.shape)}")
        check_context(context, latent.shape[0], self.config.cross_attention_dim, "context")
        emb, ctx = self.still_inputs(latent, timestep, context)
        mid, down = self.down_path(self.conv_in(latent.to(self.conv_in.weight.dtype)), emb, ctx)
        return ReferenceFeatures(down, mid)
