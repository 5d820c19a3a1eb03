"""SD1.5 ControlNets -> musev_lite's format: diffusers folders and single-file originals.

A diffusers folder (config.json + diffusion_pytorch_model.safetensors / .bin, as
lllyasviel/control_v11p_sd15_openpose is published) already has our key names. A single file
(`control_v11p_sd15_openpose.pth` / `.safetensors`) has the original ControlNet's names: the encoder
half of the SD1.5 UNet under its single-file names (`time_embed`, `input_blocks`, `middle_block`: the
table of sd15.py), plus

    input_hint_block.N     the control-image encoder: conv, SiLU, conv, SiLU, ..., the last conv is conv_out
    zero_convs.N.0         the 1x1 conv on each skip tensor          -> controlnet_down_blocks.N
    middle_block_out.0     the 1x1 conv after the mid block           -> controlnet_mid_block

The v1.1 files hold just those; the v1.0 files (`control_sd15_*.pth`) hold a whole SD1.5 model with the
ControlNet under `control_model.`, and the rest is skipped. A single file carries no config: SD1.5's
sizes are used unless --config names a diffusers config.json. A ControlNet for SD2.x or SDXL is refused.

    python -m musev_lite.convert.controlnet SRC --dest DIR [--name NAME] [--config FILE] [--dtype keep|fp16|fp32]

writes DIR/NAME.safetensors + DIR/NAME.json (NAME: `controlnet` unless given; one plain name, no path), e.g.
into a weights folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from ..command import exit_code
from ..controlnet import ControlNet, ControlNetConfig, check_sd15_base
from ..limits import file_stem
from ..weights import CONTROLNET, WeightsError, check_state_dict, read_state_dict, save_component, writable_folder

from . import Rule, rename
from .sd15 import RESNET_PARTS, UNET_BLOCKS, cast, expected_keys, find_weights, read_json

PREFIX = "control_model."  # v1.0 files: the ControlNet inside a whole SD1.5 checkpoint

CONTROLNET_BLOCKS = [
    (r"zero_convs\.(\d+)\.0\.", r"controlnet_down_blocks.\1."),
    (r"middle_block_out\.0\.", "controlnet_mid_block."),
]


def hint_rules(last: int) -> list[Rule]:
    """input_hint_block: Sequential(conv, SiLU, conv, SiLU, ..., conv); convs at even indices, `last` is conv_out."""
    return [
        (r"input_hint_block\.0\.", "controlnet_cond_embedding.conv_in."),
        (rf"input_hint_block\.{last}\.", "controlnet_cond_embedding.conv_out."),
        (r"input_hint_block\.(\d+)\.", lambda m: f"controlnet_cond_embedding.blocks.{int(m[1]) // 2 - 1}."),
    ]


def check_base(state: dict, source: str) -> None:
    """Tell SD2.x / SDXL ControlNets from the shapes (either key naming): a cross-attention K input of
    1024 / 2048, a linear proj_in (SD2.x), added embeddings (SDXL's label_emb / add_embedding)."""
    to_k = next((v for k, v in state.items() if k.endswith("attn2.to_k.weight")), None)
    if to_k is not None:
        linear = any(k.endswith("proj_in.weight") and v.ndim == 2 for k, v in state.items())
        sdxl = any(k.startswith(("label_emb.", "add_embedding.")) for k in state)
        check_sd15_base(to_k.shape[1], linear, sdxl, source)


def single_file_state(state: dict, source: str) -> tuple[dict, list[str]]:
    """A single-file ControlNet -> diffusers names, and the keys skipped (a v1.0 file's SD1.5 model)."""
    if isinstance(state.get("state_dict"), dict):  # .ckpt files nest everything under "state_dict"
        state = state["state_dict"]
    skipped = []
    if any(k.startswith(PREFIX) for k in state):
        skipped = [k for k in state if not k.startswith(PREFIX)]
        state = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    skipped += [k for k, v in state.items() if not torch.is_tensor(v)]
    state = {k: v for k, v in state.items() if torch.is_tensor(v)}
    check_base(state, source)
    if "controlnet_cond_embedding.conv_in.weight" in state:  # a diffusers-named file on its own
        return state, skipped
    hints = [int(k.split(".")[1]) for k in state if k.startswith("input_hint_block.")]
    if not hints:
        raise WeightsError(f"{source}: no input_hint_block.* keys (nor {PREFIX}input_hint_block.*); "
                           "is this a ControlNet?")
    rules = hint_rules(max(hints)) + CONTROLNET_BLOCKS + UNET_BLOCKS
    return rename(rename(state, rules, source), RESNET_PARTS, source), skipped


def read_controlnet(src: str | Path, config: str | Path | None = None) -> tuple[dict, ControlNetConfig]:
    """A diffusers ControlNet folder or a single file, checked key by key against the model."""
    src = Path(src)
    if src.is_dir():
        weights = find_weights(src, ("diffusion_pytorch_model",))
        cfg = ControlNetConfig.from_diffusers(read_json(src / "config.json"), str(src / "config.json"))
        state = read_state_dict(weights)
        check_base(state, str(weights))
    else:
        weights = src
        state, skipped = single_file_state(read_state_dict(src), str(src))
        if skipped:
            print(f"{src.name}: skipped {len(skipped)} keys that are not ControlNet weights "
                  f"(e.g. {', '.join(skipped[:3])})", file=sys.stderr)
        cfg = ControlNetConfig()
        if config is not None:
            cfg = ControlNetConfig.from_diffusers(read_json(Path(config)), str(config))
    check_state_dict(expected_keys(ControlNet, cfg), state, str(weights))
    return state, cfg


def save_controlnet(dest: str | Path, name: str, state: dict, config: ControlNetConfig, dtype: str = "keep") -> Path:
    """Write DEST/NAME.safetensors + NAME.json; returns the weights path."""
    return save_component(dest, name, cast(state, dtype), dataclasses.asdict(config))


def main(argv=None, prog: str = "python -m musev_lite.convert.controlnet") -> int:
    parser = argparse.ArgumentParser(prog=prog,
                                     description="Convert an SD1.5 ControlNet to musev_lite's format.")
    parser.add_argument("src", help="a diffusers ControlNet folder, or a single file (.pth / .safetensors / .ckpt)")
    parser.add_argument("--dest", required=True, type=Path, help="output folder, e.g. a weights folder")
    parser.add_argument("--name", default=CONTROLNET, help=f"component name (default: {CONTROLNET})")
    parser.add_argument("--config", type=Path, help="a diffusers config.json for a single file that is not SD1.5-sized")
    parser.add_argument("--dtype", choices=("keep", "fp16", "fp32"), default="keep")
    args = parser.parse_args(argv)

    def work() -> list[Path]:
        file_stem("--name", args.name, WeightsError)  # DEST/NAME.safetensors stays in DEST
        writable_folder(args.dest, "--dest")
        state, config = read_controlnet(args.src, args.config)
        return [save_controlnet(args.dest, args.name, state, config, args.dtype)]
    return exit_code(work)


if __name__ == "__main__":
    sys.exit(main())
