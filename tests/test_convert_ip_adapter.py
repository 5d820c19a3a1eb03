"""h94's SD1.5 IP-Adapters for the plain musev model: the converter (published key layout, at tiny size, as a
nested .bin and a prefixed .safetensors), loading, and runs through the Python API and the command line."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import REPO
from musev_lite.convert.ip_adapter import main as convert_main
from musev_lite.ip_adapter import ResamplerConfig
from musev_lite.pipeline import MuseVPipeline
from musev_lite.unet import UNet3D, UNet3DConfig
from musev_lite.weights import WeightsError

TINY_MUSEV = UNet3DConfig(block_out_channels=(32, 32, 32, 32), heads=2, norm_num_groups=16, cross_attention_dim=32)
FAST = dict(steps=2, first_frame_steps=2, context_frames=4, context_overlap=2, num_frames=3, height=64, width=64)
# published order of the 16 cross-attentions: down blocks, up blocks, then the mid block (diffusers' processors)
FIRST, LAST = "down_blocks.0.attentions.0.transformer_blocks.0.attn2", "mid_block.attentions.0.transformer_blocks.0.attn2"


@pytest.fixture(scope="module")
def musev_folder(tmp_path_factory):
    """A tiny plain-musev weights folder (the demo's parts, a musev UNet) and a transformers-layout image encoder."""
    root = tmp_path_factory.mktemp("ipadapter")
    pipe = MuseVPipeline.demo(seed=0)
    encoder = pipe.image_encoder
    torch.manual_seed(1)
    pipe.unet = UNet3D(TINY_MUSEV).eval()
    pipe.referencenet = pipe.image_proj = pipe.image_encoder = pipe.face_proj = None
    pipe.save_pretrained(root / "musev")
    (root / "image_encoder").mkdir()
    save_file(encoder.state_dict(), root / "image_encoder/model.safetensors")
    (root / "image_encoder/config.json").write_text(json.dumps(dataclasses.asdict(encoder.config)))
    return root


def published(kind: str, seed: int = 0) -> dict:
    """An IP-Adapter file's groups at tiny size: `plain` (ImageProjModel, 4 tokens) or `plus` (Resampler, 16)."""
    torch.manual_seed(seed)
    if kind == "plus":
        c = ResamplerConfig(embedding_dim=32, dim=32, output_dim=32, depth=2, heads=1, dim_head=64, num_queries=16)
        proj = {"latents": torch.randn(1, 16, 32), "proj_in.weight": torch.randn(32, 32), "proj_in.bias": torch.randn(32),
                "proj_out.weight": torch.randn(32, 32), "proj_out.bias": torch.randn(32),
                "norm_out.weight": torch.ones(32), "norm_out.bias": torch.zeros(32)}
        for i in range(c.depth):
            proj.update({f"layers.{i}.0.norm1.weight": torch.ones(32), f"layers.{i}.0.norm1.bias": torch.zeros(32),
                         f"layers.{i}.0.norm2.weight": torch.ones(32), f"layers.{i}.0.norm2.bias": torch.zeros(32),
                         f"layers.{i}.0.to_q.weight": torch.randn(64, 32) / 6, f"layers.{i}.0.to_kv.weight": torch.randn(128, 32) / 6,
                         f"layers.{i}.0.to_out.weight": torch.randn(32, 64) / 8,
                         f"layers.{i}.1.0.weight": torch.ones(32), f"layers.{i}.1.0.bias": torch.zeros(32),
                         f"layers.{i}.1.1.weight": torch.randn(128, 32) / 6, f"layers.{i}.1.3.weight": torch.randn(32, 128) / 11})
    else:
        proj = {"proj.weight": torch.randn(4 * 32, 64) / 8, "proj.bias": torch.randn(4 * 32),
                "norm.weight": torch.ones(32), "norm.bias": torch.zeros(32)}
    ip = {f"{n}.to_{kv}_ip.weight": torch.randn(32, 32) / 6 for n in range(1, 32, 2) for kv in "kv"}
    return {"image_proj": proj, "ip_adapter": ip}


def write(path, groups: dict):
    if path.suffix == ".bin":
        torch.save(groups, path)
    else:
        save_file({f"{g}.{k}": v for g, part in groups.items() for k, v in part.items()}, path)
    return path


def convert(src, dest, *extra):
    return convert_main([str(src), str(dest), *extra])


def folder_copy(musev_folder, tmp_path):
    import shutil

    return shutil.copytree(musev_folder / "musev", tmp_path / "w")


@pytest.mark.parametrize("kind, suffix", [("plain", ".bin"), ("plus", ".safetensors")])
def test_converted_adapter_lands_on_the_numbered_attentions(musev_folder, tmp_path, kind, suffix):
    dest = folder_copy(musev_folder, tmp_path)
    groups = published(kind)
    src = write(tmp_path / f"ip-adapter_{kind}{suffix}", groups)
    assert convert(src, dest, "--image-encoder", str(musev_folder / "image_encoder")) == 0
    projection = "resampler" if kind == "plus" else "image_proj"
    assert json.loads((dest / "ip_adapter.json").read_text())["projection"] == projection
    pipe = MuseVPipeline.from_pretrained(dest)
    assert pipe.unet.config.ip_cross_attention and getattr(pipe, projection) is not None
    attn = dict(pipe.unet.named_modules())
    assert torch.equal(attn[FIRST].to_k_ip.weight, groups["ip_adapter"]["1.to_k_ip.weight"])
    assert torch.equal(attn[LAST].to_v_ip.weight, groups["ip_adapter"]["31.to_v_ip.weight"])
    cond = pipe.image_conditioning(None, Image.new("RGB", (40, 30), "red"), torch.zeros(2, 7, 32), pipe.generation_config(None, {}))
    assert cond.ip_tokens.shape == (2, 16 if kind == "plus" else 4, 32)
    pipe.save_pretrained(tmp_path / "again")  # the IP branch goes back to its own component
    assert json.loads((tmp_path / "again/unet.json").read_text())["ip_cross_attention"] is False
    again = MuseVPipeline.from_pretrained(tmp_path / "again")
    assert torch.equal(dict(again.unet.named_modules())[LAST].to_v_ip.weight, attn[LAST].to_v_ip.weight)


def test_a_plus_adapter_replaces_a_plain_one(musev_folder, tmp_path):
    dest = folder_copy(musev_folder, tmp_path)
    encoder = ["--image-encoder", str(musev_folder / "image_encoder")]
    assert convert(write(tmp_path / "plain.bin", published("plain")), dest, *encoder) == 0
    assert convert(write(tmp_path / "plus.bin", published("plus")), dest) == 0  # keeps the folder's encoder
    assert not (dest / "image_proj.safetensors").exists() and (dest / "resampler.safetensors").exists()


def bad_file_cases():
    def drop(groups):
        del groups["ip_adapter"]["17.to_k_ip.weight"]

    def extra(groups):
        groups["ip_adapter"]["33.to_k_ip.weight"] = torch.zeros(32, 32)

    def misshape(groups):
        groups["ip_adapter"]["31.to_v_ip.weight"] = torch.zeros(32, 768)

    def sdxl_width(groups):
        groups["image_proj"]["norm.weight"] = groups["image_proj"]["norm.bias"] = torch.zeros(64)
        groups["image_proj"]["proj.weight"] = torch.zeros(2 * 64, 64)

    def faceid(groups):
        groups["image_proj"] = {"proj.0.weight": torch.zeros(2, 2)}

    def flat_garbage(groups):
        groups["unet"] = {"x": torch.zeros(1)}

    return [(drop, r"1 missing: 17\.to_k_ip\.weight"), (extra, r"1 unexpected: 33\.to_k_ip\.weight"),
            (misshape, r"31\.to_v_ip\.weight \(file \(32, 768\), model \(32, 32\)\)"),
            (sdxl_width, r"its tokens are 64 wide but the UNet's cross_attention_dim is 32"),
            (faceid, r"neither an ImageProjModel .* FaceID files"), (flat_garbage, r"not an IP-Adapter file")]


@pytest.mark.parametrize("change, message", bad_file_cases(), ids=lambda c: getattr(c, "__name__", ""))
def test_bad_files_are_named_and_nothing_is_written(musev_folder, tmp_path, capsys, change, message):
    dest = folder_copy(musev_folder, tmp_path)
    groups = published("plain")
    change(groups)
    assert convert(write(tmp_path / "x.bin", groups), dest, "--image-encoder", str(musev_folder / "image_encoder")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert __import__("re").search(message, err), err
    assert not (dest / "ip_adapter.json").exists()


def test_folders_it_does_not_fit(musev_folder, tmp_path, capsys):
    src = write(tmp_path / "plain.bin", published("plain"))
    assert convert(src, folder_copy(musev_folder, tmp_path)) == 2  # no encoder anywhere
    assert "pass --image-encoder" in capsys.readouterr().err
    assert convert(src, tmp_path / "empty") == 2
    assert "no unet.json; DEST must be a weights folder of the musev model" in capsys.readouterr().err
    MuseVPipeline.demo(seed=0).save_pretrained(tmp_path / "referencenet")
    assert convert(src, tmp_path / "referencenet", "--image-encoder", str(musev_folder / "image_encoder")) == 2
    assert "IP-Adapter files are for the plain musev model" in capsys.readouterr().err
    with pytest.raises(WeightsError, match="ip_adapter.safetensors beside a UNet with its own IP-Adapter branch"):
        (tmp_path / "referencenet/ip_adapter.json").write_text('{"projection": "image_proj"}')
        save_file({}, tmp_path / "referencenet/ip_adapter.safetensors")
        MuseVPipeline.from_pretrained(tmp_path / "referencenet")


@pytest.fixture(scope="module")
def plus_folder(musev_folder, tmp_path_factory):
    dest = tmp_path_factory.mktemp("plus") / "w"
    import shutil

    shutil.copytree(musev_folder / "musev", dest)
    src = write(dest.parent / "ip-adapter-plus_sd15.bin", published("plus"))
    assert convert(src, dest, "--image-encoder", str(musev_folder / "image_encoder")) == 0
    return dest


def test_python_api_uses_the_adapter(plus_folder):
    pipe = MuseVPipeline.from_pretrained(plus_folder)
    rng = np.random.default_rng(0)
    face, other = (Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2))
    fast = dict(FAST, negative_prompt="V1")  # the byte-level tokenizer spends a token per letter
    with_ip = pipe("a face", image=face, seed=1, **fast).latents
    without = pipe("a face", image=face, seed=1, ip_adapter_scale=0, **fast).latents
    another = pipe("a face", image=face, ip_adapter_image=other, seed=1, **fast).latents
    assert not torch.equal(with_ip, without) and not torch.equal(with_ip, another)


def test_command_line_runs_with_the_adapter(plus_folder, tmp_path):
    args = [sys.executable, "-m", "musev_lite.run", str(REPO / "examples/demo.toml")]
    for item in ["model.preset=musev", f"model.weights_dir={plus_folder}", "model.dtype=float32",
                 "generation.steps=2", "generation.first_frame_steps=2", "generation.num_frames=3",
                 "generation.context_frames=4", "generation.context_overlap=2", f"output.dir={tmp_path}",
                 "output.name=ip", 'output.formats=["png"]']:
        args += ["--set", item]
    done = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    sidecar = json.loads((tmp_path / "ip.json").read_text())
    assert {"ip_adapter.safetensors", "resampler.safetensors"} <= {p.split("/")[-1] for p in sidecar["model_files"]}


def test_sd15_sizes_map_and_the_plus_resampler_is_read_off_its_shapes():
    """At SD1.5's sizes (meta tensors, nothing allocated): the 16 published cross-attentions fit the musev UNet's,
    widest in the middle, and ip-adapter-plus_sd15's Resampler is IP-Adapter's (depth 4, 12 heads of 64, 16 queries)."""
    from musev_lite.convert.ip_adapter import ip_branch, projection

    widths = [320] * 4 + [640] * 4 + [1280] * 4 + [1280] * 6 + [640] * 6 + [320] * 6 + [1280] * 2  # down, up, mid
    group = {f"{n}.to_{kv}_ip.weight": torch.empty(w, 768, device="meta")
             for n, w in zip(range(1, 32, 2), widths[::2]) for kv in "kv"}
    mapped = ip_branch(group, UNet3DConfig.preset("musev"), "ip-adapter_sd15.bin")
    assert mapped[f"{LAST}.to_k_ip.weight"] is group["31.to_k_ip.weight"]
    assert mapped["up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v_ip.weight"] is group["13.to_v_ip.weight"]
    shapes = {"latents": (1, 16, 768), "proj_in.weight": (768, 1280), "proj_in.bias": (768,), "proj_out.weight": (768, 768),
              "proj_out.bias": (768,), "norm_out.weight": (768,), "norm_out.bias": (768,)}
    for i in range(4):
        shapes.update({f"layers.{i}.0.{n}.{p}": (768,) for n in ("norm1", "norm2") for p in ("weight", "bias")})
        shapes.update({f"layers.{i}.0.to_q.weight": (768, 768), f"layers.{i}.0.to_kv.weight": (1536, 768),
                       f"layers.{i}.0.to_out.weight": (768, 768), f"layers.{i}.1.0.weight": (768,),
                       f"layers.{i}.1.0.bias": (768,), f"layers.{i}.1.1.weight": (3072, 768),
                       f"layers.{i}.1.3.weight": (768, 3072)})
    name, _, config = projection({k: torch.empty(s, device="meta") for k, s in shapes.items()}, "ip-adapter-plus_sd15.bin")
    assert name == "resampler" and config == ResamplerConfig()
