"""Which attention kernel is fastest for the shapes of a MuseV window call: SDPA's fused kernel, or the
plain matmul-softmax-matmul computed a few batch rows at a time (scores kept under `--budget` floats).

    python bench/bench_attention.py [--channels 320,640,1280,1280] [--latent 32x20] [--dtypes float32,bfloat16]
    python bench/bench_attention.py --floor [--latent 40x64]


The shapes are those `F.scaled_dot_product_attention` gets in one `musev_referencenet` window call
(2 guidance halves x 13 frames, 8 heads; collected on the meta device), the batch cut to at most
`--rows` so one measurement stays short; each distinct shape is timed interleaved (fused, chunked,
fused, ...), and the two results compared.

`--floor`: what bounds the fused bfloat16 kernel on the call's largest attention (the full-resolution
reference-only one, Lk = twice Lq): the kernel as called; the kernel at head dim 8, where its two matrix
products nearly vanish and what is left is its softmax; the kernel on the own-frame and condition-frame
key blocks separately (one call each, the condition block one long sequence per sample since its keys are
the same for every frame) merged by log-sum-exp; and `torch.exp` over as many scores in pieces that stay in
the L2 cache, each thread's share on one thread: the cost of the exps alone, one per score, which exact
attention cannot skip (ATen's exp, more exact than the kernel's own, so an upper bound of that cost).
"""

import argparse
from collections import Counter
from unittest import mock

import torch
import torch.nn.functional as F

from musev_lite.unet import UNet3D, UNet3DConfig
from roofline import window_inputs
from timing import interleaved, load, median, ratio


def call_shapes(cfg: UNet3DConfig, shape) -> Counter:
    """{(q shape, key length): calls} of one window call."""
    seen = Counter()

    def record(q, k, v, **kwargs):
        seen[(tuple(q.shape), k.shape[2])] += 1
        return torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)

    with torch.device("meta"):
        unet = UNet3D(cfg)
    sample, cond = window_inputs(cfg, shape, device="meta")
    with mock.patch.object(F, "scaled_dot_product_attention", record):
        unet(sample, torch.tensor(500.0), cond, condition_frames=1)
    return seen


def chunked(q, k, v, budget: int):
    """softmax(q k^T / sqrt(d)) v, a few batch rows at a time so the scores stay under `budget` floats."""
    n, h, lq, d = q.shape
    rows = max(1, budget // (h * lq * k.shape[2]))
    out = torch.empty(n, h, lq, v.shape[-1], dtype=q.dtype)
    for i in range(0, n, rows):
        scores = torch.matmul(q[i : i + rows], k[i : i + rows].transpose(-1, -2)).mul_(d**-0.5)
        torch.matmul(scores.softmax(-1), v[i : i + rows], out=out[i : i + rows])
    return out


def floor(q_shape, lk: int, frames: int, repeats: int) -> None:
    """The fused kernel on the largest shape next to its softmax-only cost and the cost of its exps alone."""
    n, heads, lq, d = q_shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, heads, length, d, generator=g).bfloat16() for length in (lq, lk, lk))
    for x in (k, v):  # keys [own frame; the sample's condition frame], as SpatialSelfAttention builds them
        x[:, :, lk // 2 :] = x[::frames, :, : lk // 2].repeat_interleave(frames, 0)
    q8, k8, v8 = (x[..., :8].contiguous() for x in (q, k, v))
    scores = n * heads * lq * lk
    piece, out = torch.randn(1 << 18), torch.empty(1 << 18)  # 1 MB of float32 each: they stay in L2
    pieces = scores // piece.numel()
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    def split():  # own block per frame, condition block (frame 0's keys) once per sample, merged by log-sum-exp
        own, own_lse = flash(q, k[:, :, : lk // 2], v[:, :, : lk // 2])
        samples = n // frames
        q_all = q.unflatten(0, (samples, frames)).transpose(1, 2).flatten(2, 3)  # b heads (t Lq) d
        cond = [x[::frames, :, lk // 2 :] for x in (k, v)]
        shared, shared_lse = flash(q_all, *cond)
        shared = shared.unflatten(2, (frames, lq)).transpose(1, 2).flatten(0, 1)  # (b t) heads Lq d
        shared_lse = shared_lse.unflatten(2, (frames, lq)).transpose(1, 2).flatten(0, 1)
        weight = torch.sigmoid(own_lse - shared_lse).unsqueeze(-1)
        return torch.lerp(shared.float(), own.float(), weight).bfloat16()

    threads = torch.get_num_threads()

    def exps():  # on one thread, 1 / threads of the exps: what each thread of the kernel has to compute
        torch.set_num_threads(1)
        for _ in range(pieces // threads):
            torch.exp(piece, out=out)
        torch.set_num_threads(threads)

    times = interleaved({"fused": lambda: F.scaled_dot_product_attention(q, k, v),
                         "fused, head dim 8": lambda: F.scaled_dot_product_attention(q8, k8, v8),
                         "split + merge": split, "exps alone": exps}, repeats)
    fused = median(times["fused"][0])
    print(f"bfloat16 {tuple(q.shape)} x Lk {lk}: {scores / 1e9:.2f} G scores, {torch.get_num_threads()} threads")
    for name, (seconds, out) in times.items():
        extra = ""
        if name == "split + merge":
            exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
            extra = (f"; max abs error vs float32 {(out.float() - exact).abs().max().item():.1e} (fused: "
                     f"{(times['fused'][1].float() - exact).abs().max().item():.1e})")
        print(f"  {name:<18} {median(seconds):6.3f} s  {scores / median(seconds) / 1e9:5.2f} G scores/s  "
              f"{median(seconds) / fused:5.0%} of fused  fused {ratio(times['fused'][0], seconds)}{extra}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--channels", default="320,640,1280,1280")
    parser.add_argument("--latent", default="32x20", help="latent height x width (pixels / 8)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--rows", type=int, default=64, help="at most this many batch rows per measured shape")
    parser.add_argument("--budget", type=int, default=1 << 20, help="score elements per chunk")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--floor", action="store_true", help="what bounds the largest bfloat16 attention (above)")
    args = parser.parse_args()
    h, w = map(int, args.latent.split("x"))
    cfg = UNet3DConfig.preset("musev_referencenet")
    cfg.block_out_channels = tuple(map(int, args.channels.split(",")))
    shapes = call_shapes(cfg, (2, 4, 13, h, w))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; UNet {cfg.block_out_channels}, latent "
          f"{h}x{w}: {sum(shapes.values())} attention calls, {len(shapes)} shapes; batch cut to {args.rows} rows")
    print(f"before: {load()}")
    if args.floor:
        (q_shape, lk), _ = max(shapes.items(), key=lambda s: s[0][0][0] * s[0][0][2] * s[0][1])
        floor((min(q_shape[0], args.rows), *q_shape[1:]), lk, 13, args.repeats)
        return print(f"after:  {load()}")
    print("| dtype | q (N, heads, Lq, d) | Lk | calls | fused ms | chunked ms | fused / chunked | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        for (q_shape, lk), calls in sorted(shapes.items(), key=lambda s: -s[0][0][2] * s[0][1] * s[0][0][0]):
            n, heads, lq, d = q_shape
            n = min(n, args.rows)
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(n, heads, length, d, generator=g).to(dtype) for length in (lq, lk, lk))
            times = interleaved({"fused": lambda: F.scaled_dot_product_attention(q, k, v),
                                 "chunked": lambda: chunked(q, k, v, args.budget)}, args.repeats)
            (fused, a), (plain, b) = times["fused"], times["chunked"]
            print(f"| {name} | {(n, heads, lq, d)} | {lk} | {calls} | {median(fused) * 1e3:.1f} | "
                  f"{median(plain) * 1e3:.1f} | {ratio(fused, plain)} | {(a.float() - b.float()).abs().max().item():.1e} |",
                  flush=True)
    print(f"after:  {load()}")


if __name__ == "__main__":
    main()
