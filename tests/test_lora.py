"""LoRA merging against diffusers' load_lora_weights + fuse_lora (fixture from tests/make_fixtures.py:
a kohya file with linear, 1x1 and 3x3 conv layers and alpha != rank, a PEFT file saved by diffusers
with alpha_pattern/rank_pattern in its metadata, on the tiny unet2d / clip_text models).
Tolerances (conftest.rounding_tolerance, fp32): merged weights W + scale * up @ down, to the rounding of a sum
over the rank and three more operations per file; the merged UNet's 2D-mode output vs the fused diffusers UNet's,
to the rounding through the UNet's reductions. Unmerge restores the weights bitwise."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, max_abs_error, reduction_depth, rounding_tolerance, sd_unet
from musev_lite.clip import CLIPTextConfig, CLIPTextModel
from musev_lite.lora import LoraError, load_lora, merge_lora, unmerge_lora
from musev_lite.weights import WeightsError, config_from_dict, load_weights, read_metadata, read_state_dict
from musev_lite.unet import Conditioning

LORA = FIXTURES / "lora"
CASES = {"kohya": [("kohya", 0.8)], "peft": [("peft", 1.0)], "both": [("kohya", 0.8), ("peft", -0.5)]}


def models():
    """Our UNet3D (spatial layers = the unet2d fixture, temporal ones seeded) and text encoder (clip_text)."""
    torch.manual_seed(0)
    config = json.loads((FIXTURES / "clip_text/config.json").read_text())
    text_encoder = CLIPTextModel(config_from_dict(CLIPTextConfig, config)).eval()
    weights = FIXTURES / "clip_text/weights.safetensors"
    load_weights(text_encoder, read_state_dict(weights), str(weights))
    return sd_unet(), text_encoder


def weights(unet, text_encoder) -> dict[str, torch.Tensor]:
    return {**{f"unet.{k}": v.clone() for k, v in unet.state_dict().items()},
            **{f"text_encoder.{k}": v.clone() for k, v in text_encoder.state_dict().items()}}


def loras(case):
    return [(load_lora(LORA / f"{name}.safetensors"), scale) for name, scale in CASES[case]]


def changed(before, after) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("case", CASES)
def test_merge_matches_diffusers_fuse(case):
    """kohya at 0.8, PEFT at 1.0, and both (0.8, -0.5) into our UNet3D built from the same 2D weights."""
    fused = {k.removeprefix(f"{case}."): v for k, v in load_file(LORA / "fused.safetensors").items()
             if k.startswith(f"{case}.")}
    unet_out = fused.pop("unet_out")
    unet, text_encoder = models()
    before = weights(unet, text_encoder)
    originals = {}  # each merged layer's weight before, for unmerge_lora
    merge_lora(unet, text_encoder, loras(case), originals)
    after = weights(unet, text_encoder)
    # exactly the layers diffusers changed: no temporal layer, no bias, nothing else
    assert changed(before, after) == set(fused)
    names = sorted(fused)
    ours, reference = (torch.cat([w[k].flatten() for k in names]) for w in (after, fused))
    depth = sum(max(layer.down.shape[0] for layer in lora.layers.values()) + 3 for lora, _ in loras(case))
    what = f"{case}: {len(names)} merged weights vs diffusers' fused"
    assert max_abs_error(ours, reference, what) <= rounding_tolerance(reference, depth)
    io = load_file(FIXTURES / "unet2d/io.safetensors")
    with torch.no_grad():
        out = unet(io["sample"][:, :, None], io["timestep"], Conditioning(io["text"], motion_speed=8.0), condition_frames=0,
                   temporal=False)
    tolerance = rounding_tolerance(unet_out, reduction_depth(unet))
    assert max_abs_error(out[:, :, 0], unet_out, f"{case}: merged UNet3D (2D mode) vs fused UNet2D") <= tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_unmerge_restores_bitwise(dtype):
    """Two merge calls, then unmerge: every weight is bitwise what it was; merging again works."""
    unet, text_encoder = (m.to(dtype) for m in models())
    before = weights(unet, text_encoder)
    originals = {}  # each merged layer's weight before, for unmerge_lora
    merge_lora(unet, text_encoder, loras("kohya"), originals)
    merge_lora(unet, text_encoder, [(load_lora(LORA / "peft.safetensors"), -0.5)], originals)
    assert changed(before, weights(unet, text_encoder))
    unmerge_lora(originals)
    assert not changed(before, weights(unet, text_encoder))
    merge_lora(unet, text_encoder, loras("peft"), originals)
    unmerge_lora(originals)
    assert not changed(before, weights(unet, text_encoder))


def test_fp16_merges_in_float32():
    """A float16 model gets the float32 merge, rounded once to float16 (same fp16-valued base weights)."""
    unet32, text32 = models()
    with torch.no_grad():
        for p in [*unet32.parameters(), *text32.parameters()]:
            p.copy_(p.half().float())  # the clip_text fixture is float32
    unet16, text16 = (copy.deepcopy(m).half() for m in (unet32, text32))
    originals = {}  # each merged layer's weight before, for unmerge_lora
    merge_lora(unet32, text32, loras("both"), originals)
    merge_lora(unet16, text16, loras("both"), originals)
    want, got = weights(unet32, text32), weights(unet16, text16)
    assert all(got[k].dtype == torch.float16 for k in want)
    assert all(torch.equal(got[k], want[k].half()) for k in want)


def _save(path, tensors, metadata=None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    return path


@pytest.mark.slow
def test_spellings_agree(tmp_path):
    """The same tensors under other key spellings merge to the same weights: diffusers' `.lora.down` /
    `.lora_linear_layer.down` and old attention-processor names (`processor.to_q_lora`) with the PEFT
    metadata; kohya's layers in PEFT naming with `.alpha` keys; kohya without alpha = alpha rank."""
    renames = [(".lora_A.", ".lora.down."), (".lora_B.", ".lora.up."),
               ("attn1.to_q.lora.", "attn1.processor.to_q_lora."), ("attn1.to_v.lora.", "attn1.to_v_lora."),
               ("self_attn.q_proj.lora.", "self_attn.to_q_lora."), ("mlp.fc2.lora.", "mlp.fc2.lora_linear_layer.")]
    old = {}
    for key, value in read_state_dict(LORA / "peft.safetensors").items():
        for a, b in renames:
            key = key.replace(a, b)
        old[key] = value
    assert any("unet" in k and "processor.to_q_lora" in k for k in old)
    assert any("text_encoder" in k and ".to_q_lora" in k for k in old)
    old_path = _save(tmp_path / "old.safetensors", old, read_metadata(LORA / "peft.safetensors"))

    kohya = read_state_dict(LORA / "kohya.safetensors")
    unet, text_encoder = models()
    paths = {f"lora_unet_{n.replace('.', '_')}": f"unet.{n}" for n, _ in unet.named_modules()}
    paths.update({f"lora_te_{n.replace('.', '_')}": f"text_encoder.{n}" for n, _ in text_encoder.named_modules()})
    peft_roles = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "alpha": "alpha"}
    as_peft, rank_alpha = {}, dict(kohya)
    for key, value in kohya.items():
        stem, role = key.split(".", 1)
        as_peft[f"{paths[stem]}.{peft_roles[role]}"] = value
        if role == "alpha":
            rank_alpha[key] = torch.tensor(float(kohya[f"{stem}.lora_down.weight"].shape[0]))
    peft_path = _save(tmp_path / "kohya_as_peft.safetensors", as_peft)
    rank_path = _save(tmp_path / "alpha_rank.safetensors", rank_alpha)
    bare_path = _save(tmp_path / "no_alpha.safetensors", {k: v for k, v in kohya.items() if not k.endswith(".alpha")})

    def merged(path):
        unet, text_encoder = models()
        originals = {}  # each merged layer's weight before, for unmerge_lora
        merge_lora(unet, text_encoder, [(load_lora(path), 0.8)], originals)
        return weights(unet, text_encoder)

    pairs = [(LORA / "peft.safetensors", old_path), (LORA / "kohya.safetensors", peft_path), (rank_path, bare_path)]
    for a, b in pairs:
        want, got = merged(a), merged(b)
        assert not changed(want, got), f"{a.name} vs {b.name}"
    assert changed(merged(rank_path), merged(LORA / "kohya.safetensors"))  # alpha matters


def kohya_layer(name, down_shape, up_shape, alpha=1.0):
    return {f"{name}.lora_down.weight": torch.randn(down_shape), f"{name}.lora_up.weight": torch.randn(up_shape),
            f"{name}.alpha": torch.tensor(alpha)}


def test_unmatched_layers_are_listed_and_nothing_merges(tmp_path):
    kohya = read_state_dict(LORA / "kohya.safetensors")
    extra = {**kohya_layer("lora_unet_down_blocks_7_attentions_0_proj_in", (4, 8, 1, 1), (8, 4, 1, 1)),
             **kohya_layer("lora_te_text_model_encoder_layers_5_mlp_fc1", (4, 32), (48, 4)),
             **kohya_layer("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", (4, 12), (8, 4))}
    kohya = {k: v for k, v in kohya.items() if "blocks_0_attn1_to_q" not in k}
    lora = load_lora(_save(tmp_path / "some_unmatched.safetensors", {**kohya, **extra}))
    unet, text_encoder = models()
    before = weights(unet, text_encoder)
    with pytest.raises(LoraError) as err:
        originals = {}  # each merged layer's weight before, for unmerge_lora
        merge_lora(unet, text_encoder, [(lora, 1.0)], originals)
    message = str(err.value)
    print(message)
    assert "2 LoRA layer(s) match no layer" in message and "1 LoRA layer(s) do not fit" in message
    for name in ("lora_unet_down_blocks_7_attentions_0_proj_in", "lora_te_text_model_encoder_layers_5_mlp_fc1",
                 "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q (LoRA (8, 12)"):
        assert name in message
    assert not changed(before, weights(unet, text_encoder))
    with pytest.raises(LoraError, match="not a finite number"):
        merge_lora(unet, text_encoder, [(load_lora(LORA / "kohya.safetensors"), float("nan"))], originals)


@pytest.mark.parametrize("tensors, metadata, base", [
    (kohya_layer("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", (4, 768), (768, 4)), None, "SDXL"),
    ({"text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 1280),
      "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(1280, 4)}, None, "SDXL"),
    (kohya_layer("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", (4, 2048), (640, 4)), None,
     "SDXL (2048-wide cross-attention)"),
    (kohya_layer("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v", (4, 1024), (1280, 4)), None,
     "SD2.x (1024-wide cross-attention)"),
    ({"text_encoder.text_model.encoder.layers.3.self_attn.k_proj.lora_A.weight": torch.zeros(4, 1024),
      "text_encoder.text_model.encoder.layers.3.self_attn.k_proj.lora_B.weight": torch.zeros(1024, 4)}, None, "SD2.x"),
    (kohya_layer("lora_te_model_transformer_resblocks_0_attn_out_proj", (4, 1024), (1024, 4)), None, "SD2.x (OpenCLIP"),
    (kohya_layer("lora_unet_down_blocks_0_attentions_0_proj_in", (4, 320, 1, 1), (320, 4, 1, 1)),
     {"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl_base_v1-0"),
    (kohya_layer("lora_unet_down_blocks_0_attentions_0_proj_in", (4, 320), (320, 4)),
     {"modelspec.architecture": "stable-diffusion-v2-768-v/lora"}, "stable-diffusion-v2-768-v"),
])
def test_lora_for_another_base_is_refused(tmp_path, tensors, metadata, base):
    path = _save(tmp_path / "other.safetensors", tensors, metadata)
    with pytest.raises(LoraError, match="this LoRA was made for") as err:
        load_lora(path)
    print(err.value)
    assert base in str(err.value) and "use a LoRA trained for SD1.5" in str(err.value)


def test_bad_files(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 40)
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        load_lora(garbage)
    with pytest.raises(LoraError, match="are not LoRA weights") as err:  # a whole UNet, not a LoRA
        load_lora(FIXTURES / "unet2d/weights.safetensors")
    assert "conv_in.weight" in str(err.value)
    loha = {"lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": torch.zeros(4, 4)}
    with pytest.raises(LoraError, match="LoHa"):
        load_lora(_save(tmp_path / "loha.safetensors", loha))
    half = {"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 16),
            "lora_unet_conv_in.alpha": torch.tensor(1.0)}
    with pytest.raises(LoraError, match="lack a matching lora down/up pair") as err:
        load_lora(_save(tmp_path / "half.safetensors", half))
    assert "lora_unet_mid_block_attentions_0_proj_in {'down': (4, 16)}" in str(err.value)
    assert "lora_unet_conv_in {'alpha': ()}" in str(err.value)
    dora = {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 4, "unet.use_dora": True})}
    with pytest.raises(LoraError, match="unet.use_dora is set"):
        load_lora(_save(tmp_path / "dora.safetensors", read_state_dict(LORA / "peft.safetensors"), dora))
    with pytest.raises(LoraError, match="no LoRA weights"):
        load_lora(_save(tmp_path / "empty.safetensors", {}))
    torch.save({"lora_unet_conv_in.lora_down.weight": "not a tensor"}, tmp_path / "odd.pt")
    with pytest.raises(LoraError, match="lora_unet_conv_in.lora_down.weight"):
        load_lora(tmp_path / "odd.pt")


# The modules LCM-LoRA's distillation script puts LoRA layers on (PEFT target_modules, matched as a name or a
# dotted suffix), and how the published lcm-lora-sdv1-5/pytorch_lora_weights.safetensors names them: kohya keys
# over diffusers' module paths, `lora_unet_<path, _ for .>.lora_down.weight` / `.lora_up.weight` / `.alpha`, UNet
# only (the layout MuseV's kohya-only `update_pipeline_lora_model` reads; configs/model/lcm_model.py merges it at
# strength 1.0 into all blocks).
LCM_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
               "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


def test_lcm_lora_layout_merges_into_every_layer_it_names(tmp_path):
    """A tiny file in lcm-lora-sdv1-5's layout, made over the SD1.5 UNet's own module names (the unet2d fixture):
    every layer merges at MuseV's strength 1.0 (alpha / rank scaled), 3x3 convs as LoCon, nothing temporal,
    no text-encoder layer; unmerging restores the weights."""
    sd = read_state_dict(FIXTURES / "unet2d/weights.safetensors")
    modules = sorted(k.removesuffix(".weight") for k, v in sd.items() if k.endswith(".weight") and v.ndim in (2, 4)
                     and any(k.removesuffix(".weight") == t or k.removesuffix(".weight").endswith(f".{t}")
                             for t in LCM_TARGETS))
    generator, rank, alpha, tensors = torch.Generator().manual_seed(0), 4, 8.0, {}
    for module in modules:
        out_features, in_features, *kernel = sd[f"{module}.weight"].shape
        stem = "lora_unet_" + module.replace(".", "_")
        tensors[f"{stem}.lora_down.weight"] = 0.1 * torch.randn(rank, in_features, *kernel, generator=generator)
        tensors[f"{stem}.lora_up.weight"] = 0.1 * torch.randn(out_features, rank, *[1] * len(kernel), generator=generator)
        tensors[f"{stem}.alpha"] = torch.tensor(alpha)
    assert {m.rsplit(".", 1)[-1] for m in modules} >= {"to_q", "proj_in", "conv1", "conv_shortcut", "conv", "time_emb_proj"}
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj.") for k in tensors)
    path = _save(tmp_path / "pytorch_lora_weights.safetensors", tensors)
    unet, text_encoder = models()
    before = weights(unet, text_encoder)
    originals = {}  # each merged layer's weight before, for unmerge_lora
    counts = merge_lora(unet, text_encoder, [(load_lora(path), 1.0)], originals)
    assert counts == [{"unet": len(modules), "unet_temporal": 0, "text_encoder": 0}]
    after = weights(unet, text_encoder)
    assert changed(before, after) == {f"unet.{m}.weight" for m in modules}
    reference = []
    for module in modules:
        stem = "lora_unet_" + module.replace(".", "_")
        up, down = tensors[f"{stem}.lora_up.weight"].flatten(1), tensors[f"{stem}.lora_down.weight"].flatten(1)
        reference.append((before[f"unet.{module}.weight"].flatten(1) + alpha / rank * (up @ down)).flatten())
    ours, reference = torch.cat([after[f"unet.{m}.weight"].flatten() for m in modules]), torch.cat(reference)
    what = f"{len(modules)} layers merged from the LCM-LoRA layout vs W + alpha / r * up @ down"
    assert max_abs_error(ours, reference, what) <= rounding_tolerance(reference, rank + 3)
    unmerge_lora(originals)
    assert not changed(before, weights(unet, text_encoder))
