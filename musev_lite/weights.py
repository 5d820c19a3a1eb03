"""Reading published checkpoint files safely, and musev_lite's own weight format.

Our format is one `<name>.safetensors` (the state dict, keys named like the module tree) plus one
`<name>.json` (the config the module is built from) per component, side by side in a weights folder.
Published files are read with `read_state_dict`: safetensors directly, pickled `.bin`/`.pt`/`.ckpt`
only through `torch.load(weights_only=True)`, so a file that carries code is refused, not run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

# A weights folder: one <component>.safetensors + <component>.json per model, the tokenizer, the schedule
REQUIRED = ("unet", "vae", "text_encoder")
REFERENCENET_PARTS = ("referencenet", "image_proj", "image_encoder")  # the referencenet models' extra parts
# textual-inversion files, each word named by its file (MuseV's negative presets name badhandv4,
# ng_deepnegative_v1_75t, EasyNegativeV2, bad_prompt_version2-neg)
EMBEDDINGS = "embeddings"
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")


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


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a flat name -> tensor dict from a `.safetensors` or pickled checkpoint, on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError) as err:
            raise WeightsError(
                f"{path}: not a readable safetensors file ({err}); it may be truncated: "
                "download or convert it again"
            ) from None
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


@contextmanager
def atomic_path(path: Path, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` only if the block succeeds, so an
    interrupted write leaves no half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    else:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
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
    return [n for n in names if not (weights_dir / n).is_file()]


def config_from_dict(config_cls, config: dict):
    """A config dataclass from a JSON config (ours, diffusers' or transformers'): the keys it has are
    used, the others (`_class_name`, settings that do not change the model) are ignored."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in config.items() if k in fields})


def save_component(
    directory: str | os.PathLike, name: str, state_dict: dict[str, torch.Tensor], config: dict
) -> Path:
    """Write `<directory>/<name>.safetensors` and `<name>.json` atomically; return the weights path."""
    directory = Path(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    weights = directory / f"{name}.safetensors"
    with atomic_path(weights) as tmp:
        save_file(tensors, tmp)
    with atomic_path(directory / f"{name}.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return weights


def load_component(directory: str | os.PathLike, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read `<directory>/<name>.safetensors` and its `<name>.json` config."""
    directory = Path(directory)
    config_path = directory / f"{name}.json"
    if not config_path.is_file():
        raise WeightsError(f"{config_path}: no such file (component {name!r} is not in {directory})")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise WeightsError(f"{config_path}: not valid JSON ({err})") from None
    return read_state_dict(directory / f"{name}.safetensors"), config
