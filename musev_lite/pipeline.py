"""MuseVPipeline: load the models once, then turn an image (or only a prompt) into a video.

    pipe = MuseVPipeline.from_pretrained("weights/musev_referencenet")
    video = pipe("(masterpiece, best quality), (1girl, solo), (eye blinks:1.8)", image="face.png",
                 num_frames=24, seed=1)
    video.frames  # uint8 (F, H, W, 3): the condition image, then 24 new frames

One call is five stages, each a method below (docs/method.md tells the method):
  1. `fit_images`, `encode_text`: the images fitted to the video size; the prompt pair [negative; positive];
  2. `image_conditioning`: IP-Adapter tokens and ReferenceNet features, once per call;
  3. `draw_first_frame`: without a condition image, the first frame is drawn from the prompt in 2D mode;
  4. `denoise_shots`: per shot, VideoFusion noise, then parallel denoising around the clean condition
     latent; the next shot continues from this shot's last latent;
  5. `decode`: the latents, a few frames at a time, into uint8 frames.
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

from . import distributed
from .clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection, clip_image_preprocess
from .denoise import context_windows, guidance_scales, initial_latents, parallel_denoise, window_groups
from .ip_adapter import ImageProjection, ImageProjectionConfig
from .lora import load_lora, merge_lora, unmerge_lora
from .prompts import encode_prompt_pair, load_textual_inversion, save_textual_inversion
from .referencenet import ReferenceNet
from .samplers import SD15_SCHEDULER, SchedulerConfig, make_sampler
from .settings import OUTPUT_TYPES, ConfigError, GenerationConfig
from .tokenizer import CLIPTokenizer
from .unet import Conditioning, UNet3D, UNet3DConfig
from .vae import AutoencoderKL, VAEConfig
from .video_io import as_pil, fit_image
from .weights import (
    EMBEDDING_SUFFIXES,
    EMBEDDINGS,
    REFERENCENET_PARTS,
    REQUIRED,
    WeightsError,
    check_finite,
    config_from_dict,
    load_component,
    load_weights,
    missing_weights,
    save_component,
)

DEFAULT_SIZE = (512, 320)  # (height, width) without a condition image: MuseV's training size
GUIDANCE_FIX = "lower generation.guidance_scale / guidance_scale_end / ip_adapter_scale"
MODEL_PARTS = REQUIRED + REFERENCENET_PARTS


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
        self.loras: list[tuple[str, float]] = []  # (file, scale) merged into the UNet and text encoder

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    def to(self, device=None, dtype: torch.dtype | None = None) -> MuseVPipeline:
        """Move every model to `device` and (except the VAE, which stays float32) to `dtype`."""
        for name in MODEL_PARTS:
            model = getattr(self, name)
            if model is not None:
                model.to(device=device, dtype=None if name == "vae" else dtype)
        return self

    @classmethod
    def from_pretrained(cls, weights_dir: str | Path, device="cpu", dtype=torch.float32,
                        torch_dtype: torch.dtype | None = None) -> MuseVPipeline:
        """Load a folder written by the converters (see weights/README.md). `torch_dtype` is diffusers'
        name for `dtype`; the VAE stays in float32 either way."""
        if torch_dtype is not None:
            if dtype not in (torch.float32, torch_dtype):
                raise ValueError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree; give one of them")
            dtype = torch_dtype
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

    def load_loras(self, loras: list[tuple[str | Path, float]]) -> None:
        """Merge LoRA files (kohya / A1111 or diffusers / PEFT), each with its scale, into the UNet's
        spatial layers and the text encoder; `unload_loras` restores the weights bitwise."""
        merge_lora(self.unet, self.text_encoder, [(load_lora(path), scale) for path, scale in loras])
        self.loras += [(str(path), scale) for path, scale in loras]

    def unload_loras(self) -> None:
        unmerge_lora(self.unet, self.text_encoder)
        self.loras = []

    def save_pretrained(self, weights_dir: str | Path) -> None:
        """Write the folder `from_pretrained` reads: one safetensors + JSON config per component."""
        weights_dir = Path(weights_dir)
        for name in MODEL_PARTS:
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
    # One call, stage by stage

    @torch.no_grad()
    def __call__(
        self,
        prompt: str = "",
        image=None,
        config: GenerationConfig | None = None,
        *,
        negative_prompt: str = "V2",
        refer_image=None,
        ip_adapter_image=None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        condition_latents: torch.Tensor | None = None,
        fit_images: bool = True,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        callback: Callable[[Progress], None] | None = None,
        output_type: str = "uint8",
        **settings,
    ) -> VideoResult:
        """Generate `n_batch` shots of `num_frames` new frames after the condition image.

        `config` holds the generation settings (MuseV's defaults); keyword `settings` override some of
        them, e.g. `pipe(prompt, image, steps=4)`. Without `image` the first frame is drawn from the
        prompt and the first shot adds `num_frames - 1`. `prompt_embeds` / `negative_prompt_embeds`
        (1, L, D) skip the text encoder. `condition_latents` (1, 4, 1, h, w) is frame 0 as a latent,
        instead of `image`. `fit_images=False`: the images already have the video's size and are used
        as they are (MuseV's centre crop is not the identity even at that size). `latents` (1,4,F,h,w):
        the first shot's starting noise instead of a draw. `generator` instead of `config.seed`.
        """
        config = (config or GenerationConfig()).replace(**settings)
        has_image = image is not None or condition_latents is not None
        config.validate(has_image=has_image)
        if output_type not in OUTPUT_TYPES:
            raise ConfigError(f"output_type = {output_type!r}: use one of {', '.join(OUTPUT_TYPES)}")
        seed = config.seed
        if generator is None:
            seed = random.randrange(10**8) if seed is None else seed
            ranks = distributed.current()
            if ranks is not None:  # distributed: every rank draws rank 0's noise
                seed = ranks.broadcast_seed(seed)
            generator = torch.Generator("cpu").manual_seed(seed)
        report = callback or (lambda progress: None)

        height, width = self.video_size(image, condition_latents, config)
        image, refer_image, ip_adapter_image = self.fit_images(image, refer_image, ip_adapter_image, height, width,
                                                               fit_images)
        text = self.encode_text(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        if condition_latents is not None:
            if image is not None or config.redraw_condition_image:
                raise ConfigError("condition_latents replace the condition image: give no image and leave "
                                  "redraw_condition_image off")
            condition = self.check_condition_latents(condition_latents, height, width)
        elif image is not None and not config.redraw_condition_image:
            condition = self.encode_images([image])[:, :, None]  # 1 4 1 h w
        else:  # text -> first frame -> video, or MuseV's img2img redraw of the condition image
            first = self.image_conditioning(refer_image, ip_adapter_image, text, config)
            condition = self.draw_first_frame(image, first, (height // 8, width // 8), config, generator, report)
        if image is None or config.redraw_condition_image:
            # frame 0 as an image stands in for missing reference images; a redraw replaces them
            frame0 = Image.fromarray(self.decode(condition)[0])
            refer_image = frame0 if config.redraw_condition_image or refer_image is None else refer_image
            ip_adapter_image = frame0 if config.redraw_condition_image or ip_adapter_image is None else ip_adapter_image
        cond = self.image_conditioning(refer_image, ip_adapter_image, text, config)
        video_latents = self.denoise_shots(condition, cond, config, generator, latents, report, drawn=not has_image)
        frames = self.decode(video_latents, progress=lambda done, total: report(Progress("decode", 0, 1, done, total, 0)))
        if output_type == "pil":
            frames = [Image.fromarray(f) for f in frames]
        return VideoResult(frames, video_latents, seed)

    def video_size(self, image, condition_latents, config: GenerationConfig) -> tuple[int, int]:
        """(height, width): as set, else the condition image's (or latent's), else MuseV's 512x320;
        floored to `size_multiple` as MuseV does."""
        if condition_latents is not None:
            size = (condition_latents.shape[-2] * 8, condition_latents.shape[-1] * 8)
        elif image is not None:
            image = as_pil(image)
            size = (image.height, image.width)
        else:
            size = DEFAULT_SIZE
        multiple = config.size_multiple
        height, width = (config.height or size[0]) // multiple * multiple, (config.width or size[1]) // multiple * multiple
        if height < 8 or width < 8:
            raise ConfigError(f"video size {height}x{width} is too small; give height/width of at least {multiple}")
        return height, width

    @staticmethod
    def fit_images(image, refer_image, ip_adapter_image, height: int, width: int, fit: bool = True):
        """The condition, ReferenceNet and IP-Adapter images as RGB PIL images of the video's size (the
        reference images default to the condition image). `fit=False`: they must have that size."""

        def fitted(im, name):
            im = as_pil(im)
            if fit:
                return fit_image(im, height, width)
            if im.size != (width, height):
                raise ConfigError(f"{name} is {im.width}x{im.height} but the video is {width}x{height}; "
                                  "pass fit_images=True to centre-crop and resize it")
            return im

        image = None if image is None else fitted(image, "image")
        refer_image = image if refer_image is None else fitted(refer_image, "refer_image")
        ip_adapter_image = image if ip_adapter_image is None else fitted(ip_adapter_image, "ip_adapter_image")
        return image, refer_image, ip_adapter_image

    def encode_text(self, prompt: str, negative_prompt: str, prompt_embeds=None, negative_prompt_embeds=None):
        """(2, L, D) text embeddings [negative; positive], from the prompts or given embeddings."""
        if prompt_embeds is None:
            if negative_prompt_embeds is not None:
                raise ConfigError("negative_prompt_embeds given without prompt_embeds; give both, or prompts")
            return encode_prompt_pair(self.tokenizer, self.text_encoder, prompt, negative_prompt).to(self.device)
        if negative_prompt_embeds is None:
            negative_prompt_embeds = encode_prompt_pair(self.tokenizer, self.text_encoder, "", negative_prompt)[:1]
        width = self.unet.config.cross_attention_dim
        for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if embeds.ndim != 3 or embeds.shape[0] != 1 or embeds.shape[2] != width:
                raise ConfigError(f"{name} must be (1, tokens, {width}); got {tuple(embeds.shape)}")
        if prompt_embeds.shape[1] != negative_prompt_embeds.shape[1]:
            raise ConfigError(f"prompt_embeds has {prompt_embeds.shape[1]} tokens, the negative prompt "
                              f"{negative_prompt_embeds.shape[1]}; pass negative_prompt_embeds of the same length")
        return torch.cat([negative_prompt_embeds, prompt_embeds]).to(self.device, self.dtype)

    def check_condition_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        shape = (1, 4, 1, height // 8, width // 8)
        if tuple(latents.shape) != shape:
            raise ConfigError(f"condition_latents have shape {tuple(latents.shape)}; this call needs {shape} "
                              "(batch, channels, one frame, height/8, width/8)")
        return latents.to(self.device, torch.float32)

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> clean latents (n, 4, h, w): VAE posterior mean x scaling factor."""
        pixels = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2)
        pixels = pixels.to(self.device, torch.float32) / 127.5 - 1
        return check_finite(self.vae.encode(pixels), "image encoding (VAE)")

    @torch.no_grad()
    def image_conditioning(self, refer_image, ip_image, text: torch.Tensor, config: GenerationConfig) -> Conditioning:
        """The text, plus IP-Adapter tokens [proj(0); proj(clip(image))] and ReferenceNet features (of
        the same image, made with each half's IP tokens or text) when the model has them, all batched
        [uncond; cond]."""
        cond = Conditioning(text, motion_speed=config.motion_speed)
        if self.image_proj is not None and ip_image is not None and config.ip_adapter_scale > 0:
            pixels = clip_image_preprocess([ip_image]).to(self.device, self.image_encoder.dtype)
            embeds = self.image_encoder(pixels)
            embeds = torch.cat([torch.zeros_like(embeds), embeds])  # the uncond tokens are proj(0), not 0
            cond.ip_tokens = self.image_proj(embeds.to(self.image_proj.proj.weight.dtype))
            cond.ip_scale = config.ip_adapter_scale
        if self.referencenet is not None and refer_image is not None:
            latent = self.encode_images([refer_image]).repeat(2, 1, 1, 1)  # same latent for both halves
            context = text if cond.ip_tokens is None else cond.ip_tokens  # IP tokens when there are, else text
            cond.refer = self.referencenet(latent, torch.zeros(()), context)
        return cond

    def _unet(self, sample, t, cond: Conditioning, condition_frames: int, temporal: bool = True, lengths=None):
        return self.unet(sample, t, cond, condition_frames=condition_frames, temporal=temporal, lengths=lengths).float()

    def draw_first_frame(self, image, cond: Conditioning, shape_hw, config: GenerationConfig, generator, report):
        """Draw (no image) or redraw (img2img from `image`) one frame with the temporal layers off."""
        steps = config.first_frame_steps
        sampler = make_sampler(config.sampler, self.scheduler, steps)
        noise = torch.randn((1, 4, 1, *shape_hw), generator=generator).to(self.device)
        if image is None:
            x = noise * sampler.init_noise_sigma
        else:  # MuseV's redraw noises the image to the first timestep: its `strength` is inert
            x = sampler.add_noise(self.encode_images([image])[:, :, None], noise, 0)
        no_condition = torch.zeros((1, 4, 0, *shape_hw), device=self.device)

        def after_step(i, x):
            check_finite(x, f"first frame, step {i + 1}/{steps}", "lower generation.first_frame_guidance")
            report(Progress("first_frame", 0, config.n_batch, i + 1, steps, 1))

        return parallel_denoise(self._unet, x, no_condition, cond, sampler, [[0]], [config.first_frame_guidance] * steps,
                                generator=generator, temporal=False, callback=after_step, ranks=distributed.current())

    def denoise_shots(self, condition: torch.Tensor, cond: Conditioning, config: GenerationConfig, generator,
                      latents, report, drawn: bool) -> torch.Tensor:
        """Every shot's latents after the condition latent, (1, 4, F, h, w). Each shot starts from
        VideoFusion noise and is denoised in parallel windows around its condition latent: the image's
        for the first shot, the last latent of the shot before for the others."""
        g = config
        ranks = distributed.current()  # distributed: each rank denoises its share of the windows
        shape_hw = tuple(condition.shape[-2:])
        shots = [condition]
        for shot in range(g.n_batch):
            frames = g.num_frames - 1 if shot == 0 and drawn else g.num_frames
            sampler = make_sampler(g.sampler, self.scheduler, g.steps, noise_type="video_fusion")
            if shot == 0 and latents is not None:
                if tuple(latents.shape) != (1, 4, frames, *shape_hw):
                    raise ConfigError(f"latents have shape {tuple(latents.shape)}; this call needs "
                                      f"{(1, 4, frames, *shape_hw)} (batch, channels, new frames, height/8, width/8)")
                x = latents.to(self.device, torch.float32) * sampler.init_noise_sigma
            else:
                x = initial_latents((1, 4, frames, *shape_hw), generator, sampler.init_noise_sigma, g.w_ind_noise,
                                    condition, g.img_weight).to(self.device)
            windows = context_windows(g.context_schedule, frames, g.context_frames, g.context_overlap)
            guidance = guidance_scales(g.guidance_scale, g.steps, g.guidance_scale_end, g.guidance_method)
            calls = len(window_groups(windows if ranks is None else ranks.windows(windows), g.window_batch))

            def after_step(i, x, shot=shot):
                check_finite(x, f"shot {shot + 1}/{g.n_batch}, step {i + 1}/{g.steps}", GUIDANCE_FIX)
                report(Progress("video", shot, g.n_batch, i + 1, g.steps, calls))

            x = parallel_denoise(self._unet, x, condition, cond, sampler, windows, guidance, g.window_batch, generator,
                                 callback=after_step, ranks=ranks)
            shots.append(x)
            condition = x[:, :, -1:]  # the next shot continues from this shot's last frame
        return torch.cat(shots, dim=2)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, chunk_size: int = 8, progress=None) -> np.ndarray:
        """(1, 4, F, h, w) -> uint8 (F, H, W, 3), `chunk_size` frames in float at a time. Distributed,
        each rank decodes a block of the chunks and every rank gets all frames."""
        frames = latents[0].transpose(0, 1)  # f 4 h w
        starts = list(range(0, len(frames), chunk_size))
        ranks = distributed.current()
        if ranks is not None:  # distributed: this rank's block of chunks
            starts = ranks.block(starts)
        chunks = []
        for start in starts:
            images = self.vae.decode(frames[start : start + chunk_size].float().to(self.device), chunk_size)
            check_finite(images, f"decoding frames {start}-{start + len(images) - 1}")
            # (x / 2 + 0.5) clamped, x255 truncated: as MuseV writes its videos
            chunks.append(((images / 2 + 0.5).clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
            if progress:
                progress(start + len(chunks[-1]), len(frames))
        if ranks is not None:  # distributed: every rank's chunks, in rank order = frame order
            chunks = [chunk for part in ranks.all_gather(chunks, "gathering the decoded frames") for chunk in part]
        return np.concatenate(chunks)
