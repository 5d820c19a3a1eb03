"""MuseVPipeline: load the models once, then turn an image (or only a prompt) into a video.

    pipe = MuseVPipeline.from_pretrained("weights/musev_referencenet")
    video = pipe("(masterpiece, best quality), (1girl, solo), (eye blinks:1.8)", image="face.png",
                 num_frames=24, seed=1)
    video.frames  # uint8 (F, H, W, 3): the condition image, then 24 new frames

One call (spec: pipeline.md §2-§4, §7):
  1. fit the images to the video size; encode the prompt pair [negative; positive];
  2. IP-Adapter tokens and ReferenceNet features, once per call;
  3. without a condition image, draw the first frame from the prompt in 2D mode (§2.4);
  4. for each shot: VideoFusion noise, then parallel denoising around the clean condition latent;
     the next shot continues from this shot's last latent (§3.6);
  5. decode the latents a few frames at a time into uint8 frames.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection, clip_image_preprocess
from .denoise import context_windows, guidance_scales, initial_latents, parallel_denoise, video_fusion_noise
from .ip_adapter import ImageProjection, ImageProjectionConfig
from .prompts import encode_prompt_pair, load_textual_inversion, save_textual_inversion
from .referencenet import ReferenceNet
from .samplers import SD15_SCHEDULER, SchedulerConfig, make_sampler
from .tokenizer import CLIPTokenizer
from .unet import UNet3D, UNet3DConfig
from .vae import AutoencoderKL, VAEConfig
from .video_io import as_pil, fit_image
from .weights import WeightsError, config_from_dict, load_component, load_weights, save_component

DEFAULT_SIZE = (512, 320)  # (height, width) without a condition image: MuseV's training size
REQUIRED = ("unet", "vae", "text_encoder")
REFERENCENET_PARTS = ("referencenet", "image_proj", "image_encoder")
# textual-inversion files in a weights folder, each word named by its file (MuseV's negative presets
# name badhandv4, ng_deepnegative_v1_75t, EasyNegativeV2, bad_prompt_version2-neg)
EMBEDDINGS = "embeddings"
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")


@dataclass
class Progress:
    """Passed to the callback after every sampler step and every decoded chunk."""

    stage: str  # "first_frame" | "video" | "decode"
    shot: int  # 0-based
    shots: int
    step: int  # 1-based within the stage (decode: frames done)
    steps: int  # total of the stage (decode: frames)
    unet_calls: int  # UNet calls per step


@dataclass
class VideoResult:
    frames: np.ndarray | list[Image.Image]  # uint8 (F, H, W, 3), or PIL images
    latents: torch.Tensor  # (1, 4, F, H/8, W/8), clean
    seed: int | None


def missing_weights(weights_dir: str | Path) -> list[str]:
    """Files `from_pretrained` needs that are not in `weights_dir`."""
    weights_dir = Path(weights_dir)
    names = [f"{c}.{ext}" for c in REQUIRED for ext in ("safetensors", "json")]
    names += ["tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler.json"]
    if (weights_dir / "referencenet.json").is_file():
        names += [f"{c}.{ext}" for c in REFERENCENET_PARTS for ext in ("safetensors", "json")]
    return [n for n in names if not (weights_dir / n).is_file()]


def _load(cls, config_cls, weights_dir: Path, name: str, device, dtype):
    state, config = load_component(weights_dir, name)
    model = cls(config_from_dict(config_cls, config))
    load_weights(model, state, str(weights_dir / f"{name}.safetensors"))
    return model.to(device=device, dtype=dtype).eval()


class MuseVPipeline:
    def __init__(self, unet: UNet3D, vae: AutoencoderKL, text_encoder, tokenizer, scheduler: SchedulerConfig,
                 referencenet: ReferenceNet | None = None, image_proj: ImageProjection | None = None,
                 image_encoder: CLIPVisionModelWithProjection | None = None):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler = scheduler
        self.referencenet, self.image_proj, self.image_encoder = referencenet, image_proj, image_encoder
        self.files: list[str] = []  # what was loaded, for the sidecar
        self.textual_inversions: dict[str, torch.Tensor] = {}  # word -> its vectors

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @classmethod
    def from_pretrained(cls, weights_dir: str | Path, device="cpu", dtype=torch.float32) -> MuseVPipeline:
        """Load a folder written by the converters (see weights/README.md)."""
        weights_dir = Path(weights_dir)
        missing = missing_weights(weights_dir)
        if missing:
            raise WeightsError(f"{weights_dir}: missing {', '.join(missing)}; see weights/README.md to fetch them")
        unet = _load(UNet3D, UNet3DConfig, weights_dir, "unet", device, dtype)
        vae = _load(AutoencoderKL, VAEConfig, weights_dir, "vae", device, torch.float32)  # VAE in fp32, as MuseV
        text_encoder = _load(CLIPTextModel, CLIPTextConfig, weights_dir, "text_encoder", device, dtype)
        tokenizer = CLIPTokenizer.from_folder(weights_dir / "tokenizer")
        extra = {}
        if (weights_dir / "referencenet.json").is_file():
            extra = dict(
                referencenet=_load(ReferenceNet, UNet3DConfig, weights_dir, "referencenet", device, dtype),
                image_proj=_load(ImageProjection, ImageProjectionConfig, weights_dir, "image_proj", device, dtype),
                image_encoder=_load(CLIPVisionModelWithProjection, CLIPVisionConfig, weights_dir, "image_encoder",
                                    device, dtype),
            )
        pipe = cls(unet, vae, text_encoder, tokenizer, SchedulerConfig.from_json(weights_dir / "scheduler.json"), **extra)
        embeddings = sorted(p for p in (weights_dir / EMBEDDINGS).glob("*") if p.suffix in EMBEDDING_SUFFIXES)
        for path in embeddings:
            pipe.load_textual_inversion(path)
        pipe.files = sorted(str(p) for p in weights_dir.glob("*.safetensors")) + [str(p) for p in embeddings]
        return pipe

    def load_textual_inversion(self, path: str | Path, word: str | None = None) -> str:
        """Add an A1111 textual-inversion embedding (.pt / .safetensors); its word (default: the file
        name) can then be used in prompts. Returns the word."""
        word = word or Path(path).stem
        ids = load_textual_inversion(path, self.tokenizer, self.text_encoder, word)
        table = self.text_encoder.text_model.embeddings.token_embedding.weight
        self.textual_inversions[word] = table[ids[0] : ids[-1] + 1].detach().cpu().clone()
        return word

    def save_pretrained(self, weights_dir: str | Path) -> None:
        """Write the folder `from_pretrained` reads: one safetensors + JSON config per component."""
        weights_dir = Path(weights_dir)
        for name in REQUIRED + REFERENCENET_PARTS:
            model = getattr(self, name)
            if model is not None:
                state = model.state_dict()
                if name == "text_encoder":  # the base vocabulary; added words go to embeddings/
                    key = "text_model.embeddings.token_embedding.weight"
                    state[key] = state[key][: self.tokenizer.base_vocab_size]
                save_component(weights_dir, name, state, dataclasses.asdict(model.config))
        for word, vectors in self.textual_inversions.items():
            save_textual_inversion(weights_dir / EMBEDDINGS / f"{word}.safetensors", vectors)
        self.tokenizer.save(weights_dir / "tokenizer")
        (weights_dir / "scheduler.json").write_text(json.dumps(dataclasses.asdict(self.scheduler), indent=2) + "\n")

    @classmethod
    def demo(cls, seed: int = 0, device="cpu") -> MuseVPipeline:
        """The `tiny` preset at seeded random weights with a byte-level tokenizer: exercises every part
        of the pipeline offline in seconds. A pipeline demo, not a trained model: its videos are noise."""
        torch.manual_seed(seed)
        tokenizer = CLIPTokenizer.byte_level()
        unet_config = UNet3DConfig.preset("tiny")
        text_config = CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=unet_config.cross_attention_dim,
                                     intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        vision_config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, patch_size=32, projection_dim=64)
        models = dict(
            unet=UNet3D(unet_config),
            vae=AutoencoderKL(VAEConfig(block_out_channels=(16, 16, 16, 16), norm_num_groups=8, layers_per_block=1)),
            text_encoder=CLIPTextModel(text_config),
            referencenet=ReferenceNet(unet_config),
            image_proj=ImageProjection(ImageProjectionConfig(vision_config.projection_dim, unet_config.cross_attention_dim)),
            image_encoder=CLIPVisionModelWithProjection(vision_config),
        )
        models = {k: m.to(device).eval() for k, m in models.items()}
        return cls(tokenizer=tokenizer, scheduler=SchedulerConfig.from_dict(SD15_SCHEDULER), **models)

    # -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> clean latents (n, 4, h, w): VAE posterior mean x scaling factor."""
        pixels = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2)
        pixels = pixels.to(self.device, torch.float32) / 127.5 - 1
        return self.vae.encode(pixels)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, chunk_size: int = 8, progress=None) -> np.ndarray:
        """(1, 4, F, h, w) -> uint8 (F, H, W, 3), `chunk_size` frames in float at a time."""
        frames = latents[0].transpose(0, 1)  # f 4 h w
        out = None
        for start in range(0, len(frames), chunk_size):
            images = self.vae.decode(frames[start : start + chunk_size].float().to(self.device), chunk_size)
            # (x / 2 + 0.5) clamped, x255 truncated: as MuseV writes its videos
            chunk = ((images / 2 + 0.5).clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            if out is None:
                out = np.empty((len(frames), *chunk.shape[1:]), dtype=np.uint8)
            out[start : start + len(chunk)] = chunk
            if progress:
                progress(start + len(chunk), len(frames))
        return out

    def _unet(self, sample, t, text, condition_frames, **kwargs):
        return self.unet(sample, t, text, condition_frames=condition_frames, **kwargs).float()

    @torch.no_grad()
    def image_conditioning(self, refer_image, ip_image, text, ip_adapter_scale: float) -> dict:
        """IP-Adapter tokens [proj(0); proj(clip(image))] and ReferenceNet features, batch [uncond; cond]."""
        kwargs = {}
        if self.image_proj is not None and ip_image is not None and ip_adapter_scale > 0:
            pixels = clip_image_preprocess([ip_image]).to(self.device, self.image_encoder.dtype)
            embeds = self.image_encoder(pixels)
            embeds = torch.cat([torch.zeros_like(embeds), embeds])  # the uncond tokens are proj(0), not 0
            kwargs["ip_tokens"] = self.image_proj(embeds.to(self.image_proj.proj.weight.dtype))
            kwargs["ip_scale"] = ip_adapter_scale
        if self.referencenet is not None and refer_image is not None:
            latent = self.encode_images([refer_image]).repeat(2, 1, 1, 1)  # same latent for both halves
            context = kwargs.get("ip_tokens", text)  # IP tokens when there is an IP-Adapter, else the text
            kwargs["refer"] = self.referencenet(latent, torch.zeros(()), context)
        return kwargs

    @torch.no_grad()
    def __call__(
        self,
        prompt: str = "",
        image=None,
        *,
        negative_prompt: str = "V2",
        refer_image=None,
        ip_adapter_image=None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int = 12,
        n_batch: int = 1,
        steps: int = 10,
        guidance_scale: float = 3.5,
        guidance_scale_end: float | None = None,
        guidance_method: str = "linear",
        first_frame_steps: int = 30,
        first_frame_guidance: float = 7.5,
        redraw_condition_image: bool = False,
        context_frames: int = 12,
        context_overlap: int = 4,
        context_schedule: str = "uniform_v2",
        window_batch: int = 1,
        motion_speed: float = 8.0,
        w_ind_noise: float = 0.5,
        img_weight: float = 1e-3,
        ip_adapter_scale: float = 1.0,
        sampler: str = "euler",
        size_multiple: int = 8,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        callback: Callable[[Progress], None] | None = None,
        output_type: str = "uint8",
    ) -> VideoResult:
        """Generate `n_batch` shots of `num_frames` new frames after the condition image (MuseV's
        defaults). Without `image` the first frame is drawn from the prompt, and the first shot adds
        `num_frames - 1`. `latents` (1,4,F,h,w): the first shot's starting noise instead of a draw."""
        self._check(num_frames, n_batch, steps, guidance_scale, first_frame_guidance, size_multiple, output_type, image)
        if generator is None:
            seed = random.randrange(10**8) if seed is None else seed
            generator = torch.Generator("cpu").manual_seed(seed)
        report = callback or (lambda progress: None)

        image = as_pil(image) if image is not None else None
        height, width = self._size(image, height, width, size_multiple)
        fit = lambda im: fit_image(as_pil(im), height, width)  # noqa: E731
        image = fit(image) if image is not None else None
        refer_image = fit(refer_image) if refer_image is not None else image
        ip_adapter_image = fit(ip_adapter_image) if ip_adapter_image is not None else image
        text = encode_prompt_pair(self.tokenizer, self.text_encoder, prompt, negative_prompt).to(self.device)
        shape_hw = (height // 8, width // 8)

        drawn = image is None  # text -> first frame -> video
        if drawn or redraw_condition_image:
            conditioning = self.image_conditioning(refer_image, ip_adapter_image, text, ip_adapter_scale)
            condition = self._first_frame(image, text, conditioning, shape_hw, first_frame_steps,
                                          first_frame_guidance, sampler, generator, report, n_batch)
            frame0 = Image.fromarray(self.decode(condition)[0])
            # the drawn frame stands in for missing reference images; a redraw replaces them (§2.4, §7.1)
            refer_image = frame0 if redraw_condition_image or refer_image is None else refer_image
            ip_adapter_image = frame0 if redraw_condition_image or ip_adapter_image is None else ip_adapter_image
        else:
            condition = self.encode_images([image])[:, :, None]  # 1 4 1 h w
        conditioning = self.image_conditioning(refer_image, ip_adapter_image, text, ip_adapter_scale)
        video_unet_kwargs = dict(conditioning, motion_speed=motion_speed)

        shots = [condition]
        for shot in range(n_batch):
            frames = num_frames - 1 if shot == 0 and drawn else num_frames
            schedule = make_sampler(sampler, self.scheduler, steps)
            if shot == 0 and latents is not None:
                if tuple(latents.shape) != (1, 4, frames, *shape_hw):
                    raise ValueError(f"latents have shape {tuple(latents.shape)}; this call needs "
                                     f"{(1, 4, frames, *shape_hw)} (batch, channels, new frames, height/8, width/8)")
                x = latents.to(self.device, torch.float32) * schedule.init_noise_sigma
            else:
                x = initial_latents((1, 4, frames, *shape_hw), generator, schedule.init_noise_sigma, w_ind_noise,
                                    condition, img_weight).to(self.device)
            windows = context_windows(context_schedule, x.shape[2], context_frames, context_overlap)
            guidance = guidance_scales(guidance_scale, steps, guidance_scale_end, guidance_method)
            n_calls = -(-len(windows) // window_batch)
            x = parallel_denoise(
                self._unet, x, condition, text, schedule, windows, guidance, window_batch, video_unet_kwargs,
                callback=lambda i, _: report(Progress("video", shot, n_batch, i + 1, steps, n_calls)),
                unused_noise=(lambda shape: video_fusion_noise(shape, generator)) if sampler == "euler" else None,
            )
            shots.append(x)
            condition = x[:, :, -1:]  # the next shot continues from this shot's last frame (§3.6)
        video_latents = torch.cat(shots, dim=2)
        frames = self.decode(video_latents, progress=lambda done, total: report(Progress("decode", 0, 1, done, total, 0)))
        if output_type == "pil":
            frames = [Image.fromarray(f) for f in frames]
        return VideoResult(frames, video_latents, seed)

    def _first_frame(self, image, text, conditioning, shape_hw, steps, guidance, sampler, generator, report, n_batch):
        """Draw (no image) or redraw (img2img from `image`) one frame with the temporal layers off."""
        schedule = make_sampler(sampler, self.scheduler, steps)
        noise = torch.randn((1, 4, 1, *shape_hw), generator=generator).to(self.device)
        if image is None:
            x = noise * schedule.init_noise_sigma
        else:  # MuseV's redraw noises the image to the first timestep; its `strength` is inert (§2.4)
            x = schedule.add_noise(self.encode_images([image])[:, :, None], noise, 0)
        no_condition = torch.zeros((1, 4, 0, *shape_hw), device=self.device)
        return parallel_denoise(
            self._unet, x, no_condition, text, schedule, [[0]], [guidance] * steps, 1,
            dict(conditioning, temporal=False),
            callback=lambda i, _: report(Progress("first_frame", 0, n_batch, i + 1, steps, 1)),
            unused_noise=(lambda shape: torch.randn(shape, generator=generator)) if sampler == "euler" else None,
        )

    @staticmethod
    def _size(image, height, width, multiple):
        if image is not None:
            height, width = height or image.height, width or image.width
        else:
            height, width = height or DEFAULT_SIZE[0], width or DEFAULT_SIZE[1]
        height, width = height // multiple * multiple, width // multiple * multiple  # MuseV floors
        if height < 8 or width < 8:
            raise ValueError(f"video size {height}x{width} is too small; give height/width of at least {multiple}")
        return height, width

    @staticmethod
    def _check(num_frames, n_batch, steps, guidance_scale, first_frame_guidance, size_multiple, output_type, image):
        if num_frames < (1 if image is not None else 2):
            raise ValueError(f"num_frames = {num_frames}: need at least {1 if image is not None else 2} "
                             "(without an image the first frame is drawn, then num_frames - 1 more)")
        if n_batch < 1 or steps < 1:
            raise ValueError(f"n_batch ({n_batch}) and steps ({steps}) must be at least 1")
        if guidance_scale < 1 or first_frame_guidance < 1:
            raise ValueError(f"guidance_scale = {guidance_scale}, first_frame_guidance = {first_frame_guidance}: "
                             "must be >= 1 (parallel denoising uses classifier-free guidance)")
        if size_multiple < 8 or size_multiple % 8:
            raise ValueError(f"size_multiple = {size_multiple} must be a multiple of 8")
        if output_type not in ("uint8", "pil"):
            raise ValueError(f"output_type = {output_type!r}: use 'uint8' or 'pil'")

