"""One GenerationConfig from the TOML file to the UNet call, and the pipeline's front door: keyword
overrides, precomputed prompt embeddings and condition latents, fitted images, dtype and device moves,
`python -m musev_lite` and `--print-config`."""

import dataclasses
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

import musev_lite.unet
from conftest import REPO
from musev_lite import __version__
from musev_lite.config import build_config, load_config, to_toml
from musev_lite.pipeline import MuseVPipeline
from musev_lite.plan import fitted_images
from musev_lite.run import main
from musev_lite.settings import ConfigError, GenerationConfig
from musev_lite.video_io import fit_image

pytestmark = pytest.mark.filterwarnings("ignore:prompt truncated")
IMAGE = np.random.default_rng(0).integers(0, 255, (40, 72, 3)).astype(np.uint8)
FAST = dict(steps=2, first_frame_steps=2, context_frames=4, context_overlap=2)


@pytest.fixture(scope="module")
def pipe():
    return MuseVPipeline.demo(seed=0)


def run_config(tmp_path, generation: str):
    config = tmp_path / "walk.toml"
    config.write_text(f'[model]\npreset = "tiny"\n[input]\nimage = "{REPO / "examples/face.png"}"\n'
                      f'[generation]\nsteps = 1\nnum_frames = 6\ncontext_frames = 3\ncontext_overlap = 1\nseed = 2\n'
                      f'{generation}\n[output]\ndir = "{tmp_path}"\nformats = ["png"]\n')
    return main([str(config)])


def test_motion_speed_walks_from_the_toml_file_to_the_frame_embedding(tmp_path, monkeypatch):
    """generation.motion_speed in a TOML file scales the UNet's frame positions (the tiny preset is anivv1)."""
    seen = []
    original = musev_lite.unet.sinusoidal_embedding
    monkeypatch.setattr(musev_lite.unet, "sinusoidal_embedding", lambda t, dim: seen.append(t.clone()) or original(t, dim))
    assert run_config(tmp_path, "motion_speed = 3.0") == 0
    frame_positions = [t for t in seen if t.dtype == torch.int64]  # timesteps are floats, positions longs
    assert frame_positions and all(torch.equal(t, torch.arange(len(t)) * 3) for t in frame_positions)
    assert {len(t) for t in frame_positions} == {4, 3}  # windows [0,1,2], [2,3,4], [4,5] + the condition frame


@pytest.mark.slow
def test_window_batch_changes_the_calls_not_the_video(tmp_path, monkeypatch):
    calls = []
    original = MuseVPipeline._unet
    monkeypatch.setattr(MuseVPipeline, "_unet", lambda self, sample, *a, **k: calls.append(sample.shape[0])
                        or original(self, sample, *a, **k))
    frames = {}
    for batch in (1, 2):
        calls.clear()
        (tmp_path / str(batch)).mkdir()
        assert run_config(tmp_path / str(batch), f"window_batch = {batch}") == 0
        frames[batch] = sorted((tmp_path / str(batch)).glob("walk-2_frames/*.png"))
        assert calls == ([2, 2, 2] if batch == 1 else [4, 2])  # 2 equal windows share a call, the short one not
    from PIL import Image

    for a, b in zip(frames[1], frames[2], strict=True):
        assert np.abs(np.asarray(Image.open(a), int) - np.asarray(Image.open(b), int)).max() <= 1


def test_keyword_overrides_and_unknown_names(pipe):
    config = GenerationConfig(num_frames=3, seed=5, **FAST)
    a = pipe("a face", IMAGE, config)
    b = pipe("a face", IMAGE, GenerationConfig(), num_frames=3, seed=5, **FAST)
    assert torch.equal(a.latents, b.latents)
    with pytest.raises(ConfigError, match="unknown generation setting 'step'; did you mean 'steps'"):
        pipe("a face", IMAGE, config, step=3)
    with pytest.raises(ConfigError, match=r"generation.guidance_scale = inf must be a finite number"):
        pipe("a face", IMAGE, config, guidance_scale=float("inf"))


def test_prompt_embeds_and_condition_latents_skip_their_encoders(pipe):
    base = pipe("a face", IMAGE, num_frames=3, seed=5, negative_prompt="V1", **FAST)
    text = pipe.encode_text("a face", "V1")
    embeds = pipe("", IMAGE, num_frames=3, seed=5, prompt_embeds=text[1:], negative_prompt_embeds=text[:1], **FAST)
    assert torch.equal(embeds.latents, base.latents)
    fitted = fit_image(fitted_images(IMAGE, None, None, 40, 72)[0], 40, 72)
    latent = pipe.encode_images([fitted_images(IMAGE, None, None, 40, 72)[0]])[:, :, None]
    from_latent = pipe("a face", None, num_frames=3, seed=5, negative_prompt="V1", condition_latents=latent,
                       refer_image=fitted, ip_adapter_image=fitted, fit_images=False, **FAST)
    assert torch.equal(from_latent.latents[:, :, :1], latent)
    with pytest.raises(ConfigError, match="condition_latents have shape"):
        pipe("a face", None, num_frames=3, condition_latents=latent[..., :-1], height=40, width=72, **FAST)
    with pytest.raises(ConfigError, match="prompt_embeds must be"):
        pipe("", IMAGE, num_frames=3, prompt_embeds=text, **FAST)


def test_fitted_images_are_used_as_they_are(pipe):
    fitted = np.asarray(fit_image(fitted_images(IMAGE, None, None, 40, 72)[0], 40, 72))
    once = pipe("a face", fitted, num_frames=2, seed=5, fit_images=False, **FAST)
    assert torch.equal(once.latents[:, :, :1], pipe.encode_images([fitted])[:, :, None])
    twice = pipe("a face", fitted, num_frames=2, seed=5, **FAST)  # MuseV's crop is not the identity
    assert not torch.equal(twice.latents[:, :, :1], once.latents[:, :, :1])
    with pytest.raises(ConfigError, match="image is 72x40 but the video is 64x32"):
        pipe("a face", fitted, num_frames=2, height=32, width=64, fit_images=False, **FAST)


@pytest.mark.slow
def test_to_and_torch_dtype(tmp_path):
    pipe = MuseVPipeline.demo(seed=0)
    pipe.save_pretrained(tmp_path)
    loaded = MuseVPipeline.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16 and loaded.vae.encoder.conv_in.weight.dtype == torch.float32
    assert loaded.controlnets["controlnet"].conv_in.weight.dtype == torch.bfloat16
    pipe.to(dtype=torch.bfloat16)
    assert pipe.unet.conv_in.weight.dtype == pipe.text_encoder.text_model.embeddings.token_embedding.weight.dtype == torch.bfloat16
    assert pipe.vae.decoder.conv_out.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="disagree"):
        MuseVPipeline.from_pretrained(tmp_path, dtype=torch.float16, torch_dtype=torch.bfloat16)


def test_print_config_round_trips():
    config = load_config(REPO / "examples/pose2video.toml", ["generation.guidance_scale_end=5"])
    text = to_toml(config)
    again = build_config(tomllib.loads(text))
    assert to_toml(again) == text and again.generation == config.generation and again.input == config.input
    assert again.output.dir == str(Path.cwd() / "outputs")  # the default, relative to the working directory, made absolute
    assert "# seed = (unset)" not in text and "[[" not in text


@pytest.mark.slow
def test_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "musev_lite", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == f"musev_lite {__version__}"
    done = subprocess.run([sys.executable, "-m", "musev_lite", "run", str(REPO / "examples/demo.toml"),
                           "--print-config", "--set", "generation.steps=3"], capture_output=True, text=True)
    assert done.returncode == 0 and "steps = 3\n" in done.stdout
    done = subprocess.run([sys.executable, "-m", "musev_lite", "convert", "nothing"], capture_output=True, text=True)
    assert done.returncode == 2 and "convert needs a converter first: one of musev, sd15, controlnet" in done.stderr


def test_generation_defaults_are_dataclass_defaults():
    """The pipeline call has no defaults of its own: every generation setting comes from GenerationConfig."""
    import inspect

    params = inspect.signature(MuseVPipeline.__call__).parameters
    assert not set(params) & {f.name for f in dataclasses.fields(GenerationConfig)}
