"""The run configuration: a TOML file with four sections, every key optional, MuseV's defaults.

    [model]       which network and weights, where to run
    [input]       condition image, prompts, reference images
    [generation]  every knob of the pipeline call (`settings.GenerationConfig`, checked there)
    [output]      where and in which formats to write

`load_config(path, overrides)` reads the file, applies `--set section.key=value` overrides, checks
every key, type and range, and raises ConfigError naming the key and what to do. Relative paths are
relative to the current directory. The README's "Configuration" section lists every key.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .settings import DTYPES, FORMATS, PRESETS, ConfigError, GenerationConfig, one_of, require, suggest, typed


@dataclass
class ModelConfig:
    preset: str = "musev_referencenet"  # one of settings.PRESETS
    weights_dir: str = "weights/musev_referencenet"  # a folder made by the converters (unused for tiny)
    device: str = "cpu"
    dtype: str = "float32"  # one of settings.DTYPES (the VAE always runs in float32)
    compile: bool = False  # torch.compile the UNet (faster for long runs, slow first step)


@dataclass
class InputConfig:
    image: str = ""  # condition image; empty: the first frame is drawn from the prompt
    prompt: str = ""
    negative_prompt: str = "V2"  # a preset (Empty, V1..V5) or literal text
    refer_image: str = ""  # ReferenceNet image; empty: the condition image
    ip_adapter_image: str = ""  # IP-Adapter image; empty: the condition image


@dataclass
class OutputConfig:
    dir: str = "outputs"
    name: str = ""  # file stem; empty: "<config name>-<seed>"
    formats: list[str] = field(default_factory=lambda: ["mp4"])  # one or more of settings.FORMATS
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


def build_config(data: dict) -> RunConfig:
    config = RunConfig()
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown section [{section}]{suggest(section, SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table of keys")
        target = getattr(config, section)
        fields = {f.name: f.type for f in dataclasses.fields(target)}
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(f"unknown key {section}.{key}{suggest(key, fields)}")
            setattr(target, key, typed(f"{section}.{key}", value, fields[key]))
    check(config)
    return config


def check(config: RunConfig) -> None:
    """Ranges and choices; files are checked where they are opened."""
    m, i, g, o = config.model, config.input, config.generation, config.output
    one_of("model.preset", m.preset, PRESETS)
    one_of("model.dtype", m.dtype, DTYPES)
    require(m.preset == "tiny" or m.weights_dir != "", "model.weights_dir is empty; set it to a converted weights folder")
    g.validate(has_image=i.image != "")
    require(len(o.formats) > 0, "output.formats is empty; use e.g. [\"mp4\"]")
    for fmt in o.formats:
        one_of("output.formats entry", fmt, FORMATS)
    require(o.fps > 0, f"output.fps = {o.fps} must be > 0")
    require("/" not in o.name and "\\" not in o.name, f"output.name = {o.name!r} must be a file stem, not a path")


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
