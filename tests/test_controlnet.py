"""ControlNet against diffusers' ControlNetModel / MultiControlNetModel at tiny random weights, the
single-file (original) layout against the diffusers layout of the same weights, the full SD1.5 key set,
control_guidance_start/end, and the errors a user can cause (fixtures: tests/make_fixtures.py controlnet)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, max_abs_error, reduction_depth, rounding_tolerance
from musev_lite.controlnet import ControlNet, ControlNetConfig, MultiControlNet, controlnet_keep
from musev_lite.convert import controlnet as convert
from musev_lite.weights import WeightsError, load_component, load_weights

FIX = FIXTURES / "controlnet"
CONFIG = json.loads((FIX / "config.json").read_text())
WEIGHTS = {k: v.float() for k, v in load_file(FIX / "weights.safetensors").items()}
IO = load_file(FIX / "io.safetensors")
SD15_KEYS = json.loads((FIX / "sd15_keys.json").read_text())


def tiny(state=WEIGHTS) -> ControlNet:
    net = ControlNet(ControlNetConfig.from_diffusers(CONFIG)).eval()
    load_weights(net, state, "fixture")
    return net


# Against diffusers: the same float32 math in another order, to rounding through the net's reductions
# (conftest.rounding_tolerance; every residual passes at most all of them).
DEPTH = reduction_depth(tiny())


def residuals(net, image, scale=0.7):
    with torch.no_grad():
        return net(IO["sample"], IO["timestep"], IO["text"], image, scale)


def assert_matches(res, prefix: str, what: str):
    for i, down in enumerate(res.down):
        reference = IO[f"{prefix}down.{i}"]
        assert max_abs_error(down, reference, f"{what} down {i}") <= rounding_tolerance(reference, DEPTH)
    assert max_abs_error(res.mid, IO[f"{prefix}mid"], f"{what} mid") <= rounding_tolerance(IO[f"{prefix}mid"], DEPTH)


def ldm_state(state: dict) -> dict:
    """The same weights under the original names, as diffusers' single-file loader reads them."""
    return {SD15_KEYS[k]["ldm"]: v for k, v in state.items()}


def test_matches_diffusers_controlnet():
    """12 down residuals + 1 mid, at conditioning scale 0.7, fractional timestep, a 6x5 latent."""
    res = residuals(tiny(), IO["images"][0].float())
    assert len(res.down) == 12
    assert_matches(res, "", "ControlNet vs diffusers")


def test_transformer_layernorms_are_diffusers_not_musev():
    """A stock diffusers model: LayerNorm eps 1e-5 everywhere (MuseV's UNet has 0 in norm1/norm3)."""
    eps = {m.eps for m in tiny().modules() if isinstance(m, torch.nn.LayerNorm)}
    assert eps == {1e-5}


def test_multi_controlnet_sums_each_with_its_own_image_and_scale():
    second = dict(WEIGHTS, **{k: v.float() for k, v in load_file(FIX / "second_own.safetensors").items()})
    multi = MultiControlNet([tiny(), tiny(second)])
    images = [IO["images"][0].float(), IO["images"][1].float()]
    with torch.no_grad():
        res = multi(IO["sample"], IO["timestep"], IO["text"], images, [0.7, 1.3])
    assert_matches(res, "multi.", "MultiControlNet vs diffusers")
    with torch.no_grad():  # swapping the images changes the result: each net really gets its own
        swapped = multi(IO["sample"], IO["timestep"], IO["text"], images[::-1], [0.7, 1.3])
    assert (swapped.mid - res.mid).abs().max() > 1e-3


def test_full_size_keys_equal_diffusers():
    """SD1.5-size ControlNet (meta device): the same 340 keys and shapes as diffusers' ControlNetModel."""
    with torch.device("meta"):
        ours = {k: list(v.shape) for k, v in ControlNet(ControlNetConfig()).state_dict().items()}
    assert ours == {k: v["shape"] for k, v in SD15_KEYS.items()}


def test_controlnet_keep_equals_diffusers():
    """The conditioning-scale factor diffusers' pipeline used at every step, for start/end pairs
    whose boundaries fall exactly on steps (e.g. 0.7 of 10)."""
    cases = json.loads((FIX / "keep.json").read_text())
    for case in cases:
        ours = [controlnet_keep(i, case["steps"], case["start"], case["end"]) for i in range(case["steps"])]
        assert ours == case["keep"], case


# ---------------------------------------------------------------------------------------------
# Converter


def diffusers_folder(root, config=CONFIG):
    root.mkdir()
    (root / "config.json").write_text(json.dumps(config))
    shutil.copy(FIX / "weights.safetensors", root / "diffusion_pytorch_model.safetensors")
    return root


def test_diffusers_folder_converts(tmp_path, capsys):
    src = diffusers_folder(tmp_path / "control_v11p_sd15_openpose")
    assert convert.main([str(src), "--dest", str(tmp_path / "w"), "--name", "controlnet_pose"]) == 0
    state, config = load_component(tmp_path / "w", "controlnet_pose")
    assert state.keys() == WEIGHTS.keys() and all(torch.equal(state[k].float(), WEIGHTS[k]) for k in WEIGHTS)
    assert ControlNetConfig(**config) == ControlNetConfig.from_diffusers(CONFIG)
    assert capsys.readouterr().out.strip() == str(tmp_path / "w/controlnet_pose.safetensors")


@pytest.mark.parametrize("layout", ["v1.1 .pth", "v1.0 control_model. .pth", "v1.1 .safetensors", "diffusers names"])
def test_single_file_equals_diffusers_layout(layout, tmp_path, capsys):
    """The original layout of the fixture's weights converts back to them exactly, and runs as diffusers'
    (a lone diffusers-named weights file too)."""
    state = load_file(FIX / "weights.safetensors")
    if layout != "diffusers names":
        state = ldm_state(state)
    path = tmp_path / ("control.pth" if ".pth" in layout else "control_v11p_sd15_openpose.safetensors")
    if ".pth" not in layout:
        save_file(state, path)
    elif "v1.0" in layout:  # a whole SD1.5 checkpoint with the ControlNet inside
        extra = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2), "global_step": 5}
        torch.save({"state_dict": {**{f"control_model.{k}": v for k, v in state.items()}, **extra}}, path)
    else:
        torch.save(state, path)
    assert convert.main([str(path), "--dest", str(tmp_path / "w"), "--config", str(FIX / "config.json")]) == 0
    if "v1.0" in layout:
        assert "skipped 2 keys that are not ControlNet weights" in capsys.readouterr().err
    converted, config = load_component(tmp_path / "w", "controlnet")
    assert converted.keys() == WEIGHTS.keys() and all(torch.equal(converted[k].float(), WEIGHTS[k]) for k in WEIGHTS)
    net = ControlNet(ControlNetConfig(**config)).eval()
    load_weights(net, {k: v.float() for k, v in converted.items()}, "converted")
    assert_matches(residuals(net, IO["images"][0].float()), "", f"single file ({layout}) vs diffusers")


def test_single_file_without_config_is_sd15_sized(tmp_path, capsys):
    """No --config: SD1.5's sizes, so the tiny file's shapes are named as wrong and nothing is written."""
    path = tmp_path / "control.pth"
    torch.save(ldm_state(load_file(FIX / "weights.safetensors")), path)
    assert convert.main([str(path), "--dest", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "with wrong shape: conv_in.weight (file (8, 4, 3, 3), model (320, 4, 3, 3))" in err
    assert not (tmp_path / "w").exists()


def test_missing_and_unexpected_keys_are_named(tmp_path, capsys):
    state = ldm_state(load_file(FIX / "weights.safetensors"))
    del state["zero_convs.11.0.weight"]
    state["input_blocks.1.0.extra.weight"] = torch.zeros(1)
    path = tmp_path / "control.safetensors"
    save_file(state, path)
    assert convert.main([str(path), "--dest", str(tmp_path / "w"), "--config", str(FIX / "config.json")]) == 2
    err = capsys.readouterr().err
    assert "1 missing: controlnet_down_blocks.11.weight" in err
    assert "1 unexpected: down_blocks.0.resnets.0.extra.weight" in err
    assert not (tmp_path / "w").exists()


def test_not_a_controlnet(tmp_path):
    with pytest.raises(WeightsError, match="no input_hint_block.* keys .*; is this a ControlNet"):
        convert.read_controlnet(FIXTURES / "single_file/sd15_tiny.safetensors")


@pytest.mark.parametrize("base, config", [
    ("SD2.x", {"cross_attention_dim": 1024, "use_linear_projection": True, "attention_head_dim": [5, 10, 20, 20]}),
    ("SDXL", {"cross_attention_dim": 2048, "addition_embed_type": "text_time",
              "transformer_layers_per_block": [1, 2, 10]}),
])
def test_other_base_config_is_refused(base, config, tmp_path, capsys):
    src = diffusers_folder(tmp_path / "cn", {**CONFIG, **config})
    assert convert.main([str(src), "--dest", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert f"this ControlNet is for {base}" in err and "use an SD1.5 ControlNet" in err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("base", ["SD2.x", "SDXL"])
def test_other_base_single_file_is_refused(base, tmp_path):
    """Told from the shapes: SD2.x has linear proj_in and 1024-wide text, SDXL label_emb and 2048."""
    state = ldm_state(load_file(FIX / "weights.safetensors"))
    width = {"SD2.x": 1024, "SDXL": 2048}[base]
    for key in [k for k in state if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))]:
        state[key] = torch.zeros(state[key].shape[0], width)
    if base == "SD2.x":
        state = {k: v[:, :, 0, 0] if k.endswith("proj_in.weight") else v for k, v in state.items()}
    else:
        state["label_emb.0.0.weight"] = torch.zeros(4, 4)
    path = tmp_path / "control.safetensors"
    save_file({f"control_model.{k}": v.contiguous() for k, v in state.items()}, path)
    with pytest.raises(WeightsError, match=f"this ControlNet is for {base} \\(cross-attention width {width}"):
        convert.read_controlnet(path)


def test_unsupported_settings_are_named():
    with pytest.raises(WeightsError, match="global_pool_conditions=True \\(expected False\\)"):
        ControlNetConfig.from_diffusers({**CONFIG, "global_pool_conditions": True})
    with pytest.raises(WeightsError, match="controlnet_conditioning_channel_order='bgr'"):
        ControlNetConfig.from_diffusers({**CONFIG, "controlnet_conditioning_channel_order": "bgr"})


# ---------------------------------------------------------------------------------------------
# Input errors


def test_bad_inputs_raise_clear_errors():
    net = tiny()
    sample, t, text, image = IO["sample"], IO["timestep"], IO["text"], IO["images"][0].float()
    with pytest.raises(ValueError, match=r"sample must be \(N, 4, h, w\) latents; got shape \(2, 4, 1, 6, 5\)"):
        net(sample[:, :, None], t, text, image)
    with pytest.raises(ValueError, match=r"text must be \(B=2, tokens, 32\)"):
        net(sample, t, text[..., :16], image)
    expected = (r"control_image must be \(N, 3, 8h, 8w\) = \(2, 3, 48, 40\) for latents \(2, 4, 6, 5\); "
                r"got \(2, 3, 47, 40\)")
    with pytest.raises(ValueError, match=expected):
        net(sample, t, text, image[:, :, :47])
    with pytest.raises(ValueError, match=r"control_image must be .* got \(1, 3, 48, 40\)"):
        net(sample, t, text, image[:1])
    with pytest.raises(ValueError, match=r"values must be in \[0, 1\] .* minimum of -1"):
        net(sample, t, text, image * 2 - 1)
    with pytest.raises(ValueError, match="timestep must be one value or one per sample \\(N=2\\); got 3 values"):
        net(sample, torch.tensor([1.0, 2.0, 3.0]), text, image)
    with torch.no_grad():  # one timestep serves the batch
        res = net(sample, 20.0, text, image, 0.7)
    reference = IO["mid"][1]
    assert max_abs_error(res.mid[1], reference, "scalar timestep, sample 1") <= rounding_tolerance(reference, DEPTH)


def test_multi_controlnet_errors():
    multi = MultiControlNet([tiny(), tiny()])
    image = IO["images"][0].float()
    with pytest.raises(ValueError, match="2 ControlNets need as many control images and scales; got 1 images and 2"):
        multi(IO["sample"], IO["timestep"], IO["text"], [image], [1.0, 1.0])
    wider = ControlNet(ControlNetConfig.from_diffusers({**CONFIG, "block_out_channels": [8, 16, 16, 32]}))
    with pytest.raises(ValueError, match="ControlNets of different sizes"):
        MultiControlNet([tiny(), wider])
    with pytest.raises(ValueError, match="needs at least one ControlNet"):
        MultiControlNet([])
