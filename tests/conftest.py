"""Shared test helpers: where the reference material lives, and skipping cleanly without it."""

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"  # small committed fixtures made by tests/make_fixtures.py
SHARED = Path(os.environ.get("MUSEV_LITE_SHARED", REPO.parent / "shared"))

torch.set_num_threads(min(2, torch.get_num_threads()))

# The numerically sensitive tests (parity, bfloat16, the pipeline, video2video, distributed): CI runs them a
# second time as on a CPU without AVX-512 or bfloat16 hardware (.ci/run), marked `numerics` here.
NUMERICS = {"test_bf16.py", "test_cli.py", "test_clip.py", "test_compile.py", "test_controlnet.py",
            "test_convert.py", "test_denoise.py", "test_distributed.py", "test_ip_adapter.py", "test_ip_adapter_face.py",
            "test_loop_parity.py", "test_lora.py", "test_pipeline.py", "test_prompts.py", "test_samplers.py",
            "test_unet2d.py", "test_unet_parity.py", "test_uneven_windows.py", "test_vae.py",
            "test_video2video.py", "test_video2video_fixture.py", "test_video2video_parity.py"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in NUMERICS:
            item.add_marker(pytest.mark.numerics)


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


# ---------------------------------------------------------------------------------------------
# Tolerances, from an error model (never from the rounding of the host that wrote the test)
#
# Two computations of the same float math in another order (another kernel, vector width, thread split,
# batch size or library) differ by rounding. Every reduction (a linear or convolution layer's sums, done by
# blocked, vectorised kernels; a norm's mean and variance) rounds its result with a relative error of order
# u, the unit roundoff (2^-24 in float32); the roundings of the reductions along a value's path are independent and add up like a
# random walk, to about u * |value| * sqrt(depth). Over an output of up to 10^6 values the largest stays
# below 5 such sigmas, and each of the two computations has its own: ROUNDING_K = 8 > 5 * sqrt(2).

ROUNDING_K = 8.0


def rounding_tolerance(reference: torch.Tensor, depth: float, dtype: torch.dtype = torch.float32) -> float:
    """ROUNDING_K * u(dtype) * max|reference| * sqrt(depth): how far two correct computations of
    `reference` in `dtype`, through `depth` reductions, may lie apart."""
    unit_roundoff = torch.finfo(dtype).eps / 2
    return ROUNDING_K * unit_roundoff * reference.detach().abs().max().item() * math.sqrt(depth)


def reduction_depth(*models: torch.nn.Module) -> int:
    """The reductions a value goes through in `models`: one per linear and convolution layer (an attention
    counts its four projections, which covers its two products) and two per norm (its mean and variance,
    whose rounding the division by a small spread amplifies). Every layer counts, so this bounds the
    longest path from above."""
    layers = (torch.nn.Linear, torch.nn.modules.conv._ConvNd)
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    return sum(isinstance(m, layers) + 2 * isinstance(m, norms) for model in models for m in model.modules())


def spread_tolerance(recorded_spread: float) -> float:
    """For a comparison with a run of the original that records its own spread: how far that run moved
    when only its attention kernel was swapped (fused SDPA -> explicit softmax; the fixtures' manifests,
    `determinism`). That is one sample of a kernel change's rounding; ROUNDING_K covers another kernel,
    CPU and order of ours."""
    return ROUNDING_K * recorded_spread


@pytest.fixture(scope="module")
def clip_tokenizer():
    """The real CLIP vocabulary (not committed: a user's clone skips these tests)."""
    from musev_lite.tokenizer import CLIPTokenizer

    folder = SHARED / "reference/clip_tokenizer"
    if not folder.is_dir():
        pytest.skip(f"the CLIP vocabulary is not committed; it is read from {folder}, absent here")
    return CLIPTokenizer.from_folder(folder)


def sd_unet():
    """Our UNet3D with the unet2d fixture's SD1.5 weights (tests/make_fixtures.py); its temporal layers
    stay at their init."""
    from musev_lite.convert.musev import unet_config_from_diffusers
    from musev_lite.unet import UNet3D
    from musev_lite.weights import load_weights, read_state_dict

    config = json.loads((FIXTURES / "unet2d/config.json").read_text())
    # diffusers' transformer blocks use LayerNorm eps 1e-5 everywhere: set MuseV's quirk to that
    cfg = unet_config_from_diffusers(config, "musev")
    cfg.transformer_norm_eps = 1e-5
    cfg.temporal_conv_groups = cfg.transformer_in_groups = 4
    unet = UNet3D(cfg).eval()
    weights = FIXTURES / "unet2d/weights.safetensors"
    sd_keys = {k: v.float() for k, v in read_state_dict(weights).items()}
    # the SD keys fill the spatial layers; the temporal ones stay at their init and are skipped
    load_weights(unet, sd_keys, str(weights), allow_missing=True)
    assert all(k.startswith(("transformer_in", "frame_embedding")) or "temp_" in k
               for k in set(unet.state_dict()) - set(sd_keys))
    return unet


def original_fixture_models(shared_dir: Path, variant: str):
    """Our UNet3D (and ReferenceNet) loaded with the original MuseV fixture weights (fp16 on disk -> fp32)."""
    import json

    from musev_lite.referencenet import ReferenceNet
    from musev_lite.convert.musev import unet_config_from_diffusers
    from musev_lite.unet import UNet3D
    from musev_lite.weights import load_weights, read_state_dict

    root = shared_dir / "reference/fixtures" / variant
    config = unet_config_from_diffusers(json.loads((root / "unet/config.json").read_text()), variant)
    unet = UNet3D(config).eval()
    weights = root / "unet/diffusion_pytorch_model.safetensors"
    load_weights(unet, {k: v.float() for k, v in read_state_dict(weights).items()}, str(weights))
    referencenet = None
    if (root / "referencenet").is_dir():
        referencenet = ReferenceNet(config).eval()
        weights = root / "referencenet/diffusion_pytorch_model.safetensors"
        load_weights(referencenet, {k: v.float() for k, v in read_state_dict(weights).items()}, str(weights))
    return unet, referencenet


def old_vae_names(state):
    """diffusers' VAE files from before its attention rewrite: query/key/value/proj_attn, 1x1-conv shapes."""
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    out = {}
    for key, value in state.items():
        for new, old in names.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
                value = value[:, :, None, None] if value.ndim == 2 else value
        out[key] = value
    return out


def make_sd15_folder(root, sd_unet: dict, unet_config: dict, cross_dim: int):
    """A diffusers SD1.5 folder as published (tiny sizes): unet/, vae/ (old attention names),
    text_encoder/ (.bin with position_ids), tokenizer/ (byte-level), scheduler/."""
    from safetensors.torch import save_file

    from musev_lite.clip import CLIPTextConfig, CLIPTextModel
    from musev_lite.samplers import SD15_SCHEDULER
    from musev_lite.tokenizer import CLIPTokenizer
    from musev_lite.vae import AutoencoderKL, VAEConfig

    torch.manual_seed(0)
    (root / "unet").mkdir(parents=True)
    save_file(sd_unet, root / "unet/diffusion_pytorch_model.safetensors")
    (root / "unet/config.json").write_text(json.dumps(unet_config))
    vae_config = VAEConfig(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, layers_per_block=1)
    (root / "vae").mkdir()
    torch.save(old_vae_names(AutoencoderKL(vae_config).state_dict()), root / "vae/diffusion_pytorch_model.bin")
    (root / "vae/config.json").write_text(json.dumps(dataclasses.asdict(vae_config)))
    tokenizer = CLIPTokenizer.byte_level()
    text_config = CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=cross_dim, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2)
    (root / "text_encoder").mkdir()
    text_state = dict(CLIPTextModel(text_config).state_dict(), **{"text_model.embeddings.position_ids": torch.arange(77)[None]})
    torch.save(text_state, root / "text_encoder/pytorch_model.bin")
    (root / "text_encoder/config.json").write_text(json.dumps(dataclasses.asdict(text_config)))
    tokenizer.save(root / "tokenizer")
    (root / "scheduler").mkdir()
    (root / "scheduler/scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER))
    return root


def make_release(root, shared_dir: Path) -> dict:
    """`checkpoints/` as the MuseV release lays it out, at tiny sizes with the published key names:
    motion/musev_referencenet (the original's fixture weights; the motion file without the SD1.5 keys),
    t2i/sd1.5/majicmixRealv6Fp16, vae/sd-vae-ft-mse, IP-Adapter/models/image_encoder, embedding/badhandv4.pt.
    Returns the full 3D UNet state the conversion must arrive at."""
    from safetensors.torch import load_file

    from musev_lite.clip import CLIPVisionConfig, CLIPVisionModelWithProjection
    from musev_lite.vae import AutoencoderKL, VAEConfig

    src = shared_dir / "reference/fixtures/musev_referencenet"
    motion = root / "motion/musev_referencenet"
    unet = load_file(src / "unet/diffusion_pytorch_model.safetensors")
    sd_keys = set(json.loads((shared_dir / "reference/keys/unet2d_sd15_diffusers.json").read_text()))
    unet_config = {k: v for k, v in json.loads((src / "unet/config.json").read_text()).items() if not k.startswith("_")}
    (motion / "unet").mkdir(parents=True)
    torch.save({k: v for k, v in unet.items() if k not in sd_keys}, motion / "unet/diffusion_pytorch_model.bin")
    (motion / "unet/config.json").write_text(json.dumps(unet_config))
    (motion / "referencenet").mkdir()
    refer = load_file(src / "referencenet/diffusion_pytorch_model.safetensors")
    refer["up_blocks.0.resnets.0.conv1.weight"] = torch.zeros(1)  # an unpruned save; must be dropped
    torch.save(refer, motion / "referencenet/diffusion_pytorch_model.bin")
    (motion / "referencenet/config.json").write_text((src / "referencenet/config.json").read_text())
    proj = {k.removeprefix("image_proj."): v for k, v in load_file(src / "ip_adapter_image_proj.safetensors").items()}
    torch.save({"image_proj": proj}, motion / "ip_adapter_image_proj.bin")
    make_sd15_folder(root / "t2i/sd1.5/majicmixRealv6Fp16", {k: v for k, v in unet.items() if k in sd_keys}, unet_config, 32)
    vae = root / "vae/sd-vae-ft-mse"
    vae.mkdir(parents=True)
    vae_config = VAEConfig(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, layers_per_block=1)
    torch.manual_seed(1)  # not the base's VAE: the conversion must take this one
    torch.save(old_vae_names(AutoencoderKL(vae_config).state_dict()), vae / "diffusion_pytorch_model.bin")
    (vae / "config.json").write_text(json.dumps(dataclasses.asdict(vae_config)))
    encoder = root / "IP-Adapter/models/image_encoder"
    encoder.mkdir(parents=True)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              patch_size=32, projection_dim=1024)
    torch.save(CLIPVisionModelWithProjection(vision).state_dict(), encoder / "pytorch_model.bin")
    (encoder / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", **dataclasses.asdict(vision)}))
    (root / "embedding").mkdir()  # one of the four negative embeddings, A1111 .pt (two vectors)
    torch.save({"string_to_param": {"*": torch.randn(2, 32)}, "name": "badhandv4"}, root / "embedding/badhandv4.pt")
    return unet


def write_lossless(path, frames, fps=12):
    """FFV1 in Matroska (RGB, lossless): a video file whose frames read back exactly as written."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "bgr0"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


# ---------------------------------------------------------------------------------------------
# The run command, in another process


def sets(items):
    """["section.key=value", ...] -> the run command's --set arguments."""
    return [arg for item in items for arg in ("--set", item)]


def interrupt_when(process, marker: str, signum: int):
    """Read stderr until a line holds `marker`, send `signum`; return (exit code, stdout, all of stderr)."""
    seen = []
    for line in process.stderr:
        seen.append(line)
        if marker in line:
            process.send_signal(signum)
            break
    else:
        process.wait()
        pytest.fail(f"the run ended before printing {marker!r}:\n{''.join(seen)}")
    out, err = process.communicate(timeout=300)
    return process.returncode, out, "".join(seen) + err
