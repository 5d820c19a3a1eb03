"""Where the models compute and in what: a device name checked against what this torch has, and the
models' dtype, "auto" resolved to bfloat16 only where the hardware computes it. Resolved once per run
(run.py's `Job`) and once per `from_pretrained` / `to` call; nothing else guesses them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .settings import DTYPES, ConfigError


def resolve_device(device, key: str = "device") -> str:
    """`device` (a name or torch.device) checked against what this torch has; "auto" picks cuda, then mps,
    then cpu. `key` names the setting in errors."""
    name = str(device)
    has = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name == "auto":
        return next(kind for kind in ("cuda", "mps", "cpu") if has[kind])
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{key} = {name!r} is not a torch device; use \"auto\", \"cpu\", \"cuda\", "
                          "\"cuda:1\" or \"mps\"") from None
    if not has.get(device.type, False):
        raise ConfigError(f"{key} = {name!r} but this torch has no {device.type.upper()} device; "
                          f"use \"auto\" or one of {', '.join(k for k, ok in has.items() if ok)}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{key} = {name!r} but there are {torch.cuda.device_count()} CUDA devices")
    return name


def native_bfloat16(device: str) -> bool:
    """Whether `device` computes bfloat16 in hardware: a CUDA GPU that supports it, or an x86 CPU with
    AVX512-BF16 or AMX (Linux's /proc/cpuinfo says; elsewhere a CPU counts as without) whose bf16 torch's
    kernels use: oneDNN's (which `ONEDNN_MAX_CPU_ISA` can cap below it) and ATen's AVX-512 vector code
    (which `ATEN_CPU_CAPABILITY` can cap). Emulated bfloat16 is slower than float32."""
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    if device != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    onednn = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    return (("avx512_bf16" in flags or "amx_bf16" in flags) and torch.backends.cpu.get_cpu_capability() == "AVX512"
            and torch.backends.mkldnn.is_available() and onednn())


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """The models' dtype for a `model.dtype` setting on `device`. "auto" is bfloat16 where the hardware
    computes it (about 4x float32 for SD1.5's UNet on such a CPU, bench/roofline.py; frames within a few
    levels of float32's, tests/test_bf16.py) and float32 elsewhere, where emulated bfloat16 can be slower.
    float32 reproduces the original MuseV to rounding."""
    if name == "auto":
        return torch.bfloat16 if native_bfloat16(device) else torch.float32
    return getattr(torch, name)


def model_dtype(value, key: str = "dtype", device: str = "cpu") -> torch.dtype:
    """The models' dtype given as a torch.dtype or by name: one of settings.DTYPES ("auto" resolved for
    `device` by `resolve_dtype`), also written as str(torch.float16) writes it ("torch.float16"). Anything
    else is a ConfigError naming `key`. (diffusers takes a torch.dtype only and turns any other value into
    float32 with a warning; a name is accepted here, a wrong one refused.)"""
    name = str(value) if isinstance(value, torch.dtype) else value
    name = name.removeprefix("torch.") if isinstance(name, str) else None
    if name not in DTYPES:
        raise ConfigError(f"{key} = {value!r} is not one of {', '.join(DTYPES)} (a name, or torch.float32, "
                          "torch.bfloat16, torch.float16)")
    return resolve_dtype(name, device)
