"""MuseV's video UNet: the Stable Diffusion 1.5 UNet with temporal layers and visual conditioning.

The spatial part is SD1.5's UNet2DConditionModel, key for key, so any SD1.5 UNet state dict loads
into it. MuseV adds, per resolution level:

* a TemporalConvLayer after every ResNet and a TransformerTemporalModel after every spatial
  transformer (both gated by |temporal_weight|, both normalising over the whole window of frames);
* "reference-only" self-attention: every frame's spatial attn1 also attends to the tokens of the
  clean condition frame(s) placed at the start of the window (no parameters);
* for the referencenet variants: a decoupled IP-Adapter branch in every spatial cross-attention
  (to_k_ip/to_v_ip on CLIP image tokens), and ReferEmbFuseAttention layers that let the UNet attend
  to ReferenceNet features of a reference image.

Frames are flattened into the batch frame-major within each sample: row b*T + t, written "(b t)".
Spec: ../shared/spec/model.md (sections quoted as §n below).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .weights import WeightsError

SD_DOWN_BLOCKS = ("CrossAttnDownBlock", "CrossAttnDownBlock", "CrossAttnDownBlock", "DownBlock")
SD_UP_BLOCKS = ("UpBlock", "CrossAttnUpBlock", "CrossAttnUpBlock", "CrossAttnUpBlock")


@dataclass
class UNet3DConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    # diffusers calls this "attention_head_dim", but SD1.5 uses it as the number of heads (§2)
    num_heads: int = 8
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    # The original hard-codes GroupNorm(32, C) in TemporalConvLayer, and builds transformer_in with
    # the TransformerTemporalModel default of 32 groups, whatever norm_num_groups says (§6.1, §3.1).
    temporal_conv_norm_groups: int = 32
    transformer_in_norm_groups: int = 32
    # LayerNorm eps quirk of MuseV's BasicTransformerBlock (§4.4): a positional-argument mix-up gives
    # norm1 and norm3 eps 0.0; norm2 keeps 1e-5. Plain SD1.5 uses 1e-5 for all three.
    transformer_norm1_norm3_eps: float = 0.0
    transformer_norm2_eps: float = 1e-5
    # MuseV variant flags (§1); the defaults are a plain SD1.5 UNet plus temporal layers.
    transformer_in: bool = False  # a temporal transformer right after conv_in (`musev` only)
    anivv1_cfg: bool = False  # SiLU after the time and frame MLPs; frame index x motion_speed
    skip_time_act: bool = False  # ResNets skip their SiLU before time_emb_proj
    keep_vision_condition: bool = False  # condition frames get a zero time embedding
    refer_fusion: bool = False  # ReferEmbFuseAttention layers fed by the ReferenceNet
    ip_cross_attn: bool = False  # to_k_ip/to_v_ip (IP-Adapter) in every spatial cross-attention

    @classmethod
    def preset(cls, name: str) -> UNet3DConfig:
        """The released `musev`, `musev_referencenet` (= `musev_referencenet_pose`) UNets, or tiny
        test sizes of them: `tiny` (musev flags) and `tiny_referencenet`."""
        musev = dict(transformer_in=True)
        referencenet = dict(
            anivv1_cfg=True,
            skip_time_act=True,
            keep_vision_condition=True,
            refer_fusion=True,
            ip_cross_attn=True,
        )
        tiny = dict(block_out_channels=(32, 32, 32, 32), num_heads=2, norm_num_groups=16, cross_attention_dim=32)
        presets = {
            "musev": musev,
            "musev_referencenet": referencenet,
            "musev_referencenet_pose": referencenet,
            "tiny": {**tiny, **musev},
            "tiny_referencenet": {**tiny, **referencenet},
        }
        if name not in presets:
            raise ValueError(f"unknown UNet preset {name!r}; choose one of {', '.join(presets)}")
        return cls(**presets[name])

    @classmethod
    def from_diffusers(cls, config: dict, variant: str) -> UNet3DConfig:
        """Structure from a diffusers `unet/config.json` (UNet3DConditionModel or SD1.5's
        UNet2DConditionModel), MuseV flags from `variant`: the original loader passes the flags
        explicitly, overriding whatever the checkpoint's config.json says (§1)."""
        flags = {f.name: getattr(cls.preset(variant), f.name) for f in dataclasses.fields(cls)}
        return cls(**{**flags, **sd_structure_from_diffusers(config)})


def sd_structure_from_diffusers(config: dict) -> dict:
    """SD1.5-layout structural values of a diffusers UNet config.json (shared with ReferenceNet)."""
    down = tuple(t.replace("2D", "").replace("3D", "") for t in config.get("down_block_types", SD_DOWN_BLOCKS))
    up = tuple(t.replace("2D", "").replace("3D", "") for t in config.get("up_block_types", SD_UP_BLOCKS))
    if down != SD_DOWN_BLOCKS or up != SD_UP_BLOCKS:
        raise WeightsError(
            f"unet config.json: block types {down} / {up} are not the SD1.5 layout {SD_DOWN_BLOCKS} / "
            f"{SD_UP_BLOCKS}; only SD1.5-style UNets are supported"
        )
    heads = config.get("attention_head_dim", 8)
    if isinstance(heads, (list, tuple)):
        if len(set(heads)) != 1:
            raise WeightsError(f"unet config.json: attention_head_dim {heads} differs per block; expected one value")
        heads = heads[0]
    return dict(
        in_channels=config.get("in_channels", 4),
        out_channels=config.get("out_channels", 4),
        block_out_channels=tuple(config.get("block_out_channels", (320, 640, 1280, 1280))),
        layers_per_block=config.get("layers_per_block", 2),
        num_heads=heads,
        norm_num_groups=config.get("norm_num_groups", 32),
        norm_eps=config.get("norm_eps", 1e-5),
        cross_attention_dim=config.get("cross_attention_dim", 768),
    )


class ReferenceFeatures(NamedTuple):
    """ReferenceNet outputs for the UNet: 12 down-path tensors (B,C,h',w') and the mid block (§7.2)."""

    down: list[torch.Tensor]
    mid: torch.Tensor


@dataclass
class FrameConditioning:
    """Everything the blocks need besides the hidden states, prepared once per forward."""

    num_frames: int  # T
    temb: torch.Tensor  # (b t) d: time embedding per frame row
    text: torch.Tensor  # b l d: cross-attention context
    femb: torch.Tensor | None  # t d: frame-position embedding, None when temporal layers are off
    condition_frames: int  # clean condition frames at the start of the window (0 = none)
    temporal: bool  # run the temporal layers (False = the plain 2D UNet)
    ip_tokens: torch.Tensor | None = None  # b n d: IP-Adapter image tokens
    ip_scale: float = 1.0


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (N,) -> (N, dim), [cos | sin] (diffusers flip_sin_to_cos=True, shift 0).
    Timesteps may be fractional."""
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps[:, None].float() * torch.exp(exponent)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def multihead_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v per head: q (N,Lq,C), k/v (N,Lk,C) -> (N,Lq,C)."""
    n, length, channels = q.shape
    q, k, v = (x.unflatten(-1, (heads, -1)).transpose(1, 2) for x in (q, k, v))  # n heads l d
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(n, length, channels)


# ---------------------------------------------------------------------------------------------
# SD1.5 building blocks


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, temb_dim: int, cfg: UNet3DConfig):
        super().__init__()
        self.skip_time_act = cfg.skip_time_act
        self.norm1 = nn.GroupNorm(cfg.norm_num_groups, in_channels, eps=cfg.norm_eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, out_channels)
        self.norm2 = nn.GroupNorm(cfg.norm_num_groups, out_channels, eps=cfg.norm_eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        # skip_time_act models applied the SiLU once to the whole embedding already (§4.1)
        temb = temb if self.skip_time_act else F.silu(temb)
        h = h + self.time_emb_proj(temb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class Downsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        # nearest to the size of the skip it meets (= x2 when the latent size is a multiple of 8)
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class Attention(nn.Module):
    """Multi-head attention with diffusers' key names (Q/K/V without bias, to_out.0 with bias)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, ip_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        if ip_dim is not None:  # decoupled IP-Adapter keys/values (§4.6)
            self.to_k_ip = nn.Linear(ip_dim, dim, bias=False)
            self.to_v_ip = nn.Linear(ip_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Plain self-attention over the token axis: (N, L, C) -> (N, L, C)."""
        return self.to_out[0](multihead_attention(self.to_q(x), self.to_k(x), self.to_v(x), self.heads))

    def self_attention_with_condition_frames(self, x: torch.Tensor, ctx: FrameConditioning) -> torch.Tensor:
        """Spatial attn1 (§4.5): frame t of sample b attends to its own hw tokens plus the tokens
        of the condition frames of sample b. x: (b t) hw c."""
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        t, n_cond = ctx.num_frames, ctx.condition_frames
        if n_cond > 0 and t > 1:
            k, v = (_append_condition_tokens(z, t, n_cond) for z in (k, v))
        return self.to_out[0](multihead_attention(q, k, v, self.heads))

    def cross_attention(self, x: torch.Tensor, ctx: FrameConditioning) -> torch.Tensor:
        """Spatial attn2: text cross-attention, plus ip_scale x attention to the IP-Adapter tokens
        (§4.6). Every frame of sample b sees the same context, so queries are grouped per sample.
        x: (b t) hw c."""
        bt, tokens, channels = x.shape
        q = self.to_q(x).reshape(bt // ctx.num_frames, ctx.num_frames * tokens, channels)  # b (t hw) c
        out = multihead_attention(q, self.to_k(ctx.text), self.to_v(ctx.text), self.heads)
        if ctx.ip_tokens is not None and ctx.ip_scale > 0:
            ip = ctx.ip_tokens
            out = out + ctx.ip_scale * multihead_attention(q, self.to_k_ip(ip), self.to_v_ip(ip), self.heads)
        return self.to_out[0](out.reshape(bt, tokens, channels))


def _append_condition_tokens(z: torch.Tensor, num_frames: int, n_cond: int) -> torch.Tensor:
    """(b t) n c -> (b t) (n + n_cond n) c: each frame's tokens followed by its sample's
    condition-frame tokens."""
    bt, n, c = z.shape
    z = z.view(bt // num_frames, num_frames, n, c)  # b t n c
    cond = z[:, :n_cond].reshape(-1, 1, n_cond * n, c).expand(-1, num_frames, -1, -1)  # b t (k n) c
    return torch.cat([z, cond], dim=2).flatten(0, 1)


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        # net.1 is a dropout in diffusers (identity at inference); kept so net.2 keeps its key
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, second attention, GEGLU feed-forward, each with a residual.

    Spatial blocks (context_dim given): attn1 with condition-frame tokens, attn2 on the text (+IP).
    Temporal blocks (context_dim None): attn1 and attn2 are both self-attention over frames."""

    def __init__(self, dim: int, heads: int, cfg: UNet3DConfig, context_dim: int | None = None, ip_dim: int | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=cfg.transformer_norm1_norm3_eps)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.transformer_norm2_eps)
        self.attn2 = Attention(dim, heads, context_dim, ip_dim)
        self.norm3 = nn.LayerNorm(dim, eps=cfg.transformer_norm1_norm3_eps)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, ctx: FrameConditioning | None = None) -> torch.Tensor:
        # The original recomputes attn1 for the unconditional CFG half and then discards the result
        # (§4.4); that dead branch is left out.
        if ctx is None:
            x = x + self.attn1(self.norm1(x))
            x = x + self.attn2(self.norm2(x))
        else:
            x = x + self.attn1.self_attention_with_condition_frames(self.norm1(x), ctx)
            x = x + self.attn2.cross_attention(self.norm2(x), ctx)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """SD1.5 spatial transformer: GroupNorm, 1x1 conv in, one block over the h*w tokens of every
    frame, 1x1 conv out, residual (§4.3)."""

    def __init__(self, dim: int, cfg: UNet3DConfig):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_num_groups, dim, eps=1e-6)
        self.proj_in = nn.Conv2d(dim, dim, 1)
        ip_dim = cfg.cross_attention_dim if cfg.ip_cross_attn else None
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(dim, cfg.num_heads, cfg, cfg.cross_attention_dim, ip_dim)]
        )
        self.proj_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, ctx: FrameConditioning) -> torch.Tensor:
        bt, c, h, w = x.shape
        y = self.proj_in(self.norm(x)).permute(0, 2, 3, 1).reshape(bt, h * w, c)  # (b t) (h w) c
        y = self.transformer_blocks[0](y, ctx)
        y = y.reshape(bt, h, w, c).permute(0, 3, 1, 2)  # (b t) c h w
        return self.proj_out(y) + x


# ---------------------------------------------------------------------------------------------
# MuseV's temporal and reference layers


class TemporalConvLayer(nn.Module):
    """Four GroupNorm -> SiLU -> Conv3d(3,1,1) stages over time, gated residual (§6.1).
    The GroupNorm statistics span all frames of the window, the condition frame included."""

    def __init__(self, dim: int, groups: int):
        super().__init__()

        def stage(dropout_slot: bool) -> nn.Sequential:
            # keys conv1.{0,2}, conv{2,3,4}.{0,3}: index 2 of conv2-4 is a dropout in the original
            layers = [nn.GroupNorm(groups, dim), nn.SiLU(), nn.Conv3d(dim, dim, (3, 1, 1), padding=(1, 0, 0))]
            return nn.Sequential(*layers[:2], nn.Identity(), layers[2]) if dropout_slot else nn.Sequential(*layers)

        self.conv1 = stage(False)
        self.conv2 = stage(True)
        self.conv3 = stage(True)
        self.conv4 = stage(True)
        self.temporal_weight = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        bt, c, h, w = x.shape
        x5 = x.view(bt // num_frames, num_frames, c, h, w).transpose(1, 2)  # b c t h w
        y = self.conv4(self.conv3(self.conv2(self.conv1(x5))))
        return (x5 + self.temporal_weight.abs() * y).transpose(1, 2).reshape(bt, c, h, w)


class TransformerTemporalModel(nn.Module):
    """Attention over the frames of every pixel (§5): 5-D GroupNorm (eps 1e-6) over the window,
    linear in, + projected frame embedding, a block with two self-attentions over T, linear out,
    gated residual."""

    def __init__(self, dim: int, femb_dim: int, groups: int, cfg: UNet3DConfig):
        super().__init__()
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, dim)
        self.frame_emb_proj = nn.Linear(femb_dim, dim)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(dim, cfg.num_heads, cfg)])
        self.proj_out = nn.Linear(dim, dim)
        self.temporal_weight = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor, ctx: FrameConditioning) -> torch.Tensor:
        bt, c, h, w = x.shape
        t = ctx.num_frames
        b = bt // t
        x5 = x.view(b, t, c, h, w)
        y = self.norm(x5.transpose(1, 2))  # b c t h w: statistics over the whole window
        y = y.permute(0, 3, 4, 2, 1).reshape(b * h * w, t, c)  # (b h w) t c
        # the frame embedding is the same for every sample and pixel: (t, c) broadcasts
        y = self.proj_in(y) + self.frame_emb_proj(F.silu(ctx.femb))
        y = self.transformer_blocks[0](y)
        y = self.proj_out(y).view(b, h, w, t, c).permute(0, 3, 4, 1, 2)  # b t c h w
        return (x5 + self.temporal_weight.abs() * y).reshape(bt, c, h, w)


class ReferEmbFuseAttention(Attention):
    """Fuses ReferenceNet features (§6.2): queries = the UNet tokens of each frame (no norm),
    keys/values = the reference tokens of that sample followed by the frame's own tokens; residual."""

    def forward(self, x: torch.Tensor, refer: torch.Tensor, num_frames: int) -> torch.Tensor:
        bt, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (b t) (h w) c
        refer = refer.flatten(2).transpose(1, 2)  # b (h' w') c

        def keys_values(proj: nn.Linear) -> torch.Tensor:
            ref = proj(refer).repeat_interleave(num_frames, dim=0)  # (b t) (h' w') c
            return torch.cat([ref, proj(tokens)], dim=1)

        out = multihead_attention(self.to_q(tokens), keys_values(self.to_k), keys_values(self.to_v), self.heads)
        return self.to_out[0](out).transpose(1, 2).reshape(bt, c, h, w) + x


# ---------------------------------------------------------------------------------------------
# UNet blocks. `temporal=False` builds them without temporal layers (the ReferenceNet).
# The AdaIN "temporal cond" the original calls after every layer returns its input unchanged
# (§6.7), so it is not here.


def _temporal_convs(dim: int, n: int, cfg: UNet3DConfig, temporal: bool) -> nn.ModuleList | None:
    return nn.ModuleList(TemporalConvLayer(dim, cfg.temporal_conv_norm_groups) for _ in range(n)) if temporal else None


def _temporal_attentions(dim: int, n: int, cfg: UNet3DConfig, temporal: bool) -> nn.ModuleList | None:
    femb_dim = 4 * cfg.block_out_channels[0]
    layers = (TransformerTemporalModel(dim, femb_dim, cfg.norm_num_groups, cfg) for _ in range(n))
    return nn.ModuleList(layers) if temporal else None


class DownBlock(nn.Module):
    """CrossAttnDownBlock3D / DownBlock3D: per layer resnet -> temp_conv -> [attention ->
    temp_attention] -> refer fusion, then the downsampler -> refer fusion; every output is a skip."""

    def __init__(self, cfg: UNet3DConfig, in_ch: int, out_ch: int, attention: bool, downsample: bool, temporal: bool):
        super().__init__()
        n = cfg.layers_per_block
        temb_dim = 4 * cfg.block_out_channels[0]
        self.resnets = nn.ModuleList(ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, temb_dim, cfg) for j in range(n))
        self.temp_convs = _temporal_convs(out_ch, n, cfg, temporal)
        self.attentions = nn.ModuleList(Transformer2DModel(out_ch, cfg) for _ in range(n)) if attention else None
        self.temp_attentions = _temporal_attentions(out_ch, n, cfg, temporal and attention)
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch)]) if downsample else None
        n_fuse = n + int(downsample)
        self.refer_emb_attns = (
            nn.ModuleList(ReferEmbFuseAttention(out_ch, cfg.num_heads) for _ in range(n_fuse)) if cfg.refer_fusion else None
        )

    def forward(self, x, ctx: FrameConditioning, refer: list[torch.Tensor] | None = None):
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, ctx.temb)
            if ctx.temporal and self.temp_convs is not None:
                x = self.temp_convs[j](x, ctx.num_frames)
            if self.attentions is not None:
                x = self.attentions[j](x, ctx)
                if ctx.temporal and self.temp_attentions is not None:
                    x = self.temp_attentions[j](x, ctx)
            if refer is not None:
                x = self.refer_emb_attns[j](x, refer[j], ctx.num_frames)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            if refer is not None:
                x = self.refer_emb_attns[-1](x, refer[-1], ctx.num_frames)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """UNetMidBlock3DCrossAttn: resnet -> temp_conv -> attention -> temp_attention -> resnet -> temp_conv."""

    def __init__(self, cfg: UNet3DConfig, channels: int, temporal: bool):
        super().__init__()
        temb_dim = 4 * cfg.block_out_channels[0]
        self.resnets = nn.ModuleList(ResnetBlock2D(channels, channels, temb_dim, cfg) for _ in range(2))
        self.temp_convs = _temporal_convs(channels, 2, cfg, temporal)
        self.attentions = nn.ModuleList([Transformer2DModel(channels, cfg)])
        self.temp_attentions = _temporal_attentions(channels, 1, cfg, temporal)

    def forward(self, x: torch.Tensor, ctx: FrameConditioning) -> torch.Tensor:
        run_temporal = ctx.temporal and self.temp_convs is not None
        x = self.resnets[0](x, ctx.temb)
        if run_temporal:
            x = self.temp_convs[0](x, ctx.num_frames)
        x = self.attentions[0](x, ctx)
        if run_temporal:
            x = self.temp_attentions[0](x, ctx)
        x = self.resnets[1](x, ctx.temb)
        if run_temporal:
            x = self.temp_convs[1](x, ctx.num_frames)
        return x


class UpBlock(nn.Module):
    """UpBlock3D / CrossAttnUpBlock3D: per layer concat a skip -> resnet -> temp_conv ->
    [attention -> temp_attention]; then the upsampler."""

    def __init__(self, cfg, in_ch: int, prev_ch: int, out_ch: int, attention: bool, upsample: bool, temporal: bool):
        super().__init__()
        n = cfg.layers_per_block + 1
        temb_dim = 4 * cfg.block_out_channels[0]
        self.resnets = nn.ModuleList(
            ResnetBlock2D((prev_ch if j == 0 else out_ch) + (in_ch if j == n - 1 else out_ch), out_ch, temb_dim, cfg)
            for j in range(n)
        )
        self.temp_convs = _temporal_convs(out_ch, n, cfg, temporal)
        self.attentions = nn.ModuleList(Transformer2DModel(out_ch, cfg) for _ in range(n)) if attention else None
        self.temp_attentions = _temporal_attentions(out_ch, n, cfg, temporal and attention)
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if upsample else None

    def forward(self, x, skips: list[torch.Tensor], ctx: FrameConditioning, upsample_size=None):
        for j, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips[-1 - j]], dim=1), ctx.temb)
            if ctx.temporal and self.temp_convs is not None:
                x = self.temp_convs[j](x, ctx.num_frames)
            if self.attentions is not None:
                x = self.attentions[j](x, ctx)
                if ctx.temporal and self.temp_attentions is not None:
                    x = self.temp_attentions[j](x, ctx)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


# ---------------------------------------------------------------------------------------------
# The model


class UNet3D(nn.Module):
    """MuseV's UNet3DConditionModel for the released variants.

    Not implemented because the released models compute nothing with them: the spatial position
    embedding (§6.5), the AdaIN temporal cond (§6.7), the discarded CFG attn1 recompute (§4.4),
    need_zero_vis_cond_temb (never read, §1), keep_content_condition masks and ReferenceNet
    self-attention features (§5, §7.2)."""

    def __init__(self, config: UNet3DConfig):
        super().__init__()
        self.config = cfg = config
        ch = cfg.block_out_channels
        temb_dim = 4 * ch[0]
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb_dim)
        self.frame_embedding = TimestepEmbedding(ch[0], temb_dim)
        self.transformer_in = (
            TransformerTemporalModel(ch[0], temb_dim, cfg.transformer_in_norm_groups, cfg) if cfg.transformer_in else None
        )
        if cfg.refer_fusion:
            self.first_refer_emb_attns = ReferEmbFuseAttention(ch[0], cfg.num_heads)
            self.mid_block_refer_emb_attns = ReferEmbFuseAttention(ch[-1], cfg.num_heads)
        last = len(ch) - 1
        self.down_blocks = nn.ModuleList(
            DownBlock(cfg, ch[max(i - 1, 0)], ch[i], attention=i < last, downsample=i < last, temporal=True)
            for i in range(len(ch))
        )
        self.mid_block = MidBlock(cfg, ch[-1], temporal=True)
        rev = ch[::-1]
        self.up_blocks = nn.ModuleList(
            UpBlock(cfg, rev[min(i + 1, last)], rev[max(i - 1, 0)], rev[i], attention=i > 0, upsample=i < last, temporal=True)
            for i in range(len(ch))
        )
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def refer_features_for_block(self, refer: ReferenceFeatures, i: int) -> list[torch.Tensor]:
        """ReferenceNet down features fused into down block i (§7.3).

        Reproduces the original's slicing `start = 1 + n * i` with n = layers + 1 for blocks with a
        downsampler but n = layers for the last block: with 2 layers per block, down_blocks.3 gets
        features 7, 8 (down_blocks.2's layers, at twice its resolution) instead of 10, 11. The
        released weights were trained this way, so it is kept."""
        is_last = i == len(self.down_blocks) - 1
        n = self.config.layers_per_block + (0 if is_last else 1)
        start = 1 + n * i
        return refer.down[start : start + n]

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        text: torch.Tensor,
        *,
        condition_frames: int = 1,
        motion_speed: float = 8.0,
        ip_tokens: torch.Tensor | None = None,
        ip_scale: float = 1.0,
        refer: ReferenceFeatures | None = None,
        temporal: bool = True,
    ) -> torch.Tensor:
        """Noise prediction (B,4,T,h,w) for sample (B,4,T,h,w) whose first `condition_frames` frames
        are clean condition latents. `temporal=False` is the 2D (text-to-image) mode: every temporal
        layer is skipped; reference-only attention and the zero condition-frame time embedding then
        only act if T > 1 (as in the original); IP-Adapter and refer fusion stay active."""
        self._check_inputs(sample, text, condition_frames, ip_tokens, refer)
        b, c, t, h, w = sample.shape
        ctx = self._conditioning(sample, timestep, text, condition_frames, motion_speed, ip_tokens, ip_scale, temporal)

        x = self.conv_in(sample.transpose(1, 2).reshape(b * t, c, h, w))  # (b t) c h w
        if temporal and self.transformer_in is not None:
            x = self.transformer_in(x, ctx)
        if refer is not None:
            x = self.first_refer_emb_attns(x, refer.down[0], t)
        skips = [x]
        for i, block in enumerate(self.down_blocks):
            x, states = block(x, ctx, None if refer is None else self.refer_features_for_block(refer, i))
            skips += states
        x = self.mid_block(x, ctx)
        if refer is not None:
            x = self.mid_block_refer_emb_attns(x, refer.mid, t)
        for block in self.up_blocks:
            n = len(block.resnets)
            skips, block_skips = skips[:-n], skips[-n:]
            x = block(x, block_skips, ctx, skips[-1].shape[-2:] if skips else None)
        x = self.conv_out(F.silu(self.conv_norm_out(x)))
        return x.reshape(b, t, -1, h, w).transpose(1, 2)  # b c t h w

    def _conditioning(self, sample, timestep, text, condition_frames, motion_speed, ip_tokens, ip_scale, temporal):
        cfg = self.config
        b, _, t = sample.shape[:3]
        dtype = self.conv_in.weight.dtype
        timesteps = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(b)
        temb = self.time_embedding(timestep_embedding(timesteps, cfg.block_out_channels[0]).to(dtype))
        if cfg.anivv1_cfg:
            temb = F.silu(temb)
        temb = temb.repeat_interleave(t, dim=0)  # (b t) d
        if cfg.keep_vision_condition and condition_frames > 0 and t > 1:
            temb.view(b, t, -1)[:, :condition_frames] = 0

        femb = None
        if temporal:
            frame_index = torch.arange(t, device=sample.device)  # window-local positions
            if cfg.anivv1_cfg:
                frame_index = (frame_index * motion_speed).long()
            femb = self.frame_embedding(timestep_embedding(frame_index, cfg.block_out_channels[0]).to(dtype))
            if cfg.anivv1_cfg:
                femb = F.silu(femb)
        return FrameConditioning(t, temb, text, femb, condition_frames, temporal, ip_tokens, ip_scale)

    def _check_inputs(self, sample, text, condition_frames, ip_tokens, refer) -> None:
        cfg = self.config
        if sample.ndim != 5 or sample.shape[1] != cfg.in_channels:
            raise ValueError(f"sample must be (B, {cfg.in_channels}, T, h, w); got {tuple(sample.shape)}")
        b, t = sample.shape[0], sample.shape[2]
        if text.ndim != 3 or text.shape[0] != b or text.shape[2] != cfg.cross_attention_dim:
            raise ValueError(
                f"text must be (B={b}, L, {cfg.cross_attention_dim}) to match the sample; got {tuple(text.shape)}"
            )
        if not 0 <= condition_frames <= t:
            raise ValueError(f"condition_frames={condition_frames} must be between 0 and T={t}")
        if ip_tokens is not None:
            if not cfg.ip_cross_attn:
                raise ValueError("this UNet has no IP-Adapter cross-attention (ip_cross_attn=False); pass ip_tokens=None")
            if ip_tokens.ndim != 3 or ip_tokens.shape[0] != b or ip_tokens.shape[2] != cfg.cross_attention_dim:
                raise ValueError(
                    f"ip_tokens must be (B={b}, n, {cfg.cross_attention_dim}); got {tuple(ip_tokens.shape)}"
                )
        if refer is not None:
            if not cfg.refer_fusion:
                raise ValueError("this UNet has no ReferenceNet fusion (refer_fusion=False); pass refer=None")
            levels = len(cfg.block_out_channels)
            expected = 1 + levels * cfg.layers_per_block + levels - 1  # conv_in, every layer, every downsampler
            if len(refer.down) != expected or any(f.ndim != 4 or f.shape[0] != b for f in (*refer.down, refer.mid)):
                shapes = [tuple(f.shape) for f in refer.down]
                raise ValueError(
                    f"refer must hold {expected} down features and a mid feature, each (B={b}, C, h, w); "
                    f"got down {shapes}, mid {tuple(refer.mid.shape)}"
                )
