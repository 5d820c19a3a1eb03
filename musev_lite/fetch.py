"""Download the published MuseV checkpoints and convert them into a musev_lite weights folder.

    python -m musev_lite.fetch musev_referencenet --dest weights/musev_referencenet

Files come from the Hugging Face repository TMElyralab/MuseV, laid out as MuseV's README clones it
(`motion/`, `t2i/sd1.5/`, `vae/`, `IP-Adapter/`), into a downloads folder (default `checkpoints/`).
The pose model (and any model with --controlnet) also gets the ControlNet MuseV's video2video loads
for its pose control (`--controlnet_name dwpose_body_hand`): lllyasviel/control_v11p_sd15_openpose,
into `controlnet/control_v11p_sd15_openpose/`, converted to the component `controlnet`.
Downloads resume from `.part` files (HTTP Range), show progress on stderr, and are checked against
a size and sha256 when those are known. Then the converters write the weights folder. weights/README.md
lists every file. Plain urllib, nothing else.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .command import exit_code
from .convert.controlnet import read_controlnet, save_controlnet
from .convert.musev import convert
from .weights import CONTROLNET, writable_folder

DEFAULT_BASE_URL = "https://huggingface.co/TMElyralab/MuseV/resolve/main"
BASE_MODELS = ("majicmixRealv6Fp16", "fantasticmix_v10")
MODELS = ("musev", "musev_referencenet", "musev_referencenet_pose")


class FetchError(ValueError):
    """A download failed or did not check out."""


@dataclass
class Remote:
    """One published file; `alternatives` are tried in order (the release's exact names are not
    certain: diffusers accepts .safetensors or .bin)."""

    path: str
    alternatives: tuple[str, ...] = ()
    size: int | None = None
    sha256: str | None = None
    hint: str = ""  # said when no name is found
    optional: bool = False  # absent from the release: skipped with a note


DIFFUSERS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
TRANSFORMERS = ("model.safetensors", "pytorch_model.bin")
IMAGE_ENCODER = "IP-Adapter/models/image_encoder"
# the textual inversions MuseV's negative presets name, as its scripts load them (text2video.py)
NEGATIVE_EMBEDDINGS = ("embedding/badhandv4.pt", "embedding/ng_deepnegative_v1_75t.pt",
                       "embedding/EasyNegativeV2.safetensors", "embedding/bad_prompt_version2-neg.pt")
# MuseV's pose ControlNet: ControlNetModel.from_pretrained("lllyasviel/control_v11p_sd15_openpose") (MMCM controlnet.py)
CONTROLNET_URL = "https://huggingface.co/lllyasviel/control_v11p_sd15_openpose/resolve/main"
CONTROLNET_DIR = "controlnet/control_v11p_sd15_openpose"  # in the downloads folder
IMAGE_ENCODER_HINT = (f"if your mirror lacks {IMAGE_ENCODER}/, put the files of "
                      f"https://huggingface.co/h94/IP-Adapter/tree/main/models/image_encoder there and run again")


def _weights(folder: str, names: tuple[str, ...] = DIFFUSERS, hint: str = "") -> list[Remote]:
    first, *rest = (f"{folder}/{name}" for name in names)
    return [Remote(f"{folder}/config.json", hint=hint), Remote(first, tuple(rest), hint=hint)]


def plan(model: str, base: str = "majicmixRealv6Fp16") -> list[Remote]:
    """Every file `model` needs, as paths in the release."""
    if model not in MODELS:
        raise FetchError(f"model {model!r} is unknown; use one of {', '.join(MODELS)}")
    if base not in BASE_MODELS:
        raise FetchError(f"base {base!r} is not in the release; use one of {', '.join(BASE_MODELS)}")
    sd = f"t2i/sd1.5/{base}"
    files = _weights(f"motion/{model}/unet") + _weights(f"{sd}/unet") + _weights(f"{sd}/text_encoder", TRANSFORMERS)
    files += [Remote(f"{sd}/tokenizer/{name}") for name in ("vocab.json", "merges.txt")]
    files += [Remote(f"{sd}/scheduler/scheduler_config.json")] + _weights("vae/sd-vae-ft-mse")
    files += [Remote(path, optional=True) for path in NEGATIVE_EMBEDDINGS]
    if model != "musev":
        # the pose model ships its own image projection but no ReferenceNet: MuseV's README runs it with
        # musev_referencenet's
        files += _weights("motion/musev_referencenet/referencenet")
        files += [Remote(f"motion/{model}/ip_adapter_image_proj.bin")]
        files += _weights(IMAGE_ENCODER, TRANSFORMERS, IMAGE_ENCODER_HINT)
    return files


def plan_controlnet() -> list[Remote]:
    """The files of the ControlNet repository (relative to CONTROLNET_URL and to CONTROLNET_DIR)."""
    repository = CONTROLNET_URL.removesuffix("/resolve/main")
    hint = f"the ControlNet is the diffusers folder {repository}; --controlnet-url names a mirror"
    return [Remote("config.json", hint=hint), Remote(DIFFUSERS[0], DIFFUSERS[1:], hint=hint)]


def download(url: str, target: Path, size: int | None = None, sha256: str | None = None, quiet: bool = False) -> Path:
    """Fetch `url` to `target`, resuming `target.part`; the target appears only when complete and checked."""
    if target.is_file() and (size is None or target.stat().st_size == size):
        return target
    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # the .part is already whole
            response = None
        else:
            raise FetchError(f"{url}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        raise FetchError(f"{url}: cannot connect ({getattr(err, 'reason', err)}); check the network or --base-url") from None
    if response is not None:
        with response:
            if have and response.status != 206:  # the server ignored Range: start over
                have = 0
            total = int(response.headers.get("Content-Length", 0)) + have or size
            try:  # folders are made only once the server answers: a failed fetch leaves none behind
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(part, "ab" if have else "wb") as out:
                    done, last = have, 0.0
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        done += len(chunk)
                        if not quiet and time.monotonic() - last > 1:
                            last = time.monotonic()
                            share = f" ({100 * done / total:.0f}%)" if total else ""
                            print(f"  {target.name}: {done / 1e6:.1f} MB{share}", file=sys.stderr, flush=True)
            except OSError as err:
                raise FetchError(f"{part}: cannot be written ({err.strerror or err}); choose another --downloads "
                                 "folder or free some space") from None
    got = part.stat().st_size
    if size is not None and got != size:
        raise FetchError(f"{url}: got {got} bytes, expected {size}; run the command again to resume")
    if sha256 is not None:
        digest = hashlib.sha256()
        with open(part, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        if digest.hexdigest() != sha256:
            part.unlink()
            raise FetchError(f"{url}: sha256 {digest.hexdigest()} does not match the expected {sha256}; "
                             "the partial file was removed, run the command again")
    os.replace(part, target)
    return target


def fetch_all(files: list[Remote], downloads: Path, base_url: str, quiet: bool = False) -> None:
    """Download every file not already in `downloads`, trying a file's alternative names on HTTP 404."""
    for remote in files:
        names = (remote.path, *remote.alternatives)
        if any((downloads / name).is_file() for name in names):
            continue
        for name in names:
            if not quiet:
                print(f"fetch {name}", file=sys.stderr, flush=True)
            try:
                download(f"{base_url.rstrip('/')}/{name}", downloads / name, remote.size, remote.sha256, quiet)
                break
            except FetchError as err:
                if "HTTP 404" not in str(err):
                    raise
                not_found = err
        else:  # no name was found
            if not remote.optional:
                raise FetchError(f"{not_found}{'; ' + remote.hint if remote.hint else ''}") from None
            if not quiet:
                print(f"skip {remote.path}: not in the release (optional)", file=sys.stderr, flush=True)


def main(argv=None, prog: str = "python -m musev_lite.fetch") -> int:
    parser = argparse.ArgumentParser(prog=prog,
                                     description="Download a released MuseV model and convert it into a weights folder.")
    parser.add_argument("model", choices=MODELS)
    parser.add_argument("--dest", type=Path, help="weights folder to write (default: weights/<model>)")
    parser.add_argument("--downloads", type=Path, default=Path("checkpoints"),
                        help="where the release files go; kept, so a second run downloads nothing (default: checkpoints)")
    parser.add_argument("--base", choices=BASE_MODELS, default="majicmixRealv6Fp16", help="the SD1.5 base model")
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL, help="the release, or a mirror of it")
    parser.add_argument("--controlnet", action="store_true",
                        help="also fetch and convert the pose ControlNet (always done for musev_referencenet_pose)")
    parser.add_argument("--controlnet-url", default=CONTROLNET_URL, help="the ControlNet's repository, or a mirror of it")
    parser.add_argument("--dtype", choices=("keep", "fp16", "fp32"), default="keep", help="of the written weights")
    parser.add_argument("--download-only", action="store_true", help="fetch the files, do not convert")
    args = parser.parse_args(argv)
    try:
        return exit_code(lambda: [fetch_and_convert(args)])
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume the download", file=sys.stderr)
        return 130


def fetch_and_convert(args: argparse.Namespace) -> Path:
    """The command's work: download what the model needs, then convert it; the folder written (the
    downloads folder with --download-only)."""
    downloads, dest = args.downloads, args.dest or Path("weights") / args.model
    with_controlnet = args.controlnet or args.model == "musev_referencenet_pose"
    for option, url in (("--base-url", args.base_url), ("--controlnet-url", args.controlnet_url)):
        if urllib.parse.urlsplit(url).scheme not in ("http", "https", "file"):
            raise FetchError(f"{option} {url!r} is not a URL; give http://, https:// or file://...")
    writable_folder(downloads, "--downloads")
    writable_folder(dest, "--dest")
    fetch_all(plan(args.model, args.base), downloads, args.base_url)
    if with_controlnet:
        fetch_all(plan_controlnet(), downloads / CONTROLNET_DIR, args.controlnet_url)
    if args.download_only:
        return downloads
    controlnet = read_controlnet(downloads / CONTROLNET_DIR) if with_controlnet else None  # checked first
    motion = downloads / "motion"
    embeddings = downloads / "embedding"
    convert(motion / args.model, downloads / "t2i/sd1.5" / args.base, dest, preset=args.model,
            vae=downloads / "vae/sd-vae-ft-mse",
            image_encoder_dir=None if args.model == "musev" else downloads / IMAGE_ENCODER,
            referencenet_dir=motion / "musev_referencenet/referencenet", dtype=args.dtype,
            embeddings=embeddings if embeddings.is_dir() else None)
    if controlnet is not None:
        save_controlnet(dest, CONTROLNET, *controlnet, dtype=args.dtype)
    return dest


if __name__ == "__main__":
    sys.exit(main())
