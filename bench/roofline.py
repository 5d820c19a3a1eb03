"""Where the time of one UNet window call goes, next to what this CPU's matrix units can do.

    python bench/roofline.py [--quick] [--channels 320,640,1280,1280] [--dtypes float32,bfloat16] [--rounds 1]

One `musev_referencenet` window call (random weights, SD1.5 width by default): latents (2, 4, 13, 40, 64),
both guidance halves of a 13-frame window at 512x320 with its condition frame, ReferenceNet features and
IP-Adapter tokens; `--quick` takes (2, 4, 13, 32, 20) (256x160). For each op class (convolution,
linear/matmul, attention, copies, elementwise + norms) it prints
  * FLOPs, counted by torch.utils.flop_counter.FlopCounterMode on the meta device (attention counted
    from the shapes SDPA gets: 4 * B * heads * Lq * Lk * d);
  * self CPU seconds per class, from torch.profiler, for each dtype;
  * achieved GFLOP/s per class, and as a share of this machine's GEMM peak for that dtype, measured in
    the same run by a large torch.mm before and after the model calls (the better of the two).
Calls of the dtypes are interleaved (float32, bfloat16, float32, ... with `--rounds`), after one warm-up
call each (`--no-warmup` skips it: at full size one call takes minutes); the time ratio is per round.
"""

import argparse
import statistics
import time
from collections import Counter
from unittest import mock

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from musev_lite.unet import Conditioning, ReferenceFeatures, UNet3D, UNet3DConfig
from timing import load

CLASSES = ("conv", "linear/matmul", "attention", "copies", "elementwise+norms")
LINEAR = {"aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
          "aten::mkldnn_linear", "aten::_mkldnn_linear"}
COPIES = {"aten::copy_", "aten::clone", "aten::cat", "aten::contiguous", "aten::_to_copy", "aten::repeat",
          "aten::repeat_interleave", "aten::index_select", "aten::index", "aten::stack", "aten::narrow_copy",
          "aten::to_mkldnn", "aten::_reshape_alias", "aten::reshape", "aten::flatten", "aten::unflatten"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def op_class(name: str) -> str | None:
    """The class of a profiled op by its name; None for wrappers whose self time is bookkeeping."""
    if "conv" in name or "slow_conv" in name:
        return "conv"
    if name in LINEAR:
        return "linear/matmul"
    if "scaled_dot_product" in name or "softmax" in name:
        return "attention"
    if name in COPIES:
        return "copies"
    if name.startswith("aten::"):
        return "elementwise+norms"
    return None


def window_inputs(cfg: UNet3DConfig, shape, dtype=torch.float32, device="cpu"):
    """Random latents of `shape` (B, 4, T, h, w) and the conditioning of a musev_referencenet window call:
    text (B, 77, D), 4 IP-Adapter tokens, and ReferenceNet maps of the shapes the ReferenceNet gives."""
    b, _, _, h, w = shape
    g = torch.Generator().manual_seed(0)

    def rand(*size):
        return torch.randn(size, generator=g).to(device=device, dtype=dtype)

    chs, levels = cfg.block_out_channels, len(cfg.block_out_channels)
    down = [rand(b, chs[0], h, w)]  # conv_in, then per level its layers and (but the last) the downsampler
    for i, ch in enumerate(chs):
        down += [rand(b, ch, h >> i, w >> i) for _ in range(cfg.layers_per_block)]
        if i < levels - 1:
            down.append(rand(b, ch, h >> (i + 1), w >> (i + 1)))
    refer = ReferenceFeatures(down, rand(b, chs[-1], h >> (levels - 1), w >> (levels - 1)))
    cond = Conditioning(rand(b, 77, cfg.cross_attention_dim), motion_speed=8.0,
                        ip_tokens=rand(b, 4, cfg.cross_attention_dim), refer=refer)
    return rand(*shape), cond


def flops_per_class(cfg: UNet3DConfig, shape) -> Counter:
    """FLOPs of one call by class, counted on the meta device (nothing is computed)."""
    attention = Counter()

    def counted_sdpa(q, k, v, **kwargs):  # attention FLOPs from its shapes; an empty result, no math
        attention["attention"] += sdpa_flop_count(q.shape, k.shape, v.shape)
        return torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)

    with torch.device("meta"):
        unet = UNet3D(cfg)
    sample, cond = window_inputs(cfg, shape, device="meta")
    with FlopCounterMode(display=False) as counter, mock.patch.object(F, "scaled_dot_product_attention", counted_sdpa):
        unet(sample, torch.tensor(500.0), cond, condition_frames=1)
    flops = Counter(attention)
    for op, n in counter.get_flop_counts()["Global"].items():
        flops["conv" if "convolution" in str(op) else "linear/matmul"] += n
    return flops


def gemm_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of the best of `repeats` (n x n) @ (n x n) products, after one warm-up."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def profiled_call(unet, sample, cond) -> tuple[float, Counter, Counter]:
    """Wall seconds of one call, self CPU seconds per class, and the call counts of copy ops."""
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        unet(sample, torch.tensor(500.0), cond, condition_frames=1)
        wall = time.perf_counter() - start
    seconds, counts = Counter(), Counter()
    for event in prof.key_averages():
        kind = op_class(event.key)
        if kind is not None:
            seconds[kind] += event.self_cpu_time_total / 1e6
        if event.key in ("aten::copy_", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone"):
            counts[event.key] += event.count
    return wall, seconds, counts


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="latents (2, 4, 13, 32, 20) instead of (2, 4, 13, 40, 64)")
    parser.add_argument("--channels", default="320,640,1280,1280", help="SD1.5's widths by default")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--no-warmup", action="store_true")
    args = parser.parse_args()
    shape = (2, 4, 13, 32, 20) if args.quick else (2, 4, 13, 40, 64)
    cfg = UNet3DConfig.preset("musev_referencenet")
    cfg.block_out_channels = tuple(map(int, args.channels.split(",")))
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}; "
          f"musev_referencenet UNet {cfg.block_out_channels}, latents {shape}")
    print(f"before: {load()}")
    peaks = {d: gemm_peak(d) for d in dtypes}
    flops = flops_per_class(cfg, shape)
    torch.manual_seed(0)
    unet = UNet3D(cfg).eval()
    with torch.no_grad():  # open the temporal gates (no effect on speed; keeps the numbers away from zero)
        for name, p in unet.named_parameters():
            if name.endswith("temporal_weight"):
                p.fill_(0.5)
    inputs = {d: window_inputs(cfg, shape, d) for d in dtypes}
    runs = {d: [] for d in dtypes}
    for r in range(args.rounds + (not args.no_warmup)):
        for d in dtypes:
            unet.to(d)
            result = profiled_call(unet, *inputs[d])
            if r > 0 or args.no_warmup:
                runs[d].append(result)
            print(f"  {'warm-up' if r == 0 and not args.no_warmup else 'round'} {str(d).removeprefix('torch.')}: "
                  f"{result[0]:.1f} s", flush=True)
    peaks = {d: max(peaks[d], gemm_peak(d)) for d in dtypes}
    print(f"after:  {load()}")
    print("GEMM peak (best torch.mm 2048^3, before/after the calls): "
          + ", ".join(f"{str(d).removeprefix('torch.')} {p:.0f} GFLOP/s" for d, p in peaks.items()))
    total = sum(flops.values())
    print(f"FLOPs of one call: {total / 1e12:.2f} TFLOP (" + ", ".join(
        f"{c} {flops[c] / total:.0%}" for c in CLASSES if flops[c]) + ")")
    header = "| class | GFLOP | " + " | ".join(
        f"{str(d).removeprefix('torch.')} s (share) | GFLOP/s (% of peak)" for d in dtypes) + " |"
    print(header)
    print("|" + "---|" * (2 + 2 * len(dtypes)))
    medians = {}
    for d in dtypes:
        walls = [w for w, _, _ in runs[d]]
        best = runs[d][walls.index(statistics.median_low(walls))]
        medians[d] = best
    for c in CLASSES + ("total",):
        cells = [c, f"{(flops[c] if c != 'total' else total) / 1e9:.0f}" if (c == "total" or flops[c]) else "-"]
        for d in dtypes:
            wall, seconds, _ = medians[d]
            s = wall if c == "total" else seconds[c]
            n = total if c == "total" else flops[c]
            cells.append(f"{s:.1f} ({s / wall:.0%})")
            cells.append(f"{n / s / 1e9:.0f} ({n / s / 1e9 / peaks[d]:.0%})" if n and s else "-")
        print("| " + " | ".join(cells) + " |")
    for d in dtypes:
        counts = medians[d][2]
        print(f"{str(d).removeprefix('torch.')}: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    if len(dtypes) == 2:
        a, b = dtypes
        rounds = [ra[0] / rb[0] for ra, rb in zip(runs[a], runs[b])]
        print(f"{str(a).removeprefix('torch.')} / {str(b).removeprefix('torch.')} seconds per call: "
              f"x{statistics.median(rounds):.2f} ({min(rounds):.2f}-{max(rounds):.2f}) over {len(rounds)} round(s)")


if __name__ == "__main__":
    main()
