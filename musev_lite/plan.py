"""What one generation call will do, worked out once before any model runs: `make_plan` checks the inputs
and the settings against each other and returns a frozen `GenerationPlan` (the task, the video's size,
the new frames of each shot, the sampler steps, the parallel-denoising windows). The pipeline's stages,
the memory check, the progress and run.py read the plan; none of them re-derives it.

Also here: the input records a call takes (`ControlVideo`, and the `RunState` it resumes from, checked
against the plan), and the fitting of images and videos to the video's size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from .denoise import context_windows, window_groups
from .settings import MOTION_SPEED, ConfigError, GenerationConfig
from .video_io import as_pil, crop_resize, fit_image
from .weights import CONTROLNET

DEFAULT_SIZE = (512, 320)  # (height, width) without a condition image: MuseV's training size
WORKING_SIZE = max(DEFAULT_SIZE)  # a bigger condition image is scaled down to this long side


@dataclass
class ControlVideo:
    """A control video for a ControlNet (video2video): rendered pose / depth / edge frames, frame 0 for
    the condition image, frame 1 + f for generated frame f (MuseV's pairing)."""

    frames: np.ndarray  # uint8 (F, H, W, 3)
    controlnet: str = CONTROLNET  # which of the pipeline's ControlNets (a weights-folder component)
    scale: float = 1.0
    at_video_size: bool = False  # the frames already have the video's size (e.g. drawn from keypoints): no crop


@dataclass
class RunState:
    """Where a generation is, after a sampler step or a shot: `generate(..., resume=state)` continues from
    it to the same video, bit for bit. Small: latents, not frames."""

    shot: int  # the shot in progress (n_batch: all done)
    step: int  # sampler steps done in it (0: not started)
    condition: torch.Tensor  # (1, 4, 1, h, w) its condition latent
    latents: torch.Tensor | None  # (1, 4, n, h, w) its latents after `step` steps; None before the first
    first_condition: torch.Tensor  # frame 0's latent (the reference images' stand-in when it was drawn)
    generator: torch.Tensor  # torch.Generator.get_state() at that point
    seed: int | None


@dataclass(frozen=True)
class GenerationPlan:
    """One call, planned: what `generate` will do with these settings and inputs."""

    config: GenerationConfig
    task: str  # image2video (a condition image), text2image2video (frame 0 drawn from the prompt), video2video
    height: int  # the video's size in pixels
    width: int
    shot_frames: tuple[int, ...]  # new frames of each shot (video2video: one pass over the video after frame 0)
    first_frame_steps: int  # sampler steps that draw or redraw frame 0 (0: the condition image is encoded)
    start_step: int  # the step each shot starts at: from an RGB video, 1 - video_strength of the steps are skipped
    control_frames: int  # frames of control video held in memory (every control video's frames)

    @property
    def shots(self) -> int:
        return len(self.shot_frames)

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // 8, self.width // 8

    @property
    def total_frames(self) -> int:
        """Frames of the video: the condition frame, then every shot's new frames."""
        return 1 + sum(self.shot_frames)

    @cached_property
    def windows(self) -> dict[int, list[list[int]]]:
        """The parallel-denoising windows of a shot, by its number of new frames (worked out when first
        asked: after the memory check, which refuses an absurd length before its windows are listed)."""
        g = self.config
        return {n: context_windows(g.context_schedule, n, g.context_frames, g.context_overlap)
                for n in sorted(set(self.shot_frames))}

    def unet_calls(self, frames: int) -> list[list[list[int]]]:
        """The windows of a shot of `frames` new frames as the UNet calls of one step take them."""
        return window_groups(self.windows[frames], self.config.window_batch)

    def steps_left(self, resume: RunState | None = None) -> int:
        """Sampler steps the call runs: all of them, or those after the state it resumes from."""
        per_shot = self.config.steps - self.start_step
        if resume is None:
            return self.first_frame_steps + self.shots * per_shot
        return (self.shots - resume.shot) * per_shot - max(resume.step - self.start_step, 0)


def make_plan(config: GenerationConfig, image, video, control, condition_latents,
              controlnets: Collection[str]) -> tuple[GenerationPlan, object, torch.Tensor | None, list[ControlVideo]]:
    """The plan of a call, and its inputs as checked: (plan, image, video, control). The RGB and control
    videos become uint8 tensors (`check_videos`); the RGB video's frame 0 is the condition image when none
    is given; `controlnets` are the pipeline's ControlNet names. An unset `motion_speed` becomes MuseV's:
    MOTION_SPEED, and for video2video 1, the rate frames given as they are were taken at (MuseV's
    video2video passes its video reader's sample rate; run.py passes the input's)."""
    control = [control] if isinstance(control, ControlVideo) else [] if control is None else control
    video, control = check_videos(video, control, image, condition_latents, controlnets)
    if video is not None and image is None and condition_latents is None:
        image = video[0]  # the RGB video's first frame is the condition image
    has_image = image is not None or condition_latents is not None
    config.validate(has_image=has_image)
    height, width = video_size(image, condition_latents, config)
    g = config
    if video is not None or control:
        task, shot_frames = "video2video", (len(video if video is not None else control[0].frames) - 1,)
        g = g.replace(motion_speed=1.0) if g.motion_speed is None else g
    else:
        task = "image2video" if has_image else "text2image2video"
        shot_frames = tuple(g.num_frames - (shot == 0 and not has_image) for shot in range(g.n_batch))
        g = g.replace(motion_speed=MOTION_SPEED) if g.motion_speed is None else g
    first_frame_steps = g.first_frame_steps if not has_image or g.redraw_condition_image else 0
    start = g.steps - min(int(g.steps * g.video_strength), g.steps) if video is not None else 0  # as diffusers' img2img
    control_frames = sum(len(c.frames) for c in control)
    plan = GenerationPlan(g, task, height, width, shot_frames, first_frame_steps, start, control_frames)
    return plan, image, video, control


def check_videos(video, control: list[ControlVideo], image, condition_latents, controlnets: Collection[str]):
    """The RGB and control videos as uint8 tensors (F, H, W, 3) of one length F >= 2, each control
    naming one of `controlnets`; a control video needs a condition image."""
    def frames(array, what):
        array = np.asarray(array)
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[3] != 3:
            raise ConfigError(f"{what} must be uint8 frames (F, H, W, 3); got {array.dtype} {array.shape}")
        if len(array) < 2:
            raise ConfigError(f"{what} has {len(array)} frame(s); video2video needs at least 2 (frame 0 pairs "
                              "with the condition image, the rest are generated)")
        return torch.from_numpy(np.ascontiguousarray(array))

    video = None if video is None else frames(video, "video")
    if not isinstance(control, (list, tuple)):
        raise ConfigError(f"control must be a ControlVideo or a list of them, got {type(control).__name__}")
    checked = []
    for n, c in enumerate(control):
        if not isinstance(c, ControlVideo):
            raise ConfigError(f"control[{n}] must be a ControlVideo(frames, controlnet, scale), got {type(c).__name__}")
        if c.controlnet not in controlnets:
            have = ", ".join(controlnets) or "none"
            raise ConfigError(f"control[{n}] names ControlNet {c.controlnet!r}, but this pipeline has {have}; "
                              "convert one into the weights folder (python -m musev_lite.convert.controlnet)")
        checked.append(dataclasses.replace(c, frames=frames(c.frames, f"control[{n}] video")))
    lengths = {len(v) for v in [video] + [c.frames for c in checked] if v is not None}
    if len(lengths) > 1:
        raise ConfigError(f"the RGB and control videos have different lengths {sorted(lengths)}; give videos of "
                          "the same frames (same length and frame rate)")
    if checked and video is None and image is None and condition_latents is None:
        raise ConfigError("a control video (pose2video) needs a condition image: the person to animate "
                          "(input.image), its pose being control frame 0")
    return video, checked


def fit_video_size(image_size: tuple[int, int] | None, height: int = 0, width: int = 0,
                   multiple: int = 8) -> tuple[int, int]:
    """(height, width) of a video: `height` and `width` as set; an unset one follows the condition image
    (`image_size` = (h, w)): both unset, the image scaled down (never up) to a long side of at most
    WORKING_SIZE, aspect kept; one set, the other by the image's aspect. Without an image, MuseV's 512x320.
    Then floored to `multiple`, as MuseV's scripts floor to 64. (MuseV's scripts take an image's own size,
    which for a camera photo needs far more memory than a machine has; the model was trained at 512x320.)"""
    if image_size is None:
        h, w = height or DEFAULT_SIZE[0], width or DEFAULT_SIZE[1]
    else:
        ih, iw = image_size
        if height and width:
            h, w = height, width
        elif height or width:
            h, w = height or ih * width // iw, width or iw * height // ih
        else:
            long = max(ih, iw, WORKING_SIZE)
            h, w = ih * WORKING_SIZE // long, iw * WORKING_SIZE // long
    h, w = h // multiple * multiple, w // multiple * multiple
    if h < 8 or w < 8:
        source = f" from the image's {image_size[1]}x{image_size[0]}" if image_size and not (height and width) else ""
        raise ConfigError(f"video size {w}x{h} (width x height){source} is too small; set generation.height/width "
                          f"to at least {multiple}")
    return h, w


def video_size(image, condition_latents, config: GenerationConfig) -> tuple[int, int]:
    """(height, width) of the video: `fit_video_size` of the condition image, or the condition latent's."""
    if condition_latents is not None:  # the latent fixes the size
        h, w = condition_latents.shape[-2] * 8, condition_latents.shape[-1] * 8
        return fit_video_size(None, config.height or h, config.width or w, config.size_multiple)
    size = None if image is None else as_pil(image).size[::-1]
    return fit_video_size(size, config.height, config.width, config.size_multiple)


def fitted_images(image, refer_image, ip_adapter_image, height: int, width: int, fit: bool = True):
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


def fitted_videos(video, control: list[ControlVideo], height: int, width: int, fit: bool = True):
    """Every frame crop-resized to the video size as MuseV's video reader does; `fit=False`: the
    frames must already have it."""
    def fitted(frames, what):
        if not fit:
            if tuple(frames.shape[1:3]) != (height, width):
                raise ConfigError(f"{what} frames are {frames.shape[2]}x{frames.shape[1]} but the video is "
                                  f"{width}x{height}; pass fit_images=True to crop and resize them")
            return frames
        return torch.stack([torch.from_numpy(crop_resize(f.numpy(), height, width)) for f in frames])

    video = None if video is None else fitted(video, "video")
    control = [c if c.at_video_size and tuple(c.frames.shape[1:3]) == (height, width)
               else dataclasses.replace(c, frames=fitted(c.frames, f"control[{n}]")) for n, c in enumerate(control)]
    return video, control


def check_resume(resume, plan: GenerationPlan) -> None:
    """A ConfigError when `resume` is a state this call cannot have saved (`resume_problem`)."""
    problem = resume_problem(resume, plan)
    if problem:
        raise ConfigError(f"resume state: {problem}; resume with the settings and inputs that saved it (a run's "
                          "checkpoint: delete its folder to start over)")


def resume_problem(resume, plan: GenerationPlan) -> str | None:
    """What makes `resume` a state this call cannot have saved (None: nothing): shot and step out of range,
    a seed that is no integer, latents of another shape or dtype than the call's (1, 4, frames, h, w)
    float32, a random-generator state of another size than torch's."""
    if not isinstance(resume, RunState):
        return f"resume must be a RunState (from on_state, or a checkpoint), got {type(resume).__name__}"
    whole = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    shots, steps = plan.shots, plan.config.steps
    if not (whole(resume.shot) and 0 <= resume.shot <= shots):
        return f"shot = {resume.shot!r}, but this call has shots 0..{shots - 1} (and {shots}: all done)"
    if not (whole(resume.step) and 0 <= resume.step <= steps):
        return f"step = {resume.step!r}, but this call has {steps} steps per shot"
    if not (resume.seed is None or whole(resume.seed)):
        return f"seed = {resume.seed!r} is not an integer"
    if resume.latents is not None and resume.shot == shots:
        return "it holds latents after the last shot"
    expected = {"condition": (1, 4, 1, *plan.latent_hw), "first_condition": (1, 4, 1, *plan.latent_hw)}
    if resume.latents is not None:
        expected["latents"] = (1, 4, plan.shot_frames[resume.shot], *plan.latent_hw)
    for name, shape in expected.items():
        tensor = getattr(resume, name)
        if not torch.is_tensor(tensor) or tuple(tensor.shape) != shape or tensor.dtype != torch.float32:
            got = f"{tensor.dtype} {tuple(tensor.shape)}" if torch.is_tensor(tensor) else type(tensor).__name__
            return f"{name} is {got}; shot {resume.shot} of this call needs float32 {shape}"
    size = torch.Generator().get_state().shape
    if not (torch.is_tensor(resume.generator) and resume.generator.dtype == torch.uint8
            and resume.generator.shape == size):
        got = tuple(resume.generator.shape) if torch.is_tensor(resume.generator) else type(resume.generator).__name__
        return f"generator state is {got}, not torch's uint8 {tuple(size)} of a CPU generator"
    return None
