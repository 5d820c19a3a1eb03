"""CLIP text and vision towers and the image preprocessing against transformers (tiny random weights,
fixtures from tests/make_fixtures.py). Tolerance: rounding through the towers' reductions, fp32
(conftest.rounding_tolerance)."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import FIXTURES, max_abs_error, reduction_depth, rounding_tolerance
from musev_lite.clip import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    clip_image_preprocess,
)
from musev_lite.weights import WeightsError, load_weights, read_state_dict


def load(model, part):
    weights = FIXTURES / part / "weights.safetensors"
    state = {k: v.float() if v.is_floating_point() else v for k, v in read_state_dict(weights).items()}
    state.pop("text_model.embeddings.position_ids", None)  # a buffer some transformers versions save
    state.pop("vision_model.embeddings.position_ids", None)
    load_weights(model, state, str(weights))
    return model.eval()


def config(cls, part):
    data = json.loads((FIXTURES / part / "config.json").read_text())
    return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def test_text_hidden_states():
    io = load_file(FIXTURES / "clip_text/io.safetensors")
    model = load(CLIPTextModel(config(CLIPTextConfig, "clip_text")), "clip_text")
    with torch.no_grad():
        hidden = model(io["input_ids"])
    reference = io["last_hidden_state"]
    assert max_abs_error(hidden, reference, "CLIP text last_hidden_state") <= rounding_tolerance(reference, reduction_depth(model))


def test_text_too_long_is_refused():
    model = CLIPTextModel(CLIPTextConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=5))
    with pytest.raises(ValueError, match="6 tokens: the text encoder takes at most 5"):
        model(torch.zeros(1, 6, dtype=torch.long))


def test_vision_image_embeds():
    io = load_file(FIXTURES / "clip_vision/io.safetensors")
    model = load(CLIPVisionModelWithProjection(config(CLIPVisionConfig, "clip_vision")), "clip_vision")
    images = [io[f"image.{name}"].numpy() for name in ("portrait", "landscape", "tiny")]
    with torch.no_grad():
        embeds = model(clip_image_preprocess(images))
    reference = io["image_embeds"]
    assert max_abs_error(embeds, reference, "CLIP vision image_embeds") <= rounding_tolerance(reference, reduction_depth(model))


def test_preprocessing_equals_clip_image_processor():
    """The reference is stored in float16: each value is off by at most float16's unit roundoff times its
    size (~1e-3 here), plus our float32 rounding of the normalisation; one uint8 level is ~0.015."""
    io = load_file(FIXTURES / "clip_vision/io.safetensors")
    images = [Image.fromarray(io[f"image.{name}"].numpy()) for name in ("portrait", "landscape", "tiny")]
    pixels = clip_image_preprocess(images)
    assert pixels.shape == (3, 3, 224, 224)
    reference = io["pixel_values_fp16"].float()
    max_abs_error(pixels, reference, "CLIPImageProcessor pixel values")
    stored = torch.finfo(torch.float16).eps / 2 * reference.abs()  # one rounding to float16, per value
    assert ((pixels - reference).abs() <= stored + rounding_tolerance(reference, 3)).all()


def test_wrong_shape_names_the_key():
    model = CLIPTextModel(config(CLIPTextConfig, "clip_text"))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["text_model.final_layer_norm.weight"] = torch.zeros(7)
    with pytest.raises(WeightsError, match="text_model.final_layer_norm.weight"):
        load_weights(model, state, "text_encoder")
