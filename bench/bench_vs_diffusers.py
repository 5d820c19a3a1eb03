"""Our UNet in 2D mode (the SD1.5 UNet that draws the first frame) against diffusers' UNet2DConditionModel,
same weights, same inputs, timed in one run. Needs the reference extra (pip install -e ".[reference]").

    python bench/bench_vs_diffusers.py [--channels 320,640,1280,1280] [--latent 64x64] [--repeats 3]

Prints seconds per UNet call (batch 2: both guidance halves; the two UNets called in turn, bench/timing.py),
the ratio, the machine's load, and the max abs difference of the outputs (they must agree: the speed is
only worth comparing if the results are the same).
"""

import argparse

import torch
from diffusers import UNet2DConditionModel

from musev_lite.unet import Conditioning, UNet3D, UNet3DConfig
from musev_lite.weights import load_weights
from timing import interleaved, load, median, ratio


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--channels", default="320,640,1280,1280", help="SD1.5's widths by default")
    parser.add_argument("--latent", default="64x64", help="latent height x width (pixels / 8)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    channels = tuple(map(int, args.channels.split(",")))
    h, w = map(int, args.latent.split("x"))
    torch.manual_seed(0)
    reference = UNet2DConditionModel(block_out_channels=channels, cross_attention_dim=768,
                                     attention_head_dim=8).eval()
    cfg = UNet3DConfig.preset("musev")
    cfg.block_out_channels, cfg.transformer_norm_eps = channels, 1e-5  # diffusers' LayerNorm eps
    ours = UNet3D(cfg).eval()
    load_weights(ours, reference.state_dict(), "diffusers UNet2DConditionModel", allow_missing=True)

    sample = torch.randn(2, 4, h, w)
    text = torch.randn(2, 77, 768)
    t = torch.tensor([500.0, 500.0])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; UNet {channels}, latent {h}x{w}, batch 2; "
          f"timed interleaved, {args.repeats} rounds after a warm-up")
    print(f"before: {load()}")
    cond = Conditioning(text, motion_speed=8.0)
    with torch.no_grad():
        times = interleaved({
            "diffusers": lambda: reference(sample, t, text).sample,
            "ours": lambda: ours(sample[:, :, None], t, cond, condition_frames=0, temporal=False),
        }, args.repeats)
    print(f"after:  {load()}")
    (theirs_s, theirs), (ours_s, out) = times["diffusers"], times["ours"]
    print(f"diffusers UNet2DConditionModel: {median(theirs_s):.2f} s/call (median)")
    print(f"musev_lite UNet3D, 2D mode:     {median(ours_s):.2f} s/call   speed-up {ratio(theirs_s, ours_s)}")
    print(f"max abs difference of the outputs: {(out[:, :, 0] - theirs).abs().max().item():.2e} "
          f"(output std {theirs.std().item():.3f})")

if __name__ == "__main__":
    main()
