"""IPAdapterFaceID's published `ip-adapter-faceid_sd15.bin` -> the `ip_adapter_face` component of a weights folder.

The file (tencent-ailab's IP-Adapter, as MuseV's musev/models/ip_adapter_face_loader.py reads it) holds two
groups:
  * `image_proj`: the MLP projection (MLPProjModel: `proj.0.*`, `proj.2.*`, `norm.*`), 512-d ArcFace
    embedding -> 4 tokens;
  * `ip_adapter`: IP-Adapter's attention processors numbered in diffusers' `attn_processors` order (down
    blocks, up blocks, mid block; each transformer's attn1 even, attn2 odd). MuseV takes `N.to_k_ip.weight`
    / `N.to_v_ip.weight` of the 16 cross-attentions (N = 1, 3, ..., 31) as the face branch of the UNet's
    attn2 (`ip_adapter_face_to_k_ip` / `_v_ip`); the processors' LoRA (`N.to_{q,k,v,out}_lora.{down,up}.weight`)
    is not loaded by MuseV, and is dropped here too (the converter says so).

The component: `image_proj.<MLP keys>` and `unet.<attn2 path>.ip_adapter_face_to_{k,v}_ip.weight`, every key
and shape checked against the folder's UNet (unet.json) before anything is written.

    musev-lite convert faceid ip-adapter-faceid_sd15.bin weights/musev_referencenet
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

from ..command import exit_code
from ..ip_adapter import FaceProjection, FaceProjectionConfig
from ..models import FACE
from ..unet import UNet3D, UNet3DConfig
from ..weights import WeightsError, check_state_dict, config_from_dict, read_component_config, read_state_dict, save_component

from .sd15 import expected_keys

LORA_KEY = re.compile(r"\d+\.to_(q|k|v|out)_lora\.(down|up)\.weight")  # IP-Adapter's FaceID LoRA: MuseV skips it


def face_unet_keys(unet_config: UNet3DConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """published `N.to_{k,v}_ip.weight` -> (our UNet key, its shape), N = 1, 3, ... in diffusers'
    attn_processors order: every attn2 of the down blocks, then the up blocks, then the mid block."""
    shapes = expected_keys(UNet3D, dataclasses.replace(unet_config, ip_adapter_face=True))
    ours = [k for k in shapes if ".ip_adapter_face_to_k_ip." in k]
    ours = [k for prefix in ("down_blocks.", "up_blocks.", "mid_block.") for k in ours if k.startswith(prefix)]
    table = {}
    for i, k_key in enumerate(ours):
        v_key = k_key.replace("_to_k_ip.", "_to_v_ip.")
        table[f"{2 * i + 1}.to_k_ip.weight"] = (k_key, tuple(shapes[k_key]))
        table[f"{2 * i + 1}.to_v_ip.weight"] = (v_key, tuple(shapes[v_key]))
    return table


def read_faceid(path: Path, unet_config: UNet3DConfig) -> tuple[dict, FaceProjectionConfig, int]:
    """The component's tensors and projection config, checked; and how many LoRA tensors were dropped."""
    state = read_state_dict(path)
    groups = [k for k in ("image_proj", "ip_adapter") if not isinstance(state.get(k), dict)]
    if groups:
        raise WeightsError(f"{path}: expected an IPAdapterFaceID checkpoint {{'image_proj': {{...}}, 'ip_adapter': "
                           f"{{...}}}} (ip-adapter-faceid_sd15.bin); it lacks {', '.join(groups)}; found keys "
                           f"{list(state)[:6]}")
    proj, layers = state["image_proj"], state["ip_adapter"]
    width = unet_config.cross_attention_dim
    first = proj.get("proj.0.weight")
    if first is None or first.ndim != 2 or "proj.2.weight" not in proj:
        raise WeightsError(f"{path}: image_proj is not IPAdapterFaceID's MLP (proj.0.*, proj.2.*, norm.*); found keys "
                           f"{list(proj)[:6]}")
    tokens = proj["proj.2.weight"].shape[0] // width
    config = FaceProjectionConfig(first.shape[1], width, max(tokens, 1))
    check_state_dict(expected_keys(FaceProjection, config), proj, f"{path} (image_proj)")
    table = face_unet_keys(unet_config)
    dropped = [k for k in layers if LORA_KEY.fullmatch(k)]
    branch = {k: v for k, v in layers.items() if k not in dropped}
    check_state_dict({k: shape for k, (_, shape) in table.items()}, branch, f"{path} (ip_adapter)")
    tensors = {f"image_proj.{k}": v for k, v in proj.items()}
    tensors.update({f"unet.{table[k][0]}": v for k, v in branch.items()})
    return tensors, config, len(dropped)


def convert(checkpoint: Path, weights_dir: Path) -> Path:
    """Write `<weights_dir>/ip_adapter_face.{safetensors,json}` for the UNet of that folder."""
    unet_config = config_from_dict(UNet3DConfig, read_component_config(weights_dir, "unet"))
    tensors, config, dropped = read_faceid(Path(checkpoint), unet_config)
    path = save_component(weights_dir, FACE, tensors, dataclasses.asdict(config))
    note = f"; dropped its {dropped} LoRA tensors, which MuseV does not load" if dropped else ""
    print(f"wrote {path} ({len(tensors)} tensors{note})", file=sys.stderr)
    return path


def main(argv=None, prog: str = "python -m musev_lite.convert.faceid") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Add IPAdapterFaceID (ip-adapter-faceid_sd15.bin) to a "
                                     "converted MuseV weights folder, as its ip_adapter_face component.")
    parser.add_argument("checkpoint", type=Path, help="ip-adapter-faceid_sd15.bin (h94/IP-Adapter-FaceID)")
    parser.add_argument("weights_dir", type=Path, help="a converted weights folder (model.weights_dir)")
    args = parser.parse_args(argv)
    return exit_code(lambda: [convert(args.checkpoint, args.weights_dir)])


if __name__ == "__main__":
    sys.exit(main())
