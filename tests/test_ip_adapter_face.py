"""IPAdapterFaceID against the ORIGINAL MuseV, and its converter, inputs and errors.

The fixture (tests/fixtures/ip_adapter_face, made by tests/make_fixtures.py's ip_adapter_face part from an
original checkout) holds the original's outputs at tiny random weights: the face tokens of IP-Adapter's
MLPProjModel, one UNet3DConditionModel forward with ip_adapter_face_emb, and the final latents of the shared
t13_linspace3 image2video call run with a face embedding. The weights are redrawn here from the manifest's
init specs (`make_fixtures.seeded_weights`), written as the published `ip-adapter-faceid_sd15.bin` layout (with
LoRA tensors MuseV skips) and converted by `musev_lite.convert.faceid`.

Tolerances, derived, not tuned: the projection and the forward within conftest.rounding_tolerance of their
output through the model's reductions (2.6e-6 on tokens of up to 2.7, 4.2e-5 on outputs of up to 2.6); the whole
call within 8x the original's own spread when its attention kernel was swapped (conftest.spread_tolerance,
1.1e-3 on latents of up to 100).
"""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import (FIXTURES, REPO, SHARED, max_abs_error, original_fixture_models, reduction_depth, rounding_tolerance,
                      spread_tolerance)
from make_fixtures import seeded_weights
from musev_lite.convert import faceid
from musev_lite.denoise import WindowedDenoiser, context_windows, sample
from musev_lite.ip_adapter import face_embedding_checked
from musev_lite.models import FACE, load_face_component
from musev_lite.pipeline import MuseVPipeline
from musev_lite.samplers import EulerSampler, SchedulerConfig
from musev_lite.unet import Conditioning, ReferenceFeatures
from musev_lite.weights import WeightsError

FOLDER = FIXTURES / "ip_adapter_face"
MANIFEST = json.loads((FOLDER / "manifest.json").read_text())
RUN = "musev_referencenet/t13_linspace3"
LORA = {"0.to_q_lora.down.weight": (4, 32), "1.to_k_lora.up.weight": (32, 4)}  # as the published file has them


def published(lora: bool = True) -> dict:
    """The fixture's face weights in ip-adapter-faceid_sd15.bin's layout."""
    m = MANIFEST
    proj = seeded_weights(m["image_proj"]["init_spec"], m["image_proj"]["seed"])
    layers = seeded_weights(m["ip_adapter"]["init_spec"], m["ip_adapter"]["seed"])
    if lora:
        layers.update({k: torch.zeros(shape) for k, shape in LORA.items()})
    return {"image_proj": proj, "ip_adapter": layers}


def write_bin(path, state) -> str:
    torch.save(state, path)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The shared fixture's UNet with the face branch and the face projection, through `convert faceid`."""
    if not (SHARED / "reference").is_dir():
        pytest.skip(f"reference material not found at {SHARED} (it sits beside the checkout in CI)")
    unet, referencenet = original_fixture_models(SHARED, "musev_referencenet")
    folder = tmp_path_factory.mktemp("weights")
    (folder / "unet.json").write_text(json.dumps({"cross_attention_dim": 32, "block_out_channels": [32] * 4,
                                                   "heads": 2, "norm_num_groups": 16}))
    faceid.convert(write_bin(folder / "ip-adapter-faceid_sd15.bin", published()), folder)
    unet, proj = load_face_component(folder, unet, "cpu", torch.float32)
    return unet, proj


def test_face_tokens_equal_the_original(models):
    _, proj = models
    inputs = load_file(FOLDER / "inputs.safetensors")
    face = face_embedding_checked(inputs["face_embedding"], "fixture")
    with torch.no_grad():
        ours = proj(torch.stack([torch.zeros_like(face), face]))
    reference = inputs["face_tokens"]
    assert max_abs_error(ours, reference, "face tokens") <= rounding_tolerance(reference, reduction_depth(proj))


def test_unet_forward_equals_the_original(models):
    unet, _ = models
    shared = load_file(SHARED / "reference/fixtures" / f"{RUN}.safetensors")
    face_tokens = load_file(FOLDER / "inputs.safetensors")["face_tokens"]
    reference = load_file(FOLDER / "outputs.safetensors")["forward.out"]
    frames = reference.shape[2]
    refer = ReferenceFeatures([shared[f"refnet.down_block_refer_embs.{i}"].squeeze(2) for i in range(12)],
                              shared["refnet.mid_block_refer_emb"].squeeze(2))
    cond = Conditioning(shared["text.prompt_embeds"], motion_speed=8.0, ip_tokens=shared["ip.image_emb"], refer=refer,
                        face_tokens=face_tokens, face_scale=MANIFEST["face_scale"])
    with torch.no_grad():
        out = unet(shared["unet.step0.win1.sample"][:, :, :frames], shared["unet.step0.win1.timestep"], cond)
        without = unet(shared["unet.step0.win1.sample"][:, :, :frames], shared["unet.step0.win1.timestep"],
                       Conditioning(cond.text, 8.0, cond.ip_tokens, refer=refer))
    assert max_abs_error(out, reference, "forward with the face") <= rounding_tolerance(reference, reduction_depth(unet))
    assert (without - reference).abs().max() > 0.1  # the face branch is what the fixture tests


@pytest.mark.slow
def test_image2video_loop_equals_the_original(models):
    """Our loop with the shared run's inputs and our face tokens gives the original's final latents."""
    unet, proj = models
    fixtures = SHARED / "reference/fixtures"
    meta = json.loads((fixtures / "manifest.json").read_text())["variants"]["musev_referencenet"]["runs"]["t13_linspace3"]
    shared = load_file(fixtures / f"{RUN}.safetensors")
    x_t = shared["latents.x_T"]
    sampler = EulerSampler(SchedulerConfig.from_dict(meta["checkpoint_scheduler_config"]), len(meta["step_timesteps"]))
    refer = ReferenceFeatures([shared[f"refnet.down_block_refer_embs.{i}"].squeeze(2) for i in range(12)],
                              shared["refnet.mid_block_refer_emb"].squeeze(2))
    face = load_file(FOLDER / "inputs.safetensors")["face_embedding"]
    with torch.no_grad():
        face_tokens = proj(torch.stack([torch.zeros_like(face), face]))
    cond = Conditioning(shared["text.prompt_embeds"], motion_speed=8.0, ip_tokens=shared["ip.image_emb"], refer=refer,
                        face_tokens=face_tokens, face_scale=MANIFEST["face_scale"])
    windows = context_windows("uniform_v2", x_t.shape[2], 12, 4)
    denoiser = WindowedDenoiser(unet, x_t, shared["cond.condition_latents"], cond, sampler, windows,
                                [3.5] * len(sampler.timesteps))
    with torch.no_grad():
        latents = sample(denoiser, sampler, x_t)
    final = torch.cat([shared["cond.condition_latents"], latents], dim=2)
    reference = load_file(FOLDER / "outputs.safetensors")["call.final_latents"]
    tolerance = spread_tolerance(MANIFEST["call"]["rerun_math_attention_final_max_abs_diff"])
    assert max_abs_error(final, reference, "image2video with a face, final latents") <= tolerance


def test_the_original_needs_the_ip_adapter_beside_the_face():
    """Recorded, not reproduced: the original's face branch reads vision_clip_emb.shape on its first call."""
    assert MANIFEST["checks"]["forward_without_vision_clip_emb"].startswith("AttributeError")


# ---------------------------------------------------------------------------------------------
# The converter


def tiny_weights(tmp_path):
    pipe = MuseVPipeline.demo()
    pipe.save_pretrained(tmp_path / "weights")
    return tmp_path / "weights", pipe


def test_converter_round_trip(tmp_path, capsys):
    """The demo's face weights, written in the published layout, convert back to the same component."""
    folder, pipe = tiny_weights(tmp_path)
    table = faceid.face_unet_keys(pipe.unet.config)
    unet_state = pipe.unet.state_dict()
    state = {"image_proj": pipe.face_proj.state_dict(),
             "ip_adapter": {k: unet_state[ours] for k, (ours, _) in table.items()}}
    state["ip_adapter"]["3.to_out_lora.down.weight"] = torch.zeros(4, 32)
    (folder / f"{FACE}.json").unlink()
    (folder / f"{FACE}.safetensors").unlink()
    from musev_lite.__main__ import main
    assert main(["convert", "faceid", write_bin(tmp_path / "f.bin", state), str(folder)]) == 0
    assert "dropped its 1 LoRA tensors, which MuseV does not load" in capsys.readouterr().err
    again = MuseVPipeline.from_pretrained(folder)
    for key, value in again.unet.state_dict().items():
        assert torch.equal(value, unet_state[key]), key
    assert list(table)[:2] == ["1.to_k_ip.weight", "1.to_v_ip.weight"]
    assert table["31.to_k_ip.weight"][0].startswith("mid_block.") and table["9.to_k_ip.weight"][0].startswith("down_blocks.2")
    assert table["13.to_k_ip.weight"][0].startswith("up_blocks.1.attentions.0.")


@pytest.mark.parametrize("change, pattern", [
    (lambda s: s["ip_adapter"].pop("7.to_v_ip.weight"), r"1 missing: 7\.to_v_ip\.weight"),
    (lambda s: s["ip_adapter"].update({"33.to_k_ip.weight": torch.zeros(32, 32)}), r"1 unexpected: 33\.to_k_ip\.weight"),
    (lambda s: s["ip_adapter"].update({"5.to_k_ip.weight": torch.zeros(32, 16)}),
     r"1 with wrong shape: 5\.to_k_ip\.weight \(file \(32, 16\), model \(32, 32\)\)"),
    (lambda s: s["image_proj"].pop("norm.bias"), r"\(image_proj\): weights do not fit the model; 1 missing: norm\.bias"),
    (lambda s: s.pop("ip_adapter"), r"expected an IPAdapterFaceID checkpoint .* it lacks ip_adapter"),
    (lambda s: s.update(image_proj={"proj.weight": torch.zeros(128, 1024)}), r"image_proj is not IPAdapterFaceID's MLP"),
])
def test_converter_names_what_does_not_fit(tmp_path, capsys, change, pattern):
    folder, pipe = tiny_weights(tmp_path)
    table = faceid.face_unet_keys(pipe.unet.config)
    state = {"image_proj": pipe.face_proj.state_dict(),
             "ip_adapter": {k: torch.zeros(shape) for k, (_, shape) in table.items()}}
    change(state)
    before = (folder / f"{FACE}.safetensors").read_bytes()
    from musev_lite.convert.faceid import main
    assert main([write_bin(tmp_path / "f.bin", state), str(folder)]) == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if line]
    assert line.startswith("error: ") and re.search(pattern, line), line
    assert (folder / f"{FACE}.safetensors").read_bytes() == before  # nothing written


def test_converter_needs_a_weights_folder(tmp_path):
    with pytest.raises(WeightsError, match=r"unet\.json: no such file"):
        faceid.convert(tmp_path / "f.bin", tmp_path)


# ---------------------------------------------------------------------------------------------
# Inputs: the Python API and the command line


@pytest.fixture(scope="module")
def pipe():
    return MuseVPipeline.demo()


IMAGE = np.random.default_rng(0).integers(0, 255, (64, 64, 3)).astype(np.uint8)
FACE_VECTOR = torch.nn.functional.normalize(torch.randn(512, generator=torch.Generator().manual_seed(3)), dim=0)


def call(pipe, **kwargs):
    return pipe("a face", IMAGE, num_frames=3, steps=2, seed=1, context_frames=4, context_overlap=2, **kwargs).latents


@pytest.mark.slow
def test_python_api(pipe):
    without, face = call(pipe), call(pipe, face_embedding=FACE_VECTOR)
    assert (face - without).abs().max() > 1e-3
    assert torch.equal(call(pipe, face_embedding=FACE_VECTOR, ip_adapter_face_scale=0), without)
    # insightface's raw embedding (norm ~25) is normalised as insightface does; numpy arrays work too
    raw = call(pipe, face_embedding=(FACE_VECTOR * 25).numpy())  # the same vector to rounding
    assert (raw - face).abs().max() <= 1e-4 * face.abs().max()


@pytest.mark.parametrize("value, pattern", [
    (torch.zeros(512), "face_embedding: the face embedding is all zeros"),
    (torch.full((512,), float("nan")), "face_embedding: the face embedding holds NaN or infinity"),
    (torch.ones(1, 2, 512), r"face_embedding: a face embedding is one 512-d ArcFace vector, got shape \(1, 2, 512\)"),
    (torch.ones(128), r"got shape \(128,\); make it with insightface"),
    ("face.npy", r"face_embedding: give the vector, not a file name \('face.npy'\): torch.from_numpy\(np.load"),
    (["a"] * 512, "face_embedding: a face embedding must be a 512-d vector of numbers, got list"),
])
def test_python_api_errors(pipe, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(pipe, face_embedding=value)


def test_weights_without_faceid_say_how_to_add_it(pipe, tmp_path):
    folder, _ = tiny_weights(tmp_path)
    (folder / f"{FACE}.json").unlink()
    (folder / f"{FACE}.safetensors").unlink()
    plain = MuseVPipeline.from_pretrained(folder)
    assert plain.face_proj is None and not plain.unet.config.ip_adapter_face
    with pytest.raises(ValueError, match=r"no IPAdapterFaceID: convert ip-adapter-faceid_sd15\.bin .*convert faceid"):
        call(plain, face_embedding=FACE_VECTOR)


def run_cli(tmp_path, *overrides):
    args = [sys.executable, "-m", "musev_lite.run", str(REPO / "examples/demo.toml")]
    for item in ["model.preset=tiny", "generation.steps=2", "generation.num_frames=3", "generation.context_frames=4",
                 "generation.context_overlap=2", "generation.seed=2", f"output.dir={tmp_path / 'out'}",
                 'output.formats=["png"]', "output.name=v", *overrides]:
        args += ["--set", item]
    return subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=300, env={"OMP_NUM_THREADS": "1",
                          "PATH": "/usr/bin:/bin"})


@pytest.mark.slow
def test_cli_end_to_end(tmp_path):
    np.save(tmp_path / "face.npy", FACE_VECTOR.numpy())
    save_file({"embedding": FACE_VECTOR}, tmp_path / "face.safetensors")
    frames = {}
    for name, extra in [("none", ()), ("npy", (f"input.face_embedding={tmp_path / 'face.npy'}",)),
                        ("st", (f"input.face_embedding={tmp_path / 'face.safetensors'}",))]:
        done = run_cli(tmp_path / name, *extra)
        assert done.returncode == 0, done.stderr
        frames[name] = np.stack([np.asarray(Image.open(p))
                                 for p in sorted((tmp_path / name / "out/v_frames").iterdir())])
        config = json.loads((tmp_path / name / "out/v.json").read_text())["config"]
        assert config["generation"]["ip_adapter_face_scale"] == 1.0
    assert not np.array_equal(frames["none"], frames["npy"]) and np.array_equal(frames["npy"], frames["st"])


@pytest.mark.slow
def test_faceid_example_runs(tmp_path):
    """examples/faceid.toml on the tiny preset, with an embedding in place of the one made from face.png."""
    np.save(tmp_path / "face.npy", FACE_VECTOR.numpy())
    args = [sys.executable, "-m", "musev_lite.run", str(REPO / "examples/faceid.toml")]
    for item in ["model.preset=tiny", "generation.steps=2", "generation.num_frames=3", "generation.context_frames=4",
                 "generation.context_overlap=2", f"input.face_embedding={tmp_path / 'face.npy'}",
                 f"output.dir={tmp_path / 'out'}"]:
        args += ["--set", item]
    done = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "out/faceid-1.json").read_text())["config"]
    assert config["input"]["face_embedding"] == str(tmp_path / "face.npy")


@pytest.mark.slow
@pytest.mark.parametrize("make, pattern", [
    (lambda p: np.save(p / "f.npy", np.zeros(512, np.float32)), "f.npy: the face embedding is all zeros"),
    (lambda p: np.save(p / "f.npy", np.ones(511, np.float32)), r"f.npy: a face embedding is one 512-d ArcFace vector, got shape \(511,\)"),
    (lambda p: np.save(p / "f.npy", np.full(512, np.nan, np.float32)), "f.npy: the face embedding holds NaN"),
    (lambda p: np.save(p / "f.npy", np.array([{"x": 1}], dtype=object)), r"f.npy: not a readable \.npy array"),
    (lambda p: save_file({"a": torch.ones(512), "b": torch.ones(512)}, p / "f.safetensors"),
     r"f.safetensors: holds 2 tensors"),
    (lambda p: (p / "f.txt").write_text("1 2 3"), r"f.txt: a face embedding is a \.npy or \.safetensors file"),
    (lambda p: None, r"input.face_embedding: .*/f.npy: no such file"),
])
def test_cli_bad_face_embedding(tmp_path, make, pattern):
    make(tmp_path)
    name = next((p.name for p in tmp_path.iterdir() if p.name.startswith("f.")), "f.npy")
    done = run_cli(tmp_path, f"input.face_embedding={tmp_path / name}")
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_face_image_without_insightface(tmp_path):
    """insightface is not a dependency: without it, face_image says how to make the .npy."""
    try:
        import insightface  # noqa: F401
        pytest.skip("insightface is installed here")
    except ImportError:
        pass
    done = run_cli(tmp_path, f"input.face_image={REPO / 'examples/face.png'}")
    [line] = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and "needs insightface" in line and 'input.face_embedding = "face.npy"' in line
    assert "README: IPAdapterFaceID" in line and not (tmp_path / "out").exists()


def test_unet_refuses_face_tokens_it_cannot_use():
    from musev_lite.unet import UNet3D, UNet3DConfig

    x, text = torch.zeros(2, 4, 2, 8, 8), torch.zeros(2, 3, 32)
    plain = UNet3D(UNet3DConfig.preset("tiny")).eval()
    with pytest.raises(ValueError, match=r"face_tokens given, but this UNet has no IPAdapterFaceID attention"):
        plain(x, 1.0, Conditioning(text, 8.0, face_tokens=torch.zeros(2, 4, 32)))
    face = UNet3D(UNet3DConfig(**{**UNet3DConfig.preset("tiny").__dict__, "ip_adapter_face": True})).eval()
    with pytest.raises(ValueError, match=r"face_tokens must be \(B=2, tokens, 32\) to match the sample; got \(1, 4, 32\)"):
        face(x, 1.0, Conditioning(text, 8.0, face_tokens=torch.zeros(1, 4, 32)))
