"""IP-Adapter image projection against the ORIGINAL MuseV run (../shared fixtures)."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import max_abs_error, reduction_depth, rounding_tolerance
from musev_lite.ip_adapter import ImageProjection, ImageProjectionConfig
from musev_lite.weights import WeightsError, load_weights


def test_tokens_equal_the_original(shared):
    root = shared / "reference/fixtures/musev_referencenet"
    weights = {k.removeprefix("image_proj."): v.float() for k, v in load_file(root / "ip_adapter_image_proj.safetensors").items()}
    tensors = load_file(root / "t20_linspace.safetensors")
    model = ImageProjection(ImageProjectionConfig(1024, 32, 4))
    load_weights(model, weights, "ip_adapter_image_proj")
    embeds = tensors["inputs.clip_image_embeds"]
    with torch.no_grad():
        tokens = model(torch.cat([torch.zeros_like(embeds), embeds]))  # uncond = proj(0)
    reference = tensors["ip.image_emb"]  # one linear layer and a LayerNorm: rounding through them (fp32)
    assert max_abs_error(tokens, reference, "IP tokens") <= rounding_tolerance(reference, reduction_depth(model))


def test_wrong_shape_is_named():
    model = ImageProjection(ImageProjectionConfig(16, 8, 2))
    state = {k: torch.zeros(v.shape) for k, v in model.state_dict().items()}
    state["proj.weight"] = torch.zeros(8, 16)
    with pytest.raises(WeightsError, match=r"proj.weight \(file \(8, 16\), model \(16, 16\)\)"):
        load_weights(model, state, "proj")


# ---------------------------------------------------------------------------------------------
# IP-Adapter's own modules (tests/make_fixtures.py resampler: its Resampler, ImageProjModel, and transformers'
# penultimate CLIP hidden states). Tolerance: rounding through the modules' reductions, fp32.

def fixture_part(prefix: str) -> dict:
    from conftest import FIXTURES

    weights = load_file(FIXTURES / "resampler/weights.safetensors")
    return {k.removeprefix(prefix): v.float() for k, v in weights.items() if k.startswith(prefix)}


def test_resampler_equals_ip_adapters():
    import json

    from conftest import FIXTURES
    from musev_lite.ip_adapter import Resampler, ResamplerConfig

    sizes = json.loads((FIXTURES / "resampler/versions.json").read_text())["resampler"]
    model = Resampler(ResamplerConfig(**sizes)).eval()
    load_weights(model, fixture_part("resampler."), "resampler fixture")
    io = load_file(FIXTURES / "resampler/io.safetensors")
    with torch.no_grad():
        tokens = model(io["resampler.hidden_states"])
    reference = io["resampler.tokens"]
    assert max_abs_error(tokens, reference, "Resampler tokens") <= rounding_tolerance(reference, reduction_depth(model))


def test_image_projection_equals_ip_adapters_image_proj_model():
    from conftest import FIXTURES

    model = ImageProjection(ImageProjectionConfig(24, 32, 4)).eval()
    load_weights(model, fixture_part("image_proj."), "image_proj fixture")
    io = load_file(FIXTURES / "resampler/io.safetensors")
    with torch.no_grad():
        tokens = model(io["image_proj.image_embeds"])
    reference = io["image_proj.tokens"]
    assert max_abs_error(tokens, reference, "ImageProjModel tokens") <= rounding_tolerance(reference, reduction_depth(model))


def test_penultimate_hidden_states_equal_transformers():
    import json

    from conftest import FIXTURES
    from musev_lite.clip import CLIPVisionConfig, CLIPVisionModelWithProjection
    from musev_lite.weights import config_from_dict

    config = config_from_dict(CLIPVisionConfig, json.loads((FIXTURES / "clip_vision/config.json").read_text()))
    model = CLIPVisionModelWithProjection(config).eval()
    load_weights(model, {k: v.float() for k, v in load_file(FIXTURES / "clip_vision/weights.safetensors").items()
                         if k != "vision_model.embeddings.position_ids"}, "clip_vision fixture")
    pixels = load_file(FIXTURES / "clip_vision/io.safetensors")["pixel_values_fp16"].float()
    with torch.no_grad():
        hidden = model.penultimate_hidden_states(pixels)
    reference = load_file(FIXTURES / "resampler/io.safetensors")["clip_vision.penultimate_hidden_states"]
    layers = model.vision_model.encoder.layers  # the path: embeddings, pre-LayerNorm, all layers but the last
    depth = reduction_depth(model.vision_model.embeddings, model.vision_model.pre_layrnorm, *layers[:-1])
    assert max_abs_error(hidden, reference, "CLIP penultimate hidden states") <= rounding_tolerance(reference, depth)
