"""One pipeline call of the ORIGINAL MuseV against one `MuseVPipeline` call: same weights, same inputs,
timed interleaved in one process.

    MUSEV_SRC=path/to/MuseV MMCM_SRC=path/to/MMCM IP_ADAPTER_SRC=path/to/IP-Adapter \
        python bench/bench_pipeline_vs_original.py [--channels 64,128,256,256] [--frames 13] [--steps 2] \
        [--dtype bfloat16] [--threads 1]

The original is `MusevControlNetPipeline.__call__` called as scripts/inference/text2video.py's predictor
calls it for image2video (condition image, ReferenceNet image and IP-Adapter image all the same image,
uniform_v2 windows of 12 frames with overlap 4, guidance 3.5, Euler with VideoFusion noise, seeded
generator), set up as the predictor does (Euler from the SD1.5 scheduler config, VAE slicing,
xformers attention). It needs the original's environment (see bench/bench_vs_original.py) and runs
through tests/make_fixtures.py's `_original_musev`, whose xformers stand-in is torch SDPA with 3-D
inputs given a heads axis (the fused kernel ours uses too).

Weights: the `musev_referencenet` UNet, its ReferenceNet and the IP-Adapter projection at reduced
width (default 64-256 channels, 8 heads, text width 768), random, built by the original classes and
loaded into ours; a small random VAE (diffusers AutoencoderKL, 32-128 channels) on both sides. The
text embeddings are given (random, both halves), so neither side runs a text encoder; the CLIP image
encoder is a stand-in returning a fixed embedding on both sides. The original computes in float32, ours
in `--dtype` (float32 by default; its VAE stays float32).

Prints seconds per call for each round, the ratio (median and range of the per-round ratios), the
machine's load before and after, and how far apart the two calls' final latents and frames are.
"""

import argparse
import json
import os
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from musev_lite.convert.musev import REFERENCENET_UNUSED, unet_config_from_diffusers
from musev_lite.convert.sd15 import vae_state
from musev_lite.clip import CLIPTextConfig, CLIPTextModel
from musev_lite.ip_adapter import ImageProjection, ImageProjectionConfig
from musev_lite.pipeline import MuseVPipeline
from musev_lite.referencenet import ReferenceNet
from musev_lite.samplers import SchedulerConfig
from musev_lite.tokenizer import CLIPTokenizer
from musev_lite.unet import UNet3D
from musev_lite.vae import AutoencoderKL, VAEConfig
from musev_lite.weights import load_weights
from timing import interleaved, load, median, ratio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from make_fixtures import _original_musev  # noqa: E402

SHARED = Path(os.environ.get("MUSEV_LITE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
FIXTURES = SHARED / "reference/fixtures"
VAE = dict(block_out_channels=(32, 64, 128, 128), layers_per_block=2, norm_num_groups=32)
SEED = 1000


class FixedImageEmbeds(torch.nn.Module):
    """The CLIP image encoder's place, on both sides: the same (1, 1024) embedding for any image."""

    def __init__(self, embeds):
        super().__init__()
        self.register_buffer("embeds", embeds)

    @property
    def dtype(self):
        return self.embeds.dtype

    def extract_images(self, images, target_height, target_width, return_type):  # the original's interface
        return self.embeds

    def forward(self, pixels):  # ours
        return self.embeds


def original_pipeline(orig, unet_config: dict, refer_config: dict, embeds: torch.Tensor):
    """MusevControlNetPipeline with random reduced-width models, set up as the predictor sets it up."""
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import PNDMScheduler
    from transformers import CLIPTextConfig as HFTextConfig
    from transformers import CLIPTextModel as HFTextModel
    from transformers import CLIPTokenizer as HFTokenizer

    torch.manual_seed(0)
    unet = orig.UNet3DConditionModel(**unet_config).eval()
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name.endswith("temporal_weight"):
                p.fill_(0.5)  # open the temporal gates so those layers' numbers count
    vae = DiffusersVAE(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                       **VAE).eval()
    text_encoder = HFTextModel(HFTextConfig(hidden_size=768, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2)).eval()  # never called: embeddings are given
    vocab = SHARED / "reference/clip_tokenizer"
    scheduler_config = json.loads((FIXTURES / "manifest.json").read_text())["variants"]["musev_referencenet"][
        "runs"]["t13_linspace3"]["checkpoint_scheduler_config"]
    pipe = orig.predictor.MusevControlNetPipeline(
        vae=vae, unet=unet, scheduler=PNDMScheduler.from_config(scheduler_config), controlnet=None,
        text_encoder=text_encoder,
        tokenizer=HFTokenizer(str(vocab / "vocab.json"), str(vocab / "merges.txt"), model_max_length=77),
        safety_checker=None, feature_extractor=None, referencenet=orig.ReferenceNet2D(**refer_config).eval(),
        vision_clip_extractor=FixedImageEmbeds(embeds),
        ip_adapter_image_proj=orig.ImageProjModel(cross_attention_dim=768, clip_embeddings_dim=1024,
                                                  clip_extra_context_tokens=4).eval())
    pipe.scheduler = orig.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.enable_vae_slicing()
    pipe.set_progress_bar_config(disable=True)
    randn = torch.randn
    with mock.patch("torch.cuda.is_available", lambda: True), \
            mock.patch("torch.randn", lambda *a, device=None, **k: randn(*a, **k)):
        pipe.enable_xformers_memory_efficient_attention()  # its CUDA self-test, run on the CPU stand-in
    return pipe, scheduler_config


def our_pipeline(theirs, unet_config: dict, scheduler_config: dict, embeds: torch.Tensor) -> MuseVPipeline:
    """The same weights in our models."""
    config = unet_config_from_diffusers(unet_config, "musev_referencenet")
    unet, referencenet = UNet3D(config).eval(), ReferenceNet(config).eval()
    load_weights(unet, theirs.unet.state_dict(), "the original's UNet")
    load_weights(referencenet, {k: v for k, v in theirs.referencenet.state_dict().items()
                                if not k.startswith(REFERENCENET_UNUSED)}, "the original's ReferenceNet")
    vae = AutoencoderKL(VAEConfig(**VAE)).eval()
    load_weights(vae, vae_state(theirs.vae.state_dict(), "diffusers VAE"), "the original's VAE")
    image_proj = ImageProjection(ImageProjectionConfig()).eval()
    load_weights(image_proj, theirs.ip_adapter_image_proj.state_dict(), "the original's image projection")
    tokenizer = CLIPTokenizer.byte_level()
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=tokenizer.vocab_size, intermediate_size=64,
                                                num_hidden_layers=1, num_attention_heads=2)).eval()  # never called
    return MuseVPipeline(unet, vae, text_encoder, tokenizer, SchedulerConfig.from_dict(scheduler_config),
                         referencenet=referencenet, image_proj=image_proj, image_encoder=FixedImageEmbeds(embeds))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--channels", default="64,128,256,256")
    parser.add_argument("--size", default="256x160", help="video height x width in pixels")
    parser.add_argument("--frames", type=int, default=13, help="new frames after the condition image")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--dtype", default="float32", help="ours in this dtype (the original stays float32)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    height, width = map(int, args.size.split("x"))
    channels = [int(c) for c in args.channels.split(",")]
    orig = _original_musev(*(Path(os.environ[k]) for k in ("MUSEV_SRC", "MMCM_SRC", "IP_ADAPTER_SRC")))

    def sized(folder):
        config = json.loads((FIXTURES / "musev_referencenet" / folder / "config.json").read_text())
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        return dict(config, block_out_channels=channels, attention_head_dim=8, cross_attention_dim=768,
                    norm_num_groups=32)

    unet_config = sized("unet")
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 1024, generator=generator)
    theirs, scheduler_config = original_pipeline(orig, unet_config, sized("referencenet"), embeds)
    ours = our_pipeline(theirs, unet_config, scheduler_config, embeds).to(dtype=getattr(torch, args.dtype))

    # inputs: a smooth random image (8x8 tiles), the text embeddings [negative; prompt]
    tiles = torch.randint(0, 256, (height // 8, width // 8, 3), generator=generator, dtype=torch.uint8)
    image = tiles.repeat_interleave(8, 0).repeat_interleave(8, 1).numpy()  # (H, W, 3)
    negative, prompt = torch.randn(2, 1, 77, 768, generator=generator)
    as_call = image.transpose(2, 0, 1)[None, :, None]  # (1, 3, 1, H, W), as the predictor hands it over
    settings = dict(context_frames=12, context_overlap=4, guidance=3.5, w_ind_noise=0.5, img_weight=1e-3, speed=8.0)

    def original_call(steps):
        out = theirs(
            video_length=args.frames, prompt_embeds=prompt, negative_prompt_embeds=negative, height=height,
            width=width, num_inference_steps=steps, guidance_scale=settings["guidance"], output_type="np",
            generator=torch.Generator("cpu").manual_seed(SEED), condition_images=as_call, refer_image=as_call,
            ip_adapter_image=as_call, skip_temporal_layer=False, noise_type="video_fusion",
            w_ind_noise=settings["w_ind_noise"], need_img_based_video_noise=True, img_weight=settings["img_weight"],
            motion_speed=settings["speed"], context_schedule="uniform_v2", context_frames=settings["context_frames"],
            context_overlap=settings["context_overlap"], ip_adapter_scale=1.0)
        frames = (np.asarray(out.videos[0]).transpose(1, 2, 3, 0) * 255).astype(np.uint8)  # (F, H, W, 3) as MuseV writes them
        return torch.from_numpy(out.latents), frames

    def our_call(steps):
        out = ours(image=image, prompt_embeds=prompt, negative_prompt_embeds=negative, fit_images=False,
                   num_frames=args.frames, steps=steps, guidance_scale=settings["guidance"], sampler="euler",
                   w_ind_noise=settings["w_ind_noise"], img_weight=settings["img_weight"],
                   motion_speed=settings["speed"], context_schedule="uniform_v2",
                   context_frames=settings["context_frames"], context_overlap=settings["context_overlap"],
                   generator=torch.Generator("cpu").manual_seed(SEED))
        return out.latents, out.frames

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; musev_referencenet image2video, UNet "
          f"{tuple(channels)}, {height}x{width}, ours in {args.dtype}, {args.frames} frames + the condition frame, {args.steps} Euler steps; "
          f"warm-up with 1 step, then {args.repeats} rounds interleaved")
    print(f"before: {load()}")
    with torch.no_grad():
        original_call(1), our_call(1)
        times = interleaved({"original": lambda: original_call(args.steps), "ours": lambda: our_call(args.steps)},
                            args.repeats, warmup=False)
    print(f"after:  {load()}")
    (theirs_s, (theirs_latents, theirs_frames)), (ours_s, (ours_latents, ours_frames)) = times["original"], times["ours"]
    print(f"original MusevControlNetPipeline.__call__: {' '.join(f'{s:.1f}' for s in theirs_s)} s "
          f"(median {median(theirs_s):.1f} s)")
    print(f"musev_lite MuseVPipeline.__call__:         {' '.join(f'{s:.1f}' for s in ours_s)} s "
          f"(median {median(ours_s):.1f} s)   speed-up {ratio(theirs_s, ours_s)}")
    print(f"final latents: max abs difference {(ours_latents - theirs_latents).abs().max().item():.2e} "
          f"(|latents| <= {theirs_latents.abs().max().item():.1f}); frames: max abs difference "
          f"{np.abs(ours_frames.astype(int) - theirs_frames.astype(int)).max()} of 255")


if __name__ == "__main__":
    main()
