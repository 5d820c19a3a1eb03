"""Our UNet3D against the ORIGINAL MuseV UNet3DConditionModel: same weights, same window, timed in one run.

Needs the original's environment beside ours (for developers; nothing of it is committed). Rebuilt and
checked on a CPU box (python 3.11.7) as follows; it also runs tests/make_fixtures.py's video2video part:
  * sources: github TMElyralab/MuseV main @43370a6, its submodules TMElyralab/MMCM @1e2b6e6 and
    TMElyralab/diffusers branch tme @abf2f8b (0.24.0.dev0), and for the fixture's IP-Adapter projection
    tencent-ailab/IP-Adapter @62e4af9 (only its ip_adapter/ folder is needed);
  * a venv: `pip install torch==2.13.0` first (CPU build), then `pip install path/to/diffusers` (the fork's
    checkout), then transformers==4.33.1 (brings tokenizers 0.13.3), huggingface_hub==0.20.3, ftfy==6.1.1, and
    what the original's imports ask for; the versions that worked: einops 0.8.2, pandas 3.1.1, h5py 3.16.0,
    moviepy==1.0.3, opencv-python-headless 5.0.0.93, librosa 0.11.0, ffmpeg-python 0.2.0, easydict 1.14,
    omegaconf 2.4.0, safetensors 0.8.0, numpy 2.4.6, pillow 13.0.0;
  * not installed, replaced by stand-ins at import: xformers (every release pins its own CUDA torch and has
    no CPU kernel: its memory_efficient_attention is sdpa() below) and torchvision (PyPI's 0.28.0 for
    torch 2.13 links libc10_cuda; the CPU wheel is only on the PyTorch index; the original imports it in
    MMCM's video dataset and musev/utils/util.py but never calls it on these paths). MMCM's package
    __init__ imports every MMCM tool (torchvision, insightface, ...), so `mmcm` is entered without it;
  * musev_lite importable there too (`pip install --no-deps -e .` into that venv, or a venv layered on it),
    the checkouts on PYTHONPATH (MMCM's root, not the mmcm folder), and ../shared/reference/fixtures (the
    released configs' switches; MUSEV_LITE_SHARED overrides where shared/ is):

    PYTHONPATH=MuseV:MMCM python bench/bench_vs_original.py [musev|musev_referencenet] [--channels 64,128,256,256]

Check of that environment: the original pipeline run as the shared fixtures describe gives their
musev_referencenet/t13_linspace3 guided eps to 1.1e-5 and final latents to 1.4e-4 (|x| <= 105), the
fixtures' own float-level spread across attention kernels (another CPU, other GEMM kernels).

xformers has no CPU kernel, so its attention is routed to F.scaled_dot_product_attention (the same
math, and the kernel we use), and the original's DEBUG logging is switched off: what is compared is
the models' own work. The temporal gates are opened (0.5) so the temporal layers count. The two
UNets are called in turn (warm-up, then original, ours, original, ours, ...; bench/timing.py) and the
machine's load is printed before and after: on a shared machine only ratios from one run mean anything.
"""

import argparse
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from musev_lite.referencenet import ReferenceNet
from musev_lite.convert.musev import unet_config_from_diffusers
from musev_lite.unet import Conditioning, UNet3D
from musev_lite.weights import load_weights
from timing import interleaved, load, median, ratio

SHARED = Path(os.environ.get("MUSEV_LITE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
FIXTURES = SHARED / "reference/fixtures"


def sdpa(q, k, v, attn_bias=None, p=0.0, scale=None, op=None):
    """xformers' memory_efficient_attention through SDPA's fused kernel. xformers takes (B, M, H, K) or
    (B, M, K); SDPA wants (B, H, M, K) and runs its fused CPU kernel only on 4-D inputs, so the 3-D case (the
    original's head_to_batch_dim layout, B = batch x heads) gets a heads axis of 1, as our attention has."""
    three = q.ndim == 3
    if three:
        q, k, v = (x.unsqueeze(2) for x in (q, k, v))  # (B, M, 1, K)
        attn_bias = None if attn_bias is None else attn_bias.unsqueeze(1)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, M, K)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=scale).transpose(1, 2)
    return out.squeeze(2) if three else out


def original_unet_class():
    """The original UNet3DConditionModel, imported with the stand-ins described above."""
    def module(name, path=None):
        sys.modules[name] = types.ModuleType(name)
        sys.modules[name].__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=path is not None)
        if path is not None:
            sys.modules[name].__path__ = path
        return sys.modules[name]

    xformers = module("xformers", [])
    xformers.ops = module("xformers.ops")
    xformers.ops.memory_efficient_attention = sdpa
    # mmcm without its __init__; mmcm.utils still imports normally
    module("mmcm", list(importlib.util.find_spec("mmcm").submodule_search_locations))
    from musev.models.unet_3d_condition import UNet3DConditionModel

    return UNet3DConditionModel


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("variant", nargs="?", default="musev_referencenet", choices=("musev", "musev_referencenet"))
    parser.add_argument("--channels", default="64,128,256,256")
    parser.add_argument("--latent", default="32x20", help="latent height x width (pixels / 8)")
    parser.add_argument("--dtype", default="float32", help="ours in this dtype (the original stays float32)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    UNet3DConditionModel = original_unet_class()
    logging.disable(logging.INFO)
    channels = [int(c) for c in args.channels.split(",")]
    h, w = map(int, args.latent.split("x"))

    config = json.loads((FIXTURES / args.variant / "unet/config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config.update(block_out_channels=channels, attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32)
    torch.manual_seed(0)
    original = UNet3DConditionModel(**config).eval()
    with torch.no_grad():
        for name, p in original.named_parameters():
            if name.endswith("temporal_weight"):
                p.fill_(0.5)
    ours_config = unet_config_from_diffusers(config, args.variant)
    ours = UNet3D(ours_config).eval()
    load_weights(ours, original.state_dict(), "the original's weights")
    ours.to(getattr(torch, args.dtype))

    # one window: the condition frame, then 12 frames; both guidance halves
    sample, timestep, text = torch.randn(2, 4, 13, h, w), torch.tensor(500), torch.randn(2, 77, 768)
    theirs_kwargs = dict(sample_index=torch.arange(1, 13), vision_conditon_frames_sample_index=torch.tensor([0]),
                         sample_frame_rate=8.0, do_classifier_free_guidance=True, return_dict=False)
    cond = Conditioning(text, motion_speed=8.0)
    if args.variant == "musev_referencenet":
        with torch.no_grad():
            refer = ReferenceNet(ours_config).eval()(torch.randn(2, 4, h, w), 0.0, torch.randn(2, 4, 768))
        ip_tokens = torch.randn(2, 4, 768)
        theirs_kwargs.update(vision_clip_emb=ip_tokens, down_block_refer_embs=[f[:, :, None] for f in refer.down],
                             mid_block_refer_emb=refer.mid[:, :, None])
        cond.ip_tokens, cond.refer = ip_tokens, refer

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.variant} UNet {tuple(channels)}, "
          f"window of 13 frames at {h}x{w}, batch 2; ours in {args.dtype}; timed interleaved, {args.repeats} rounds after a warm-up")
    print(f"before: {load()}")
    with torch.no_grad():
        times = interleaved({
            "original": lambda: original(sample, timestep, text, **theirs_kwargs)[0],
            "ours": lambda: ours(sample, timestep, cond, condition_frames=1).float(),
        }, args.repeats)
    print(f"after:  {load()}")
    (theirs_s, theirs), (ours_s, out) = times["original"], times["ours"]
    print(f"original UNet3DConditionModel: {median(theirs_s):.2f} s/call (median)")
    print(f"musev_lite UNet3D:             {median(ours_s):.2f} s/call   speed-up {ratio(theirs_s, ours_s)}")
    print(f"max abs difference of the outputs: {(out - theirs).abs().max().item():.2e} (output std {theirs.std().item():.3f})")

if __name__ == "__main__":
    main()
