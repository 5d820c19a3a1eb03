"""CLIP, both towers: the text encoder every SD1.5 model conditions on, and the image encoder of
IP-Adapter (OpenCLIP ViT-H/14) whose image embedding becomes the "image prompt" tokens.

Both are the same pre-LayerNorm transformer encoder; the text tower adds a causal mask and returns
every token's final hidden state (after the last LayerNorm, no clip-skip, as MuseV), the vision
tower embeds 14x14 patches plus a class token and returns the projected class token (IP-Adapter's
`image_embeds`), or, for the Resampler of IP-Adapter's plus models, every token's penultimate hidden state.
Keys are transformers' (`text_model.*`, `vision_model.*`, `visual_projection.weight`).
`clip_image_preprocess` reproduces transformers' default CLIPImageProcessor, which is what MuseV used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class CLIPTextConfig:
    """SD1.5's text encoder (OpenAI CLIP ViT-L/14 text tower) by default."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclass
class CLIPVisionConfig:
    """IP-Adapter's image encoder (OpenCLIP ViT-H/14 with projection) by default."""

    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    projection_dim: int = 1024
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5


ACTIVATIONS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu}


class CLIPAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, causal: bool):
        b, n, c = x.shape
        q, k, v = (p(x).unflatten(-1, (self.heads, c // self.heads)).transpose(1, 2) for p in
                   (self.q_proj, self.k_proj, self.v_proj))  # b heads n d
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class CLIPMLP(nn.Module):
    def __init__(self, dim: int, inner: int, act: str):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, inner), nn.Linear(inner, dim)
        self.act = ACTIVATIONS[act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer layer: x += attn(LN1 x); x += mlp(LN2 x)."""

    def __init__(self, cfg: CLIPTextConfig | CLIPVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg.hidden_size, cfg.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x, causal: bool):
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x, causal: bool):
        for layer in self.layers:
            x = layer(x, causal)
        return x


# ---------------------------------------------------------------------------------------------
# Text tower


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, ids):
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids):
        return self.final_layer_norm(self.encoder(self.embeddings(ids), causal=True))


class CLIPTextModel(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids, L <= 77 -> last hidden state (B, L, hidden_size)."""
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"{input_ids.shape[1]} tokens: the text encoder takes at most "
                             f"{self.config.max_position_embeddings}; split the prompt into chunks")
        return self.text_model(input_ids)


# ---------------------------------------------------------------------------------------------
# Vision tower


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2 + 1, cfg.hidden_size)

    def forward(self, pixels):
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # b (h w) c
        cls = self.class_embedding.expand(len(pixels), 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPVisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: the published key
        self.encoder = CLIPEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels):
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixels)), causal=False)
        return self.post_layernorm(x[:, 0])  # the class token


class CLIPVisionModelWithProjection(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.vision_model = CLIPVisionTransformer(config)
        self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual_projection.weight.dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> image_embeds (B, projection_dim)."""
        return self.visual_projection(self.vision_model(pixel_values.to(self.dtype)))

    def penultimate_hidden_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> (B, 1 + patches, hidden_size): every token after all encoder
        layers but the last, with no LayerNorm after them (transformers' `hidden_states[-2]`), what the
        Resampler of IP-Adapter's plus models reads."""
        vision = self.vision_model
        x = vision.pre_layrnorm(vision.embeddings(pixel_values.to(self.dtype)))
        for layer in vision.encoder.layers[:-1]:
            x = layer(x, causal=False)
        return x


def clip_image_preprocess(images, size: int = 224) -> torch.Tensor:
    """PIL images or uint8 (H,W,3) arrays -> (B,3,size,size), as transformers' CLIPImageProcessor():
    shortest side to `size` (bicubic), centre crop `size`, scale to [0,1], CLIP mean/std."""
    out = []
    for image in images:
        image = image.convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)
        new_w, new_h = (size, new_long) if w <= h else (new_long, size)
        image = image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        array = np.asarray(image, dtype=np.float32)[top : top + size, left : left + size] / 255.0
        out.append((array - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()
