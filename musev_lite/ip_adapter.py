"""IP-Adapter's image projection: one CLIP image embedding -> a few "image prompt" tokens.

The tokens feed the UNet's decoupled cross-attention (`to_k_ip` / `to_v_ip`) and are the
ReferenceNet's cross-attention context. For classifier-free guidance the unconditional tokens are
the projection of a zero embedding, not zeros (docs/method.md#referencenet-and-ip-adapter).
Keys: `proj.*`, `norm.*`, as the `image_proj` entry of the published `ip_adapter_image_proj.bin`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ImageProjectionConfig:
    clip_embeddings_dim: int = 1024  # CLIP ViT-H/14 image_embeds
    cross_attention_dim: int = 768  # the UNet's text width
    num_tokens: int = 4


class ImageProjection(nn.Module):
    def __init__(self, config: ImageProjectionConfig):
        super().__init__()
        self.config = config
        self.proj = nn.Linear(config.clip_embeddings_dim, config.num_tokens * config.cross_attention_dim)
        self.norm = nn.LayerNorm(config.cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, clip_dim) -> (B, num_tokens, cross_attention_dim)"""
        tokens = self.proj(image_embeds).unflatten(-1, (self.config.num_tokens, self.config.cross_attention_dim))
        return self.norm(tokens)
