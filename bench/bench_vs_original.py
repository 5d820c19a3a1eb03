"""Our UNet3D against the ORIGINAL MuseV UNet3DConditionModel: same weights, same window, timed in one run.

Needs the original's environment beside ours (for developers; nothing of it is committed):
  * a MuseV checkout (github TMElyralab/MuseV) and its MMCM submodule on PYTHONPATH,
  * its diffusers fork (github TMElyralab/diffusers, branch tme) installed, with transformers==4.33.1,
    huggingface_hub==0.20.3, einops and the packages its imports ask for (pandas, h5py, moviepy==1.0.3,
    opencv-python-headless, librosa, ffmpeg-python, easydict, torchvision, xformers),
  * ../shared/reference/fixtures (the released configs' switches).

    PYTHONPATH=MuseV:MuseV/MMCM:. python bench/bench_vs_original.py [musev|musev_referencenet] [--channels 64,128,256,256]

xformers has no CPU kernel, so its attention is routed to F.scaled_dot_product_attention (the same
math, and the kernel we use), and the original's DEBUG logging is switched off: what is compared is
the models' own work. The temporal gates are opened (0.5) so the temporal layers count.
"""

import argparse
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
import xformers.ops
from musev.models.unet_3d_condition import UNet3DConditionModel

from musev_lite.referencenet import ReferenceNet
from musev_lite.convert.musev import unet_config_from_diffusers
from musev_lite.unet import Conditioning, UNet3D
from musev_lite.weights import load_weights
from timing import seconds_per_call

FIXTURES = Path(__file__).resolve().parents[2] / "shared/reference/fixtures"


def sdpa(q, k, v, attn_bias=None, p=0.0, scale=None, op=None):
    """xformers' memory_efficient_attention, (B, M, H, K) or (B, M, K), through SDPA."""
    if q.ndim == 4:
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=scale).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=scale)



def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("variant", nargs="?", default="musev_referencenet", choices=("musev", "musev_referencenet"))
    parser.add_argument("--channels", default="64,128,256,256")
    parser.add_argument("--latent", default="32x20", help="latent height x width (pixels / 8)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    xformers.ops.memory_efficient_attention = sdpa
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

    with torch.no_grad():
        theirs_s, theirs = seconds_per_call(lambda: original(sample, timestep, text, **theirs_kwargs)[0], args.repeats)
        ours_s, out = seconds_per_call(lambda: ours(sample, timestep, cond, condition_frames=1), args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.variant} UNet {tuple(channels)}, "
          f"window of 13 frames at {h}x{w}, batch 2")
    print(f"original UNet3DConditionModel: {theirs_s:.2f} s/call")
    print(f"musev_lite UNet3D:             {ours_s:.2f} s/call   speed-up x{theirs_s / ours_s:.2f}")
    print(f"max abs difference of the outputs: {(out - theirs).abs().max().item():.2e} (output std {theirs.std().item():.3f})")


if __name__ == "__main__":
    main()
