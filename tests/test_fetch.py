"""Downloads against a local HTTP server on 127.0.0.1: whole files, resume, checks, clear errors."""

import hashlib
import http.server
import shutil
import threading
from contextlib import contextmanager
from functools import partial

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, SHARED, make_release
from musev_lite.convert.sd15 import read_vae_folder
from musev_lite.fetch import CONTROLNET_URL, FetchError, Remote, download, fetch_all, main, plan, plan_controlnet
from musev_lite.pipeline import MuseVPipeline
from musev_lite.weights import load_component


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; honours "Range: bytes=N-" (http.server does not) and counts requests."""

    requests: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        RangeHandler.requests.append((self.path, self.headers.get("Range")))
        path = self.translate_path(self.path)
        try:
            data = open(path, "rb").read()
        except OSError:
            self.send_error(404, "Not Found")
            return
        start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
        if start >= len(data) and start:
            self.send_error(416)
            return
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])


@contextmanager
def serving(root):
    """An HTTP server on 127.0.0.1 serving `root`; yields its URL."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    RangeHandler.requests = []
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "remote"
    (root / "motion/musev/unet").mkdir(parents=True)
    (root / "motion/musev/unet/diffusion_pytorch_model.bin").write_bytes(bytes(range(256)) * 40)
    (root / "motion/musev/unet/config.json").write_text('{"a": 1}')
    with serving(root) as url:
        yield url, root


def test_whole_file_with_checks(server, tmp_path):
    url, root = server
    data = (root / "motion/musev/unet/diffusion_pytorch_model.bin").read_bytes()
    target = download(f"{url}/motion/musev/unet/diffusion_pytorch_model.bin", tmp_path / "d/x.bin",
                      size=len(data), sha256=hashlib.sha256(data).hexdigest(), quiet=True)
    assert target.read_bytes() == data and not (tmp_path / "d/x.bin.part").exists()


def test_resume_from_part(server, tmp_path):
    url, root = server
    data = (root / "motion/musev/unet/diffusion_pytorch_model.bin").read_bytes()
    (tmp_path / "x.bin.part").write_bytes(data[:3000])
    download(f"{url}/motion/musev/unet/diffusion_pytorch_model.bin", tmp_path / "x.bin", quiet=True)
    assert (tmp_path / "x.bin").read_bytes() == data
    assert RangeHandler.requests[-1][1] == "bytes=3000-"


def test_checksum_mismatch_is_rejected(server, tmp_path):
    url, _ = server
    with pytest.raises(FetchError, match="sha256 .* does not match"):
        download(f"{url}/motion/musev/unet/config.json", tmp_path / "c.json", sha256="0" * 64, quiet=True)
    assert not (tmp_path / "c.json").exists() and not (tmp_path / "c.json.part").exists()


def test_size_mismatch_is_rejected(server, tmp_path):
    url, _ = server
    with pytest.raises(FetchError, match="got 8 bytes, expected 9"):
        download(f"{url}/motion/musev/unet/config.json", tmp_path / "c.json", size=9, quiet=True)
    assert not (tmp_path / "c.json").exists()


def test_404_and_connection_refused_are_named(server, tmp_path):
    url, _ = server
    with pytest.raises(FetchError, match="nothing.bin: HTTP 404"):
        download(f"{url}/nothing.bin", tmp_path / "n.bin", quiet=True)
    with pytest.raises(FetchError, match="cannot connect"):
        download("http://127.0.0.1:9/x.bin", tmp_path / "x.bin", quiet=True)


def test_alternative_names_after_404(server, tmp_path):
    url, root = server
    files = [Remote("motion/musev/unet/config.json"),
             Remote("motion/musev/unet/diffusion_pytorch_model.safetensors", ("motion/musev/unet/diffusion_pytorch_model.bin",))]
    fetch_all(files, tmp_path / "dl", url, quiet=True)
    assert (tmp_path / "dl/motion/musev/unet/diffusion_pytorch_model.bin").is_file()
    count = len(RangeHandler.requests)
    fetch_all(files, tmp_path / "dl", url, quiet=True)  # everything is there: no request
    assert len(RangeHandler.requests) == count


def test_plans():
    musev = [r.path for r in plan("musev")]
    assert "motion/musev/unet/config.json" in musev and not any("referencenet" in p for p in musev)
    pose = [r.path for r in plan("musev_referencenet_pose", "fantasticmix_v10")]
    assert "motion/musev_referencenet_pose/ip_adapter_image_proj.bin" in pose
    assert "motion/musev_referencenet/referencenet/config.json" in pose
    assert "t2i/sd1.5/fantasticmix_v10/unet/config.json" in pose
    with pytest.raises(FetchError, match="model 'musev2' is unknown"):
        plan("musev2")
    controlnet = plan_controlnet()  # a diffusers folder of its own repository
    assert CONTROLNET_URL == "https://huggingface.co/lllyasviel/control_v11p_sd15_openpose/resolve/main"
    assert [(r.path, r.alternatives) for r in controlnet] == [
        ("config.json", ()), ("diffusion_pytorch_model.safetensors", ("diffusion_pytorch_model.bin",))]


# ---------------------------------------------------------------------------------------------
# The whole command: a tiny release (published layout and key names) served on 127.0.0.1


@pytest.fixture
def release(tmp_path):
    if not (SHARED / "reference").is_dir():
        pytest.skip(f"reference material not found at {SHARED} (it sits beside the checkout in CI)")
    root = tmp_path / "release"
    return root, make_release(root, SHARED)


@pytest.mark.slow
def test_fetch_downloads_and_converts(release, tmp_path, capsys):
    root, unet = release
    dest, downloads = tmp_path / "weights", tmp_path / "checkpoints"
    with serving(root) as url:
        assert main(["musev_referencenet", "--dest", str(dest), "--downloads", str(downloads), "--base-url", url]) == 0
        fetched = [path for path, _ in RangeHandler.requests]
        assert main(["musev_referencenet", "--dest", str(dest), "--downloads", str(downloads), "--base-url", url]) == 0
        again = [path for path, _ in RangeHandler.requests[len(fetched):]]
        # the second run downloads nothing; it only asks again for the optional files the release lacks
        assert again == ["/embedding/ng_deepnegative_v1_75t.pt", "/embedding/EasyNegativeV2.safetensors",
                         "/embedding/bad_prompt_version2-neg.pt"]
    out, err = capsys.readouterr()
    assert out.strip().splitlines() == [str(dest)] * 2
    assert "/motion/musev_referencenet/unet/diffusion_pytorch_model.bin" in fetched  # after a 404 for .safetensors
    assert "/motion/musev/unet/config.json" not in fetched and not list(downloads.rglob("*.part"))
    state, _ = load_component(dest, "unet")
    assert state.keys() == unet.keys() and all(torch.equal(state[k], unet[k]) for k in unet)
    vae, _ = load_component(dest, "vae")
    ft_mse, _ = read_vae_folder(root / "vae/sd-vae-ft-mse")  # MuseV's VAE, not the base model's
    assert all(torch.equal(vae[k], ft_mse[k]) for k in ft_mse)
    pipe = MuseVPipeline.from_pretrained(dest)
    assert pipe.referencenet is not None and pipe.image_encoder is not None
    # the negative embeddings the release has are converted and loaded; the absent ones are skipped
    badhand = torch.load(root / "embedding/badhandv4.pt", weights_only=True)["string_to_param"]["*"]
    assert torch.equal(pipe.textual_inversions["badhandv4"], badhand) and len(pipe.tokenizer.encode("badhandv4")) == 2
    assert "skip embedding/EasyNegativeV2.safetensors: not in the release" in err


def test_fetch_names_what_the_mirror_lacks(release, tmp_path, capsys):
    root, _ = release
    shutil.rmtree(root / "IP-Adapter")
    dest = tmp_path / "weights"
    with serving(root) as url:
        code = main(["musev_referencenet", "--dest", str(dest), "--downloads", str(tmp_path / "dl"), "--base-url", url])
    err = capsys.readouterr().err
    assert code == 2 and "IP-Adapter/models/image_encoder/config.json: HTTP 404" in err
    assert "https://huggingface.co/h94/IP-Adapter/tree/main/models/image_encoder" in err
    assert not dest.exists()


def pose_release(root):
    """The pose model's motion folder (the referencenet model's files stand in for it) and, in the same
    mirror, the ControlNet's repository as a diffusers folder (.bin: found after a 404 for .safetensors)."""
    pose = root / "motion/musev_referencenet_pose"
    shutil.copytree(root / "motion/musev_referencenet/unet", pose / "unet")
    shutil.copy(root / "motion/musev_referencenet/ip_adapter_image_proj.bin", pose)
    hub = root / "lllyasviel/control_v11p_sd15_openpose"
    hub.mkdir(parents=True)
    (hub / "config.json").write_text((FIXTURES / "controlnet/config.json").read_text())
    weights = load_file(FIXTURES / "controlnet/weights.safetensors")
    torch.save(weights, hub / "diffusion_pytorch_model.bin")
    return weights


@pytest.mark.slow
def test_fetch_pose_model_with_its_controlnet(release, tmp_path, capsys):
    root, _ = release
    weights = pose_release(root)
    dest, downloads = tmp_path / "weights", tmp_path / "checkpoints"
    with serving(root) as url:
        assert main(["musev_referencenet_pose", "--dest", str(dest), "--downloads", str(downloads), "--base-url", url,
                     "--controlnet-url", f"{url}/lllyasviel/control_v11p_sd15_openpose"]) == 0
        fetched = [path for path, _ in RangeHandler.requests]
    assert "/lllyasviel/control_v11p_sd15_openpose/diffusion_pytorch_model.bin" in fetched
    assert (downloads / "controlnet/control_v11p_sd15_openpose/config.json").is_file()
    state, config = load_component(dest, "controlnet")
    assert state.keys() == weights.keys() and all(torch.equal(state[k], weights[k]) for k in weights)
    assert config["block_out_channels"] == [8, 16, 16, 16]
    for name in ("controlnet.json", "controlnet.safetensors"):  # this tiny ControlNet fits no UNet of the release
        (dest / name).rename(tmp_path / name)  # (from_pretrained checks the widths: test_bad_inputs.py)
    assert MuseVPipeline.from_pretrained(dest).referencenet is not None  # the rest of the folder is complete


def test_fetch_names_a_missing_controlnet(release, tmp_path, capsys):
    root, _ = release
    pose_release(root)
    shutil.rmtree(root / "lllyasviel")
    dest = tmp_path / "weights"
    with serving(root) as url:
        code = main(["musev_referencenet", "--controlnet", "--dest", str(dest), "--downloads", str(tmp_path / "dl"),
                     "--base-url", url, "--controlnet-url", f"{url}/lllyasviel/control_v11p_sd15_openpose"])
    err = capsys.readouterr().err
    assert code == 2 and "control_v11p_sd15_openpose/config.json: HTTP 404" in err
    assert "https://huggingface.co/lllyasviel/control_v11p_sd15_openpose; --controlnet-url names a mirror" in err
    assert not dest.exists()
