"""IP-Adapter's image projections: an image (or face) embedding -> a few "image prompt" tokens.

`ImageProjection`: one CLIP image embedding -> tokens for the UNet's decoupled cross-attention
(`to_k_ip` / `to_v_ip`), also the ReferenceNet's cross-attention context. Keys `proj.*`, `norm.*`, as the
`image_proj` entry of the published `ip_adapter_image_proj.bin`.

`FaceProjection`: IPAdapterFaceID's MLP (IP-Adapter's MLPProjModel): a 512-d L2-normalised ArcFace
embedding -> 4 tokens for the UNet's face branch (`ip_adapter_face_to_k_ip` / `_v_ip`). Keys `proj.0.*`,
`proj.2.*`, `norm.*`, as the `image_proj` entry of the published `ip-adapter-faceid_sd15.bin`.
`face_embedding_checked` is the check every face embedding passes, from a file or from Python.

For classifier-free guidance the unconditional tokens of both are the projection of a zero embedding, not
zeros (docs/method.md#referencenet-and-ip-adapter).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

FACE_EMBEDDING_DIM = 512  # insightface's ArcFace (buffalo_l) `normed_embedding`


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


@dataclass
class FaceProjectionConfig:
    id_embeddings_dim: int = FACE_EMBEDDING_DIM
    cross_attention_dim: int = 768  # the UNet's text width
    num_tokens: int = 4


class FaceProjection(nn.Module):
    """Linear (d -> 2d), GELU, Linear (2d -> n*D), LayerNorm over each of the n tokens."""

    def __init__(self, config: FaceProjectionConfig):
        super().__init__()
        self.config = config
        d, width = config.id_embeddings_dim, config.cross_attention_dim
        self.proj = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, config.num_tokens * width))
        self.norm = nn.LayerNorm(width)

    def forward(self, face_embeds: torch.Tensor) -> torch.Tensor:
        """(B, id_dim) -> (B, num_tokens, cross_attention_dim)"""
        tokens = self.proj(face_embeds).unflatten(-1, (self.config.num_tokens, self.config.cross_attention_dim))
        return self.norm(tokens)


class FaceEmbeddingError(ValueError):
    """A face embedding that is not one 512-d ArcFace vector."""


def face_embedding_checked(embedding, source: str, dim: int = FACE_EMBEDDING_DIM) -> torch.Tensor:
    """A face embedding as a float32 (dim,) tensor of L2 norm 1: insightface's `normed_embedding` (what MuseV's
    extractor passes on) as it is, or its raw `embedding` (norm ~20-30), divided by its norm as insightface
    does. Anything else (another size, NaN or infinity, all zeros) is a FaceEmbeddingError naming `source`."""
    how = "make it with insightface (README: IPAdapterFaceID), np.save(path, face.normed_embedding)"
    if isinstance(embedding, (str, os.PathLike)):
        raise FaceEmbeddingError(f"{source}: give the vector, not a file name ({str(embedding)!r:.60}): "
                                 "torch.from_numpy(np.load(path)), or input.face_embedding in a run configuration")
    try:
        x = torch.as_tensor(embedding)
    except (TypeError, ValueError, RuntimeError):
        raise FaceEmbeddingError(f"{source}: a face embedding must be a {dim}-d vector of numbers, got "
                                 f"{type(embedding).__name__}; {how}") from None
    if x.dtype == torch.bool or not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
        raise FaceEmbeddingError(f"{source}: a face embedding must hold numbers, got {x.dtype}; {how}")
    if x.numel() != dim or x.squeeze().ndim != 1:
        raise FaceEmbeddingError(f"{source}: a face embedding is one {dim}-d ArcFace vector, got shape "
                                 f"{tuple(x.shape)}; {how}")
    x = x.detach().reshape(dim).to("cpu", torch.float32)
    if not torch.isfinite(x).all():
        raise FaceEmbeddingError(f"{source}: the face embedding holds NaN or infinity; {how}")
    if not x.any():
        raise FaceEmbeddingError(f"{source}: the face embedding is all zeros (no face was found?); {how}")
    norm = x.norm()
    return x if abs(norm.item() - 1) <= 1e-3 else x / norm
