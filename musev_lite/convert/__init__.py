"""Converters from the published checkpoints to musev_lite's weights folder (`musev_lite.convert`).

Files in diffusers / transformers layout already carry our module names, so they need no table: they
are read, checked against the model's keys and shapes, and written. Only formats whose names really
differ get one small pattern table each: single-file A1111 checkpoints and old VAE attention names
(`sd15.py`), single-file ControlNets (`controlnet.py`, reusing sd15.py's UNet table), and h94's SD1.5
IP-Adapters, whose attention weights are numbered in diffusers' processor order (`ip_adapter.py`). `musev.py`
assembles a MuseV model from its motion checkpoint and an SD1.5 base.

    python -m musev_lite.convert.sd15 SRC DEST       an SD1.5 base (diffusers folder or single file)
    python -m musev_lite.convert.musev --help        a MuseV model: motion UNet + base + VAE + image encoder
    python -m musev_lite.convert.controlnet SRC --dest DIR   an SD1.5 ControlNet (diffusers folder or single file)
    python -m musev_lite.convert.ip_adapter SRC DEST --image-encoder DIR   an SD1.5 IP-Adapter into a musev folder
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from ..weights import WeightsError

Rule = tuple[str, str | Callable[[re.Match], str]]


def rename(state: dict[str, torch.Tensor], rules: list[Rule], source: str) -> dict[str, torch.Tensor]:
    """Apply the first matching (regex, replacement) rule to every key; a key no rule matches is an
    error that names it. Rules are anchored at the start of the key."""
    compiled = [(re.compile(pattern), replacement) for pattern, replacement in rules]
    out, unmapped = {}, []
    for key, value in state.items():
        for pattern, replacement in compiled:
            match = pattern.match(key)
            if match:
                new = replacement(match) if callable(replacement) else match.expand(replacement)
                out[new + key[match.end():]] = value
                break
        else:
            unmapped.append(key)
    if unmapped:
        shown = ", ".join(unmapped[:12]) + (f", ... ({len(unmapped) - 12} more)" if len(unmapped) > 12 else "")
        raise WeightsError(f"{source}: {len(unmapped)} keys have no mapping: {shown}")
    return out
