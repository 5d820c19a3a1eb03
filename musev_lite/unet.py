"""MuseV's video UNet: Stable Diffusion 1.5's UNet with temporal layers and visual conditioning.

What it adds to SD1.5 (why: docs/method.md#the-video-unet):
  * a TemporalConvLayer after every ResNet and a TransformerTemporalModel (attention across frames,
    positions from a frame-index embedding) after every spatial transformer, each gated by |w|;
  * "reference-only" spatial self-attention: every frame also attends to the clean condition frame's
    tokens, which the pipeline puts at frame 0 of every window;
  * for the referencenet models: ReferenceNet features fused by attention after conv_in, every down
    layer and the mid block, and IP-Adapter image tokens in every cross-attention;
  * with IPAdapterFaceID (`ip_adapter_face`): a second, face-only IP branch in every cross-attention, with
    its own K/V (`ip_adapter_face_to_k_ip` / `_v_ip`) and scale, attending to ArcFace tokens.
With `temporal=False` every temporal layer is skipped and it is the SD1.5 UNet ("2D mode", used to
draw a first frame from text). Module and parameter names are the published diffusers keys, so the
released checkpoints load with no renaming. The SD1.5 down path (sizes `SD15Sizes`, blocks, time
embedding, `SD15DownPath`) is written here once; referencenet.py and controlnet.py are built on it.

Left out, because the original computes them for nothing (docs/method.md#left-out): the AdaIN
"temporal cond" (returns its input), the unconditional attn1 recompute under CFG (overwritten), the
spatial position embedding (disabled in every release), need_zero_vis_cond_temb (never read).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------
# Config


@dataclass
class SD15Sizes:
    """The sizes of an SD1.5 UNet's down path, SD1.5's by default: what UNet3DConfig (the UNet and the
    ReferenceNet) and ControlNetConfig share."""

    in_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    heads: int = 8  # diffusers calls this "attention_head_dim"; it is the number of heads
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)

    def plain_blocks(self, transformer_norm_eps: float) -> UNet3DConfig:
        """What unet.py's blocks read to make plain SD1.5 blocks of these sizes: MuseV's switches off."""
        sizes = {f.name: getattr(self, f.name) for f in dataclasses.fields(SD15Sizes)}
        return UNet3DConfig(**sizes, transformer_norm_eps=transformer_norm_eps)


@dataclass
class UNet3DConfig(SD15Sizes):
    """Sizes and switches of the UNet; SD1.5 sizes by default. `preset()` gives the released models."""

    out_channels: int = 4
    temporal_conv_groups: int = 32  # TemporalConvLayer's GroupNorm(32, C) is hard-coded in MuseV
    transformer_in_groups: int = 32  # transformer_in is built with the default 32 groups
    # MuseV passes its BasicTransformerBlock arguments by position into a newer diffusers signature,
    # so norm1/norm3 get eps = 0.0 (norm2 keeps 1e-5); the released weights ran that way (docs/method.md#quirks).
    transformer_norm_eps: float = 0.0
    transformer_in: bool = True  # a temporal transformer right after conv_in (musev)
    anivv1: bool = False  # SiLU after the time/frame MLPs; frame positions x motion_speed
    skip_time_act: bool = False  # ResNets skip their SiLU on the time embedding (anivv1 did it)
    zero_condition_temb: bool = False  # condition frames get a zero time embedding
    refer_fusion: bool = False  # ReferenceNet feature fusion (refer_emb_attns)
    ip_cross_attention: bool = False  # IP-Adapter to_k_ip / to_v_ip in every spatial attn2
    ip_adapter_face: bool = False  # IPAdapterFaceID's ip_adapter_face_to_k_ip / _v_ip in every spatial attn2

    @classmethod
    def preset(cls, name: str) -> UNet3DConfig:
        """The released `musev`, `musev_referencenet` (= `musev_referencenet_pose`), or `tiny` for tests."""
        referencenet = dict(
            transformer_in=False, anivv1=True, skip_time_act=True, zero_condition_temb=True,
            refer_fusion=True, ip_cross_attention=True,
        )
        tiny = dict(block_out_channels=(32, 32, 32, 32), heads=2, norm_num_groups=16, cross_attention_dim=32)
        presets = {
            "musev": {},
            "musev_referencenet": referencenet,
            "musev_referencenet_pose": referencenet,
            "tiny": dict(tiny, **referencenet),
        }
        if name not in presets:
            raise ValueError(f"UNet preset {name!r} is unknown; use one of {sorted(presets)}")
        return cls(**presets[name])


class ReferenceFeatures(NamedTuple):
    """ReferenceNet outputs the UNet fuses: 12 down-path maps (B,C,h',w') and the mid-block map."""

    down: list[torch.Tensor]
    mid: torch.Tensor


class ControlResiduals(NamedTuple):
    """ControlNet outputs added to the UNet, per frame ((B T), C, h', w'): one map per skip connection
    (conv_in, every down layer and downsampler: 12 for SD1.5) and one for the mid block."""

    down: list[torch.Tensor]
    mid: torch.Tensor


@dataclass
class Conditioning:
    """Everything besides the noisy frames that steers a UNet call.

    Tensors have one row per sample, batched [uncond; cond] by the pipeline (the negative prompt's
    text, IP tokens of a zero image embedding, ReferenceNet features of the same image made with
    each half's IP tokens or text).
    """

    text: torch.Tensor  # (B, L, D) prompt tokens
    motion_speed: float  # frame positions are multiplied by it (anivv1 models: the referencenet ones)
    ip_tokens: torch.Tensor | None = None  # (B, n, D) IP-Adapter image tokens, None: no IP-Adapter
    ip_scale: float = 1.0  # weight of the IP-Adapter attention next to the text attention
    refer: ReferenceFeatures | None = None  # ReferenceNet maps, (B, C, h', w') each
    control: ControlResiduals | None = None  # ControlNet residuals of this call's frames
    face_tokens: torch.Tensor | None = None  # (B, n, D) IPAdapterFaceID tokens, None: no face branch
    face_scale: float = 1.0  # weight of the face attention next to the text attention

    def repeat(self, k: int) -> Conditioning:
        """The conditioning of `k` windows stacked in one call: all uncond copies, then all cond copies
        (window-major inside each half), the layout the denoising loop stacks its windows in."""
        if k == 1:
            return self

        def rows(x: torch.Tensor) -> torch.Tensor:  # (2 b) ... -> (2 k b) ...
            uncond, cond = x.chunk(2)
            reps = (k,) + (1,) * (x.dim() - 1)
            return torch.cat([uncond.repeat(reps), cond.repeat(reps)])

        refer = None if self.refer is None else ReferenceFeatures([rows(m) for m in self.refer.down], rows(self.refer.mid))
        if self.control is not None:
            raise ValueError("ControlNet residuals are per window: set them after repeating the conditioning")
        return Conditioning(rows(self.text), self.motion_speed, None if self.ip_tokens is None else rows(self.ip_tokens),
                            self.ip_scale, refer, face_tokens=None if self.face_tokens is None else rows(self.face_tokens),
                            face_scale=self.face_scale)


@dataclass
class FrameContext:
    """What every block needs besides the hidden states, for one forward call."""

    num_frames: int  # T, frames per sample (condition frames included)
    condition_frames: int  # clean condition frames at the start of T that attn1 also attends to
    text: torch.Tensor  # (B, L, D), one row per sample (not per frame)
    frame_emb: torch.Tensor | None  # (T, 4*C0) frame-position embedding; None = temporal layers off
    ip_tokens: torch.Tensor | None = None  # (B, n, D) IP-Adapter image tokens
    ip_scale: float = 1.0
    face_tokens: torch.Tensor | None = None  # (B, n, D) IPAdapterFaceID tokens
    face_scale: float = 1.0
    lengths: list[int] | None = None  # real frames per sample when samples are padded to T; None: all T
    frame_embs: dict[int, torch.Tensor] | None = None  # with `lengths`: the frame embedding of each length


# ---------------------------------------------------------------------------------------------
# Embeddings


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """diffusers' Timesteps(dim, flip_sin_to_cos=True, freq_shift=0): [cos, sin] of t * 10000^(-i/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


# ---------------------------------------------------------------------------------------------
# Spatial (SD1.5) blocks


class ResnetBlock2D(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, cfg: UNet3DConfig):
        super().__init__()
        self.norm1 = nn.GroupNorm(cfg.norm_num_groups, in_ch, eps=cfg.norm_eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(4 * cfg.block_out_channels[0], out_ch)
        self.norm2 = nn.GroupNorm(cfg.norm_num_groups, out_ch, eps=cfg.norm_eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None
        self.skip_time_act = cfg.skip_time_act

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        temb = temb if self.skip_time_act else F.silu(temb)
        h = h + self.time_emb_proj(temb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Downsample2D(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, size):
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


def attention(q, k, v, heads: int):
    """Multi-head softmax attention: (N, Lq, C), (N, Lk, C), (N, Lk, C) -> (N, Lq, C)."""
    n, lq, c = q.shape
    q, k, v = (x.unflatten(-1, (heads, c // heads)).transpose(1, 2) for x in (q, k, v))  # n heads L d
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, lq, c)


class Attention(nn.Module):
    """diffusers-layout attention: to_q/to_k/to_v without bias, to_out.0 with bias (+ IP-Adapter K/V,
    + IPAdapterFaceID K/V: (dim, context_dim) each, as MuseV's IPAttention names them)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, ip: bool = False, face: bool = False):
        super().__init__()
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.to_k_ip = nn.Linear(context_dim, dim, bias=False) if ip else None
        self.to_v_ip = nn.Linear(context_dim, dim, bias=False) if ip else None
        self.ip_adapter_face_to_k_ip = nn.Linear(context_dim, dim, bias=False) if face else None  # (dim, context_dim)
        self.ip_adapter_face_to_v_ip = nn.Linear(context_dim, dim, bias=False) if face else None

    def forward(self, x, context=None):
        context = x if context is None else context
        return self.to_out[0](attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads))


class SpatialSelfAttention(Attention):
    """attn1 of the spatial transformers, with MuseV's reference-only attention (docs/method.md#the-condition-frame).

    With condition frames in a window, frame t of sample b attends to its own tokens and to the
    condition frames' tokens: K/V = [h[b, t]; h[b, :n_cond]].
    """

    def forward(self, x, ctx: FrameContext):
        n_cond, t = ctx.condition_frames, ctx.num_frames
        if n_cond == 0 or t == 1:
            return super().forward(x)
        bt, n, _ = x.shape

        def with_condition(y):  # (b t) hw c -> (b t) ((1 + n_cond) hw) c: own tokens, then the condition frames'
            cond = y.unflatten(0, (bt // t, t))[:, :n_cond].flatten(1, 2)  # b (n_cond hw) c
            return torch.cat([y, cond.repeat_interleave(t, 0)], 1)

        out = attention(self.to_q(x), with_condition(self.to_k(x)), with_condition(self.to_v(x)), self.heads)
        return self.to_out[0](out)


class CrossAttention(Attention):
    """attn2: text cross-attention, plus decoupled IP-Adapter attention to image tokens
    (docs/method.md#referencenet-and-ip-adapter) and IPAdapterFaceID's to face tokens
    (docs/method.md#ipadapterfaceid), each with its own K/V and the same query:
    to_out(attn(q, text) + ip_scale * attn(q, image tokens) + face_scale * attn(q, face tokens))."""

    def forward(self, x, ctx: FrameContext):
        t = ctx.num_frames
        q = self.to_q(x)
        # K/V per sample, shared by its frames: (b L c) -> ((b t) L c)
        k = self.to_k(ctx.text).repeat_interleave(t, 0)
        v = self.to_v(ctx.text).repeat_interleave(t, 0)
        out = attention(q, k, v, self.heads)
        if self.to_k_ip is not None and ctx.ip_tokens is not None:
            k_ip = self.to_k_ip(ctx.ip_tokens).repeat_interleave(t, 0)
            v_ip = self.to_v_ip(ctx.ip_tokens).repeat_interleave(t, 0)
            out = out + ctx.ip_scale * attention(q, k_ip, v_ip, self.heads)
        if self.ip_adapter_face_to_k_ip is not None and ctx.face_tokens is not None:  # (b 4 D) -> ((b t) 4 c)
            k_face = self.ip_adapter_face_to_k_ip(ctx.face_tokens).repeat_interleave(t, 0)
            v_face = self.ip_adapter_face_to_v_ip(ctx.face_tokens).repeat_interleave(t, 0)
            out = out + ctx.face_scale * attention(q, k_face, v_face, self.heads)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """x += attn1(LN1 x); x += attn2(LN2 x); x += FF(LN3 x). attn1/attn2 are given by the caller."""

    def __init__(self, dim: int, attn1: nn.Module, attn2: nn.Module, eps13: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps13)
        self.attn1 = attn1
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.attn2 = attn2
        self.norm3 = nn.LayerNorm(dim, eps=eps13)
        self.ff = FeedForward(dim)

    def forward(self, x, *attn_args):
        x = x + self.attn1(self.norm1(x), *attn_args)
        x = x + self.attn2(self.norm2(x), *attn_args)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """SD1.5 spatial transformer: GroupNorm, 1x1 conv in, one block over the h*w tokens, 1x1 conv out."""

    def __init__(self, ch: int, cfg: UNet3DConfig):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_num_groups, ch, eps=1e-6)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        attn1 = SpatialSelfAttention(ch, cfg.heads)
        attn2 = CrossAttention(ch, cfg.heads, cfg.cross_attention_dim, ip=cfg.ip_cross_attention, face=cfg.ip_adapter_face)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(ch, attn1, attn2, cfg.transformer_norm_eps)])
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x, ctx: FrameContext):
        bt, c, h, w = x.shape
        y = self.proj_in(self.norm(x))
        y = y.flatten(2).transpose(1, 2)  # (b t) (h w) c
        y = self.transformer_blocks[0](y, ctx)
        y = y.transpose(1, 2).reshape(bt, c, h, w)
        return x + self.proj_out(y)  # x first: the sum keeps the residual stream's memory layout


# ---------------------------------------------------------------------------------------------
# Temporal blocks (docs/method.md#the-video-unet)


def to_video(x, t: int):
    """(b t) c h w -> b c t h w"""
    return x.unflatten(0, (-1, t)).transpose(1, 2)


def to_frames(x):
    """b c t h w -> (b t) c h w"""
    return x.transpose(1, 2).flatten(0, 1)


def by_length(layer: nn.Module, x, ctx: FrameContext):
    """Run a temporal layer on samples padded to different lengths as if each were alone (docs/method.md#windows).

    Temporal layers mix the frames of a sample (GroupNorm statistics over all its frames, convolution
    and attention along time), so padded frames would change the real ones. Here the layer sees, per
    length L, the samples of that length cut to their first L frames: exactly its unpadded input. The
    padded frames pass through unchanged; their predictions are meaningless and dropped by the caller.
    """
    frames = x.unflatten(0, (-1, ctx.num_frames))  # b T c h w
    out = frames.clone()
    for length in sorted(set(ctx.lengths)):
        index = torch.tensor([i for i, n in enumerate(ctx.lengths) if n == length], device=x.device)
        part = dataclasses.replace(ctx, num_frames=length, frame_emb=ctx.frame_embs[length], lengths=None, frame_embs=None)
        y = layer(frames[index, :length].flatten(0, 1), part)  # (k L) c h w, laid out as an unpadded call's
        out[index, :length] = y.unflatten(0, (-1, length))
    return out.flatten(0, 1)


class TemporalConvLayer(nn.Module):
    """Four GroupNorm-SiLU-Conv3d(3x1x1) stages over time; out = x + |w| * stages(x).

    GroupNorm sees the whole 5-D window, so its statistics mix all frames, condition frame included.
    """

    def __init__(self, ch: int, groups: int):
        super().__init__()

        def stage(dropout: bool):
            layers = [nn.GroupNorm(groups, ch), nn.SiLU()] + ([nn.Dropout(0.0)] if dropout else [])
            return nn.Sequential(*layers, nn.Conv3d(ch, ch, (3, 1, 1), padding=(1, 0, 0)))

        self.conv1, self.conv2, self.conv3, self.conv4 = stage(False), stage(True), stage(True), stage(True)
        self.temporal_weight = nn.Parameter(torch.tensor([1e-5]))

    def forward(self, x, ctx: FrameContext):
        if ctx.lengths is not None:
            return by_length(self, x, ctx)
        y = to_video(x, ctx.num_frames)
        y = y + self.temporal_weight.abs() * self.conv4(self.conv3(self.conv2(self.conv1(y))))
        return to_frames(y)


class TemporalSelfAttention(Attention):
    """Both attentions of a temporal block are self-attention over the frames (double self-attention)."""

    def forward(self, x, ctx=None):
        return super().forward(x)


class TransformerTemporalModel(nn.Module):
    """Attention across the frames of each pixel, with frame-position embeddings; out = x + |w| * y."""

    def __init__(self, ch: int, cfg: UNet3DConfig, groups: int):
        super().__init__()
        temb_ch = 4 * cfg.block_out_channels[0]
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch)
        self.frame_emb_proj = nn.Linear(temb_ch, ch)
        attn1, attn2 = TemporalSelfAttention(ch, cfg.heads), TemporalSelfAttention(ch, cfg.heads)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(ch, attn1, attn2, cfg.transformer_norm_eps)])
        self.proj_out = nn.Linear(ch, ch)
        self.temporal_weight = nn.Parameter(torch.tensor([1e-5]))

    def forward(self, x, ctx: FrameContext):
        if ctx.lengths is not None:
            return by_length(self, x, ctx)
        video = to_video(x, ctx.num_frames)  # b c t h w
        b, c, t, h, w = video.shape
        y = self.norm(video)  # statistics over all frames of the window
        y = y.permute(0, 3, 4, 2, 1).reshape(b * h * w, t, c)  # (b h w) t c
        y = self.proj_in(y) + self.frame_emb_proj(F.silu(ctx.frame_emb))  # + positions (t c)
        y = self.proj_out(self.transformer_blocks[0](y))
        y = y.reshape(b, h, w, t, c).permute(0, 4, 3, 1, 2)  # b c t h w
        return to_frames(video + self.temporal_weight.abs() * y)


class ReferEmbFuseAttention(Attention):
    """Fuse a ReferenceNet feature map: frame tokens attend to [reference tokens; own tokens].

    No input norm; residual. The same reference serves every frame of a sample.
    """

    def forward(self, x, reference, num_frames: int):
        bt, c, h, w = x.shape
        # contiguous once for the three (two) projections, which would each copy a transposed view
        tokens = x.flatten(2).transpose(1, 2).contiguous()  # (b t) (h w) c
        ref = reference.flatten(2).transpose(1, 2).contiguous()  # b (h' w') c
        k_ref = self.to_k(ref).repeat_interleave(num_frames, 0)  # (b t) (h' w') c
        v_ref = self.to_v(ref).repeat_interleave(num_frames, 0)
        k = torch.cat([k_ref, self.to_k(tokens)], 1)
        v = torch.cat([v_ref, self.to_v(tokens)], 1)
        out = self.to_out[0](attention(self.to_q(tokens), k, v, self.heads))
        return x + out.transpose(1, 2).reshape(bt, c, h, w)  # in x's memory layout


# ---------------------------------------------------------------------------------------------
# UNet levels


class DownBlock(nn.Module):
    """One resolution of the down path: (ResNet, temporal conv, [spatial + temporal transformer],
    [refer fusion]) per layer, then a downsampler (+ refer fusion), except at the last level."""

    def __init__(self, in_ch, out_ch, cfg: UNet3DConfig, attention: bool, downsample: bool, temporal: bool):
        super().__init__()
        n = cfg.layers_per_block
        self.resnets = nn.ModuleList(ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, cfg) for j in range(n))
        self.temp_convs = (nn.ModuleList(TemporalConvLayer(out_ch, cfg.temporal_conv_groups) for _ in range(n))
                           if temporal else None)
        self.attentions = nn.ModuleList(Transformer2DModel(out_ch, cfg) for _ in range(n)) if attention else None
        self.temp_attentions = (nn.ModuleList(TransformerTemporalModel(out_ch, cfg, cfg.norm_num_groups) for _ in range(n))
                                if attention and temporal else None)
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch)]) if downsample else None
        self.refer_emb_attns = (nn.ModuleList(ReferEmbFuseAttention(out_ch, cfg.heads) for _ in range(n + downsample))
                                if cfg.refer_fusion else None)

    def forward(self, x, temb, ctx: FrameContext, refer_features=None):
        """Returns the output and the skip tensors (one per layer, one after the downsampler)."""
        temporal = ctx.frame_emb is not None
        fuse = refer_features is not None and self.refer_emb_attns is not None
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if temporal and self.temp_convs is not None:
                x = self.temp_convs[j](x, ctx)
            if self.attentions is not None:
                x = self.attentions[j](x, ctx)
                if temporal and self.temp_attentions is not None:
                    x = self.temp_attentions[j](x, ctx)
            if fuse:
                x = self.refer_emb_attns[j](x, refer_features[j], ctx.num_frames)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            if fuse:
                x = self.refer_emb_attns[-1](x, refer_features[-1], ctx.num_frames)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """ResNet, temporal conv, spatial + temporal transformer, ResNet, temporal conv."""

    def __init__(self, ch, cfg: UNet3DConfig, temporal: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(ch, ch, cfg) for _ in range(2))
        self.attentions = nn.ModuleList([Transformer2DModel(ch, cfg)])
        self.temp_convs = (nn.ModuleList(TemporalConvLayer(ch, cfg.temporal_conv_groups) for _ in range(2))
                           if temporal else None)
        self.temp_attentions = nn.ModuleList([TransformerTemporalModel(ch, cfg, cfg.norm_num_groups)]) if temporal else None

    def forward(self, x, temb, ctx: FrameContext):
        temporal = ctx.frame_emb is not None and self.temp_convs is not None
        x = self.resnets[0](x, temb)
        if temporal:
            x = self.temp_convs[0](x, ctx)
        x = self.attentions[0](x, ctx)
        if temporal:
            x = self.temp_attentions[0](x, ctx)
        x = self.resnets[1](x, temb)
        if temporal:
            x = self.temp_convs[1](x, ctx)
        return x


class UpBlock(nn.Module):
    """One resolution of the up path: per layer, concat a skip, ResNet, temporal conv,
    [spatial + temporal transformer]; then an upsampler, except at full resolution."""

    def __init__(self, in_ch, out_ch, skip_chs, cfg: UNet3DConfig, attention: bool, upsample: bool):
        super().__init__()
        n = len(skip_chs)
        self.resnets = nn.ModuleList(ResnetBlock2D((in_ch if j == 0 else out_ch) + skip_chs[j], out_ch, cfg)
                                     for j in range(n))
        self.temp_convs = nn.ModuleList(TemporalConvLayer(out_ch, cfg.temporal_conv_groups) for _ in range(n))
        self.attentions = nn.ModuleList(Transformer2DModel(out_ch, cfg) for _ in range(n)) if attention else None
        self.temp_attentions = (nn.ModuleList(TransformerTemporalModel(out_ch, cfg, cfg.norm_num_groups) for _ in range(n))
                                if attention else None)
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if upsample else None

    def forward(self, x, temb, ctx: FrameContext, skips: list):
        """Consumes its skip tensors from the end of `skips`; upsamples to the size of the next one."""
        temporal = ctx.frame_emb is not None
        for j, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if temporal:
                x = self.temp_convs[j](x, ctx)
            if self.attentions is not None:
                x = self.attentions[j](x, ctx)
                if temporal:
                    x = self.temp_attentions[j](x, ctx)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, skips[-1].shape[-2:])
        return x


def sd15_down_blocks(cfg: UNet3DConfig, temporal: bool) -> nn.ModuleList:
    """SD1.5's down path: one DownBlock per level, with spatial transformers and a downsampler at every
    level but the last."""
    chs, levels = cfg.block_out_channels, len(cfg.block_out_channels)
    return nn.ModuleList(DownBlock(chs[max(i - 1, 0)], chs[i], cfg, attention=i < levels - 1,
                                   downsample=i < levels - 1, temporal=temporal) for i in range(levels))


def skip_channels(cfg: SD15Sizes) -> list[int]:
    """Channels of the down path's skip tensors in order: conv_in's, then every down layer's and
    downsampler's (12 for SD1.5). The up path pops them from the end; a ControlNet has a 1x1 conv for each."""
    chs, levels = cfg.block_out_channels, len(cfg.block_out_channels)
    return [chs[0]] + [chs[i] for i in range(levels) for _ in range(cfg.layers_per_block + (i < levels - 1))]


# ---------------------------------------------------------------------------------------------
# The model


def memory_format(dtype: torch.dtype) -> torch.memory_format:
    """The layout of the frames (and of the convolution weights) for a dtype. oneDNN computes bfloat16
    convolutions channels-last and copies any other layout in and out on every call, so in bfloat16 the
    frames stay channels-last from conv_in to conv_out (the transformers' token views are then free too);
    float32 convolutions are fastest in the default layout (bench/roofline.py)."""
    return torch.channels_last if dtype == torch.bfloat16 else torch.contiguous_format


def set_conv_layout(model: nn.Module, fmt: torch.memory_format) -> None:
    """Store every convolution weight of `model` in `fmt` (channels_last_3d for the 3-D ones), in place."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d)):
                layout = torch.channels_last_3d if fmt == torch.channels_last and module.weight.dim() == 5 else fmt
                module.weight.data = module.weight.data.contiguous(memory_format=layout)


class SD15DownPath(nn.Module):
    """A model built on SD1.5's down path: UNet3D, ReferenceNet, ControlNet. Each makes its `conv_in`,
    `time_embedding`, `down_blocks` (sd15_down_blocks) and `mid_block` itself, under diffusers' names and
    in its own order (seeded random weights, as the demo's, follow the order modules are made in); the
    time embedding and the pass through the down path are here."""

    def embed_time(self, timestep, n: int, device) -> torch.Tensor:
        """(n, 4*C0) embedding of one timestep or of one per sample, in the model's dtype."""
        timestep = torch.as_tensor(timestep, device=device).reshape(-1).expand(n)
        c0 = self.config.block_out_channels[0]
        return self.time_embedding(sinusoidal_embedding(timestep, c0).to(self.conv_in.weight.dtype))

    def still_inputs(self, sample: torch.Tensor, timestep, text: torch.Tensor) -> tuple[torch.Tensor, FrameContext]:
        """Time embedding (N, 4*C0) and block context for N still images `sample` (N, C, h, w) with
        cross-attention context `text` (N, L, D): one frame each, no temporal layers."""
        emb = self.embed_time(timestep, sample.shape[0], sample.device)
        return emb, FrameContext(num_frames=1, condition_frames=0, text=text.to(self.conv_in.weight.dtype),
                                 frame_emb=None)

    def down_path(self, x: torch.Tensor, emb: torch.Tensor, ctx: FrameContext,
                  refer: ReferenceFeatures | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """conv_in's output x ((b t), C0, h, w) -> the mid block's output and the skip tensors (x, then every
        down layer's and downsampler's output: skip_channels). `refer`: ReferenceNet maps to fuse (UNet3D)."""
        skips = [x]
        for i, block in enumerate(self.down_blocks):
            # MuseV slices ReferenceNet features as [1 + n*i : 1 + n*i + n], n = layers (+1 with a
            # downsampler). For the last block that starts at 7, not 10: it reuses the h/4 maps
            # 7 and 8 instead of the h/8 maps 10, 11. Trained that way, so kept (docs/method.md#quirks).
            n = len(block.resnets) + (block.downsamplers is not None)
            features = None if refer is None else refer.down[1 + n * i : 1 + n * i + n]
            x, block_skips = block(x, emb, ctx, features)
            skips.extend(block_skips)
        return self.mid_block(x, emb, ctx), skips


class LayoutFollowsDtype(SD15DownPath):
    """A down-path model whose convolution weights take their dtype's layout (`memory_format`) after every
    .to() / .float() / .bfloat16(): nn.Module._apply is behind them all. A state dict loaded later is
    copied into that layout."""

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        set_conv_layout(self, memory_format(self.conv_in.weight.dtype))
        return self


class UNet3D(LayoutFollowsDtype):
    def __init__(self, cfg: UNet3DConfig):
        super().__init__()
        self.config = cfg
        chs = cfg.block_out_channels
        levels = len(chs)
        temb_ch = 4 * chs[0]
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chs[0], temb_ch)
        self.frame_embedding = TimestepEmbedding(chs[0], temb_ch)
        self.transformer_in = (TransformerTemporalModel(chs[0], cfg, cfg.transformer_in_groups)
                               if cfg.transformer_in else None)
        self.first_refer_emb_attns = ReferEmbFuseAttention(chs[0], cfg.heads) if cfg.refer_fusion else None
        self.mid_block_refer_emb_attns = ReferEmbFuseAttention(chs[-1], cfg.heads) if cfg.refer_fusion else None
        self.down_blocks = sd15_down_blocks(cfg, temporal=True)
        self.mid_block = MidBlock(chs[-1], cfg, temporal=True)
        skips, n = skip_channels(cfg), cfg.layers_per_block + 1
        up_blocks = []
        for level in reversed(range(levels)):  # each takes the last n skips left, last first
            mine, skips = skips[-n:][::-1], skips[:-n]
            up_blocks.append(UpBlock(chs[min(level + 1, levels - 1)], chs[level], mine, cfg,
                                     attention=level < levels - 1, upsample=level > 0))
        self.up_blocks = nn.ModuleList(up_blocks)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, chs[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(chs[0], cfg.out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, cond: Conditioning, *,
                condition_frames: int = 1, temporal: bool = True, lengths: Sequence[int] | None = None) -> torch.Tensor:
        """Noise prediction for `sample` (B,4,T,h,w), whose first `condition_frames` frames are clean
        condition latents. `temporal=False` skips every temporal layer (SD1.5 2D mode). `lengths`: real
        frames per sample (condition frames included) when samples of different lengths are padded at
        the end to T; each real frame's prediction is then the one the sample gets alone, padded frames'
        predictions are meaningless."""
        self._check_inputs(sample, cond, condition_frames, lengths)
        cfg = self.config
        b, _, t, h, w = sample.shape
        dtype = self.conv_in.weight.dtype
        emb = self.embed_time(timestep, b, sample.device)
        if cfg.anivv1:
            emb = F.silu(emb)
        emb = emb.repeat_interleave(t, 0)  # (b t) d
        if cfg.zero_condition_temb and t > 1 and condition_frames > 0:
            emb = emb.unflatten(0, (b, t)).clone()  # b t d
            emb[:, :condition_frames] = 0
            emb = emb.flatten(0, 1)

        frame_emb = self.frame_positions(t, cond.motion_speed, sample.device) if temporal else None
        ip_tokens = None if cond.ip_tokens is None or cond.ip_scale == 0 else cond.ip_tokens.to(dtype)
        face_tokens = None if cond.face_tokens is None or cond.face_scale == 0 else cond.face_tokens.to(dtype)
        ctx = FrameContext(t, condition_frames, cond.text.to(dtype), frame_emb, ip_tokens, cond.ip_scale,
                           face_tokens, cond.face_scale)
        if temporal and lengths is not None and any(n != t for n in lengths):
            ctx.lengths = list(lengths)  # each length's embedding made on its own, as an unpadded call makes it
            ctx.frame_embs = {n: self.frame_positions(n, cond.motion_speed, sample.device) for n in set(lengths)}
        refer = cond.refer
        if refer is not None:  # in the UNet's dtype, as the text (a ReferenceNet may run in another one)
            refer = ReferenceFeatures([m.to(dtype) for m in refer.down], refer.mid.to(dtype))

        x = self.conv_in(to_frames(sample.to(dtype)).contiguous(memory_format=memory_format(dtype)))  # (b t) c h w
        if temporal and self.transformer_in is not None:
            x = self.transformer_in(x, ctx)
        if refer is not None:
            x = self.first_refer_emb_attns(x, refer.down[0], t)
        x, skips = self.down_path(x, emb, ctx, refer)
        if refer is not None:
            x = self.mid_block_refer_emb_attns(x, refer.mid, t)
        if cond.control is not None:  # ControlNet: residuals on the skip connections and the mid block
            skips = [skip + residual.to(dtype) for skip, residual in zip(skips, cond.control.down)]
            x = x + cond.control.mid.to(dtype)
        for block in self.up_blocks:
            x = block(x, emb, ctx, skips)
        x = self.conv_out(F.silu(self.conv_norm_out(x)))
        return to_video(x, t)  # b c t h w

    def frame_positions(self, t: int, motion_speed: float, device) -> torch.Tensor:
        """(t, 4*C0) embedding of the window-local positions 0..t-1, the condition frame at 0 (x motion_speed
        for anivv1)."""
        cfg = self.config
        positions = torch.arange(t, device=device)
        if cfg.anivv1:
            positions = (positions * motion_speed).long()
        frame_emb = self.frame_embedding(sinusoidal_embedding(positions, cfg.block_out_channels[0]).to(self.conv_in.weight.dtype))
        return F.silu(frame_emb) if cfg.anivv1 else frame_emb

    def _check_inputs(self, sample, cond: Conditioning, condition_frames, lengths) -> None:
        """Clear errors for inputs that would otherwise fail deep inside, or be silently ignored."""
        cfg = self.config
        if sample.ndim != 5 or sample.shape[1] != cfg.in_channels:
            raise ValueError(f"sample must be (B, {cfg.in_channels}, T, h, w); got shape {tuple(sample.shape)}")
        b, t = sample.shape[0], sample.shape[2]
        check_context(cond.text, b, cfg.cross_attention_dim, "text")
        if not 0 <= condition_frames <= t:
            raise ValueError(f"condition_frames={condition_frames} must be between 0 and the sample's T={t}")
        if lengths is not None and (len(lengths) != b or any(not max(condition_frames, 1) <= n <= t for n in lengths)):
            raise ValueError(f"lengths must give each of the B={b} samples its real frames, between "
                             f"{max(condition_frames, 1)} and T={t}; got {list(lengths)}")
        if cond.ip_tokens is not None:
            if not cfg.ip_cross_attention:
                raise ValueError("ip_tokens given, but this UNet has no IP-Adapter attention (ip_cross_attention=False)")
            check_context(cond.ip_tokens, b, cfg.cross_attention_dim, "ip_tokens")
        if cond.face_tokens is not None:
            if not cfg.ip_adapter_face:
                raise ValueError("face_tokens given, but this UNet has no IPAdapterFaceID attention (ip_adapter_face=False)")
            check_context(cond.face_tokens, b, cfg.cross_attention_dim, "face_tokens")
        n_down = len(skip_channels(cfg))  # conv_in, every layer, every downsampler
        if cond.refer is not None:
            refer = cond.refer
            if not cfg.refer_fusion:
                raise ValueError("refer given, but this UNet has no ReferenceNet fusion (refer_fusion=False)")
            maps = [*refer.down, refer.mid]
            if len(refer.down) != n_down or any(m.ndim != 4 or m.shape[0] != b for m in maps):
                raise ValueError(
                    f"refer must hold {n_down} down maps and a mid map, each (B={b}, C, h, w); got down "
                    f"{[tuple(m.shape) for m in refer.down]}, mid {tuple(refer.mid.shape)}"
                )
        if cond.control is not None:
            control = cond.control
            maps = [*control.down, control.mid]
            if len(control.down) != n_down or any(m.ndim != 4 or m.shape[0] != b * t for m in maps):
                raise ValueError(
                    f"control must hold {n_down} down residuals and a mid residual, each (B*T={b * t}, C, h, w); "
                    f"got down {[tuple(m.shape) for m in control.down]}, mid {tuple(control.mid.shape)}"
                )


def check_context(context: torch.Tensor, batch: int, dim: int, what: str) -> None:
    """A cross-attention context must be (batch, tokens, dim)."""
    if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != dim:
        raise ValueError(f"{what} must be (B={batch}, tokens, {dim}) to match the sample; got {tuple(context.shape)}")


# ---------------------------------------------------------------------------------------------
# torch.compile


def compile_model(model: nn.Module) -> nn.Module:
    """torch.compile `model` with inductor's vector width given explicitly, as the ISA inductor picks.

    Inductor (torch 2.13, CPU) writes its kernels for the vector ISA it picks (AVX-512: 16 floats a
    vector, AVX2: 8; ATEN_CPU_CAPABILITY chooses among those the CPU has), but its on-disk graph cache
    does not key on that ISA: a graph cached under one ISA and loaded under another is built with the
    other's vectors, and returns NaN or garbage or corrupts the heap. Given as an option (`cpp.simdlen`)
    the width is part of the cache key; the kernels are the same as without it.
    """
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa  # what inductor generates for (0: no vector ISA)
    except ImportError:  # torch before 2.4 keeps it elsewhere: compiled as it is
        return torch.compile(model)
    return torch.compile(model, options={"cpp.simdlen": pick_vec_isa().bit_width()})
