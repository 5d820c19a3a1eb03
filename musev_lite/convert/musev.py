"""A released MuseV model -> one musev_lite weights folder (what `MuseVPipeline.from_pretrained` reads).

As the original's loaders assemble it:
  * unet: the motion checkpoint `motion/<model>/unet/` (temporal layers, frame embedding, IP-Adapter
    K/V, ReferenceNet fusion; it may or may not carry SD1.5 weights), with the SD1.5 base model's UNet
    laid over it: the base's spatial weights win, and it may bring no key the 3D UNet lacks;
  * referencenet: `motion/musev_referencenet/referencenet/` (SD1.5 names; an up path, if saved, is dropped);
  * image_proj: `motion/<model>/ip_adapter_image_proj.bin` (`{"image_proj": {proj.*, norm.*}}`);
  * image_encoder: IP-Adapter's CLIP ViT-H/14 (`IP-Adapter/models/image_encoder/`, transformers layout);
  * vae: `vae/sd-vae-ft-mse` (MuseV replaces the base's VAE), text encoder / tokenizer / scheduler: the base;
  * embeddings/: the textual inversions of `embedding/` that MuseV's negative prompt presets name.

    python -m musev_lite.convert.musev --motion checkpoints/motion/musev_referencenet \\
        --base checkpoints/t2i/sd1.5/majicmixRealv6Fp16 --vae checkpoints/vae/sd-vae-ft-mse \\
        --image-encoder checkpoints/IP-Adapter/models/image_encoder weights/musev_referencenet
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from ..clip import CLIPVisionConfig, CLIPVisionModelWithProjection
from ..command import exit_code
from ..ip_adapter import ImageProjection, ImageProjectionConfig
from ..limits import file_stem
from ..prompts import read_textual_inversion, save_textual_inversion
from ..referencenet import ReferenceNet
from ..unet import UNet3D, UNet3DConfig
from ..weights import (
    EMBEDDING_SUFFIXES,
    EMBEDDINGS,
    WeightsError,
    check_state_dict,
    config_from_dict,
    read_state_dict,
    writable_folder,
)

from .sd15 import checked, expected_keys, find_weights, read_base, read_json, text_side, write_folder

MODELS = ("musev", "musev_referencenet", "musev_referencenet_pose")
REFERENCENET_UNUSED = ("up_blocks.", "conv_norm_out.", "conv_out.")  # not in the released ReferenceNet's forward
SD15_DOWN = ("CrossAttnDownBlock", "CrossAttnDownBlock", "CrossAttnDownBlock", "DownBlock")
SD15_UP = ("UpBlock", "CrossAttnUpBlock", "CrossAttnUpBlock", "CrossAttnUpBlock")


def check_sd15_layout(config: dict) -> None:
    """The block types of a diffusers UNet config.json (2D or 3D names) must be SD1.5's."""
    down = tuple(name.replace("2D", "").replace("3D", "") for name in config.get("down_block_types", SD15_DOWN))
    up = tuple(name.replace("2D", "").replace("3D", "") for name in config.get("up_block_types", SD15_UP))
    if down != SD15_DOWN or up != SD15_UP:
        raise WeightsError(
            f"unet config.json: down/up block types {down} / {up} are not the SD1.5 layout {SD15_DOWN} / {SD15_UP}; "
            "only SD1.5-style UNets are supported"
        )


def unet_config_from_diffusers(config: dict, preset: str) -> UNet3DConfig:
    """Sizes from a published unet/config.json (2D or MuseV 3D); MuseV's switches from the model name,
    because the released configs do not carry all of them."""
    check_sd15_layout(config)
    heads = config.get("attention_head_dim", 8)
    if not isinstance(heads, int):
        if len(set(heads)) != 1:
            raise WeightsError(f"unet config.json: attention_head_dim {heads} differs per level; expected one value")
        heads = heads[0]
    sizes = dict(
        in_channels=config.get("in_channels", 4),
        out_channels=config.get("out_channels", 4),
        block_out_channels=tuple(config.get("block_out_channels", (320, 640, 1280, 1280))),
        layers_per_block=config.get("layers_per_block", 2),
        heads=heads,
        norm_num_groups=config.get("norm_num_groups", 32),
        norm_eps=config.get("norm_eps", 1e-5),
        cross_attention_dim=config.get("cross_attention_dim", 768),
    )
    switches = {k: v for k, v in dataclasses.asdict(UNet3DConfig.preset(preset)).items() if k not in sizes}
    switches.update({k: v for k, v in config.items() if k in {"temporal_conv_groups", "transformer_in_groups"}})
    return UNet3DConfig(**sizes, **switches)


def motion_unet(motion_dir: Path, base_unet: dict | None, preset: str) -> tuple[dict, UNet3DConfig]:
    """The 3D UNet's weights: the motion checkpoint, then the base's SD1.5 weights over it."""
    folder = motion_dir / "unet"
    weights = find_weights(folder, ("diffusion_pytorch_model",))
    config = unet_config_from_diffusers(read_json(folder / "config.json"), preset)
    state = read_state_dict(weights)
    expected = expected_keys(UNet3D, config)
    if base_unet is not None:
        foreign = [k for k in base_unet if k not in expected]
        if foreign:
            raise WeightsError(f"the base UNet has {len(foreign)} keys the 3D UNet lacks "
                               f"(e.g. {', '.join(foreign[:5])}); is it an SD1.5 model?")
        state = {**state, **base_unet}
    try:
        check_state_dict(expected, state, str(weights))
    except WeightsError as err:
        hint = "" if base_unet is not None else " (a motion checkpoint without SD1.5 weights needs --base)"
        raise WeightsError(f"{err}{hint}") from None
    return state, config


def referencenet(folder: Path, preset: str) -> tuple[dict, UNet3DConfig]:
    weights = find_weights(folder, ("diffusion_pytorch_model",))
    config = unet_config_from_diffusers(read_json(folder / "config.json"), preset)
    state = {k: v for k, v in read_state_dict(weights).items() if not k.startswith(REFERENCENET_UNUSED)}
    return state, config


def image_proj(path: Path) -> tuple[dict, ImageProjectionConfig]:
    state = read_state_dict(path)
    state = state.get("image_proj", state)
    if not isinstance(state, dict) or "proj.weight" not in state or "norm.weight" not in state:
        raise WeightsError(f"{path}: expected {{'image_proj': {{proj.*, norm.*}}}}, found keys {list(state)[:6]}")
    width = state["norm.weight"].shape[0]
    config = ImageProjectionConfig(state["proj.weight"].shape[1], width, state["proj.weight"].shape[0] // width)
    return state, config


def image_encoder(folder: Path) -> tuple[dict, CLIPVisionConfig]:
    weights = find_weights(folder, ("model", "pytorch_model"))
    config = read_json(folder / "config.json")
    config = config.get("vision_config", config)
    state = {k: v for k, v in read_state_dict(weights).items() if k != "vision_model.embeddings.position_ids"}
    return state, config_from_dict(CLIPVisionConfig, config)


def textual_inversions(folder: Path, width: int) -> dict[str, torch.Tensor]:
    """word -> vectors of every A1111 embedding in `folder` (MuseV's `checkpoints/embedding/`)."""
    files = sorted(p for p in folder.glob("*") if p.suffix in EMBEDDING_SUFFIXES)
    if not files:
        raise WeightsError(f"{folder}: no textual-inversion files ({', '.join(EMBEDDING_SUFFIXES)})")
    return {file_stem("textual-inversion word", path.stem, WeightsError): read_textual_inversion(path, width)
            for path in files}


def convert(motion: Path, base: Path, dest: Path, preset: str | None = None, vae: Path | None = None,
            image_encoder_dir: Path | None = None, referencenet_dir: Path | None = None,
            tokenizer: Path | None = None, dtype: str = "keep", embeddings: Path | None = None) -> Path:
    if not Path(motion).is_dir():
        raise WeightsError(f"--motion {motion}: no such folder (checkpoints/motion/<model> of the release)")
    preset = preset or motion.name
    if preset not in MODELS:
        raise WeightsError(f"cannot tell the model from {motion.name!r}; pass --preset ({', '.join(MODELS)})")
    sd = read_base(base, tokenizer, vae)
    unet_state, unet_config = motion_unet(motion, sd.unet, preset)
    components = [checked("unet", unet_state, unet_config, UNet3D, str(motion / "unet"))]
    components += text_side(sd)
    if preset != "musev":
        # the pose model has no ReferenceNet of its own: MuseV's README runs it with musev_referencenet's
        refer_dir = referencenet_dir or motion.parent / "musev_referencenet" / "referencenet"
        if image_encoder_dir is None:
            raise WeightsError(f"{preset} needs the IP-Adapter image encoder: pass --image-encoder")
        components.append(checked("referencenet", *referencenet(refer_dir, preset), ReferenceNet, str(refer_dir)))
        proj_path = motion / "ip_adapter_image_proj.bin"
        components.append(checked("image_proj", *image_proj(proj_path), ImageProjection, str(proj_path)))
        components.append(checked("image_encoder", *image_encoder(image_encoder_dir), CLIPVisionModelWithProjection,
                                  str(image_encoder_dir)))
    words = textual_inversions(embeddings, sd.text_config.hidden_size) if embeddings is not None else {}
    write_folder(dest, components, sd, dtype)  # only once everything fits
    for word, vectors in words.items():
        save_textual_inversion(dest / EMBEDDINGS, word, vectors)
    return dest


def main(argv=None, prog: str = "python -m musev_lite.convert.musev") -> int:
    parser = argparse.ArgumentParser(prog=prog,
                                     description="Convert a released MuseV model into a musev_lite weights folder.")
    parser.add_argument("dest", help="output folder (model.weights_dir)")
    parser.add_argument("--motion", required=True, type=Path, help="checkpoints/motion/<model> of the release")
    parser.add_argument("--base", required=True, type=Path, help="SD1.5 base: a diffusers folder or a single file")
    parser.add_argument("--vae", type=Path, help="VAE folder (MuseV uses sd-vae-ft-mse); default: the base's")
    parser.add_argument("--image-encoder", type=Path, help="IP-Adapter/models/image_encoder (referencenet models)")
    parser.add_argument("--referencenet", type=Path, help="default: motion/musev_referencenet/referencenet")
    parser.add_argument("--tokenizer", type=Path, help="CLIP tokenizer folder (a single-file base has none)")
    parser.add_argument("--embeddings", type=Path, help="textual inversions for the negative presets "
                        "(MuseV's checkpoints/embedding: badhandv4, ng_deepnegative_v1_75t, ...)")
    parser.add_argument("--preset", choices=MODELS, help="default: the motion folder's name")
    parser.add_argument("--dtype", choices=("keep", "fp16", "fp32"), default="keep")
    args = parser.parse_args(argv)
    return exit_code(lambda: [convert(args.motion, args.base, writable_folder(args.dest, "dest"), args.preset, args.vae,
                                      args.image_encoder, args.referencenet, args.tokenizer, args.dtype, args.embeddings)])


if __name__ == "__main__":
    sys.exit(main())
