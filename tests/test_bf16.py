"""bfloat16 against float32 on the tiny preset: every model the pipeline runs in `model.dtype` (UNet with
ReferenceNet features, IP tokens and ControlNet residuals; ReferenceNet; ControlNet; text and image
encoders), and a whole pipeline call, stay within a stated share of the float32 output's scale.

The reference is the same model in float32 (same weights before the cast). bf16 keeps 8 significant
bits, so each op rounds by up to 0.4%; through the tiny models' ~100 ops that adds up to ~2-4% (RMS).
Tolerances: RMS error <= 6% of the float32 output's RMS, max error <= 8% of its max |value|, for
each model and for the pipeline's final latents (2 Euler steps).
"""

import copy
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import max_abs_error
from musev_lite.pipeline import MuseVPipeline
from musev_lite.unet import Conditioning, ReferEmbFuseAttention, compile_model

RMS_TOLERANCE, MAX_TOLERANCE = 0.06, 0.08
IMAGE = np.random.default_rng(0).integers(0, 255, (40, 72, 3)).astype(np.uint8)


def check(ours: torch.Tensor, reference: torch.Tensor, what: str) -> None:
    """`ours` within the tolerances of `reference`, relative to the reference's scale; errors printed."""
    ours, reference = ours.double(), reference.double()
    err = max_abs_error(ours, reference, what)
    rms = ((ours - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()).item()
    peak = reference.abs().max().item()
    print(f"{what}: max error {err / peak:.2%} of max |x| = {peak:.3g}, RMS error {rms:.2%} of the RMS")
    assert torch.isfinite(ours).all() and ours.dtype == reference.dtype
    assert rms <= RMS_TOLERANCE and err <= MAX_TOLERANCE * peak


@pytest.fixture(scope="module")
def pipe():
    pipe = MuseVPipeline.demo(seed=0)
    with torch.no_grad():  # open the temporal gates, so the temporal layers' rounding counts
        for name, p in pipe.unet.named_parameters():
            if name.endswith("temporal_weight"):
                p.fill_(0.5)
    return pipe


def model_outputs(pipe: MuseVPipeline, dtype: torch.dtype) -> dict:
    """Every model's output on fixed inputs, in `dtype` (float32 inputs, cast by the models)."""
    pipe = copy.deepcopy(pipe).to(dtype=dtype)
    g = torch.Generator().manual_seed(1)
    sample, text, frames = torch.randn(2, 4, 5, 8, 12, generator=g), torch.randn(2, 77, 32, generator=g), 2 * 5
    with torch.no_grad():
        ip = pipe.image_proj(torch.randn(2, 64, generator=g).to(dtype))
        refer = pipe.referencenet(sample[:, :, 0], 0.0, ip)
        control = pipe.controlnets["controlnet"](sample.transpose(1, 2).flatten(0, 1), 500.0,
                                                 text.repeat_interleave(5, 0), torch.rand(frames, 3, 64, 96, generator=g))
        eps = pipe.unet(sample, 500.0, Conditioning(text, 8.0, ip, 1.0, refer, control), condition_frames=1)
        tokens = pipe.text_encoder(torch.randint(0, 200, (2, 77), generator=g))
        image = pipe.image_encoder(torch.rand(2, 3, 224, 224, generator=g).to(dtype))
    assert eps.dtype == dtype
    return {"UNet eps": eps, "ReferenceNet mid": refer.mid, "ReferenceNet conv_in": refer.down[0],
            "ControlNet mid": control.mid, "ControlNet down[6]": control.down[6], "text encoder": tokens,
            "image encoder": image}


@pytest.mark.slow
def test_every_model_in_bf16_stays_close_to_fp32(pipe):
    reference, ours = model_outputs(pipe, torch.float32), model_outputs(pipe, torch.bfloat16)
    for what in reference:
        check(ours[what].float(), reference[what], f"{what}, bf16 vs fp32")


def test_a_bf16_pipeline_call_stays_close_to_fp32(pipe):
    fast = dict(num_frames=4, seed=5, steps=2, context_frames=4, context_overlap=2)
    reference = pipe("a face", IMAGE, **fast)
    ours = copy.deepcopy(pipe).to(dtype=torch.bfloat16)("a face", IMAGE, **fast)
    assert ours.latents.dtype == torch.float32  # latents and the sampler stay float32; the VAE too
    check(ours.latents, reference.latents, "final latents, bf16 vs fp32")
    print(f"frames: max difference {np.abs(ours.frames.astype(int) - reference.frames.astype(int)).max()} of 255")


@pytest.mark.slow
def test_compiled_reference_fusion_in_bf16_is_not_nan():
    """The ReferenceNet fusion compiled in bf16 (transposed tiles: its residual add reads the attention
    output across the token layout) agrees with eager to bf16 rounding. It returned NaN with
    ATEN_CPU_CAPABILITY=avx2 on an AVX-512 machine: inductor's graph cache served the AVX-512 build of
    the same graph; `compile_model` keys the cache on the vector width (tests/test_compile.py)."""
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("torch.compile needs a C++ compiler on a CPU")
    torch.manual_seed(0)
    fuse = ReferEmbFuseAttention(32, 2).eval().to(torch.bfloat16)
    x, reference = torch.randn(6, 32, 8, 8).bfloat16(), torch.randn(2, 32, 8, 8).bfloat16()
    with torch.no_grad():
        eager, compiled = fuse(x, reference, 3), compile_model(fuse)(x, reference, 3)
    torch._dynamo.reset()
    check(compiled.float(), eager.float(), "ReferEmbFuseAttention in bf16, compiled vs eager")


def onednn_computes_bf16() -> bool:
    """Whether oneDNN runs this CPU's bfloat16 convolutions (AVX-512 and up, unless ONEDNN_MAX_CPU_ISA holds it
    lower, as CI's AVX2 leg does). Elsewhere ATen's fallback convolution copies its operands whatever their
    layout, so the layout claims below do not apply there."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def ancestors(event) -> list[str]:
    """Names of the ops a profiled op ran inside, innermost first."""
    names = []
    while event.cpu_parent is not None:
        event = event.cpu_parent
        names.append(event.name)
    return names


@pytest.mark.slow
def test_bf16_unet_keeps_convolutions_channels_last(pipe):
    """oneDNN computes bfloat16 convolutions channels-last and copies any other layout in and out on every
    call; the UNet keeps its bf16 frames and conv weights channels-last, so no convolution copies. Cast back
    to float32 the weights are contiguous again and the output is the float32 original's, to the weights'
    bf16 rounding."""
    unet = copy.deepcopy(pipe.unet).to(torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    sample, text = torch.randn(2, 4, 3, 8, 12, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad(), torch.profiler.profile() as prof:
        unet(sample, 500.0, Conditioning(text, 8.0))
    copies = [e for e in prof.events() if e.name == "aten::copy_" and "convolution" in " ".join(ancestors(e))]
    assert not copies or not onednn_computes_bf16(), f"{len(copies)} layout copies inside bf16 convolutions"
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    unet.float()
    assert all(p.is_contiguous() for p in unet.parameters())
    with torch.no_grad():
        check(unet(sample, 500.0, Conditioning(text, 8.0)), pipe.unet(sample, 500.0, Conditioning(text, 8.0)),
              "UNet cast to bf16 and back vs float32")


def test_bf16_controlnet_keeps_convolutions_channels_last(pipe):
    """The ControlNet runs for every window at every step: in bfloat16 its convolutions copy nothing either,
    and cast back to float32 it gives the float32 original's residuals to the weights' bf16 rounding."""
    controlnet = copy.deepcopy(pipe.controlnets["controlnet"]).to(torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    args = (torch.randn(4, 4, 8, 12, generator=g), 500.0, torch.randn(4, 77, 32, generator=g),
            torch.rand(4, 3, 64, 96, generator=g))
    with torch.no_grad(), torch.profiler.profile() as prof:
        controlnet(*args)
    copies = [e for e in prof.events() if e.name == "aten::copy_" and "convolution" in " ".join(ancestors(e))]
    assert not copies or not onednn_computes_bf16(), f"{len(copies)} layout copies inside bf16 convolutions"
    controlnet.float()
    assert all(p.is_contiguous() for p in controlnet.parameters())
    with torch.no_grad():
        check(controlnet(*args).mid, pipe.controlnets["controlnet"](*args).mid, "ControlNet cast to bf16 and back vs float32")
