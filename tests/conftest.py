"""Shared test helpers: where the reference material lives, and skipping cleanly without it."""

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"  # small committed fixtures made by tests/make_fixtures.py
SHARED = Path(os.environ.get("MUSEV_LITE_SHARED", REPO.parent / "shared"))

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def shared():
    """`../shared` (specs, manifests, original-MuseV fixtures); skips when it is not beside the checkout."""
    if not (SHARED / "reference").is_dir():
        pytest.skip(f"reference material not found at {SHARED} (it sits beside the checkout in CI)")
    return SHARED


def max_abs_error(ours: torch.Tensor, reference: torch.Tensor, what: str) -> float:
    """Max |ours - reference| after a shape check; printed so the test log shows what was seen."""
    assert ours.shape == reference.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(reference.shape)}"
    err = (ours.double() - reference.double()).abs().max().item() if ours.numel() else 0.0
    print(f"{what}: max abs error {err:.3g}")
    return err


def original_fixture_models(shared_dir: Path, variant: str):
    """Our UNet3D (and ReferenceNet) loaded with the original MuseV fixture weights (fp16 on disk -> fp32)."""
    import json

    from musev_lite.referencenet import ReferenceNet
    from musev_lite.unet import UNet3D, UNet3DConfig
    from musev_lite.weights import load_weights, read_state_dict

    root = shared_dir / "reference/fixtures" / variant
    config = UNet3DConfig.from_diffusers(json.loads((root / "unet/config.json").read_text()), variant)
    unet = UNet3D(config).eval()
    weights = root / "unet/diffusion_pytorch_model.safetensors"
    load_weights(unet, {k: v.float() for k, v in read_state_dict(weights).items()}, str(weights))
    referencenet = None
    if (root / "referencenet").is_dir():
        referencenet = ReferenceNet(config).eval()
        weights = root / "referencenet/diffusion_pytorch_model.safetensors"
        load_weights(referencenet, {k: v.float() for k, v in read_state_dict(weights).items()}, str(weights))
    return unet, referencenet
