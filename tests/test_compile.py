"""`model.compile = true`: the compiled UNet against eager, on the host's own vector ISA.

Inductor (torch 2.13, CPU) writes its kernels for one vector ISA (AVX-512: 16 floats a vector, AVX2: 8)
but keys its on-disk graph cache without it: a graph cached under one ISA and loaded under another
returned NaN (AVX2 loading AVX-512 graphs, float32 and bfloat16) or corrupted the heap (the reverse).
`compile_model` puts the vector width in the key. These tests pass natively and under
`ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`.

Tolerances: float32 1e-4, as the parity tests (compiled kernels sum in another order; seen: 2e-6 at
|output| <= 1.5); bfloat16 test_bf16's `check` (compiled and eager round to bf16 at different points).
"""

import os
import shutil

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.cpu_vec_isa import pick_vec_isa
from torch._inductor.utils import fresh_cache

from conftest import max_abs_error
from musev_lite.config import ModelConfig, RunConfig
from musev_lite.inputs import load_pipeline
from musev_lite.unet import Conditioning, ReferEmbFuseAttention, compile_model
from test_bf16 import check

FLOAT32_TOLERANCE = 1e-4

pytestmark = [pytest.mark.slow,  # each compiles with inductor: tens of seconds to minutes
              pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                                 reason="torch.compile needs a C++ compiler on a CPU")]


def test_the_compile_cache_keeps_vector_isas_apart(monkeypatch):
    """The same module compiled for the host's vector ISA, then for none (ATEN_CPU_CAPABILITY=default,
    which inductor reads at each compile): the second compile must not load the first one's graph from
    the cache (it did before compile_model, and AVX2 loading AVX-512 graphs gave NaN), and both equal eager."""
    if not pick_vec_isa():
        pytest.skip("no vector ISA on this host: nothing to tell apart")
    torch.manual_seed(0)
    fuse = ReferEmbFuseAttention(32, 2).eval()
    x, reference = torch.randn(6, 32, 8, 8), torch.randn(2, 32, 8, 8)
    with fresh_cache(), torch.no_grad():
        eager = fuse(x, reference, 3)
        for capability in (None, "default"):
            if capability is not None:
                monkeypatch.setenv("ATEN_CPU_CAPABILITY", capability)
            torch._dynamo.reset()
            counters.clear()
            compiled = compile_model(fuse)(x, reference, 3)
            stats = counters["inductor"]
            assert (stats["fxgraph_cache_miss"], stats["fxgraph_cache_hit"]) == (1, 0), f"{pick_vec_isa()}: {dict(stats)}"
            assert max_abs_error(compiled, eager, f"compiled for {pick_vec_isa()} vs eager") <= FLOAT32_TOLERANCE
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_compiled_demo_unet_equals_eager(dtype):
    """The UNet `model.compile = true` gives (load_pipeline, tiny preset) on one window call with every
    conditioning (text, IP tokens, ReferenceNet features), temporal gates open, against its eager module."""
    pipe = load_pipeline(RunConfig(model=ModelConfig(preset="tiny", dtype=dtype, compile=True)), "cpu", getattr(torch, dtype))
    eager_unet = pipe.unet._orig_mod
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(1)
    sample, text = torch.randn(2, 4, 3, 8, 12, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        for name, p in eager_unet.named_parameters():
            if name.endswith("temporal_weight"):
                p.fill_(0.5)
        ip = pipe.image_proj(torch.randn(2, 64, generator=g).to(dt))
        cond = Conditioning(text, 8.0, ip, 1.0, pipe.referencenet(sample[:, :, 0], 0.0, ip))
        eager = eager_unet(sample, torch.tensor(500.0), cond, condition_frames=1)
        compiled = pipe.unet(sample, torch.tensor(500.0), cond, condition_frames=1)
    torch._dynamo.reset()
    what = f"compiled UNet in {dtype} on {pick_vec_isa()} vs eager"
    if dt == torch.bfloat16:
        check(compiled.float(), eager.float(), what)
    else:
        assert torch.isfinite(compiled).all()
        assert max_abs_error(compiled, eager, what) <= FLOAT32_TOLERANCE
