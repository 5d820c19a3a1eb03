"""The run configuration: a TOML file with four sections, every key optional, MuseV's defaults.

    [model]       which network and weights, where to run
    [input]       condition image, prompts, reference images
    [generation]  every knob of the pipeline call (`settings.GenerationConfig`, checked there)
    [output]      where and in which formats to write

`load_config(path, overrides)` reads the file, applies `--set section.key=value` overrides, checks
every key, type and range, and raises ConfigError naming the key and what to do. A relative path in
the file is relative to the file's folder (`PATH_KEYS`); one given with `--set`, or a default, to the
working directory. The README's "Configuration" section lists every key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from .limits import file_stem, name_max, parse_nested
from .outputs import names_beside
from .settings import (DTYPES, FORMATS, PRESETS, TASKS, ConfigError, GenerationConfig, field_types, in_range, one_of, printable,
                       require, suggest, typed)
from .video_io import MediaError, check_fps
from .weights import CONTROLNET


@dataclass
class LoraConfig:
    """One `[[model.lora]]` table: a LoRA file merged into the UNet and text encoder at load."""

    path: str = ""
    scale: float = 1.0


@dataclass
class ModelConfig:
    preset: str = "musev_referencenet"  # one of settings.PRESETS
    weights_dir: str = "weights/musev_referencenet"  # a folder made by the converters (unused for tiny)
    device: str = "cpu"  # a torch device, or "auto" (cuda, then mps, then cpu)
    dtype: str = "auto"  # one of settings.DTYPES; auto: bfloat16 where the hardware has it, else float32 (VAE: float32)
    compile: bool = False  # torch.compile the UNet (faster for long runs, slow first step)
    lora: list[LoraConfig] = field(default_factory=list)  # [[model.lora]] path = "...", scale = 0.8


@dataclass
class ControlConfig:
    """One `[[input.control]]` table: a control video for a ControlNet (video2video)."""

    path: str = ""  # a rendered control video (pose, depth, edges), or OpenPose / DWPose keypoint JSON
    controlnet: str = CONTROLNET  # the ControlNet: a component of model.weights_dir
    scale: float = 1.0
    pose_canvas: list[int] = field(default_factory=list)  # [height, width] of pixel keypoints without a canvas


@dataclass
class InputConfig:
    task: str = "auto"  # one of TASKS; auto: from the inputs given
    image: str = ""  # condition image; empty: the first frame is drawn from the prompt
    prompt: str = ""
    negative_prompt: str | None = None  # a preset (Empty, V1..V5) or literal text; unset: the model's (V2; tiny: V1)
    refer_image: str = ""  # ReferenceNet image; empty: the condition image
    ip_adapter_image: str = ""  # IP-Adapter image; empty: the condition image
    face_embedding: str = ""  # IPAdapterFaceID: a 512-d ArcFace embedding, .npy or .safetensors
    face_image: str = ""  # IPAdapterFaceID: a face image, embedded with insightface (if installed)
    video: str = ""  # video2video: an RGB video to start from
    video_sample_rate: int = 1  # video2video: every n-th frame of the videos (MuseV's sample_rate)
    video_fps: float = 0.0  # video2video: resample the videos to this frame rate instead (0: use video_sample_rate)
    control: list[ControlConfig] = field(default_factory=list)  # [[input.control]] path = "pose.mp4"


@dataclass
class OutputConfig:
    dir: str = "outputs"
    name: str = ""  # file stem; empty: "<config name>-<seed>"
    formats: list[str] = field(default_factory=lambda: ["mp4"])  # one or more of settings.FORMATS
    fps: float = 12.0
    contact_sheet: bool = True
    overwrite: bool = False  # replace outputs of the same name; false: refuse to start
    checkpoint: bool = False  # keep NAME.checkpoint/ so that `run --resume` continues an interrupted run
    checkpoint_every: int = 1  # save the state every this many sampler steps (0: after each shot only)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    input: InputConfig = field(default_factory=InputConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    # Not a setting (no annotation, so no dataclass field): "section.key" -> how its relative path was
    # resolved, filled by load_config for the errors about that file (`path_note`).
    path_notes = MappingProxyType({})

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def path_note(self, key: str) -> str:
        """" (input.image = 'face.png' is relative to the config file's folder, examples)" for a path
        setting given as a relative path, else ""."""
        note = self.path_notes.get(key)
        return f" ({note})" if note else ""


SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(RunConfig)}

# Every setting that is a path, as (section, key); "lora.path" is the `path` of each [[model.lora]] table.
PATH_KEYS = [("model", "weights_dir"), ("model", "lora.path"), ("input", "image"), ("input", "refer_image"),
             ("input", "ip_adapter_image"), ("input", "face_embedding"), ("input", "face_image"), ("input", "video"),
             ("input", "control.path"), ("output", "dir")]


def relative_paths(data: dict):
    """(table, key, "section.key") of every relative path PATH_KEYS finds in `data` (a config's tables)."""
    for section, key in PATH_KEYS:
        table = data.get(section)
        name, _, item = key.partition(".")
        if not isinstance(table, dict) or name not in table:
            continue
        if item:  # a list of tables (or one), each with its path under `item`
            tables = table[name] if isinstance(table[name], list) else [table[name]]
            places = [(t, item, f"{section}.{name}[{n}].{item}") for n, t in enumerate(tables) if isinstance(t, dict)]
        else:
            places = [(table, name, f"{section}.{name}")]
        for holder, field_name, where in places:
            value = holder.get(field_name)
            if isinstance(value, str) and "\x00" in value:
                raise ConfigError(f"{where} = {printable(value)} holds a NUL character, which no file path can hold")
            if isinstance(value, str) and value and not Path(value).is_absolute():
                yield holder, field_name, where


def resolve_paths(data: dict, folder: Path) -> dict[str, str]:
    """Resolve the relative paths in a config file's tables against its `folder`, in place (absolute, so
    that messages name the file itself, not `examples/../weights/...`); return {"section.key": how it
    was resolved} for error messages."""
    notes = {}
    for holder, key, where in relative_paths(data):
        notes[where] = f"{where} = {holder[key]!r} is relative to the config file's folder, {folder.resolve()}"
        holder[key] = str((folder / holder[key]).resolve())
    return notes


def build_config(data: dict) -> RunConfig:
    config = RunConfig()
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown section [{printable(section)}]{suggest(section, SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table of keys")
        target = getattr(config, section)
        fields = field_types(type(target))
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(f"unknown key {section}.{printable(key)}{suggest(key, fields)}")
            table = table_of(fields[key])
            if table is not None:
                value = table_list(f"{section}.{key}", value, table)
            else:
                value = typed(f"{section}.{key}", value, fields[key])
            setattr(target, key, value)
    check(config)
    return config


def table_list(where: str, value, cls) -> list:
    """`[[where]]` tables (or one inline table) -> `cls` entries, each key checked."""
    tables = [value] if isinstance(value, dict) else value
    require(isinstance(tables, list) and all(isinstance(t, dict) for t in tables),
            f"{where} must be tables: [[{where}]] path = \"...\"")
    fields = field_types(cls)
    entries = []
    for n, table in enumerate(tables):
        entry = cls()
        for key, item in table.items():
            require(key in fields, f"unknown key {where}[{n}].{printable(key)}{suggest(key, fields)}")
            setattr(entry, key, typed(f"{where}[{n}].{key}", item, fields[key]))
        require(entry.path != "", f"{where}[{n}].path is empty; give the file")
        in_range(f"{where}[{n}].scale", entry.scale, -10, 10)
        entries.append(entry)
    return entries


def table_of(kind) -> type | None:
    """The dataclass of a list-of-tables setting (`list[LoraConfig]` -> LoraConfig), else None."""
    if typing.get_origin(kind) is list and dataclasses.is_dataclass(item := typing.get_args(kind)[0]):
        return item
    return None


def check(config: RunConfig) -> None:
    """Ranges and choices; files are checked where they are opened."""
    m, i, g, o = config.model, config.input, config.generation, config.output
    one_of("model.preset", m.preset, PRESETS)
    one_of("model.dtype", m.dtype, DTYPES)
    require(m.preset == "tiny" or m.weights_dir != "", "model.weights_dir is empty; set it to a converted weights folder")
    one_of("input.task", i.task, TASKS)
    video2video = i.video != "" or len(i.control) > 0
    if i.task != "auto":
        implied = "video2video" if video2video else "image2video" if i.image else "text2image2video"
        require(i.task == implied, f"input.task = {i.task!r} but the inputs make it {implied!r} "
                "(video2video: input.video and/or [[input.control]]; image2video: input.image; else text2image2video)")
    require(not (i.face_embedding and i.face_image), "input.face_embedding and input.face_image are both set; give "
            "one face: the embedding (.npy), or the image to embed with insightface")
    require(i.video_sample_rate >= 1, f"input.video_sample_rate = {i.video_sample_rate} must be at least 1")
    require(i.video_fps == 0 or 1 <= i.video_fps <= 240, f"input.video_fps = {i.video_fps} must be 0 or in [1, 240]")
    require(i.video_fps == 0 or i.video_sample_rate == 1,
            f"input.video_fps = {i.video_fps} and input.video_sample_rate = {i.video_sample_rate} are both set; "
            "the videos are sampled one way: by frame rate or every n-th frame")
    for n, c in enumerate(i.control):
        require(c.pose_canvas == [] or (len(c.pose_canvas) == 2 and min(c.pose_canvas) > 0),
                f"input.control[{n}].pose_canvas = {c.pose_canvas} must be [height, width] in pixels")
    if video2video and i.control and not i.video:
        require(i.image != "", "pose2video ([[input.control]] without input.video) needs input.image: "
                "the person to animate, whose pose is control frame 0")
    g.validate(has_image=i.image != "" or i.video != "")
    require(len(o.formats) > 0, "output.formats is empty; use e.g. [\"mp4\"]")
    for fmt in o.formats:
        one_of("output.formats entry", fmt, FORMATS)
    try:
        check_fps(o.fps, o.formats)
    except MediaError as err:
        raise ConfigError(f"output.{err}") from None
    if o.name:
        file_stem("output.name", o.name, ConfigError)
    require(o.checkpoint_every >= 0, f"output.checkpoint_every = {o.checkpoint_every} must be 0 (after each shot "
            "only) or a number of sampler steps")


def output_kinds(o: OutputConfig, stem: str) -> dict[str, str]:
    """File name -> what it holds (a format, "sheet" or "json"), in the order written, the sidecar last."""
    kinds = {f"{stem}_frames" if fmt == "png" else f"{stem}.{fmt}": fmt for fmt in o.formats}
    if o.contact_sheet:
        kinds[f"{stem}_sheet.png"] = "sheet"
    kinds[f"{stem}.json"] = "json"
    return kinds


def check_name_length(config: RunConfig, config_stem: str) -> None:
    """Every name a run gives an entry of output.dir (`outputs.names_beside`: outputs, partial outputs,
    temporaries, lock, checkpoint) must fit the file system's limit there (`limits.name_max`), checked
    before anything is read or written. Without output.name the stem is `<config name>-<seed>`, a drawn
    seed having up to 8 digits."""
    o, seed = config.output, config.generation.seed
    stem = o.name or f"{config_stem}-{seed if seed is not None else 10**8 - 1}"
    longest = max(names_beside(stem, list(output_kinds(o, stem))), key=lambda name: len(os.fsencode(name)))
    size, limit = len(os.fsencode(longest)), name_max(o.dir)
    if size > limit:
        pattern = longest.replace(stem, "<output.name>" if o.name else f"{config_stem}-<seed>", 1)
        which = "output.name" if o.name else f"the output name {config_stem}-<seed> (from the config file's name)"
        raise ConfigError(f"{which} is too long for output.dir {o.dir!r}: the longest file name a run writes there, "
                          f"{pattern!r}, would be {size} bytes and that file system allows {limit}; set an "
                          f"output.name of at most {limit - (size - len(os.fsencode(stem)))} bytes")


def toml_value(value) -> str:
    """A setting as TOML: strings JSON-quoted (valid TOML basic strings), lists, numbers, booleans."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def to_toml(config: RunConfig, sections: tuple[str, ...] = tuple(SECTIONS)) -> str:
    """The whole configuration (or its `sections`), defaults filled in, as a TOML file `load_config` reads
    back. Paths are written absolute, so the file means the same wherever it is saved. Unset optional
    settings (TOML has no null) are written as comments."""
    lines = []
    data = config.as_dict()
    for holder, key, _ in list(relative_paths(data)):
        holder[key] = os.path.abspath(holder[key])
    for section, values in data.items():
        if section not in sections:
            continue
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"# {key} = (unset)" if value is None else f"{key} = {toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[str, str, object]:
    """`section.key=value`, value in TOML syntax (bare words are taken as strings)."""
    name, sep, raw = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not key:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. generation.steps=4")
    try:
        value = parse_nested(tomllib.loads, f"v = {raw.strip()}", f"--set {name.strip()}", ConfigError)["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key, value


def read_tables(path: str | Path) -> tuple[dict, dict[str, str]]:
    """A config file's tables, its relative paths resolved against its folder (`resolve_paths`), and how
    each was resolved ("section.key" -> note)."""
    path = Path(path)
    try:
        data = parse_nested(tomllib.loads, path.read_text(), f"config file {path}", ConfigError)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be read ({err})") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    return data, resolve_paths(data, path.parent)


def config_from(data: dict, notes: dict[str, str], overrides: list[str], stem: str) -> RunConfig:
    """A run's configuration from a file's tables (`read_tables`) and `--set` overrides, every key checked;
    `stem` names the outputs when output.name is empty (`<stem>-<seed>`). `data` is changed in place."""
    for text in overrides:
        section, key, value = parse_override(text)
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise ConfigError(f"--set {text!r}: [{section}] is not a table")
        data[section][key] = value
        notes = {k: v for k, v in notes.items() if k.partition("[")[0] != f"{section}.{key}"}
        for holder, name, where in relative_paths({section: {key: value}}):
            notes[where] = (f"{where} = {holder[name]!r} is given with --set, so it is relative to the working "
                            f"directory, {Path.cwd()}")
    config = build_config(data)
    check_name_length(config, stem)
    config.path_notes = MappingProxyType(notes)
    return config


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """The configuration of one run: the file (None: the defaults) and `--set` overrides. A file of
    `[[task]]` tables is many runs: `tasks.load_tasks` reads it."""
    data, notes = read_tables(path) if path is not None else ({}, {})
    if "task" in data:
        raise ConfigError(f"config file {path} holds [[task]] tables, one run each: run it with musev-lite run "
                          "(tasks.load_tasks reads it)")
    return config_from(data, notes, list(overrides), Path(path).stem if path is not None else "config")
