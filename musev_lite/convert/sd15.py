"""SD1.5 base models -> musev_lite's format: diffusers folders, and single-file A1111/civitai checkpoints.

A diffusers folder (`unet/ vae/ text_encoder/ tokenizer/ scheduler/`) already has our key names; only
old VAE files (e.g. sd-vae-ft-mse) name their attention `query/key/value/proj_attn`. A single file
(`.safetensors` / `.ckpt`) holds everything under LDM names:

    model.diffusion_model.*          the UNet        (input_blocks / middle_block / output_blocks)
    first_stage_model.*              the VAE         (down / mid / up, block / attn_1)
    cond_stage_model.transformer.*   the CLIP text encoder (transformers names, with or without text_model.)

Each gets one pattern table below. Everything else in such a file (EMA copies, the noise schedule) is
not needed and is reported as skipped.

    python -m musev_lite.convert.sd15 SRC DEST [--tokenizer DIR] [--vae DIR] [--dtype keep|fp16|fp32]

writes DEST/{vae,text_encoder,sd_unet}.{safetensors,json}, DEST/tokenizer/, DEST/scheduler.json
(sd_unet: the base's SD1.5 UNet weights with diffusers names, and its config.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..clip import CLIPTextConfig, CLIPTextModel
from ..command import exit_code
from ..samplers import SD15_SCHEDULER
from ..vae import AutoencoderKL, VAEConfig
from ..limits import parse_nested
from ..video_io import write_json
from ..weights import (
    WeightsError,
    atomic_path,
    check_state_dict,
    config_from_dict,
    read_state_dict,
    save_component,
    writable_folder,
)

from . import rename

SINGLE_FILE_PARTS = {"model.diffusion_model.": "unet", "first_stage_model.": "vae", "cond_stage_model.transformer.": "text_encoder"}
LAYERS = 3  # LDM numbers SD1.5's blocks per level: 2 ResNet(+attention) layers and a down/upsampler

# ---------------------------------------------------------------------------------------------
# Pattern tables


def _down(kind: str):
    """input_blocks.N (N >= 1) -> down_blocks.<level>.<kind>.<layer>"""
    def to(m):
        level, layer = divmod(int(m[1]) - 1, LAYERS)
        return f"down_blocks.{level}.downsamplers.0.conv." if kind == "downsamplers" else f"down_blocks.{level}.{kind}.{layer}."
    return to


def _up(kind: str):
    """output_blocks.N -> up_blocks.<level>.<kind>.<layer>"""
    def to(m):
        level, layer = divmod(int(m[1]), LAYERS)
        return f"up_blocks.{level}.upsamplers.0.conv." if kind == "upsamplers" else f"up_blocks.{level}.{kind}.{layer}."
    return to


UNET_BLOCKS = [
    (r"time_embed\.0\.", "time_embedding.linear_1."),
    (r"time_embed\.2\.", "time_embedding.linear_2."),
    (r"input_blocks\.0\.0\.", "conv_in."),
    (r"input_blocks\.(\d+)\.0\.op\.", _down("downsamplers")),
    (r"input_blocks\.(\d+)\.0\.", _down("resnets")),
    (r"input_blocks\.(\d+)\.1\.", _down("attentions")),
    (r"middle_block\.0\.", "mid_block.resnets.0."),
    (r"middle_block\.1\.", "mid_block.attentions.0."),
    (r"middle_block\.2\.", "mid_block.resnets.1."),
    (r"output_blocks\.(\d+)\.0\.", _up("resnets")),
    (r"output_blocks\.(\d+)\.[12]\.conv\.", _up("upsamplers")),
    (r"output_blocks\.(\d+)\.1\.", _up("attentions")),
    (r"out\.0\.", "conv_norm_out."),
    (r"out\.2\.", "conv_out."),
]
RESNET_PARTS = [  # inside a ResNet, LDM -> diffusers; anything else keeps its name
    (r"(.*\.resnets\.\d+\.)in_layers\.0\.", r"\1norm1."),
    (r"(.*\.resnets\.\d+\.)in_layers\.2\.", r"\1conv1."),
    (r"(.*\.resnets\.\d+\.)emb_layers\.1\.", r"\1time_emb_proj."),
    (r"(.*\.resnets\.\d+\.)out_layers\.0\.", r"\1norm2."),
    (r"(.*\.resnets\.\d+\.)out_layers\.3\.", r"\1conv2."),
    (r"(.*\.resnets\.\d+\.)(skip_connection|nin_shortcut)\.", r"\1conv_shortcut."),
    (r"", ""),
]
VAE_BLOCKS = [
    (r"(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
    (r"encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
    (r"encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"decoder\.up\.(\d+)\.block\.(\d+)\.", lambda m: f"decoder.up_blocks.{3 - int(m[1])}.resnets.{m[2]}."),
    (r"decoder\.up\.(\d+)\.upsample\.", lambda m: f"decoder.up_blocks.{3 - int(m[1])}.upsamplers.0."),
    (r"(encoder|decoder)\.mid\.block_(\d)\.", lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}."),
    (r"(encoder|decoder)\.mid\.attn_1\.norm\.", r"\1.mid_block.attentions.0.group_norm."),
    (r"(encoder|decoder)\.mid\.attn_1\.(q|k|v)\.", r"\1.mid_block.attentions.0.to_\2."),
    (r"(encoder|decoder)\.mid\.attn_1\.proj_out\.", r"\1.mid_block.attentions.0.to_out.0."),
    (r"", ""),
]
OLD_VAE_ATTENTION = [  # diffusers' VAE files from before its attention rewrite (e.g. sd-vae-ft-mse)
    (r"(.*\.attentions\.\d+\.)query\.", r"\1to_q."),
    (r"(.*\.attentions\.\d+\.)key\.", r"\1to_k."),
    (r"(.*\.attentions\.\d+\.)value\.", r"\1to_v."),
    (r"(.*\.attentions\.\d+\.)proj_attn\.", r"\1to_out.0."),
    (r"", ""),
]


def vae_state(state: dict, source: str) -> dict:
    """Current diffusers VAE names; attention weights stored as 1x1 convolutions become linear."""
    state = rename(state, OLD_VAE_ATTENTION, source)
    return {k: v[:, :, 0, 0] if ".attentions." in k and k.endswith(".weight") and v.ndim == 4 else v
            for k, v in state.items()}


def text_encoder_state(state: dict) -> dict:
    """transformers' CLIPTextModel names (`text_model.*`); the position_ids buffer is not a weight."""
    state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
    state.pop("text_model.embeddings.position_ids", None)
    return state


def split_single_file(state: dict, source: str) -> tuple[dict[str, dict], list[str]]:
    """An A1111 checkpoint -> diffusers-layout {"unet", "vae", "text_encoder"}, and the skipped keys."""
    if isinstance(state.get("state_dict"), dict):  # .ckpt files nest everything under "state_dict"
        state = state["state_dict"]
    parts: dict[str, dict] = {name: {} for name in SINGLE_FILE_PARTS.values()}
    skipped = []
    for key, value in state.items():
        prefix = next((p for p in SINGLE_FILE_PARTS if key.startswith(p)), None)
        if prefix is None or not torch.is_tensor(value):
            skipped.append(key)
        else:
            parts[SINGLE_FILE_PARTS[prefix]][key[len(prefix):]] = value
    for name, prefix in ((v, k) for k, v in SINGLE_FILE_PARTS.items()):
        if not parts[name]:
            raise WeightsError(f"{source}: no {prefix}* keys; is this an SD1.5 single-file checkpoint?")
    unet = rename(rename(parts["unet"], UNET_BLOCKS, f"{source} (model.diffusion_model)"), RESNET_PARTS, source)
    vae = rename(rename(parts["vae"], VAE_BLOCKS, f"{source} (first_stage_model)"), RESNET_PARTS, source)
    return {"unet": unet, "vae": vae_state(vae, source), "text_encoder": text_encoder_state(parts["text_encoder"])}, skipped


# ---------------------------------------------------------------------------------------------
# Reading a base model


@dataclass
class SD15Base:
    unet: dict[str, torch.Tensor]  # SD1.5 UNet keys, diffusers names
    vae: dict[str, torch.Tensor]
    text_encoder: dict[str, torch.Tensor]
    unet_config: dict  # diffusers unet/config.json (SD1.5's values for a single file)
    vae_config: VAEConfig
    text_config: CLIPTextConfig
    tokenizer: Path | None  # a folder with vocab.json + merges.txt
    scheduler: dict


def find_weights(folder: Path, stems: tuple[str, ...]) -> Path:
    """The weights file of a diffusers/transformers component folder."""
    for stem in stems:
        for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors", f"{stem}.bin", f"{stem}.fp16.bin"):
            if (folder / name).is_file():
                return folder / name
    if not folder.is_dir():
        raise WeightsError(f"{folder}: missing folder (the component {folder.name!r} is needed)")
    raise WeightsError(f"{folder}: no weights file ({', '.join(s + '.safetensors / .bin' for s in stems)})")


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise WeightsError(f"{path}: missing (the component {path.parent.name!r} needs its config.json)")
    try:
        return parse_nested(json.loads, path.read_text(), str(path), WeightsError)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightsError(f"{path}: not valid JSON ({err})") from None


def text_config(config: dict) -> CLIPTextConfig:
    return config_from_dict(CLIPTextConfig, config.get("text_config", config))  # a CLIPModel config nests it


def read_vae_folder(folder: Path) -> tuple[dict, VAEConfig]:
    weights = find_weights(folder, ("diffusion_pytorch_model",))
    return vae_state(read_state_dict(weights), str(weights)), config_from_dict(VAEConfig, read_json(folder / "config.json"))


def read_base(path: str | Path, tokenizer: str | Path | None = None, vae: str | Path | None = None) -> SD15Base:
    """A diffusers folder or a single-file checkpoint. A single file has no tokenizer: pass a folder
    with the CLIP vocab.json + merges.txt (any SD1.5 diffusers folder's tokenizer/). A `vae` folder
    replaces the base's VAE (then the base's own is not read)."""
    path = Path(path)
    replacement = read_vae_folder(Path(vae)) if vae is not None else None
    if path.is_dir():
        unet_weights = find_weights(path / "unet", ("diffusion_pytorch_model",))
        text_weights = find_weights(path / "text_encoder", ("model", "pytorch_model"))
        vae_state_dict, vae_cfg = replacement or read_vae_folder(path / "vae")
        scheduler_json = path / "scheduler" / "scheduler_config.json"
        return SD15Base(
            unet=read_state_dict(unet_weights), vae=vae_state_dict,
            text_encoder=text_encoder_state(read_state_dict(text_weights)),
            unet_config=read_json(path / "unet" / "config.json"), vae_config=vae_cfg,
            text_config=text_config(read_json(path / "text_encoder" / "config.json")),
            tokenizer=Path(tokenizer) if tokenizer else path / "tokenizer",
            scheduler=read_json(scheduler_json) if scheduler_json.is_file() else dict(SD15_SCHEDULER),
        )
    parts, skipped = split_single_file(read_state_dict(path), str(path))
    if skipped:
        print(f"{path.name}: skipped {len(skipped)} keys that are not UNet/VAE/text-encoder weights "
              f"(e.g. {', '.join(skipped[:3])})", file=sys.stderr)
    vae_state_dict, vae_cfg = replacement or (parts["vae"], VAEConfig())
    return SD15Base(unet=parts["unet"], vae=vae_state_dict, text_encoder=parts["text_encoder"], unet_config={},
                    vae_config=vae_cfg, text_config=CLIPTextConfig(),
                    tokenizer=Path(tokenizer) if tokenizer else None, scheduler=dict(SD15_SCHEDULER))


# ---------------------------------------------------------------------------------------------
# Writing


def cast(state: dict, dtype: str) -> dict:
    """keep | fp16 | fp32 for floating-point tensors."""
    target = {"keep": None, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    return {k: v.to(target) if target is not None and v.is_floating_point() else v for k, v in state.items()}


def expected_keys(model_cls, config) -> dict:
    with torch.device("meta"):
        return {k: v.shape for k, v in model_cls(config).state_dict().items()}


def checked(name: str, state: dict, config, model_cls, source: str) -> tuple[str, dict, object]:
    """A component whose keys and shapes fit its model, ready to write."""
    check_state_dict(expected_keys(model_cls, config), state, source)
    return name, state, config


def text_side(base: SD15Base) -> list[tuple[str, dict, object]]:
    """The vae and text_encoder components of a weights folder, checked."""
    if base.tokenizer is None or not (base.tokenizer / "vocab.json").is_file():
        raise WeightsError(f"no tokenizer at {base.tokenizer}: a single-file checkpoint has none; pass --tokenizer "
                           "with a folder holding the CLIP vocab.json and merges.txt (e.g. an SD1.5 tokenizer/)")
    return [checked("vae", base.vae, base.vae_config, AutoencoderKL, "vae"),
            checked("text_encoder", base.text_encoder, base.text_config, CLIPTextModel, "text_encoder")]


def write_folder(dest: Path, components: list, base: SD15Base, dtype: str) -> None:
    """Everything was checked before: write the components, the tokenizer files and scheduler.json."""
    for name, state, config in components:
        config = config if isinstance(config, dict) else dataclasses.asdict(config)
        save_component(dest, name, cast(state, dtype), config)
        print(f"wrote {dest / name}.safetensors ({len(state)} tensors)", file=sys.stderr)
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        if (base.tokenizer / name).is_file():
            with atomic_path(dest / "tokenizer" / name) as tmp:
                tmp.write_bytes((base.tokenizer / name).read_bytes())
    write_json(dest / "scheduler.json", base.scheduler)


def main(argv=None, prog: str = "python -m musev_lite.convert.sd15") -> int:
    parser = argparse.ArgumentParser(prog=prog,
                                     description="Convert an SD1.5 base model to musev_lite's format.")
    parser.add_argument("src", help="a diffusers folder or a single-file .safetensors/.ckpt")
    parser.add_argument("dest", help="output folder")
    parser.add_argument("--tokenizer", help="CLIP tokenizer folder (needed for a single file)")
    parser.add_argument("--vae", help="a diffusers VAE folder to use instead of the base's own")
    parser.add_argument("--dtype", choices=("keep", "fp16", "fp32"), default="keep")
    args = parser.parse_args(argv)

    def work() -> list[Path]:
        dest = writable_folder(args.dest, "dest")
        base = read_base(args.src, args.tokenizer, args.vae)
        write_folder(dest, text_side(base) + [("sd_unet", base.unet, base.unet_config)], base, args.dtype)
        return [dest]
    return exit_code(work)


if __name__ == "__main__":
    sys.exit(main())
