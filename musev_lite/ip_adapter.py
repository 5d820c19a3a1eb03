"""IP-Adapter's image projections: an image (or face) embedding -> a few "image prompt" tokens for the UNet.

The tokens feed the UNet's decoupled cross-attention (`to_k_ip` / `to_v_ip` beside each spatial attn2) and
are the ReferenceNet's cross-attention context. For classifier-free guidance the unconditional tokens are
the projection of a zero feature, not zeros, as MuseV makes them (docs/method.md#referencenet-and-ip-adapter).

Three projections, by the feature they read:
  * `ImageProjection` (IP-Adapter's ImageProjModel): the projected CLIP `image_embeds` (B, 1024) -> a linear
    layer -> LayerNorm, 4 tokens. The referencenet models' own (`ip_adapter_image_proj.bin`) and h94's
    `ip-adapter_sd15`. Keys `proj.*`, `norm.*`.
  * `Resampler` (IP-Adapter's "plus" models, `ip-adapter-plus_sd15`, `ip-adapter-plus-face_sd15`): the CLIP
    vision tower's penultimate hidden states (B, 257, 1280) -> 16 learned queries that read them through
    a few perceiver layers -> 16 tokens. Keys `latents`, `proj_in.*`, `layers.<i>.0.*` (attention),
    `layers.<i>.1.*` (feed-forward), `proj_out.*`, `norm_out.*`, as the published files' `image_proj` group.
  * `FaceProjection` (IPAdapterFaceID's MLP, IP-Adapter's MLPProjModel): a 512-d L2-normalised ArcFace
    embedding -> 4 tokens for the UNet's face branch (`ip_adapter_face_to_k_ip` / `_v_ip`). Keys `proj.0.*`,
    `proj.2.*`, `norm.*`, as the `image_proj` entry of the published `ip-adapter-faceid_sd15.bin`.
    `face_embedding_checked` is the check every face embedding passes, from a file or from Python.
`IPAdapterConfig` describes the `ip_adapter` component a converted IP-Adapter adds to a weights folder
of the plain `musev` model: its UNet's IP branch, and which projection makes its tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PROJECTIONS = ("image_proj", "resampler")  # the weights-folder component that makes an IP-Adapter's tokens


@dataclass
class IPAdapterConfig:
    """The `ip_adapter` component: `to_k_ip` / `to_v_ip` for every spatial attn2 of a UNet that has none of
    its own, with the projection (a component of the same folder) whose tokens they read."""

    projection: str = "image_proj"  # one of PROJECTIONS: image_proj reads image_embeds, resampler hidden states
    num_tokens: int = 4
    source: str = ""  # the published file it was converted from


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


# ---------------------------------------------------------------------------------------------
# The plus models' Resampler


@dataclass
class ResamplerConfig:
    """ip-adapter-plus(-face)_sd15 by default: IP-Adapter builds it with depth 4, 12 heads of 64, 16 queries."""

    embedding_dim: int = 1280  # the CLIP vision tower's hidden size (ViT-H/14)
    dim: int = 768  # the queries' width inside the resampler
    output_dim: int = 768  # the UNet's cross_attention_dim
    depth: int = 4
    heads: int = 12
    dim_head: int = 64
    num_queries: int = 16  # = the number of tokens
    ff_mult: int = 4

    @property
    def cross_attention_dim(self) -> int:  # the name the weights folder's width checks use
        return self.output_dim


class PerceiverAttention(nn.Module):
    """The queries attend to the image features and to themselves: K/V = [features; queries], each
    normalised by its own LayerNorm first. No biases."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)  # for the image features
        self.norm2 = nn.LayerNorm(dim)  # for the queries
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)  # [K | V] in one matrix, as published
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, features: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """features (B, N, dim), queries (B, Q, dim) -> (B, Q, dim)"""
        features, queries = self.norm1(features), self.norm2(queries)
        q = self.to_q(queries)  # B Q inner
        k, v = self.to_kv(torch.cat([features, queries], dim=1)).chunk(2, dim=-1)  # B (N+Q) inner, each

        def heads(x):  # B L inner -> B heads L d
            return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))  # softmax(q k^T / sqrt(d)) v
        return self.to_out(out.transpose(1, 2).flatten(2))  # B Q inner -> B Q dim


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """LayerNorm -> Linear(dim, mult*dim) -> GELU -> Linear(mult*dim, dim), no biases; keys .0, .1, .3"""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, mult * dim, bias=False), nn.GELU(),
                         nn.Linear(mult * dim, dim, bias=False))


class Resampler(nn.Module):
    """num_queries learned queries read the image features through `depth` perceiver layers (attention, then
    feed-forward, each added to the queries), then are projected to the UNet's width and normalised."""

    def __init__(self, config: ResamplerConfig):
        super().__init__()
        self.config = config
        c = config
        self.latents = nn.Parameter(torch.zeros(1, c.num_queries, c.dim))  # the learned queries
        self.proj_in = nn.Linear(c.embedding_dim, c.dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(c.dim, c.heads, c.dim_head), feed_forward(c.dim, c.ff_mult)])
            for _ in range(c.depth)
        )
        self.proj_out = nn.Linear(c.dim, c.output_dim)
        self.norm_out = nn.LayerNorm(c.output_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, N, embedding_dim) CLIP hidden states -> (B, num_queries, output_dim) tokens"""
        features = self.proj_in(hidden_states)  # B N dim
        queries = self.latents.expand(len(hidden_states), -1, -1)  # B Q dim
        for attention, ff in self.layers:
            queries = queries + attention(features, queries)
            queries = queries + ff(queries)
        return self.norm_out(self.proj_out(queries))  # B Q output_dim


# ---------------------------------------------------------------------------------------------
# IPAdapterFaceID's projection


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
