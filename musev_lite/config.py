"""The run configuration: a TOML file with four sections, every key optional, MuseV's defaults.

    [model]       which network and weights, where to run
    [input]       condition image, prompts, reference images
    [generation]  every knob of the pipeline call
    [output]      where and in which formats to write

`load_config(path, overrides)` reads the file, applies `--set section.key=value` overrides, checks
every key, type and range, and raises ConfigError naming the key and what to do. Relative paths are
relative to the current directory. The README's "Configuration" section lists every key.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

PRESETS = ("tiny", "musev", "musev_referencenet", "musev_referencenet_pose")
DTYPES = ("float32", "bfloat16", "float16")
FORMATS = ("mp4", "gif", "webp", "png")


class ConfigError(ValueError):
    """A configuration key is unknown, of the wrong type, or out of range."""


@dataclass
class ModelConfig:
    preset: str = "musev_referencenet"  # tiny | musev | musev_referencenet | musev_referencenet_pose
    weights_dir: str = "weights/musev_referencenet"  # a folder made by the converters (unused for tiny)
    device: str = "cpu"
    dtype: str = "float32"  # float32 | bfloat16 | float16 (the VAE always runs in float32)
    compile: bool = False  # torch.compile the UNet (faster for long runs, slow first step)


@dataclass
class InputConfig:
    image: str = ""  # condition image; empty: the first frame is drawn from the prompt
    prompt: str = ""
    negative_prompt: str = "V2"  # a preset (Empty, V1..V5) or literal text
    refer_image: str = ""  # ReferenceNet image; empty: the condition image
    ip_adapter_image: str = ""  # IP-Adapter image; empty: the condition image


@dataclass
class GenerationConfig:
    height: int = 0  # 0: the condition image's height (512 without an image)
    width: int = 0  # 0: the condition image's width (320 without an image)
    size_multiple: int = 8  # sizes are rounded down to this; 64 reproduces MuseV's scripts
    num_frames: int = 12  # new frames per shot (MuseV's time_size)
    n_batch: int = 1  # shots; each continues from the last frame of the one before
    steps: int = 10
    guidance_scale: float = 3.5
    guidance_scale_end: float | None = None  # set to change the guidance over the steps
    guidance_method: str = "linear"  # linear | two_stage | three_stage | fix_two_stage
    first_frame_steps: int = 30  # for drawing or redrawing the first frame (2D mode)
    first_frame_guidance: float = 7.5
    redraw_condition_image: bool = False
    context_frames: int = 12  # window length of parallel denoising
    context_overlap: int = 4
    context_schedule: str = "uniform_v2"  # uniform_v2 | uniform
    window_batch: int = 1  # windows per UNet call (same result, more memory)
    motion_speed: float = 8.0
    w_ind_noise: float = 0.5
    img_weight: float = 0.001
    ip_adapter_scale: float = 1.0
    sampler: str = "euler"  # euler | ddim
    seed: int | None = None  # none: a random seed, written to the sidecar


@dataclass
class OutputConfig:
    dir: str = "outputs"
    name: str = ""  # file stem; empty: "<config name>-<seed>"
    formats: list[str] = field(default_factory=lambda: ["mp4"])  # mp4, gif, webp, png (a frames folder)
    fps: float = 12.0
    contact_sheet: bool = True


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    input: InputConfig = field(default_factory=InputConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(RunConfig)}


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(choices)}"


def _typed(section: str, key: str, value, annotation: str):
    """Check a TOML value against a field's annotation ("int", "float | None", "list[str]", ...)."""
    where = f"{section}.{key}"
    kinds = {"int": int, "float": (int, float), "str": str, "bool": bool}
    if value is None or (annotation.endswith("| None") and value == "none"):
        if annotation.endswith("| None"):
            return None
        raise ConfigError(f"{where} must be set to a value")
    base = annotation.removesuffix(" | None")
    if base == "list[str]":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be a list of strings, e.g. [\"mp4\", \"gif\"]; got {value!r}")
        return value
    if (isinstance(value, bool) and base != "bool") or not isinstance(value, kinds[base]):
        wanted = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}[base]
        raise ConfigError(f"{where} must be {wanted}; got {value!r}")
    return float(value) if base == "float" else value


def build_config(data: dict) -> RunConfig:
    config = RunConfig()
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown section [{section}]{_suggest(section, SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table of keys")
        target = getattr(config, section)
        fields = {f.name: f.type for f in dataclasses.fields(target)}
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(f"unknown key {section}.{key}{_suggest(key, fields)}")
            setattr(target, key, _typed(section, key, value, fields[key]))
    check(config)
    return config


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(where: str, value, choices) -> None:
    _require(value in choices, f"{where} = {value!r} is not one of {', '.join(map(str, choices))}")


def check(config: RunConfig) -> None:
    """Ranges and choices; files are checked where they are opened."""
    m, i, g, o = config.model, config.input, config.generation, config.output
    _one_of("model.preset", m.preset, PRESETS)
    _one_of("model.dtype", m.dtype, DTYPES)
    _require(m.preset == "tiny" or m.weights_dir != "", "model.weights_dir is empty; set it to a converted weights folder")
    for key in ("height", "width"):
        value = getattr(g, key)
        _require(value >= 0, f"generation.{key} = {value} must be >= 0 (0 = from the image)")
        _require(value % 8 == 0, f"generation.{key} = {value} is not divisible by 8; use e.g. {value // 8 * 8 or 8}")
    _require(g.size_multiple >= 8 and g.size_multiple % 8 == 0,
             f"generation.size_multiple = {g.size_multiple} must be a multiple of 8 (8 or 64)")
    for key in ("num_frames", "n_batch", "steps", "first_frame_steps", "context_frames", "window_batch"):
        value = getattr(g, key)
        _require(value >= 1, f"generation.{key} = {value} must be at least 1")
    _require(g.steps <= 1000 and g.first_frame_steps <= 1000, "generation.steps must be at most 1000")
    _require(i.image != "" or g.num_frames >= 2,
             "generation.num_frames must be at least 2 without an image (the first frame is drawn, then the rest)")
    _require(0 <= g.context_overlap < g.context_frames,
             f"generation.context_overlap = {g.context_overlap} must be >= 0 and smaller than "
             f"generation.context_frames = {g.context_frames}")
    _require(g.guidance_scale >= 1, f"generation.guidance_scale = {g.guidance_scale} must be >= 1 "
             "(MuseV's parallel denoising needs classifier-free guidance)")
    _require(g.guidance_scale_end is None or g.guidance_scale_end >= 1,
             f"generation.guidance_scale_end = {g.guidance_scale_end} must be >= 1")
    _require(g.first_frame_guidance >= 1, f"generation.first_frame_guidance = {g.first_frame_guidance} must be >= 1")
    _one_of("generation.guidance_method", g.guidance_method, ("linear", "two_stage", "three_stage", "fix_two_stage"))
    _one_of("generation.context_schedule", g.context_schedule, ("uniform_v2", "uniform"))
    _one_of("generation.sampler", g.sampler, ("euler", "ddim"))
    _require(0 <= g.w_ind_noise <= 1, f"generation.w_ind_noise = {g.w_ind_noise} must be in [0, 1]")
    _require(0 <= g.img_weight <= 1, f"generation.img_weight = {g.img_weight} must be in [0, 1]")
    _require(g.ip_adapter_scale >= 0, f"generation.ip_adapter_scale = {g.ip_adapter_scale} must be >= 0")
    _require(g.motion_speed > 0, f"generation.motion_speed = {g.motion_speed} must be > 0")
    _require(g.seed is None or 0 <= g.seed < 2**63, f"generation.seed = {g.seed} must be a non-negative integer")
    _require(len(o.formats) > 0, "output.formats is empty; use e.g. [\"mp4\"]")
    for fmt in o.formats:
        _one_of("output.formats entry", fmt, ("mp4", "gif", "webp", "png"))
    _require(o.fps > 0, f"output.fps = {o.fps} must be > 0")
    _require("/" not in o.name and "\\" not in o.name, f"output.name = {o.name!r} must be a file stem, not a path")


def parse_override(text: str) -> tuple[str, str, object]:
    """`section.key=value`, value in TOML syntax (bare words are taken as strings)."""
    name, sep, raw = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not key:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. generation.steps=4")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key, value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    data: dict = {}
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file {path} cannot be read ({err})") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    for text in overrides:
        section, key, value = parse_override(text)
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise ConfigError(f"--set {text!r}: [{section}] is not a table")
        data[section][key] = value
    return build_config(data)
