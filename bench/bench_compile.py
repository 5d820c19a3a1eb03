"""torch.compile against eager for one `musev_referencenet` window call, and whether it recompiles.

    python bench/bench_compile.py [--channels 320,640,1280,1280] [--latent 32x20] [--dtype bfloat16] [--freezing]

Compiles the UNet as `model.compile = true` does (`compile_model`; random weights, the window of
bench/roofline.py), then times eager and compiled calls interleaved (bench/timing.py) with the load
printed, and compares their outputs. Before timing, it
checks what a run asks of the compiled model besides the first call: other timesteps (as floats, then as
0-d tensors, which the denoising loop passes), another shot's conditioning, windows of other lengths: the
graphs compiled are counted by torch._dynamo's counters, and the graph breaks of the first call reported.
`--freezing` sets torch._inductor.config.freezing (weights become constants: convolution and linear
weights prepacked for oneDNN; a LoRA applied later would be ignored).
"""

import argparse
import time

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from musev_lite.unet import UNet3D, UNet3DConfig, compile_model
from roofline import window_inputs
from timing import interleaved, load, median, ratio


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--channels", default="320,640,1280,1280")
    parser.add_argument("--latent", default="32x20", help="latent height x width (pixels / 8)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--freezing", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    h, w = map(int, args.latent.split("x"))
    dtype = getattr(torch, args.dtype)
    torch._inductor.config.freezing = args.freezing
    cfg = UNet3DConfig.preset("musev_referencenet")
    cfg.block_out_channels = tuple(map(int, args.channels.split(",")))
    torch.manual_seed(0)
    unet = UNet3D(cfg).eval().to(dtype)
    with torch.no_grad():  # open the temporal gates, so the temporal layers' work counts
        for name, p in unet.named_parameters():
            if name.endswith("temporal_weight"):
                p.fill_(0.5)
    sample, cond = window_inputs(cfg, (2, 4, 13, h, w), dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; UNet {cfg.block_out_channels}, latent "
          f"{h}x{w}, {args.dtype}, freezing={args.freezing}")
    explained = torch._dynamo.explain(unet)(sample, torch.tensor(999.0), cond, condition_frames=1)
    print(f"graphs {explained.graph_count}, graph breaks {explained.graph_break_count}"
          + "".join(f"\n  break: {b.reason}" for b in explained.break_reasons))
    torch._dynamo.reset()
    counters.clear()
    compiled = compile_model(unet)  # as model.compile = true does
    start = time.perf_counter()
    with torch.no_grad():
        compiled(sample, 999.0, cond, condition_frames=1)
        print(f"first call (compiling): {time.perf_counter() - start:.0f} s; graphs {counters['stats']['unique_graphs']}")
        for t in (500.0, 1.0):
            compiled(sample, t, cond, condition_frames=1)
        print(f"  after two more timesteps given as floats: graphs {counters['stats']['unique_graphs']}")
        for t in (250.0, 1.0):  # as the denoising loop gives them: sampler.timesteps[i], a 0-d tensor
            compiled(sample, torch.tensor(t), cond, condition_frames=1)
        print(f"  after two timesteps given as tensors: graphs {counters['stats']['unique_graphs']}")
        compiled(sample, torch.tensor(500.0), window_inputs(cfg, (2, 4, 13, h, w), dtype)[1], condition_frames=1)
        print(f"  after another shot's conditioning: graphs {counters['stats']['unique_graphs']}")
        for frames in (9, 11):
            other, other_cond = window_inputs(cfg, (2, 4, frames, h, w), dtype)
            start = time.perf_counter()
            compiled(other, torch.tensor(500.0), other_cond, condition_frames=1)
            print(f"  after a {frames}-frame window: graphs {counters['stats']['unique_graphs']} "
                  f"({time.perf_counter() - start:.0f} s)")
        print(f"before: {load()}")
        t = torch.tensor(500.0)
        times = interleaved({"eager": lambda: unet(sample, t, cond, condition_frames=1),
                             "compiled": lambda: compiled(sample, t, cond, condition_frames=1)}, args.repeats)
    print(f"after:  {load()}")
    (eager, a), (comp, b) = times["eager"], times["compiled"]
    print(f"eager {median(eager):.2f} s, compiled {median(comp):.2f} s per call: compiled faster {ratio(eager, comp)}; "
          f"outputs differ by {(a.float() - b.float()).abs().max().item():.1e} (max |x| {a.abs().max().item():.2f})")


if __name__ == "__main__":
    main()
