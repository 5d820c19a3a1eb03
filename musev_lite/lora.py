"""LoRA for the SD1.5 parts of a MuseV model: the UNet's spatial layers and the text encoder.

A LoRA holds, for some linear or conv layers of a base model, two thin factors `down` (r, in) and
`up` (out, r), and optionally `alpha`. Merging it with strength `scale` changes each such weight to

    W + scale * alpha / r * up @ down

For a conv layer `down` is an (r, in, k, k) conv and `up` a 1x1 conv (kohya's "LoCon"): their
composition is the (out, in, k, k) kernel `up @ down` over the flattened (in, k, k) axis.

File formats read (safetensors, or a pickle through `read_state_dict`):
  * kohya / A1111: `lora_unet_<module path with _ for .>.lora_down.weight`, `.lora_up.weight`,
    `.alpha`, and `lora_te_...` for the text encoder; alpha missing means alpha = r.
  * diffusers / PEFT: `unet.<module path>.lora_A.weight` / `.lora_B.weight` and `text_encoder.<...>`,
    also spelled `.lora.down/.lora.up` and `.lora_linear_layer.down/.up`, and diffusers' older
    attention-processor names (`attn1.processor.to_q_lora.down.weight`). alpha comes from `.alpha`
    keys, or from the LoRA config diffusers writes into the file's metadata (`lora_adapter_metadata`:
    lora_alpha, alpha_pattern), else alpha = r.

MuseV's video UNet keeps SD1.5's spatial layers under their diffusers names, so an SD1.5 LoRA merges
into them as into an image UNet. Every linear and conv2d layer of the UNet and text encoder that the
file names is merged: an SD1.5 LoRA names only spatial layers, so the temporal ones (`temp_attentions`,
`transformer_in`; `temp_convs` are 3D convolutions, never merged) change only for a LoRA trained on
MuseV's UNet that names them; `merge_lora` counts them. The ReferenceNet is left alone, as in the
original (MuseV's `update_pipeline_lora_models` changes only `pipeline.unet` and `pipeline.text_encoder`).
A LoRA made for SDXL or SD2.x is refused, naming the base it was made for.

Merging computes in float32 and writes back in the model's dtype. The first merge into a layer keeps
its original weight (a CPU copy) in the caller's record `originals` (layer -> weight); `unmerge_lora`
puts every one back, so unmerging restores the weights bitwise, however many LoRAs were merged in between.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .limits import parse_nested
from .weights import WeightsError, name_list, read_metadata, read_state_dict

TEMPORAL_MODULES = ("temp_attentions", "temp_convs", "transformer_in")  # MuseV's temporal parts of the UNet

# One pattern per key family: (component, module path, role). Roles: down, up, alpha.
KOHYA_KEY = re.compile(r"lora_(unet|te)_([^.]+)\.(lora_down\.weight|lora_up\.weight|alpha)")
DIFFUSERS_KEY = re.compile(
    r"(?:(unet|text_encoder)\.)?(.+?)\.(lora_A\.weight|lora_B\.weight|lora\.down\.weight|lora\.up\.weight"
    r"|lora_linear_layer\.down\.weight|lora_linear_layer\.up\.weight|alpha)"
)
OLD_DIFFUSERS_KEY = re.compile(
    r"(?:(unet|text_encoder)\.)?(.+?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight"
)
ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_A.weight": "down", "lora_B.weight": "up",
         "lora.down.weight": "down", "lora.up.weight": "up", "lora_linear_layer.down.weight": "down",
         "lora_linear_layer.up.weight": "up", "down": "down", "up": "up", "alpha": "alpha"}
# the layer an old attention-processor LoRA (`to_q_lora`) belongs to, per component
OLD_PROCESSOR_LAYERS = {
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}
LYCORIS_MARKERS = ("hada_", "lokr_", "lora_mid", "dora_scale", "lora_magnitude_vector", ".diff")
# widths that give away another base: cross-attention context (UNet attn2 to_k/to_v inputs) and
# text-encoder width (q/k/v_proj, fc1 inputs). SD1.x has 768 for both.
OTHER_BASE_WIDTHS = {
    "unet": {1024: "SD2.x (1024-wide cross-attention)", 2048: "SDXL (2048-wide cross-attention)"},
    "text_encoder": {1024: "SD2.x (its 1024-wide OpenCLIP text encoder)",
                     1280: "SDXL (its 1280-wide second text encoder)"},
}


class LoraError(WeightsError):
    """A LoRA file that cannot be read, is for another base model, or does not fit the model."""


@dataclass
class LoRALayer:
    """The LoRA of one linear/conv layer: its update is scale * up @ down, scale = alpha / r."""

    key: str  # the layer as the file names it, for messages
    down: torch.Tensor  # (r, in) or (r, in, k, k)
    up: torch.Tensor  # (out, r) or (out, r, 1, 1)
    scale: float

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the weight update: (out, in) or (out, in, k, k)."""
        return (self.up.shape[0], *self.down.shape[1:])

    def delta(self, device) -> torch.Tensor:
        """scale * up @ down in float32; for convs over the flattened (in, k, k) axis."""
        up = self.up.to(device, torch.float32).flatten(1)  # out r
        down = self.down.to(device, torch.float32).flatten(1)  # r (in k k)
        return (self.scale * (up @ down)).reshape(self.shape)


@dataclass
class LoRA:
    """A LoRA file, read: its layers by (component, module path with `_` for `.`)."""

    source: str
    layers: dict[tuple[str, str], LoRALayer]


def load_lora(path: str | os.PathLike) -> LoRA:
    """Read a kohya/A1111 or diffusers/PEFT LoRA file for SD1.x. Raises LoraError (naming the keys)
    for keys that are not LoRA weights, incomplete layers, and LoRAs made for another base model."""
    path = Path(path)
    state = read_state_dict(path)
    metadata = read_metadata(path)
    other_base = _other_base_by_name(state, metadata)
    if other_base:
        raise _other_base_error(path, other_base)
    broken = [key for key, value in state.items()
              if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(value.isfinite().all())]
    if broken:
        raise LoraError(f"{path}: {len(broken)} tensor(s) hold NaN or infinite values: {name_list(broken, 20)}; "
                        "the file is broken (download or train it again)")
    found: dict[tuple[str, str], dict] = {}  # (component, dotted module path) -> {role: tensor}
    unknown = []
    for key, value in state.items():
        parsed = _parse_key(key)
        if parsed is None or not isinstance(value, torch.Tensor):
            unknown.append(key)
            continue
        component, module, role, stem = parsed
        found.setdefault((component, module), {"key": stem})[role] = value
    if unknown:
        hint = ""
        if any(marker in key for key in unknown for marker in LYCORIS_MARKERS):
            hint = " LyCORIS LoHa/LoKr/DoRA/Tucker (lora_mid) layers are not supported, only plain LoRA and LoCon."
        raise LoraError(f"{path}: {len(unknown)} key(s) are not LoRA weights of a known format: "
                        f"{name_list(unknown, 20)}.{hint}")
    if not found:
        raise LoraError(f"{path}: no LoRA weights in the file (it is empty)")
    layers = _layers(path, found, _peft_config(path, metadata))
    for (component, name), layer in layers.items():
        inputs = ("attn2_to_k", "attn2_to_v") if component == "unet" else ("q_proj", "k_proj", "v_proj", "fc1")
        base = OTHER_BASE_WIDTHS[component].get(layer.down.shape[1])
        if name.endswith(inputs) and base:
            raise _other_base_error(path, f"{base}: {layer.key} takes {layer.down.shape[1]} inputs")
    return LoRA(str(path), layers)


def _layers(path: Path, found: dict[tuple[str, str], dict], config: dict) -> dict[tuple[str, str], LoRALayer]:
    """The LoRALayer of every (component, module) found, each checked: a down/up pair of consistent shapes,
    rank >= 1, alpha one number; its scale alpha / rank (kohya's alpha, else the PEFT config's, else 1)."""
    layers, broken, empty = {}, [], []
    for (component, module), parts in found.items():
        down, up, alpha = parts.get("down"), parts.get("up"), parts.get("alpha")
        shapes = {role: tuple(parts[role].shape) for role in ("down", "up", "alpha") if role in parts}
        if (down is None or up is None or down.ndim not in (2, 4) or up.ndim not in (2, 4)
                or up.shape[1] != down.shape[0] or up.shape[2:].numel() != 1
                or (alpha is not None and alpha.numel() != 1)):
            broken.append(f"{parts['key']} {shapes}")
            continue
        if down.shape[0] == 0 or 0 in down.shape[1:] or up.shape[0] == 0:  # rank 0, or no inputs / outputs
            empty.append(f"{parts['key']} {shapes}")
            continue
        rank = down.shape[0]
        scale = (float(alpha) if alpha is not None else rank) / rank  # kohya: no alpha means alpha = rank
        if alpha is None and component in config:  # diffusers' LoRA config: scale = lora_alpha / r (PEFT)
            lora_alpha, alpha_pattern = config[component]
            matches = [a for p, a in alpha_pattern.items() if re.match(rf"(.*\.)?({p})$", module)]
            scale = (matches[0] if matches else lora_alpha) / rank
        layers[(component, module.replace(".", "_"))] = LoRALayer(parts["key"], down, up, scale)
    if broken:
        raise LoraError(f"{path}: {len(broken)} layer(s) lack a matching lora down/up pair (down (r, in[, k, k]), "
                        f"up (out, r[, 1, 1]), alpha one number): {name_list(broken, 20)}")
    if empty:
        raise LoraError(f"{path}: {len(empty)} layer(s) have empty down/up factors (rank 0, or no inputs or outputs; "
                        f"a LoRA layer has rank >= 1): {name_list(empty, 20)}; the file is broken (train or export it again)")
    return layers


def merge_lora(unet: nn.Module, text_encoder: nn.Module | None, loras: Sequence[tuple[LoRA, float]],
               originals: dict[nn.Module, torch.Tensor]) -> list[dict[str, int]]:
    """Merge LoRAs, each with its own strength, into the weights of `unet` (musev_lite's UNet3D, or
    any module with diffusers' UNet names) and `text_encoder` (CLIPTextModel). Every layer is checked
    before any weight changes: layers that match nothing or do not fit raise one LoraError naming
    them all. `originals` gets the original weight of every layer merged into for the first time. Can be
    called again (with the same record) to add more; `unmerge_lora(originals)` removes them all. Returns, per LoRA, the
    layers it changed: {"unet": n, "unet_temporal": of those, in the temporal modules, "text_encoder": n}."""
    targets = {"unet": _named_layers(unet), "text_encoder": _named_layers(text_encoder) if text_encoder else {}}
    plan: dict[nn.Module, list[tuple[LoRALayer, float]]] = {}
    unmatched, misfit, counts = [], [], []
    for lora, scale in loras:
        if not math.isfinite(scale):
            raise LoraError(f"{lora.source}: LoRA scale {scale} is not a finite number")
        counts.append({"unet": 0, "unet_temporal": 0, "text_encoder": 0})
        for (component, name), layer in lora.layers.items():
            module = targets[component].get(name)
            if module is None:
                unmatched.append(f"{layer.key} ({Path(lora.source).name})")
            elif not _fits(layer.shape, module.weight.shape):
                misfit.append(f"{layer.key} (LoRA {layer.shape}, layer {tuple(module.weight.shape)})")
            else:
                plan.setdefault(module, []).append((layer, scale))
                counts[-1][component] += 1
                counts[-1]["unet_temporal"] += component == "unet" and _temporal(name)
    problems = []
    if unmatched:
        problems.append(f"{len(unmatched)} LoRA layer(s) match no layer of the SD1.5 UNet or text encoder: "
                        f"{name_list(unmatched, 20)}")
    if misfit:
        problems.append(f"{len(misfit)} LoRA layer(s) do not fit the layer they name: {name_list(misfit, 20)}")
    if problems:
        raise LoraError("; ".join(problems) + ". Nothing was merged. Is it a LoRA for an SD1.5 model (not SDXL, "
                        "SD2, a motion module or another architecture)?")
    with torch.no_grad():
        for module, parts in plan.items():
            weight = module.weight
            if module not in originals:
                originals[module] = weight.detach().to("cpu", copy=True)
            merged = weight.float()
            for layer, scale in parts:
                merged = merged + scale * layer.delta(weight.device).reshape(weight.shape)
            weight.copy_(merged)  # rounds to the model's dtype once per merge call
    return counts


def unmerge_lora(originals: dict[nn.Module, torch.Tensor]) -> None:
    """Put back the original weights `merge_lora` recorded in `originals` (bitwise), and empty the record."""
    with torch.no_grad():
        for module, original in originals.items():
            module.weight.copy_(original)
    originals.clear()


def _named_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Linear and Conv2d layers by module path with `_` for `.`, as kohya names them; text-encoder
    layers also without the `text_model_` prefix (transformers 5 saves them so)."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            flat = name.replace(".", "_")
            layers[flat] = layers[flat.removeprefix("text_model_")] = module
    return layers


def _temporal(name: str) -> bool:
    """Whether a UNet layer (module path with `_` for `.`) is in one of MuseV's temporal modules."""
    return any(name.startswith(f"{part}_") or f"_{part}_" in name for part in TEMPORAL_MODULES)


def _fits(delta: tuple[int, ...], weight: torch.Size) -> bool:
    """Same shape, or a linear LoRA on a 1x1 conv (and back), as SD1 vs SD2 proj_in/proj_out differ."""
    return tuple(delta) == tuple(weight) or (
        tuple(delta[:2]) == tuple(weight[:2]) and math.prod(delta) == math.prod(weight)
    )


def _parse_key(key: str) -> tuple[str, str, str, str] | None:
    """(component, dotted module path, role, the key without its role suffix) of a LoRA key, or None."""
    if m := KOHYA_KEY.fullmatch(key):
        return {"unet": "unet", "te": "text_encoder"}[m[1]], m[2], ROLES[m[3]], key[: m.start(3) - 1]
    if m := OLD_DIFFUSERS_KEY.fullmatch(key):
        component = m[1] or "unet"
        return component, f"{m[2]}.{OLD_PROCESSOR_LAYERS[component][m[3]]}", ROLES[m[4]], key[: m.start(4) - 1]
    if m := DIFFUSERS_KEY.fullmatch(key):
        return m[1] or "unet", m[2], ROLES[m[3]], key[: m.start(3) - 1]
    return None


def _peft_config(path: Path, metadata: dict[str, str]) -> dict[str, tuple[float, dict]]:
    """Per component (lora_alpha, alpha_pattern) of the LoRA config diffusers stores in a file's metadata."""
    if "lora_adapter_metadata" not in metadata:
        return {}
    try:
        config = parse_nested(json.loads, metadata["lora_adapter_metadata"], f"{path}: lora_adapter_metadata", LoraError)
    except json.JSONDecodeError as err:
        raise LoraError(f"{path}: its lora_adapter_metadata is not valid JSON ({err})") from None
    out = {}
    for component in ("unet", "text_encoder"):
        for variant in ("use_dora", "use_rslora"):
            if config.get(f"{component}.{variant}"):
                raise LoraError(f"{path}: {component}.{variant} is set in its LoRA config; "
                                "only plain LoRA is supported")
        if f"{component}.lora_alpha" in config:
            out[component] = (float(config[f"{component}.lora_alpha"]), config.get(f"{component}.alpha_pattern") or {})
    return out


def _other_base_by_name(state: dict, metadata: dict[str, str]) -> str | None:
    """The base a LoRA says it was made for, when not SD1.x: kohya's metadata, or SDXL's/SD2's key names."""
    architecture = metadata.get("modelspec.architecture", "")
    version = metadata.get("ss_base_model_version", "")
    if architecture and not architecture.startswith("stable-diffusion-v1"):
        return f"{architecture.split('/')[0]} (modelspec.architecture in its metadata)"
    if version and not version.startswith("sd_v1"):
        return f"{version} (ss_base_model_version in its metadata)"
    if metadata.get("ss_v2") == "True":
        return "SD2.x (ss_v2 in its metadata)"
    if any(key.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for key in state):
        return "SDXL (it has keys for SDXL's two text encoders: lora_te1_/lora_te2_/text_encoder_2)"
    if any("transformer_resblocks" in key for key in state):
        return "SD2.x (OpenCLIP text-encoder names: transformer_resblocks)"
    return None


def _other_base_error(path: Path, base: str) -> LoraError:
    return LoraError(f"{path}: this LoRA was made for {base}, not SD1.x; MuseV builds on SD1.5, "
                     "so use a LoRA trained for SD1.5 (or a model based on it)")
