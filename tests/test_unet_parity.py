"""UNet3D and ReferenceNet against the ORIGINAL MuseV's recorded calls (../shared fixtures).

Tolerance 1e-4 (fp32; the fixture README measured up to 3.2e-6 between two valid attention kernels).
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import max_abs_error, original_fixture_models
from musev_lite.unet import ReferenceFeatures

RUNS = ["t20_linspace", "t20_leading", "t13_linspace3"]


def reference_features(tensors):
    down = [tensors[f"refnet.down_block_refer_embs.{i}"].squeeze(2) for i in range(12)]  # b c 1 h w -> b c h w
    return ReferenceFeatures(down, tensors["refnet.mid_block_refer_emb"].squeeze(2))


@pytest.fixture(scope="module")
def models(request):
    from conftest import SHARED

    if not (SHARED / "reference").is_dir():
        pytest.skip(f"reference material not found at {SHARED} (it sits beside the checkout in CI)")
    return {v: original_fixture_models(SHARED, v) for v in ("musev", "musev_referencenet")}


@pytest.mark.parametrize("variant", ["musev", "musev_referencenet"])
@pytest.mark.parametrize("run", RUNS)
def test_unet_window_calls(shared, models, variant, run):
    tensors = load_file(shared / "reference/fixtures" / variant / f"{run}.safetensors")
    calls = json.loads((shared / "reference/fixtures/manifest.json").read_text())["variants"][variant]["runs"][run][
        "unet_calls"]
    recorded = [c for c in calls if "tensors" in c]
    assert len(recorded) >= 2
    unet, _ = models[variant]
    for call in recorded:
        kwargs = call["kwargs"]
        assert kwargs["sample_frame_rate"] == 8.0 and kwargs["ip_adapter_scale"] == 1.0
        assert tensors[kwargs["vision_conditon_frames_sample_index"]["tensor"]].tolist() == [0]
        extra = {}
        if variant == "musev_referencenet":
            extra = dict(ip_tokens=tensors["ip.image_emb"], refer=reference_features(tensors))
        name = call["tensors"]["sample"].rsplit(".", 1)[0]
        with torch.no_grad():
            out = unet(tensors[f"{name}.sample"], tensors[f"{name}.timestep"], tensors["text.prompt_embeds"],
                       condition_frames=1, motion_speed=8.0, **extra)
        assert max_abs_error(out, tensors[f"{name}.out"], f"{variant}/{run} {name}") <= 1e-4


def test_referencenet_features(shared, models):
    tensors = load_file(shared / "reference/fixtures/musev_referencenet/t20_linspace.safetensors")
    _, referencenet = models["musev_referencenet"]
    with torch.no_grad():
        features = referencenet(tensors["refnet.refer_image_vae_emb"], tensors["refnet.call.timestep"],
                                tensors["ip.image_emb"])
    expected = reference_features(tensors)
    assert len(features.down) == 12
    for i in range(12):
        assert max_abs_error(features.down[i], expected.down[i], f"referencenet down {i}") <= 1e-4
    assert max_abs_error(features.mid, expected.mid, "referencenet mid") <= 1e-4
