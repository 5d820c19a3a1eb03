"""The models of a MuseV pipeline as one bundle: loaded from a converted weights folder (each model built on
the meta device and given the file's tensors, `weights.load_model`), saved back, moved between devices and
dtypes, with LoRA files and textual-inversion words merged in, or made at seeded random weights (`demo`).
`pipeline.MuseVPipeline` is this bundle plus the generation stages.

dtype: `from_pretrained`, `demo` and `to` default to float32, as diffusers' `from_pretrained` does, and
reproduce the original MuseV to rounding; the command line's `model.dtype` defaults to "auto" (bfloat16
where the hardware computes it, about 4x faster on such a CPU, `device.resolve_dtype`). The VAE stays
float32 in every case, as MuseV keeps it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from .clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection
from .controlnet import ControlNet, ControlNetConfig
from .device import model_dtype, resolve_device
from .ip_adapter import ImageProjection, ImageProjectionConfig
from .limits import file_stem
from .lora import load_lora, merge_lora, unmerge_lora
from .prompts import DEFAULT_NEGATIVE_PROMPT, load_textual_inversion, save_textual_inversion
from .referencenet import ReferenceNet
from .samplers import SD15_SCHEDULER, SchedulerConfig
from .settings import ConfigError
from .tokenizer import CLIPTokenizer
from .unet import UNet3D, UNet3DConfig
from .vae import AutoencoderKL, VAEConfig
from .weights import (
    EMBEDDING_SUFFIXES,
    CONTROLNET,
    EMBEDDINGS,
    REFERENCENET_PARTS,
    REQUIRED,
    WeightsError,
    config_from_dict,
    load_component,
    load_model,
    missing_weights,
    read_component_config,
    save_component,
)

MODEL_PARTS = REQUIRED + REFERENCENET_PARTS


def lora_list(loras) -> list[tuple[str | Path, float]]:
    """`load_loras`' argument as (path, scale) pairs: a path alone is scale 1.0."""
    items = [loras] if isinstance(loras, (str, Path)) else loras
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"loras must be a path or a list of (path, scale) pairs; got {type(loras).__name__}")
    pairs = []
    for n, item in enumerate(items):
        pair = (item, 1.0) if isinstance(item, (str, Path)) else item
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], (str, Path))
                and isinstance(pair[1], (int, float)) and not isinstance(pair[1], bool)):
            raise ConfigError(f"loras[{n}] = {item!r:.80} must be a path or a (path, scale) pair, e.g. "
                              "[(\"style.safetensors\", 0.8)]")
        pairs.append((pair[0], float(pair[1])))
    return pairs


PART_CONFIGS = {"unet": UNet3DConfig, "text_encoder": CLIPTextConfig, "referencenet": UNet3DConfig,
                "image_proj": ImageProjectionConfig, CONTROLNET: ControlNetConfig}
# Widths a part of a weights folder shares with the UNet: (part, its setting, the UNet's setting, why)
SHARED_WIDTHS = [
    ("text_encoder", "hidden_size", "cross_attention_dim", "the UNet attends to the text encoder's output"),
    ("referencenet", "block_out_channels", "block_out_channels", "its features are fused into the UNet's blocks"),
    ("referencenet", "cross_attention_dim", "cross_attention_dim", "it reads the same text / IP-Adapter tokens"),
    ("image_proj", "cross_attention_dim", "cross_attention_dim", "the UNet attends to its IP-Adapter tokens"),
    (CONTROLNET, "in_channels", "in_channels", "it reads the UNet's latents"),
    (CONTROLNET, "block_out_channels", "block_out_channels", "its residuals are added to the UNet's skip connections"),
    (CONTROLNET, "layers_per_block", "layers_per_block", "it gives one residual per UNet skip connection"),
    (CONTROLNET, "cross_attention_dim", "cross_attention_dim", "it reads the same text embeddings as the UNet"),
]


def check_parts_fit(weights_dir: Path) -> None:
    """The parts of a weights folder must agree with the UNet on the widths they pass to each other
    (SHARED_WIDTHS), checked from their JSON configs before any weights load; else a WeightsError naming
    the part, the setting, both values and the fix."""
    unet = config_from_dict(UNet3DConfig, read_component_config(weights_dir, "unet"))
    for path in sorted(weights_dir.glob("*.json")):
        part = CONTROLNET if path.stem.startswith(CONTROLNET) else path.stem
        rules = [rule for rule in SHARED_WIDTHS if rule[0] == part]
        config = config_from_dict(PART_CONFIGS[part], read_component_config(weights_dir, path.stem)) if rules else None
        for _, key, unet_key, why in rules:
            ours, theirs = getattr(config, key), getattr(unet, unet_key)
            if ours != theirs:
                raise WeightsError(f"{path}: {key} = {ours} but the UNet's {unet_key} is {theirs} (unet.json), and "
                                   f"{why}; {path.stem} was made for another base model: convert one made for this "
                                   "UNet's base into the folder")


def _load(cls, config_cls, weights_dir: Path, name: str, device, dtype):
    state, config = load_component(weights_dir, name)
    source = str(weights_dir / f"{name}.safetensors")
    return load_model(cls, config_from_dict(config_cls, config), state, source, device, dtype).eval()


class MuseVModels:
    """The models a pipeline runs (the UNet, VAE and text encoder; the ReferenceNet, IP-Adapter projection and
    CLIP image encoder of the referencenet models; ControlNets by name) and what was merged into them."""

    def __init__(self, unet: UNet3D, vae: AutoencoderKL, text_encoder, tokenizer, scheduler: SchedulerConfig,
                 referencenet: ReferenceNet | None = None, image_proj: ImageProjection | None = None,
                 image_encoder: CLIPVisionModelWithProjection | None = None,
                 controlnets: dict[str, ControlNet] | None = None):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler = scheduler
        self.referencenet, self.image_proj, self.image_encoder = referencenet, image_proj, image_encoder
        self.controlnets = controlnets or {}  # name (weights-folder component) -> ControlNet
        self.files: list[str] = []  # what was loaded, for the sidecar
        self.textual_inversions: dict[str, torch.Tensor] = {}  # word -> its vectors
        self.loras: list[tuple[str, float]] = []  # (file, scale) merged into the UNet and text encoder
        self.lora_originals: dict[torch.nn.Module, torch.Tensor] = {}  # layer -> its weight before any LoRA
        self.negative_prompt = DEFAULT_NEGATIVE_PROMPT  # when a call gives none: MuseV's default preset (the demo's is V1)

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    def to(self, *args, device=None, dtype=None) -> MuseVModels:
        """Move every model to a device and (except the VAE, which stays float32) to a dtype, given as diffusers
        takes them: `to(device)`, `to(dtype)`, `to(device, dtype)`, or as keywords. The device must be one
        this torch has (`resolve_device`), the dtype one of settings.DTYPES (`model_dtype`)."""
        if len(args) == 1 and isinstance(args[0], torch.dtype):
            args = (None, args[0])
        if len(args) > 2 or (args and isinstance(args[0], torch.dtype)):
            raise ConfigError(f"to() takes (device), (dtype) or (device, dtype); got {args!r:.80}")
        given = dict(zip(("device", "dtype"), args))
        for key, value in (("device", device), ("dtype", dtype)):
            if value is not None and given.get(key) is not None:
                raise ConfigError(f"to(): {key} given twice, as an argument and as {key}=; give it once")
        device = given.get("device") if device is None else device
        dtype = given.get("dtype") if dtype is None else dtype
        device = None if device is None else resolve_device(device)
        dtype = None if dtype is None else model_dtype(dtype, "dtype", device or str(self.device))
        for name in MODEL_PARTS:
            model = getattr(self, name)
            if model is not None:
                model.to(device=device, dtype=None if name == "vae" else dtype)
        for net in self.controlnets.values():
            net.to(device=device, dtype=dtype)
        return self

    @classmethod
    def from_pretrained(cls, weights_dir: str | Path, device="cpu", dtype=torch.float32,
                        torch_dtype=None) -> MuseVModels:
        """Load a folder written by the converters (see weights/README.md). `torch_dtype` is diffusers'
        name for `dtype`; either is a torch.dtype or a name (`model_dtype`: "float16", "bfloat16", "float32",
        "auto"); the VAE stays in float32 either way. The parts' widths are checked against each other first
        (`check_parts_fit`)."""
        device = resolve_device(device)
        dtype = model_dtype(dtype, "dtype", device)
        if torch_dtype is not None:
            wanted = model_dtype(torch_dtype, "torch_dtype", device)
            if dtype not in (torch.float32, wanted):
                raise ConfigError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree; give one of them")
            dtype = wanted
        weights_dir = Path(weights_dir)
        missing = missing_weights(weights_dir)
        if missing:
            raise WeightsError(f"{weights_dir}: missing {', '.join(missing)}; see weights/README.md to fetch them")
        check_parts_fit(weights_dir)
        unet = _load(UNet3D, UNet3DConfig, weights_dir, "unet", device, dtype)
        vae = _load(AutoencoderKL, VAEConfig, weights_dir, "vae", device, torch.float32)  # VAE in fp32, as MuseV
        text_encoder = _load(CLIPTextModel, CLIPTextConfig, weights_dir, "text_encoder", device, dtype)
        tokenizer = CLIPTokenizer.from_folder(weights_dir / "tokenizer")
        extra = {}
        if (weights_dir / "referencenet.json").is_file():
            extra = dict(
                referencenet=_load(ReferenceNet, UNet3DConfig, weights_dir, "referencenet", device, dtype),
                image_proj=_load(ImageProjection, ImageProjectionConfig, weights_dir, "image_proj", device, dtype),
                image_encoder=_load(CLIPVisionModelWithProjection, CLIPVisionConfig, weights_dir, "image_encoder",
                                    device, dtype),
            )
        extra["controlnets"] = {path.stem: _load(ControlNet, ControlNetConfig, weights_dir, path.stem, device, dtype)
                                for path in sorted(weights_dir.glob("controlnet*.json"))}
        pipe = cls(unet, vae, text_encoder, tokenizer, SchedulerConfig.from_json(weights_dir / "scheduler.json"), **extra)
        embeddings = sorted(p for p in (weights_dir / EMBEDDINGS).glob("*") if p.suffix in EMBEDDING_SUFFIXES)
        for path in embeddings:
            pipe.load_textual_inversion(path)
        pipe.files = sorted(str(p) for p in weights_dir.glob("*.safetensors")) + [str(p) for p in embeddings]
        return pipe

    def load_textual_inversion(self, path: str | Path, word: str | None = None) -> str:
        """Add an A1111 textual-inversion embedding (.pt / .safetensors); its word (default: the file
        name) can then be used in prompts. Returns the word."""
        word = file_stem("textual-inversion word", word or Path(path).stem)  # save_pretrained names a file by it
        ids = load_textual_inversion(path, self.tokenizer, self.text_encoder, word)
        table = self.text_encoder.text_model.embeddings.token_embedding.weight
        self.textual_inversions[word] = table[ids[0] : ids[-1] + 1].detach().cpu().clone()
        return word

    def load_loras(self, loras) -> list[dict[str, int]]:
        """Merge LoRA files (kohya / A1111 or diffusers / PEFT), each with its scale, into the layers of the
        UNet and text encoder they name (an SD1.5 LoRA: the UNet's spatial layers); `unload_loras` restores
        the weights bitwise. `loras` is a list of (path, scale) pairs; a path alone (one file, or a list item)
        is taken at scale 1.0. Returns, per file, the layers it changed (`lora.merge_lora`)."""
        loras = lora_list(loras)
        merged = merge_lora(self.unet, self.text_encoder, [(load_lora(path), scale) for path, scale in loras],
                            self.lora_originals)
        self.loras += [(str(path), scale) for path, scale in loras]
        return merged

    def unload_loras(self) -> None:
        unmerge_lora(self.lora_originals)
        self.loras = []

    def save_pretrained(self, weights_dir: str | Path) -> None:
        """Write the folder `from_pretrained` reads: one safetensors + JSON config per component. The names of
        files (ControlNets, textual-inversion words) are checked before anything is written."""
        weights_dir = Path(weights_dir)
        for where, names in (("ControlNet name", self.controlnets), ("textual-inversion word", self.textual_inversions)):
            for name in names:
                file_stem(where, name)
        for name in MODEL_PARTS:
            model = getattr(self, name)
            if model is not None:
                state = model.state_dict()
                if name == "text_encoder":  # the base vocabulary; added words go to embeddings/
                    key = "text_model.embeddings.token_embedding.weight"
                    state[key] = state[key][: self.tokenizer.base_vocab_size]
                save_component(weights_dir, name, state, dataclasses.asdict(model.config))
        for name, net in self.controlnets.items():
            save_component(weights_dir, name, net.state_dict(), dataclasses.asdict(net.config))
        for word, vectors in self.textual_inversions.items():
            save_textual_inversion(weights_dir / EMBEDDINGS, word, vectors)
        self.tokenizer.save(weights_dir / "tokenizer")
        (weights_dir / "scheduler.json").write_text(json.dumps(dataclasses.asdict(self.scheduler), indent=2) + "\n")

    @classmethod
    def demo(cls, seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32) -> MuseVModels:
        """The `tiny` preset at seeded random weights with a byte-level tokenizer: exercises every part
        of the pipeline offline in seconds. A pipeline demo, not a trained model: its videos are noise.

        In float32 unless `dtype` says otherwise (the VAE stays float32), as `from_pretrained`; the CLI's
        demo (`model.preset = "tiny"`) runs in `model.dtype`, "auto" by default: bfloat16 on bfloat16
        hardware, as it says on stderr. Its default negative prompt is the preset V1: the byte-level
        tokenizer spends a token per letter, and MuseV's default V2 would be cut at 225 tokens."""
        device = resolve_device(device)
        torch.manual_seed(seed)
        tokenizer = CLIPTokenizer.byte_level()
        unet_config = UNet3DConfig.preset("tiny")
        text_config = CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=unet_config.cross_attention_dim,
                                     intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        vision_config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, patch_size=32, projection_dim=64)
        models = dict(
            unet=UNet3D(unet_config),
            vae=AutoencoderKL(VAEConfig(block_out_channels=(16, 16, 16, 16), norm_num_groups=8, layers_per_block=1)),
            text_encoder=CLIPTextModel(text_config),
            referencenet=ReferenceNet(unet_config),
            image_proj=ImageProjection(ImageProjectionConfig(vision_config.projection_dim, unet_config.cross_attention_dim)),
            image_encoder=CLIPVisionModelWithProjection(vision_config),
        )
        controlnet = ControlNet(ControlNetConfig(block_out_channels=(32, 32, 32, 32), heads=2, norm_num_groups=16,
                                                 cross_attention_dim=32, conditioning_embedding_out_channels=(8, 8, 16, 16)))
        models = {k: m.to(device).eval() for k, m in models.items()}
        pipe = cls(tokenizer=tokenizer, scheduler=SchedulerConfig.from_dict(SD15_SCHEDULER),
                   controlnets={CONTROLNET: controlnet.to(device).eval()}, **models)
        pipe.negative_prompt = "V1"
        return pipe.to(dtype=dtype)
