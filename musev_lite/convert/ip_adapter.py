"""h94's IP-Adapter for SD1.5 -> the IP-Adapter components of a weights folder of the plain `musev` model.

The published file (`ip-adapter_sd15.bin`, `ip-adapter-plus_sd15.bin`, `ip-adapter-plus-face_sd15.bin`, or
the same as `.safetensors`) holds two groups:

    image_proj   the projection: ImageProjModel (`proj.*`, `norm.*`, reads the CLIP image_embeds) or the
                 plus models' Resampler (`latents`, `proj_in.*`, `layers.*`, ...: the penultimate hidden states)
    ip_adapter   `<n>.to_k_ip.weight` / `<n>.to_v_ip.weight`, where n numbers the SD1.5 UNet's attention
                 processors in diffusers' order: the down blocks', the up blocks', then the mid block's, each
                 transformer's attn1 then attn2. The odd n = 1, 3, ..., 31 are the 16 cross-attentions.

A .bin nests the groups (`{"image_proj": {...}, "ip_adapter": {...}}`, read with torch.load(weights_only=True));
a .safetensors prefixes them (`image_proj.latents`, `ip_adapter.1.to_k_ip.weight`). Written into DEST:

    ip_adapter.{safetensors,json}   the UNet's IP branch under our names (`...attn2.to_k_ip.weight`), and which
                                    projection makes its tokens (`ip_adapter.IPAdapterConfig`)
    image_proj.* or resampler.*     the projection (a previous adapter's other projection is removed)
    image_encoder.*                 the CLIP vision tower, from --image-encoder (IP-Adapter/models/image_encoder,
                                    ViT-H/14); kept if DEST has one and none is given

    python -m musev_lite.convert.ip_adapter ip-adapter-plus_sd15.bin weights/musev \\
        --image-encoder checkpoints/IP-Adapter/models/image_encoder
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

import torch

from ..clip import CLIPVisionConfig, CLIPVisionModelWithProjection
from ..command import exit_code
from ..ip_adapter import (
    IPAdapterConfig,
    ImageProjection,
    ImageProjectionConfig,
    PROJECTIONS,
    Resampler,
    ResamplerConfig,
)
from ..unet import UNet3D, UNet3DConfig
from ..weights import (
    WeightsError,
    check_state_dict,
    config_from_dict,
    name_list,
    read_component_config,
    read_state_dict,
    save_component,
    writable_folder,
)

from .musev import image_encoder
from .sd15 import cast, checked

GROUPS = ("image_proj", "ip_adapter")
DIM_HEAD = 64  # IP-Adapter builds its SD1.5 Resamplers with heads of 64 (the file gives only heads x 64)
BLOCK_ORDER = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}  # diffusers registers up_blocks before mid_block


def published_groups(state: dict, source: str) -> dict[str, dict[str, torch.Tensor]]:
    """The file's `image_proj` and `ip_adapter` groups, from a nested .bin or a prefixed .safetensors."""
    if all(isinstance(state.get(name), dict) for name in GROUPS):
        groups, others = {name: state[name] for name in GROUPS}, [k for k in state if k not in GROUPS]
    else:
        groups, others = {name: {} for name in GROUPS}, []
        for key, value in state.items():
            group, dot, rest = key.partition(".")
            if group in groups and dot and torch.is_tensor(value):
                groups[group][rest] = value
            else:
                others.append(key)
    empty = [name for name in GROUPS if not groups[name]]
    if empty or others:
        found = name_list([str(k) for k in state], 8)
        raise WeightsError(f"{source}: not an IP-Adapter file: expected only the groups image_proj and ip_adapter "
                           f"(nested in a .bin, prefixes in a .safetensors); found {found}")
    return groups


def attn2_in_processor_order(config: UNet3DConfig) -> list[str]:
    """Our names of the UNet's spatial cross-attentions, in the order diffusers numbers an SD1.5 UNet's
    attention processors (down blocks, up blocks, mid block; module order within each)."""
    with torch.device("meta"):
        unet = UNet3D(dataclasses.replace(config, ip_cross_attention=True))
    names = [name for name, module in unet.named_modules() if getattr(module, "to_k_ip", None) is not None]
    return sorted(names, key=lambda name: BLOCK_ORDER[name.split(".")[0]])  # stable: module order kept


def ip_branch(group: dict, config: UNet3DConfig, source: str) -> dict[str, torch.Tensor]:
    """The `ip_adapter` group under our key names, every key and shape checked under the published names."""
    with torch.device("meta"):
        shapes = UNet3D(dataclasses.replace(config, ip_cross_attention=True)).state_dict()
    ours = {}  # published key -> our key
    for i, name in enumerate(attn2_in_processor_order(config)):
        for kv in ("k", "v"):
            ours[f"{2 * i + 1}.to_{kv}_ip.weight"] = f"{name}.to_{kv}_ip.weight"
    check_state_dict({key: shapes[our].shape for key, our in ours.items()}, group, f"{source} (ip_adapter group)")
    return {our: group[key] for key, our in ours.items()}


def resampler_config(group: dict, source: str) -> ResamplerConfig:
    """The Resampler's sizes, read off its weights' shapes (heads: IP-Adapter's 64 wide)."""
    needed = ("latents", "proj_in.weight", "proj_out.weight", "layers.0.0.to_q.weight", "layers.0.1.1.weight")
    missing = [key for key in needed if key not in group]
    if missing:
        raise WeightsError(f"{source} (image_proj group): a Resampler without {', '.join(missing)}")
    latents, inner = group["latents"], group["layers.0.0.to_q.weight"].shape[0]
    if latents.ndim != 3 or inner % DIM_HEAD:
        raise WeightsError(f"{source} (image_proj group): latents {tuple(latents.shape)} / attention width {inner}: "
                           f"expected (1, queries, width) and a multiple of {DIM_HEAD}")
    dim = latents.shape[2]
    depth = 1 + max(int(m[1]) for m in (re.match(r"layers\.(\d+)\.", k) for k in group) if m)
    return ResamplerConfig(embedding_dim=group["proj_in.weight"].shape[1], dim=dim,
                           output_dim=group["proj_out.weight"].shape[0], depth=depth, heads=inner // DIM_HEAD,
                           dim_head=DIM_HEAD, num_queries=latents.shape[1],
                           ff_mult=group["layers.0.1.1.weight"].shape[0] // dim)


def projection(group: dict, source: str) -> tuple[str, dict, ImageProjectionConfig | ResamplerConfig]:
    """(component name, checked weights, config) of the `image_proj` group: a Resampler or an ImageProjModel."""
    where = f"{source} (image_proj group)"
    if "latents" in group:
        return checked("resampler", group, resampler_config(group, source), Resampler, where)
    if "proj.weight" in group and "norm.weight" in group:
        width = group["norm.weight"].shape[0]
        proj = group["proj.weight"]
        config = ImageProjectionConfig(proj.shape[1], width, proj.shape[0] // width)
        return checked("image_proj", group, config, ImageProjection, where)
    raise WeightsError(f"{where}: neither an ImageProjModel (proj.*, norm.*) nor a Resampler (latents, proj_in.*, "
                       f"layers.*); found {name_list(list(group), 8)}. FaceID files (proj.0.*) are not converted here")


def encoder_config(dest: Path, image_encoder_dir: Path | None) -> tuple[CLIPVisionConfig, list]:
    """The image encoder the tokens will come from, and the component to write for it (none if DEST's is kept)."""
    if image_encoder_dir is not None:
        name, state, config = checked("image_encoder", *image_encoder(image_encoder_dir),
                                      CLIPVisionModelWithProjection, str(image_encoder_dir))
        return config, [(name, state, config)]
    if (dest / "image_encoder.json").is_file():
        return config_from_dict(CLIPVisionConfig, read_component_config(dest, "image_encoder")), []
    raise WeightsError(f"{dest} has no image_encoder: pass --image-encoder with IP-Adapter's models/image_encoder "
                       "(the CLIP ViT-H/14 its SD1.5 adapters were trained with)")


def check_features(name: str, config, encoder: CLIPVisionConfig, source: str) -> None:
    """The projection must read the width the image encoder gives it."""
    if name == "resampler":
        wanted, given, what = config.embedding_dim, encoder.hidden_size, "hidden states"
    else:
        wanted, given, what = config.clip_embeddings_dim, encoder.projection_dim, "image_embeds"
    if wanted != given:
        raise WeightsError(f"{source}: its {name} reads {wanted}-wide CLIP {what}, but the image encoder gives "
                           f"{given}; use the image encoder the adapter was made for (SD1.5 adapters: ViT-H/14, "
                           "IP-Adapter's models/image_encoder)")


def convert(src: Path, dest: Path, image_encoder_dir: Path | None = None, dtype: str = "keep") -> Path:
    """Add the IP-Adapter file `src` to the musev weights folder `dest`; nothing is written unless all fits."""
    if not (dest / "unet.json").is_file():
        raise WeightsError(f"{dest}: no unet.json; DEST must be a weights folder of the musev model "
                           "(python -m musev_lite.convert.musev, or musev-lite fetch musev)")
    unet_config = config_from_dict(UNet3DConfig, read_component_config(dest, "unet"))
    if unet_config.ip_cross_attention or (dest / "referencenet.json").is_file():
        raise WeightsError(f"{dest}: this UNet has its own IP-Adapter branch (a referencenet model, trained with its "
                           "own image_proj); IP-Adapter files are for the plain musev model")
    groups = published_groups(read_state_dict(src), str(src))
    ip_state = ip_branch(groups["ip_adapter"], unet_config, str(src))
    name, proj_state, proj_config = projection(groups["image_proj"], str(src))
    if proj_config.cross_attention_dim != unet_config.cross_attention_dim:
        raise WeightsError(f"{src}: its tokens are {proj_config.cross_attention_dim} wide but the UNet's "
                           f"cross_attention_dim is {unet_config.cross_attention_dim} (unet.json); use an adapter "
                           "made for SD1.5")
    encoder, components = encoder_config(dest, image_encoder_dir)
    check_features(name, proj_config, encoder, str(src))
    tokens = proj_config.num_queries if name == "resampler" else proj_config.num_tokens
    components += [(name, proj_state, proj_config),
                   ("ip_adapter", ip_state, IPAdapterConfig(name, tokens, Path(src).name))]
    for part, state, config in components:  # ip_adapter last: the folder has an adapter once it is there
        save_component(dest, part, cast(state, dtype), dataclasses.asdict(config))
        print(f"wrote {dest / part}.safetensors ({len(state)} tensors)", file=sys.stderr)
    for other in PROJECTIONS:  # a previous adapter's other projection is not this adapter's
        if other != name:
            for suffix in (".safetensors", ".json"):
                (dest / f"{other}{suffix}").unlink(missing_ok=True)
    return dest


def main(argv=None, prog: str = "python -m musev_lite.convert.ip_adapter") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Add an SD1.5 IP-Adapter (h94's ip-adapter_sd15, "
                                     "ip-adapter-plus_sd15, ip-adapter-plus-face_sd15) to a musev weights folder.")
    parser.add_argument("src", type=Path, help="the published .bin or .safetensors")
    parser.add_argument("dest", type=Path, help="a weights folder of the plain musev model (convert musev)")
    parser.add_argument("--image-encoder", type=Path, help="IP-Adapter/models/image_encoder (CLIP ViT-H/14); "
                        "default: the folder's own, if it has one")
    parser.add_argument("--dtype", choices=("keep", "fp16", "fp32"), default="keep")
    args = parser.parse_args(argv)
    return exit_code(lambda: [convert(args.src, writable_folder(args.dest, "dest"), args.image_encoder, args.dtype)])


if __name__ == "__main__":
    sys.exit(main())
