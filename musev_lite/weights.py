"""Reading published checkpoint files safely, and musev_lite's own weight format.

Our format is one `<name>.safetensors` (the state dict, keys named like the module tree) plus one
`<name>.json` (the config the module is built from) per component, side by side in a weights folder.
Published files are read with `read_state_dict`: safetensors directly, pickled `.bin`/`.pt`/`.ckpt`
only through `torch.load(weights_only=True)`, so a file that carries code is refused, not run.
`load_model` builds a model on the meta device and makes the checked tensors its weights: no random
init, no second copy.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import pickle
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .limits import file_stem, folder_problem, parse_nested, room_for

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

# A weights folder: one <component>.safetensors + <component>.json per model, the tokenizer, the schedule
REQUIRED = ("unet", "vae", "text_encoder")
CONTROLNET = "controlnet"  # a ControlNet's component name when none is given (more: controlnet_pose, ...)
REFERENCENET_PARTS = ("referencenet", "image_proj", "image_encoder")  # the referencenet models' extra parts
# an IP-Adapter converted for the plain musev model: the UNet's IP branch (ip_adapter), its projection
# (image_proj, or the plus models' resampler, as ip_adapter.json says) and image_encoder
IP_ADAPTER = "ip_adapter"
# textual-inversion files, each word named by its file (MuseV's negative presets name badhandv4,
# ng_deepnegative_v1_75t, EasyNegativeV2, bad_prompt_version2-neg)
EMBEDDINGS = "embeddings"
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
# the safetensors dtype names read_safetensors reads (the format stores little-endian values)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class WeightsError(ValueError):
    """A checkpoint file is missing, unreadable, unsafe, or does not fit the model."""


class NumericError(ValueError):
    """A tensor holds NaN or infinite values: stop rather than write a black video."""


def check_finite(tensor: torch.Tensor, stage: str, fix: str = "") -> torch.Tensor:
    """`tensor` unchanged if all its values are finite; else NumericError naming `stage`, what was
    found and the fixes to try: `fix` (the caller's, for its stage), float32 for a half-precision
    tensor, finite weights."""
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return tensor
    nan = int(torch.isnan(tensor).sum())
    fixes = [fix] if fix else []
    if tensor.dtype in (torch.float16, torch.bfloat16):
        fixes.append(f'run in float32 (model.dtype = "float32"): {str(tensor.dtype)[6:]} overflows easily')
    fixes.append("check that the weights are finite numbers (convert them again)")
    raise NumericError(
        f"{stage}: {nan} NaN and {int((~finite).sum()) - nan} infinite values among {tensor.numel()}; "
        "stopped instead of writing a broken video. Try: " + "; ".join(fixes)
    )


def read_state_dict(path: str | os.PathLike, mapped: bool = True) -> dict[str, torch.Tensor]:
    """Load a flat name -> tensor dict from a `.safetensors` or pickled checkpoint, on the CPU
    (`mapped`: see read_safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return read_safetensors(path, mapped)
    if path.suffix in PICKLE_SUFFIXES:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise WeightsError(
                f"{path}: refused to unpickle: the file holds more than tensors (only plain weights "
                f"are loaded, with torch.load(weights_only=True)): {str(err).splitlines()[0]}"
            ) from None
        except (RuntimeError, EOFError, OSError) as err:
            raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({err})") from None
        if not isinstance(state, dict):
            raise WeightsError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
        return state
    raise WeightsError(
        f"{path}: unknown checkpoint type {path.suffix!r}; expected .safetensors or one of "
        f"{', '.join(PICKLE_SUFFIXES)}"
    )


def read_safetensors(path: Path, mapped: bool) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, in file order.

    `mapped`: safetensors' load_file, views of a memory map of the file whose pages are read as they are
    touched, so a converter that keeps part of a file reads only that part; but a tensor changes if the
    file is rewritten in place (and the process dies if it is cut short) while the tensor is in use.
    Otherwise, for tensors a model keeps, each is read straight into memory of its own: one copy.
    """
    try:
        if mapped or sys.byteorder != "little":  # load_file also swaps the bytes on big-endian machines
            tensors = load_file(path)
            return tensors if mapped else {k: v.clone() for k, v in tensors.items()}
        with safe_open(path, framework="pt"):  # checks the header, and that the tensors cover the file
            pass
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            header.pop("__metadata__", None)
            start, tensors = f.tell(), {}
            for key, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
                if info["dtype"] not in SAFETENSORS_DTYPES:
                    raise WeightsError(f"{path}: tensor {key} is {info['dtype']}; musev_lite reads "
                                       f"{', '.join(SAFETENSORS_DTYPES)}")
                begin, end = info["data_offsets"]
                data = torch.empty(end - begin, dtype=torch.uint8)
                f.seek(start + begin)
                if f.readinto(data.numpy()) != end - begin:
                    raise OSError(f"tensor {key} ends past the end of the file")
                tensors[key] = data.view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
            return tensors
    except (SafetensorError, OSError) as err:
        raise WeightsError(f"{path}: not a readable safetensors file ({err}); it may be truncated: "
                           "download or convert it again") from None


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The text metadata of a `.safetensors` header (trainers record the base model there); {} otherwise.
    Call after `read_state_dict`, which reports unreadable files."""
    if Path(path).suffix != ".safetensors":
        return {}
    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}


def name_list(names: list[str], limit: int = 12) -> str:
    """`a, b, c, ... (n more)`: the first `limit` names of a list for an error message."""
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_state_dict(
    expected: dict[str, torch.Size | tuple[int, ...]],
    state_dict: dict[str, torch.Tensor],
    source: str,
    allow_missing: bool = False,
    allow_unexpected: bool = False,
) -> None:
    """Raise WeightsError naming every missing, unexpected and mis-shaped key."""
    missing = [] if allow_missing else [k for k in expected if k not in state_dict]
    unexpected = [] if allow_unexpected else [k for k in state_dict if k not in expected]
    misshaped = [
        f"{k} (file {tuple(state_dict[k].shape)}, model {tuple(expected[k])})"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {name_list(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {name_list(unexpected)}")
    if misshaped:
        problems.append(f"{len(misshaped)} with wrong shape: {name_list(misshaped, 6)}")
    if problems:
        raise WeightsError(f"{source}: weights do not fit the model; " + "; ".join(problems))


def load_weights(
    model: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    source: str,
    allow_missing: bool = False,
) -> None:
    """Copy a checked state dict into `model` (dtype follows the model's parameters)."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_state_dict(expected, state_dict, source, allow_missing=allow_missing)
    model.load_state_dict(state_dict, strict=not allow_missing)


def load_model(model_cls, config, state_dict: dict[str, torch.Tensor], source: str, device="cpu",
               dtype: torch.dtype | None = None) -> torch.nn.Module:
    """`model_cls(config)` holding the checked `state_dict`, moved to `device` and (floating point) `dtype`:
    the tensors `load_weights` and `.to(device, dtype)` would give, without making the model's random
    weights first. The model is built on the meta device and each tensor, converted, becomes its weight
    (load_state_dict(assign=True)). Consumes `state_dict`: a tensor leaves it once converted, so no more
    than one tensor is held twice."""
    with torch.device("meta"):
        model = model_cls(config)
    declared = model.state_dict()
    check_state_dict({k: v.shape for k, v in declared.items()}, state_dict, source)
    weights = {}
    for key, meta in declared.items():
        value = state_dict.pop(key)
        # load_weights copies into the model's dtype first: skipped where that changes no value (fp16, bf16 in fp32)
        if not (value.is_floating_point() and torch.promote_types(value.dtype, meta.dtype) == meta.dtype):
            value = value.to(meta.dtype)
        target = dtype if dtype is not None and meta.is_floating_point() else meta.dtype
        weights[key] = value.to(device=device, dtype=target)
    model.load_state_dict(weights, assign=True)
    del weights
    empty = [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if empty:
        raise RuntimeError(f"{model_cls.__name__}: {name_list(empty)} are not in the state dict and have no "
                           "values (built on the meta device): make them in the model after loading")
    return model.to(device=device, dtype=dtype)  # converted already; sets a model's per-dtype layout (unet.py)


def temporary_affixes(path: Path, is_dir: bool = False) -> tuple[str, str]:
    """(prefix, suffix) of `atomic_path`'s temporary name for `path`, around tempfile's 8 random characters:
    `.v.k3j_x9q2.tmp.mp4` for v.mp4, `.v_frames.k3j_x9q2.tmp` for the folder v_frames."""
    return (f".{path.name}.", ".tmp") if is_dir else (f".{path.stem}.", f".tmp{path.suffix}")


@contextmanager
def atomic_path(path: Path, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` only if the block succeeds, so an
    interrupted write leaves no half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = temporary_affixes(path, is_dir)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix, suffix=suffix))
    else:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
        os.close(fd)
        tmp = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod((0o777 if is_dir else 0o666) & ~umask)  # mkstemp/mkdtemp make private files; use the usual mode
    try:
        yield tmp
        if is_dir and path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        if is_dir:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def missing_weights(weights_dir: str | os.PathLike) -> list[str]:
    """Files `MuseVPipeline.from_pretrained` needs that are not in `weights_dir`."""
    weights_dir = Path(weights_dir)
    names = [f"{c}.{ext}" for c in REQUIRED for ext in ("safetensors", "json")]
    names += ["tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler.json"]
    if (weights_dir / "referencenet.json").is_file():
        names += [f"{c}.{ext}" for c in REFERENCENET_PARTS for ext in ("safetensors", "json")]
    if (weights_dir / f"{IP_ADAPTER}.json").is_file():
        projection = read_component_config(weights_dir, IP_ADAPTER).get("projection", "image_proj")
        names += [f"{c}.{ext}" for c in (IP_ADAPTER, str(projection), "image_encoder") for ext in ("safetensors", "json")]
    return [n for n in names if not (weights_dir / n).is_file()]


def config_from_dict(config_cls, config: dict):
    """A config dataclass from a JSON config (ours, diffusers' or transformers'): the keys it has are
    used, the others (`_class_name`, settings that do not change the model) are ignored."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in config.items() if k in fields})


def save_component(
    directory: str | os.PathLike, name: str, state_dict: dict[str, torch.Tensor], config: dict
) -> Path:
    """Write `<directory>/<name>.safetensors` and `<name>.json` atomically; return the weights path.
    `name` must be one plain name (`limits.file_stem`): the files stay inside `directory`."""
    directory = Path(directory)
    file_stem("component name", name, WeightsError)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    weights = directory / f"{name}.safetensors"
    with room_for(directory, weights.name, needed=sum(t.nbytes for t in tensors.values())):
        with atomic_path(weights) as tmp:
            save_file(tensors, tmp)
        with atomic_path(directory / f"{name}.json") as tmp:
            tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return weights


def read_component_config(directory: str | os.PathLike, name: str) -> dict:
    """The JSON config `<directory>/<name>.json` of a component (nested at most `limits.MAX_NESTING` deep)."""
    config_path = Path(directory) / f"{file_stem('component name', name, WeightsError)}.json"
    if not config_path.is_file():
        raise WeightsError(f"{config_path}: no such file (component {name!r} is not in {directory})")
    try:
        config = parse_nested(json.loads, config_path.read_text(), str(config_path), WeightsError)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightsError(f"{config_path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise WeightsError(f"{config_path}: expected a JSON object of settings, got {type(config).__name__}")
    return config


def load_component(directory: str | os.PathLike, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read `<directory>/<name>.safetensors` (into memory of its own: a model keeps it) and its `<name>.json`."""
    config = read_component_config(directory, name)
    return read_state_dict(Path(directory) / f"{name}.safetensors", mapped=False), config


def writable_folder(path: str | os.PathLike, option: str) -> Path:
    """`path` as a folder to write into (made later if missing), or a WeightsError naming `option` when a
    file, a device or a symbolic-link loop is in the way (`limits.folder_problem`); checked before a
    conversion starts."""
    problem = folder_problem(path)
    if problem:
        raise WeightsError(f"{option} {path} {problem}; give a folder (it is made if missing)")
    return Path(path)
