"""Converters: A1111 single files against diffusers' own conversion, old VAE names, and a whole MuseV
release tree (published key names, tiny sizes) converted, loaded and checked against the original."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, SHARED, make_release, max_abs_error, old_vae_names, reduction_depth, rounding_tolerance
from musev_lite.convert import musev, sd15
from musev_lite.pipeline import MuseVPipeline
from musev_lite.tokenizer import CLIPTokenizer
from musev_lite.vae import VAEConfig
from musev_lite.weights import WeightsError, load_component

SINGLE = FIXTURES / "single_file/sd15_tiny.safetensors"


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_single_file_equals_the_diffusers_weights(capsys):
    """The file was written from the diffusers-layout fixtures by diffusers' own to-LDM converter."""
    parts, skipped = sd15.split_single_file(load_file(SINGLE), "sd15_tiny")
    assert same(parts["unet"], load_file(FIXTURES / "unet2d/weights.safetensors"))
    assert same(parts["vae"], load_file(FIXTURES / "vae/weights.safetensors"))
    assert same(parts["text_encoder"], load_file(FIXTURES / "clip_text/weights.safetensors"))
    assert sorted(skipped) == ["alphas_cumprod", "model_ema.decay"]


def test_single_file_problems_are_named():
    state = load_file(SINGLE)
    with pytest.raises(WeightsError, match=r"model.diffusion_model\): 1 keys have no mapping: extra_block.weight"):
        sd15.split_single_file(dict(state, **{"model.diffusion_model.extra_block.weight": torch.zeros(1)}), "x")
    no_vae = {k: v for k, v in state.items() if not k.startswith("first_stage_model.")}
    with pytest.raises(WeightsError, match="no first_stage_model.\\* keys"):
        sd15.split_single_file(no_vae, "x")


def test_old_vae_attention_names():
    vae = load_file(FIXTURES / "vae/weights.safetensors")
    old = old_vae_names(vae)
    assert "decoder.mid_block.attentions.0.query.weight" in old
    assert same(sd15.vae_state(old, "old vae"), vae)


def test_sd15_cli_on_a_single_file(tmp_path, capsys):
    tokenizer = tmp_path / "tok"
    CLIPTokenizer.byte_level().save(tokenizer)
    assert sd15.main([str(SINGLE), str(tmp_path / "out")]) == 2
    assert "a single-file checkpoint has none; pass --tokenizer" in capsys.readouterr().err
    config = json.loads((FIXTURES / "vae/config.json").read_text())
    assert sd15.main([str(SINGLE), str(tmp_path / "out"), "--tokenizer", str(tokenizer)]) == 2  # tiny VAE != SD1.5 sizes
    assert "weights do not fit the model" in capsys.readouterr().err
    assert config["block_out_channels"] != list(VAEConfig().block_out_channels)


# ---------------------------------------------------------------------------------------------
# A release tree with the published layout at tiny sizes


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    if not (SHARED / "reference").is_dir():
        pytest.skip(f"reference material not found at {SHARED} (it sits beside the checkout in CI)")
    root = tmp_path_factory.mktemp("checkpoints")
    return root, make_release(root, SHARED)


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
    root, _ = release
    dest = tmp_path_factory.mktemp("weights")
    assert musev.main([str(dest), "--motion", str(root / "motion/musev_referencenet"), "--base",
                       str(root / "t2i/sd1.5/majicmixRealv6Fp16"), "--image-encoder", str(root / "IP-Adapter/models/image_encoder")]) == 0
    return dest


@pytest.mark.slow
def test_release_converts_to_a_complete_folder(converted, release):
    _, unet = release
    names = sorted(p.name for p in converted.iterdir())
    assert names == ["image_encoder.json", "image_encoder.safetensors", "image_proj.json", "image_proj.safetensors",
                     "referencenet.json", "referencenet.safetensors", "scheduler.json", "text_encoder.json",
                     "text_encoder.safetensors", "tokenizer", "unet.json", "unet.safetensors", "vae.json",
                     "vae.safetensors"]
    state, config = load_component(converted, "unet")
    assert same(state, unet) and config["refer_fusion"] and config["anivv1"]
    refer, _ = load_component(converted, "referencenet")
    assert not any(k.startswith("up_blocks.") for k in refer)
    vae, _ = load_component(converted, "vae")
    assert "decoder.mid_block.attentions.0.to_q.weight" in vae and vae["decoder.mid_block.attentions.0.to_q.weight"].ndim == 2


@pytest.mark.slow
def test_converted_unet_reproduces_the_original(converted, shared):
    """From the converted folder, the UNet and ReferenceNet give the original's recorded outputs, to the
    rounding through their reductions (fp32, conftest.rounding_tolerance)."""
    pipe = MuseVPipeline.from_pretrained(converted)
    tensors = load_file(shared / "reference/fixtures/musev_referencenet/t20_linspace.safetensors")
    down = [tensors[f"refnet.down_block_refer_embs.{i}"].squeeze(2) for i in range(12)]
    from musev_lite.unet import Conditioning, ReferenceFeatures

    with torch.no_grad():
        cond = Conditioning(tensors["text.prompt_embeds"], motion_speed=8.0, ip_tokens=tensors["ip.image_emb"],
                            refer=ReferenceFeatures(down, tensors["refnet.mid_block_refer_emb"].squeeze(2)))
        out = pipe.unet(tensors["unet.step0.win0.sample"].float(), tensors["unet.step0.win0.timestep"], cond)
        features = pipe.referencenet(tensors["refnet.refer_image_vae_emb"], 0.0, tensors["ip.image_emb"])
    reference = tensors["unet.step0.win0.out"]
    tolerance = rounding_tolerance(reference, reduction_depth(pipe.unet))
    assert max_abs_error(out, reference, "converted UNet vs original") <= tolerance
    reference = tensors["refnet.mid_block_refer_emb"].squeeze(2)
    tolerance = rounding_tolerance(reference, reduction_depth(pipe.referencenet))
    assert max_abs_error(features.mid, reference, "converted ReferenceNet") <= tolerance


@pytest.mark.slow
def test_converted_folder_runs_the_pipeline(converted):
    import numpy as np

    pipe = MuseVPipeline.from_pretrained(converted)
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3)).astype(np.uint8)
    video = pipe("a face", image=image, num_frames=2, steps=1, negative_prompt="Empty", seed=0)
    assert video.frames.shape == (3, 64, 64, 3)


def test_motion_without_base_names_the_missing_keys(release):
    root, _ = release
    with pytest.raises(WeightsError, match=r"missing: .*conv_in.weight.*needs --base"):
        musev.motion_unet(root / "motion/musev_referencenet", None, "musev_referencenet")


def test_base_weights_win_and_must_fit(release):
    root, unet = release
    motion = root / "motion/musev_referencenet"
    base = {"conv_in.weight": torch.full_like(unet["conv_in.weight"], 7.0)}
    state, _ = musev.motion_unet(motion, {**{k: v for k, v in unet.items() if "temp" not in k}, **base}, "musev_referencenet")
    assert torch.equal(state["conv_in.weight"], base["conv_in.weight"])
    with pytest.raises(WeightsError, match="the base UNet has 1 keys the 3D UNet lacks"):
        musev.motion_unet(motion, {"add_embedding.weight": torch.zeros(1)}, "musev_referencenet")
    wrong = dict(unet, **{"conv_in.weight": torch.zeros(5, 4, 3, 3)})
    with pytest.raises(WeightsError, match=r"conv_in.weight \(file \(5, 4, 3, 3\), model \(32, 4, 3, 3\)\)"):
        musev.motion_unet(motion, wrong, "musev_referencenet")


def test_missing_component_and_bad_files(release, tmp_path, capsys):
    root, _ = release
    with pytest.raises(WeightsError, match=r"unet: missing folder \(the component 'unet' is needed\)"):
        sd15.read_base(tmp_path)
    (tmp_path / "proj.bin").write_bytes(b"")
    torch.save({"image_proj": {"weight": torch.zeros(2)}}, tmp_path / "proj.bin")
    with pytest.raises(WeightsError, match=r"expected \{'image_proj'"):
        musev.image_proj(tmp_path / "proj.bin")
    assert musev.main([str(tmp_path / "w"), "--motion", str(root / "motion/musev_referencenet"),
                       "--base", str(root / "t2i/sd1.5/majicmixRealv6Fp16")]) == 2
    assert "needs the IP-Adapter image encoder: pass --image-encoder" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()  # nothing is written unless every component fits


def test_vae_folder_replaces_the_base_vae(tmp_path):
    vae = old_vae_names(load_file(FIXTURES / "vae/weights.safetensors"))
    torch.save({k: v + 1 for k, v in vae.items()}, tmp_path / "diffusion_pytorch_model.bin")
    (tmp_path / "config.json").write_text((FIXTURES / "vae/config.json").read_text())
    base = sd15.read_base(SINGLE, vae=tmp_path)
    own = sd15.read_base(SINGLE).vae
    assert base.vae.keys() == own.keys() and all(torch.equal(base.vae[k], own[k] + 1) for k in own)
    assert tuple(base.vae_config.block_out_channels) != VAEConfig().block_out_channels  # the folder's config came along


@pytest.mark.slow
def test_embeddings_are_checked_and_converted(release, tmp_path, capsys):
    root, _ = release
    args = ["--motion", str(root / "motion/musev_referencenet"), "--base", str(root / "t2i/sd1.5/majicmixRealv6Fp16"),
            "--image-encoder", str(root / "IP-Adapter/models/image_encoder")]
    assert musev.main([str(tmp_path / "w"), *args, "--embeddings", str(root / "embedding")]) == 0
    converted = load_file(tmp_path / "w/embeddings/badhandv4.safetensors")["emb_params"]
    assert torch.equal(converted, torch.load(root / "embedding/badhandv4.pt", weights_only=True)["string_to_param"]["*"])
    wide = tmp_path / "wide"
    wide.mkdir()
    torch.save({"string_to_param": {"*": torch.zeros(2, 768)}}, wide / "EasyNegativeV2.pt")
    assert musev.main([str(tmp_path / "w2"), *args, "--embeddings", str(wide)]) == 2
    assert "EasyNegativeV2.pt: embedding vectors do not fit this text encoder (width 768, expected 32)" in capsys.readouterr().err
    assert not (tmp_path / "w2").exists()
