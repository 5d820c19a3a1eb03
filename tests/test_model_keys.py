"""Full-size models (built on the meta device, no memory) have exactly the published keys and shapes."""

import json

import pytest
import torch

from musev_lite.referencenet import ReferenceNet
from musev_lite.unet import UNet3D, UNet3DConfig


def assert_same_keys(model, manifest, what):
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(manifest) - set(ours))
    unexpected = sorted(set(ours) - set(manifest))
    misshaped = [k for k in manifest if k in ours and ours[k] != manifest[k]]
    assert not missing and not unexpected and not misshaped, (what, missing[:5], unexpected[:5], misshaped[:5])


@pytest.mark.parametrize(
    "preset, manifest",
    [("musev", "unet3d_musev.json"), ("musev_referencenet", "unet3d_musev_referencenet.json"),
     ("musev_referencenet_pose", "unet3d_musev_referencenet.json")],
)
def test_unet_presets(shared, preset, manifest):
    with torch.device("meta"):
        model = UNet3D(UNet3DConfig.preset(preset))
    assert_same_keys(model, json.loads((shared / "reference/keys" / manifest).read_text()), preset)


def test_referencenet(shared):
    with torch.device("meta"):
        model = ReferenceNet(UNet3DConfig.preset("musev_referencenet"))
    assert_same_keys(model, json.loads((shared / "reference/keys/referencenet2d.json").read_text()), "referencenet")


def test_sd15_unet_keys_are_a_subset(shared):
    """The base model's UNet overlays the 3D UNet with no renaming: every SD1.5 key exists, same shape."""
    with torch.device("meta"):
        model = UNet3D(UNet3DConfig.preset("musev_referencenet"))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    sd15 = json.loads((shared / "reference/keys/unet2d_sd15_diffusers.json").read_text())
    assert all(ours.get(k) == shape for k, shape in sd15.items())


def test_unknown_preset():
    with pytest.raises(ValueError, match="UNet preset 'musev2' is unknown"):
        UNet3DConfig.preset("musev2")
