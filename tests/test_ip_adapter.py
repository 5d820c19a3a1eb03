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
