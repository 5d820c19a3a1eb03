"""Generation settings: every knob of a pipeline call, MuseV's defaults written once, and their checks.

`GenerationConfig` is what the `[generation]` section of a run configuration becomes and what
`MuseVPipeline.__call__` takes; `validate()` is the one place its ranges are checked. The tuples of
allowed values live here too, so the TOML loader, the pipeline, the sampler and the denoising loop
name the same choices. This module imports no torch: a config can be read and checked without it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass

PRESETS = ("tiny", "musev", "musev_referencenet", "musev_referencenet_pose")
DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: device.resolve_dtype
FORMATS = ("mp4", "gif", "webp", "png")
SAMPLERS = ("euler", "ddim", "lcm")
CONTEXT_SCHEDULES = ("uniform_v2", "uniform")
GUIDANCE_METHODS = ("linear", "two_stage", "three_stage", "fix_two_stage")
OUTPUT_TYPES = ("uint8", "pil")
TASKS = ("auto", "image2video", "text2image2video", "video2video")

MAX_GUIDANCE = 100.0  # far above anything useful (MuseV uses 3.5 and 7.5), low enough to stay finite
MAX_STEPS = 1000  # the training schedule has 1000 timesteps
MOTION_SPEED = 8.0  # MuseV's frame-position scale (its scripts' --motion_speed), but for video2video
LCM_MAX_STEPS = 50  # LCM's steps are a subset of the 50 it was distilled on (its original_inference_steps)


class ConfigError(ValueError):
    """A setting is unknown, of the wrong type, or out of range."""


def printable(name: str) -> str:
    """A name from a file as an error line shows it: quoted with escapes when it holds a line break or another
    character that does not print (a TOML key may), so the error stays one line."""
    return name if name.isprintable() else repr(name)


def suggest(name: str, choices) -> str:
    """"; did you mean 'x'?" for a near miss, else the list of what is known."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(choices)}"


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def one_of(where: str, value, choices) -> None:
    require(value in choices, f"{where} = {value!r} is not one of {', '.join(map(str, choices))}")


def finite(where: str, value) -> None:
    require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
            f"{where} = {value!r} must be a finite number")


def field_types(cls) -> dict[str, object]:
    """A dataclass's fields and their types: the annotations evaluated (`float | None`), not their text."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def optional_of(kind) -> object | None:
    """`X` for a type `X | None`, else None."""
    args = typing.get_args(kind)
    if isinstance(kind, types.UnionType) and type(None) in args:
        return next(arg for arg in args if arg is not type(None))
    return None


def typed(where: str, value, kind):
    """`value` checked against a field's type (int, float | None, list[str], ...); ints are accepted for
    floats (and returned as float), a bare string for a list of strings. "none" unsets an optional number
    (TOML has no null); an optional string takes "none" as the text it is."""
    base = optional_of(kind) or kind
    if value is None or (base is not kind and value == "none" and base is not str):
        require(base is not kind, f"{where} must be set to a value")
        return None
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        value = [value] if isinstance(value, str) and item is str else value
        example = {str: '["mp4", "gif"]', int: "[1080, 1920]"}[item]
        require(isinstance(value, list) and all(isinstance(v, item) and not isinstance(v, bool) for v in value),
                f"{where} must be a list of {WANTED[item].split(' ', 1)[1]}s, e.g. {example}; got {value!r}")
        return value
    accepted = (int, float) if base is float else base
    if (isinstance(value, bool) and base is not bool) or not isinstance(value, accepted):
        raise ConfigError(f"{where} must be {WANTED[base]}; got {value!r}")
    return float(value) if base is float else value


WANTED = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def in_range(where: str, value, low: float, high: float, what: str = "") -> None:
    """A finite number in [low, high]."""
    finite(where, value)
    require(low <= value <= high, f"{where} = {value} must be in [{low:g}, {high:g}]{what}")


@dataclass
class GenerationConfig:
    height: int = 0  # 0: from the condition image (512 without an image)
    width: int = 0  # 0: from the condition image (320 without an image)
    size_multiple: int = 8  # sizes are rounded down to this; 64 reproduces MuseV's scripts
    num_frames: int = 12  # new frames per shot (MuseV's time_size)
    n_batch: int = 1  # shots; each continues from the last frame of the one before
    steps: int = 10
    guidance_scale: float = 3.5
    guidance_scale_end: float | None = None  # set to change the guidance over the steps
    guidance_method: str = "linear"  # one of GUIDANCE_METHODS
    first_frame_steps: int = 30  # for drawing or redrawing the first frame (2D mode)
    first_frame_guidance: float = 7.5
    redraw_condition_image: bool = False
    context_frames: int = 12  # window length of parallel denoising
    context_overlap: int = 4
    context_schedule: str = "uniform_v2"  # one of CONTEXT_SCHEDULES
    window_batch: int = 1  # windows per UNet call (same result, more memory)
    motion_speed: float | None = None  # frame-position scale of the referencenet models (None: MOTION_SPEED, or
    # for video2video the rate the video's frames were taken at, as MuseV's video2video: plan.make_plan)
    w_ind_noise: float = 0.5  # VideoFusion noise: share of per-frame noise
    img_weight: float = 0.001  # share of the condition latent in the starting noise
    ip_adapter_scale: float = 1.0
    sampler: str = "euler"  # one of SAMPLERS
    seed: int | None = None  # None: a random seed, reported back
    video_strength: float = 1.0  # video2video from an RGB video: 1 = from noise at the first step (MuseV), 0 = the video
    control_guidance_start: float = 0.0  # share of the steps before the ControlNets start
    control_guidance_end: float = 1.0  # share of the steps after which they stop
    hist_match: bool = False  # MuseV's need_hist_match: the generated frames take frame 0's colour histograms

    def replace(self, **overrides) -> GenerationConfig:
        """A copy with some settings changed; an unknown name is a ConfigError with a suggestion."""
        names = [f.name for f in dataclasses.fields(self)]
        for name in overrides:
            require(name in names, f"unknown generation setting {name!r}{suggest(name, names)}")
        return dataclasses.replace(self, **overrides)

    def validate(self, has_image: bool = True) -> GenerationConfig:
        """Raise ConfigError naming the first setting of a wrong type or out of range (as `generation.<key>`);
        return self."""
        for name, kind in field_types(GenerationConfig).items():
            typed(f"generation.{name}", getattr(self, name), kind)
        for key in ("height", "width"):
            value = getattr(self, key)
            require(value >= 0, f"generation.{key} = {value} must be >= 0 (0 = from the image)")
            require(value == 0 or value >= 8, f"generation.{key} = {value} is too small; give at least 8 (or 0)")
            # with size_multiple > 8 an explicit size is floored to it, as MuseV's scripts do
            require(value % 8 == 0 or self.size_multiple > 8,
                    f"generation.{key} = {value} is not divisible by 8; use e.g. {value // 8 * 8 or 8}")
        require(self.size_multiple >= 8 and self.size_multiple % 8 == 0,
                f"generation.size_multiple = {self.size_multiple} must be a multiple of 8 (8 or 64)")
        for key in ("num_frames", "n_batch", "steps", "first_frame_steps", "context_frames", "window_batch"):
            value = getattr(self, key)
            require(value >= 1, f"generation.{key} = {value} must be at least 1")
        for key in ("steps", "first_frame_steps"):
            require(getattr(self, key) <= MAX_STEPS, f"generation.{key} = {getattr(self, key)} must be at most {MAX_STEPS}")
        require(has_image or self.num_frames >= 2,
                "generation.num_frames must be at least 2 without an image (the first frame is drawn, then the rest)")
        require(0 <= self.context_overlap < self.context_frames,
                f"generation.context_overlap = {self.context_overlap} must be >= 0 and smaller than "
                f"generation.context_frames = {self.context_frames}")
        for key in ("guidance_scale", "guidance_scale_end", "first_frame_guidance"):
            value = getattr(self, key)
            if value is not None:
                finite(f"generation.{key}", value)
                require(value <= MAX_GUIDANCE, f"generation.{key} = {value} must be at most {MAX_GUIDANCE:g}")
                require(value >= 1, f"generation.{key} = {value} must be >= 1 "
                        "(MuseV's parallel denoising needs classifier-free guidance)")
        one_of("generation.guidance_method", self.guidance_method, GUIDANCE_METHODS)
        one_of("generation.context_schedule", self.context_schedule, CONTEXT_SCHEDULES)
        one_of("generation.sampler", self.sampler, SAMPLERS)
        if self.sampler == "lcm":
            for key in ("steps", "first_frame_steps"):
                value = getattr(self, key)
                require(value <= LCM_MAX_STEPS,
                        f"generation.{key} = {value} is more than the 'lcm' sampler takes ({LCM_MAX_STEPS}, the steps "
                        "LCM was distilled on); LCM is meant for 4-8 steps: lower it, or use sampler 'euler'")
        in_range("generation.w_ind_noise", self.w_ind_noise, 0, 1)
        in_range("generation.img_weight", self.img_weight, 0, 1)
        in_range("generation.ip_adapter_scale", self.ip_adapter_scale, 0, 10, " (0 turns the IP-Adapter off)")
        if self.motion_speed is not None:
            in_range("generation.motion_speed", self.motion_speed, 0, 100)
            require(self.motion_speed > 0, f"generation.motion_speed = {self.motion_speed} must be > 0")
        require(self.seed is None or 0 <= self.seed < 2**63, f"generation.seed = {self.seed} must be a non-negative integer")
        in_range("generation.video_strength", self.video_strength, 0, 1)
        in_range("generation.control_guidance_start", self.control_guidance_start, 0, 1)
        in_range("generation.control_guidance_end", self.control_guidance_end, 0, 1)
        require(self.control_guidance_start < self.control_guidance_end,
                f"generation.control_guidance_start = {self.control_guidance_start} must be smaller than "
                f"generation.control_guidance_end = {self.control_guidance_end}")
        return self
