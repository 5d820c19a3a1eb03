"""Which attention kernel is fastest for the shapes of a MuseV window call: SDPA's fused kernel, or the
plain matmul-softmax-matmul computed a few batch rows at a time (scores kept under `--budget` floats).

    python bench/bench_attention.py [--channels 320,640,1280,1280] [--latent 32x20] [--dtypes float32,bfloat16]

The shapes are those `F.scaled_dot_product_attention` gets in one `musev_referencenet` window call
(2 guidance halves x 13 frames, 8 heads; collected on the meta device), the batch cut to at most
`--rows` so one measurement stays short; each distinct shape is timed interleaved (fused, chunked,
fused, ...), and the two results compared.
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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--channels", default="320,640,1280,1280")
    parser.add_argument("--latent", default="32x20", help="latent height x width (pixels / 8)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--rows", type=int, default=64, help="at most this many batch rows per measured shape")
    parser.add_argument("--budget", type=int, default=1 << 20, help="score elements per chunk")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    h, w = map(int, args.latent.split("x"))
    cfg = UNet3DConfig.preset("musev_referencenet")
    cfg.block_out_channels = tuple(map(int, args.channels.split(",")))
    shapes = call_shapes(cfg, (2, 4, 13, h, w))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; UNet {cfg.block_out_channels}, latent "
          f"{h}x{w}: {sum(shapes.values())} attention calls, {len(shapes)} shapes; batch cut to {args.rows} rows")
    print(f"before: {load()}")
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
