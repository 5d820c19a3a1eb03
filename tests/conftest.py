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
