"""MuseVPipeline: load the models once, then turn an image (or only a prompt, or a video) into a video.

    pipe = MuseVPipeline.from_pretrained("weights/musev_referencenet")
    video = pipe("(masterpiece, best quality), (1girl, solo), (eye blinks:1.8)", image="face.png",
                 num_frames=24, seed=1)
    video.frames  # uint8 (F, H, W, 3): the condition image, then 24 new frames

The models, their loading and saving, LoRA and textual inversion are `models.MuseVModels`; this file is
the call. `generate` is a numbered skeleton of named stages (docs/method.md tells the method):
  1. `plan_call`: the inputs and settings checked, and what the call will do (`plan.GenerationPlan`), with
     the memory it needs;
  2. `seeded_generator`: the random generator, from the seed (rank 0's under torchrun);
  3. the images and videos fitted to the video size; `encode_text`: the prompt pair [negative; positive];
  4. `condition_latent`: frame 0 as a latent: the condition image's, or drawn from the prompt in 2D mode
     (`draw_first_frame`);
  5. `image_conditioning`: IP-Adapter tokens, IPAdapterFaceID tokens and ReferenceNet features, once per call;
  6. `denoise_shots`: per shot, VideoFusion noise, then parallel denoising around the clean condition
     latent; the next shot continues from this shot's last latent. Video2video (`video=` RGB frames to
     start from and/or `control=` control videos for ControlNets) is one pass over the whole video:
     `denoise_video`;
  7. `decoded`: each shot's latents, a few frames at a time, into uint8 frames, yielded as the shot is done;
     with `hist_match`, the generated frames then take frame 0's colour histograms (MuseV's need_hist_match).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from . import distributed
from .clip import clip_image_preprocess
from .controlnet import MultiControlNet
from .denoise import ImageDenoiser, WindowControl, WindowedDenoiser, guidance_scales, initial_latents, sample
from .histmatch import match_frames
from .ip_adapter import face_embedding_checked
from .memory import check_memory, return_freed_memory
from .models import MuseVModels
from .plan import ControlVideo, GenerationPlan, RunState, check_resume, fitted_images, fitted_videos, make_plan
from .prompts import encode_prompt_pair
from .samplers import make_sampler, video_fusion_noise
from .settings import OUTPUT_TYPES, ConfigError, GenerationConfig
from .unet import Conditioning
from .vae import decode_chunk
from .weights import check_finite

GUIDANCE_FIX = "lower generation.guidance_scale / guidance_scale_end / ip_adapter_scale"


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
class Shot:
    """What `generate` yields when a shot is done: its frames (the condition frame first, for shot 0)."""

    index: int
    frames: np.ndarray  # uint8 (n, H, W, 3)
    latents: torch.Tensor  # (1, 4, n, H/8, W/8), clean
    seed: int | None


@dataclass
class VideoResult:
    frames: np.ndarray | list[Image.Image]  # uint8 (F, H, W, 3), or PIL images
    latents: torch.Tensor  # (1, 4, F, H/8, W/8), clean
    seed: int | None


def seeded_generator(generator: torch.Generator | None, seed: int | None) -> tuple[torch.Generator, int | None]:
    """The call's random generator and its seed: the caller's generator, or a CPU one seeded with `seed`
    (a random one when None). Under torchrun every rank takes rank 0's seed, so all draw the same noise."""
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise ConfigError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return generator, seed
    seed = random.randrange(10**8) if seed is None else seed
    ranks = distributed.current()
    if ranks is not None:  # distributed: every rank draws rank 0's noise
        seed = ranks.broadcast_seed(seed)
    return torch.Generator("cpu").manual_seed(seed), seed


class MuseVPipeline(MuseVModels):
    @torch.no_grad()
    def __call__(self, *args, output_type: str = "uint8", **kwargs) -> VideoResult:
        """The whole video at once: every shot `generate` yields, joined. Takes `generate`'s arguments;
        `output_type="pil"` gives PIL images instead of a uint8 array."""
        if output_type not in OUTPUT_TYPES:
            raise ConfigError(f"output_type = {output_type!r}: use one of {', '.join(OUTPUT_TYPES)}")
        shots = list(self.generate(*args, **kwargs))
        frames = np.concatenate([shot.frames for shot in shots])
        latents = torch.cat([shot.latents for shot in shots], dim=2)
        if output_type == "pil":
            frames = [Image.fromarray(f) for f in frames]
        return VideoResult(frames, latents, shots[0].seed)

    @torch.no_grad()
    def generate(
        self,
        prompt: str = "",
        image=None,
        config: GenerationConfig | None = None,
        *,
        negative_prompt: str | None = None,
        refer_image=None,
        ip_adapter_image=None,
        face_embedding=None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        condition_latents: torch.Tensor | None = None,
        video: np.ndarray | None = None,
        control: ControlVideo | list[ControlVideo] | None = None,
        fit_images: bool = True,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        callback: Callable[[Progress], None] | None = None,
        resume: RunState | None = None,
        on_state: Callable[[RunState], None] | None = None,
        **settings,
    ) -> Iterator[Shot]:
        """Generate `n_batch` shots of `num_frames` new frames after the condition image, yielding each
        shot's decoded frames as it is done, so a long video never sits in memory as a whole.

        `config` holds the generation settings (MuseV's defaults); keyword `settings` override some of
        them, e.g. `pipe(prompt, image, steps=4)`. Without `image` the first frame is drawn from the
        prompt and the first shot adds `num_frames - 1`. `negative_prompt`: a preset (Empty, V1..V5) or
        text; None is the pipeline's `negative_prompt` (MuseV's V2; V1 for `demo`). `prompt_embeds` /
        `negative_prompt_embeds` (1, L, D) skip the text encoder. `condition_latents` (1, 4, 1, h, w) is
        frame 0 as a latent, instead of `image`. `fit_images=False`: the images already have the video's
        size and are used as they are (MuseV's centre crop is not the identity even at that size).
        `latents` (1,4,F,h,w): the first shot's starting noise instead of a draw. `generator` instead of
        `config.seed`.
        `on_state(RunState)` is called after every sampler step and every shot; `resume=` one of those
        states (with the same arguments otherwise) continues from it: the shots after it are yielded
        and equal those of the uninterrupted run.

        Video2video: `video` (F, H, W, 3) uint8 RGB frames to start from (SDEdit, `video_strength`) and/or
        `control`, one control video per ControlNet (a `ControlVideo` or a list of them); all F frames long.
        Frame 0 pairs with the condition image (the RGB video's frame 0 when no `image` is given); the other
        F - 1 frames are generated in one parallel-denoising pass, whatever `num_frames` / `n_batch` say.

        `face_embedding`: a 512-d ArcFace embedding (tensor or array; insightface's normed_embedding) for
        IPAdapterFaceID, at `ip_adapter_face_scale`; the weights need its `ip_adapter_face` component.
        """
        # 1. Check the inputs and plan the call: nothing runs unless it can
        plan, image, video, control = self.plan_call(image, config, video=video, control=control,
                                                     condition_latents=condition_latents,
                                                     face_embedding=face_embedding, **settings)
        face = None if face_embedding is None else face_embedding_checked(face_embedding, "face_embedding")
        g, (height, width) = plan.config, (plan.height, plan.width)
        if resume is not None:
            check_resume(resume, plan)
        # 2. The random generator
        generator, seed = seeded_generator(generator, g.seed if resume is None else resume.seed)
        report = callback or (lambda progress: None)
        # 3. The images and videos at the video's size; the prompt pair
        image, refer_image, ip_adapter_image = fitted_images(image, refer_image, ip_adapter_image, height, width,
                                                             fit_images)
        video, control = fitted_videos(video, control, height, width, fit_images)
        negative_prompt = self.negative_prompt if negative_prompt is None else negative_prompt
        text = self.encode_text(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        # 4. Frame 0 as a latent
        if resume is not None:
            condition = resume.first_condition.to(self.device)
        else:
            condition = self.condition_latent(image, condition_latents, refer_image, ip_adapter_image, text, plan,
                                              generator, report, face)
        # 5. IP-Adapter and face tokens, ReferenceNet features, once (frame 0 stands in for a missing reference image)
        if image is None or g.redraw_condition_image:
            frame0 = Image.fromarray(self.decode(condition)[0])
            refer_image = frame0 if g.redraw_condition_image or refer_image is None else refer_image
            ip_adapter_image = frame0 if g.redraw_condition_image or ip_adapter_image is None else ip_adapter_image
        cond = self.image_conditioning(refer_image, ip_adapter_image, text, g, face)
        # 6. Parallel denoising, shot by shot (video2video: one pass), from the start or the resumed state
        if resume is None:
            resume = RunState(0, 0, condition, None, condition, generator.get_state(), seed)
        else:
            generator.set_state(resume.generator)

        def state(shot: int, step: int, shot_condition, latents) -> None:
            if on_state is not None:
                on_state(RunState(shot, step, shot_condition, latents, condition, generator.get_state(), seed))

        if plan.task == "video2video":
            shots = self.denoise_video(cond, plan, generator, video, control, report, resume, state)
        else:
            shots = self.denoise_shots(cond, plan, generator, latents, report, resume, state)
        # 7. Each shot decoded as it is done
        yield from self.decoded(shots, plan, condition, seed, report)

    def plan_call(self, image=None, config: GenerationConfig | None = None, *, video: np.ndarray | None = None,
                  control: ControlVideo | list[ControlVideo] | None = None,
                  condition_latents: torch.Tensor | None = None, face_embedding=None,
                  **settings) -> tuple[GenerationPlan, object, object, list]:
        """The checks `generate` makes before it starts working, without the work: the settings, the videos
        and the ControlNets they name, the video's size, a face embedding and that the weights have
        IPAdapterFaceID for it, and that there is memory for it (`check_memory`).
        Raises the ConfigError `generate` would; returns (plan, image, video, control) as `plan.make_plan`
        does. For callers that must not start unless the call can run (the CLI makes no output folder
        before), and that report what the call will do (its frames, steps and UNet calls)."""
        plan, image, video, control = make_plan(self.generation_config(config, settings), image, video, control,
                                                condition_latents, self.controlnets)
        if face_embedding is not None:
            face_embedding_checked(face_embedding, "face_embedding")
            if self.face_proj is None:
                raise ConfigError("a face embedding was given, but these weights have no IPAdapterFaceID: convert "
                                  "ip-adapter-faceid_sd15.bin into the weights folder (musev-lite convert faceid "
                                  "ip-adapter-faceid_sd15.bin WEIGHTS_DIR)")
        check_memory(self, plan)
        return plan, image, video, control

    @staticmethod
    def generation_config(config: GenerationConfig | None, overrides: dict) -> GenerationConfig:
        """`config` (MuseV's defaults when None) with keyword `overrides`."""
        if config is not None and not isinstance(config, GenerationConfig):
            raise ConfigError(f"config must be a GenerationConfig or None, got {type(config).__name__} {config!r:.40}; "
                              "give settings as keywords, e.g. pipe(prompt, image, steps=4)")
        return (config or GenerationConfig()).replace(**overrides)

    def condition_latent(self, image, condition_latents, refer_image, ip_adapter_image, text, plan: GenerationPlan,
                         generator, report, face=None) -> torch.Tensor:
        """Frame 0's clean latent (1, 4, 1, h, w): given, the image's, or drawn in 2D mode (no image, or
        MuseV's img2img redraw of the image)."""
        g = plan.config
        if condition_latents is not None:
            if image is not None or g.redraw_condition_image:
                raise ConfigError("condition_latents replace the condition image: give no image and leave "
                                  "redraw_condition_image off")
            return self.check_condition_latents(condition_latents, plan.height, plan.width)
        if image is not None and not g.redraw_condition_image:
            return self.encode_images([image])[:, :, None]  # 1 4 1 h w
        first = self.image_conditioning(refer_image, ip_adapter_image, text, g, face)
        return self.draw_first_frame(image, first, plan, generator, report)

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
        pixels = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).contiguous()
        pixels = pixels.to(self.device, torch.float32) / 127.5 - 1  # n 3 H W in [-1, 1]
        return check_finite(self.vae.encode(pixels), "image encoding (VAE)")

    @torch.no_grad()
    def image_conditioning(self, refer_image, ip_image, text: torch.Tensor, config: GenerationConfig,
                           face: torch.Tensor | None = None) -> Conditioning:
        """The text, plus IP-Adapter tokens [proj(0); proj(clip(image))] and ReferenceNet features (of the same
        image, made with each half's IP tokens or text) when the model has them, and IPAdapterFaceID tokens
        [face_proj(0); face_proj(face)] for a checked face embedding, all batched [uncond; cond]. The
        projection reads the CLIP image_embeds (`image_proj`) or, for IP-Adapter's plus models (`resampler`),
        the penultimate hidden states. `config`: a plan's, whose motion_speed is set."""
        cond = Conditioning(text, motion_speed=config.motion_speed)
        projection = self.image_proj if self.resampler is None else self.resampler
        if projection is not None and ip_image is not None and config.ip_adapter_scale > 0:
            pixels = clip_image_preprocess([ip_image]).to(self.device, self.image_encoder.dtype)
            if self.resampler is None:
                features = self.image_encoder(pixels)  # 1 projection_dim
            else:
                features = self.image_encoder.penultimate_hidden_states(pixels)  # 1 (1 + patches) hidden_size
            features = torch.cat([torch.zeros_like(features), features])  # the uncond tokens are proj(0), not 0
            cond.ip_tokens = projection(features.to(next(projection.parameters()).dtype))
            cond.ip_scale = config.ip_adapter_scale
        if self.referencenet is not None and refer_image is not None:
            latent = self.encode_images([refer_image]).repeat(2, 1, 1, 1)  # same latent for both halves
            context = text if cond.ip_tokens is None else cond.ip_tokens  # IP tokens when there are, else text
            cond.refer = self.referencenet(latent, torch.zeros(()), context)
        if face is not None and config.ip_adapter_face_scale > 0:
            embeds = torch.stack([torch.zeros_like(face), face]).to(self.device, self.face_proj.proj[0].weight.dtype)
            cond.face_tokens = self.face_proj(embeds)  # the uncond tokens are face_proj(0), as MuseV's
            cond.face_scale = config.ip_adapter_face_scale
        return cond

    def _unet(self, sample, t, cond: Conditioning, condition_frames: int, temporal: bool = True, lengths=None):
        return self.unet(sample, t, cond, condition_frames=condition_frames, temporal=temporal, lengths=lengths).float()

    def draw_first_frame(self, image, cond: Conditioning, plan: GenerationPlan, generator, report):
        """Draw (no image) or redraw (img2img from `image`) one frame with the temporal layers off. Every
        rank of a distributed run draws it itself: the same UNet calls give it the same frame."""
        g, steps = plan.config, plan.first_frame_steps
        sampler = make_sampler(g.sampler, self.scheduler, steps)
        noise = torch.randn((1, 4, 1, *plan.latent_hw), generator=generator).to(self.device)
        if image is None:
            x = noise * sampler.init_noise_sigma
        else:  # MuseV's redraw noises the image to the first timestep: its `strength` is inert
            x = sampler.add_noise(self.encode_images([image])[:, :, None], noise, 0)
        denoiser = ImageDenoiser(self._unet, cond, sampler, [g.first_frame_guidance] * steps)

        def after_step(i, x):
            check_finite(x, f"first frame, step {i + 1}/{steps}", "lower generation.first_frame_guidance")
            report(Progress("first_frame", 0, plan.shots, i + 1, steps, denoiser.calls_per_step))

        return sample(denoiser, sampler, x, generator, callback=after_step)

    def denoise_shots(self, cond: Conditioning, plan: GenerationPlan, generator, latents, report, resume: RunState,
                      state) -> Iterator[tuple[int, torch.Tensor]]:
        """(shot, its latents (1, 4, n, h, w)) shot by shot, from `resume` on; shot 0's start with the
        condition latent. Each shot starts from VideoFusion noise and is denoised in parallel windows
        around its condition latent: the image's for the first shot, the last latent of the shot before
        for the others."""
        g, condition = plan.config, resume.condition
        for shot in range(resume.shot, plan.shots):
            shape = (1, 4, plan.shot_frames[shot], *plan.latent_hw)
            sampler = make_sampler(g.sampler, self.scheduler, g.steps, noise_type="video_fusion", w_ind_noise=g.w_ind_noise)
            start = 0
            if shot == resume.shot and resume.latents is not None:
                x, start = resume.latents.to(self.device), resume.step
            elif shot == 0 and latents is not None:
                if tuple(latents.shape) != shape:
                    raise ConfigError(f"latents have shape {tuple(latents.shape)}; this call needs {shape} "
                                      "(batch, channels, new frames, height/8, width/8)")
                x = latents.to(self.device, torch.float32) * sampler.init_noise_sigma
            else:
                x = initial_latents(shape, generator, sampler.init_noise_sigma, g.w_ind_noise, condition,
                                    g.img_weight).to(self.device)
            x = self.denoise_shot(x, condition, cond, sampler, plan, generator, report, shot, start=start,
                                  state=lambda step, x, shot=shot, c=condition: state(shot, step, c, x))
            yield shot, (torch.cat([condition, x], dim=2) if shot == 0 else x)
            condition = x[:, :, -1:]  # the next shot continues from this shot's last frame
            state(shot + 1, 0, condition, None)

    def denoise_video(self, cond: Conditioning, plan: GenerationPlan, generator, video: torch.Tensor | None,
                      control: list[ControlVideo], report, resume: RunState, state) -> Iterator[tuple[int, torch.Tensor]]:
        """Video2video: frames 1.. of the input video(s) in one parallel-denoising pass, yielded as one shot
        (1, 4, F, h, w) with the condition latent first. With an RGB `video` the pass starts from its latents
        noised to step `plan.start_step` (1 - video_strength of the steps; MuseV: strength 1, the first
        step); else from VideoFusion noise as image2video. Every window's ControlNet sees the control frames
        of its frames."""
        g = plan.config
        if resume.shot > 0:  # resumed after the pass: nothing is left to do
            return
        condition = resume.condition
        shape = (1, 4, plan.shot_frames[0], *plan.latent_hw)
        sampler = make_sampler(g.sampler, self.scheduler, g.steps, noise_type="video_fusion", w_ind_noise=g.w_ind_noise)
        start = plan.start_step
        if resume.latents is not None:
            x, start = resume.latents.to(self.device), resume.step
        elif video is None:
            x = initial_latents(shape, generator, sampler.init_noise_sigma, g.w_ind_noise, condition,
                                g.img_weight).to(self.device)
        else:
            init = self.encode_frames(video[1:])
            noise = video_fusion_noise(shape, generator, g.w_ind_noise).to(self.device)
            x = init if start == g.steps else sampler.add_noise(init, noise, start)
        window_control = None
        if control:
            nets = [self.controlnets[c.controlnet] for c in control]
            window_control = WindowControl(MultiControlNet(nets), [c.frames for c in control], [c.scale for c in control],
                                           g.control_guidance_start, g.control_guidance_end)
        x = self.denoise_shot(x, condition, cond, sampler, plan, generator, report, 0, window_control, start,
                              state=lambda step, x: state(0, step, condition, x))
        yield 0, torch.cat([condition, x], dim=2)
        state(1, 0, x[:, :, -1:], None)

    def denoise_shot(self, x, condition, cond, sampler, plan: GenerationPlan, generator, report, shot: int,
                     control: WindowControl | None = None, start: int = 0, state=None) -> torch.Tensor:
        """One parallel-denoising pass over the latents `x` around `condition`, with the plan's windows, with
        progress, a NaN/Inf check and `state(steps done, latents)` after every step."""
        g = plan.config
        guidance = guidance_scales(g.guidance_scale, g.steps, g.guidance_scale_end, g.guidance_method)
        denoiser = WindowedDenoiser(self._unet, x, condition, cond, sampler, plan.windows[x.shape[2]], guidance,
                                    g.window_batch, control, distributed.current())  # distributed: a share of windows

        def after_step(i, latents):
            check_finite(latents, f"shot {shot + 1}/{plan.shots}, step {i + 1}/{g.steps}", GUIDANCE_FIX)
            report(Progress("video", shot, plan.shots, i + 1, g.steps, denoiser.calls_per_step))
            if state is not None:
                state(i + 1, latents)

        return sample(denoiser, sampler, x, generator, start, after_step)

    def decoded(self, shots: Iterator[tuple[int, torch.Tensor]], plan: GenerationPlan, condition: torch.Tensor,
                seed: int | None, report=None) -> Iterator[Shot]:
        """Each (shot, latents) decoded into its frames, with progress; with `hist_match` every generated frame
        then takes frame 0's colour histograms (MuseV's need_hist_match, `histmatch.match_frames`: frame by
        frame against one reference, so shot by shot is the whole video's result). `condition`: frame 0's
        latent, decoded again when the shots start after shot 0 (a resumed run)."""
        decoded, reference = 0, None
        for index, latents in shots:
            return_freed_memory()  # the denoising's activations, before the decode adds its own
            frames = self.decode(latents, progress=report and (lambda done, _: report(
                Progress("decode", index, plan.shots, decoded + done, plan.total_frames, 0))))
            decoded += len(frames)
            if plan.config.hist_match:
                if reference is None:
                    reference = frames[0].copy() if index == 0 else self.frame_0(condition, plan.shot_frames[0] + 1)
                generated = frames[1:] if index == 0 else frames  # a view: frame 0 stays as it is
                generated[:] = match_frames(generated, reference)
            yield Shot(index, frames, latents, seed)

    def frame_0(self, condition: torch.Tensor, shot_0_frames: int) -> np.ndarray:
        """Frame 0 (H, W, 3) bit for bit as `decode` made it at the head of shot 0 (`shot_0_frames` latents):
        in a chunk of as many frames as shot 0's first, since the VAE may round one frame alone differently."""
        chunk_size = decode_chunk(8 * condition.shape[-2], 8 * condition.shape[-1])
        return self.decode(condition.to(self.device).expand(-1, -1, min(chunk_size, shot_0_frames), -1, -1))[0]

    @torch.no_grad()
    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames (F, H, W, 3) -> clean latents (1, 4, F, h, w), `decode_chunk` frames at a time."""
        chunk_size = decode_chunk(*frames.shape[1:3])
        chunks = [self.encode_images(list(frames[i : i + chunk_size].numpy())) for i in range(0, len(frames), chunk_size)]
        return torch.cat(chunks).transpose(0, 1)[None]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, progress=None) -> np.ndarray:
        """(1, 4, F, h, w) -> uint8 (F, H, W, 3), `decode_chunk` frames in float at a time. Distributed,
        each rank decodes a block of the chunks and every rank gets all frames."""
        frames = latents[0].transpose(0, 1)  # f 4 h w
        chunk_size = decode_chunk(8 * frames.shape[-2], 8 * frames.shape[-1])
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
