"""MuseVPipeline: load the models once, then turn an image (or only a prompt) into a video.

    pipe = MuseVPipeline.from_pretrained("weights/musev_referencenet")
    video = pipe("(masterpiece, best quality), (1girl, solo), (eye blinks:1.8)", image="face.png",
                 num_frames=24, seed=1)
    video.frames  # uint8 (F, H, W, 3): the condition image, then 24 new frames

One call is five stages, each a method below (docs/method.md tells the method):
  1. `fit_images`, `encode_text`: the images fitted to the video size; the prompt pair [negative; positive];
  2. `image_conditioning`: IP-Adapter tokens and ReferenceNet features, once per call;
  3. `draw_first_frame`: without a condition image, the first frame is drawn from the prompt in 2D mode;
  4. `denoise_shots`: per shot, VideoFusion noise, then parallel denoising around the clean condition
     latent; the next shot continues from this shot's last latent. Video2video (`video=` RGB frames to
     start from and/or `control=` control videos for ControlNets) is one pass over the whole video:
     `denoise_video`;
  5. `decode`: the latents, a few frames at a time, into uint8 frames; with `hist_match`, the generated
     frames then take frame 0's colour histograms (`histmatch.match_frames`, MuseV's need_hist_match).
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import distributed
from .clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection, clip_image_preprocess
from .controlnet import ControlNet, ControlNetConfig, MultiControlNet
from .denoise import (
    ImageDenoiser,
    WindowControl,
    WindowedDenoiser,
    context_windows,
    guidance_scales,
    initial_latents,
    sample,
)
from .histmatch import match_frames
from .ip_adapter import ImageProjection, ImageProjectionConfig
from .limits import file_stem
from .lora import load_lora, merge_lora, unmerge_lora
from .memory import check_memory
from .prompts import encode_prompt_pair, load_textual_inversion, save_textual_inversion
from .referencenet import ReferenceNet
from .samplers import SD15_SCHEDULER, SchedulerConfig, make_sampler, video_fusion_noise
from .settings import DTYPES, OUTPUT_TYPES, ConfigError, GenerationConfig
from .tokenizer import CLIPTokenizer
from .unet import Conditioning, UNet3D, UNet3DConfig
from .vae import AutoencoderKL, VAEConfig
from .video_io import as_pil, crop_resize, fit_image
from .weights import (
    EMBEDDING_SUFFIXES,
    EMBEDDINGS,
    REFERENCENET_PARTS,
    REQUIRED,
    WeightsError,
    check_finite,
    config_from_dict,
    load_component,
    load_model,
    missing_weights,
    read_component_config,
    save_component,
)

DEFAULT_SIZE = (512, 320)  # (height, width) without a condition image: MuseV's training size
WORKING_SIZE = max(DEFAULT_SIZE)  # a bigger condition image is scaled down to this long side
GUIDANCE_FIX = "lower generation.guidance_scale / guidance_scale_end / ip_adapter_scale"
MODEL_PARTS = REQUIRED + REFERENCENET_PARTS


@dataclass
class Progress:
    """Passed to the callback after every sampler step and every decoded chunk."""

    stage: str  # "first_frame" | "video" | "decode"
    shot: int  # 0-based
    shots: int
    step: int  # 1-based within the stage (decode: frames done)
    steps: int  # total of the stage (decode: frames)
    unet_calls: int  # UNet calls per step


@dataclass
class ControlVideo:
    """A control video for a ControlNet (video2video): rendered pose / depth / edge frames, frame 0 for
    the condition image, frame 1 + f for generated frame f (MuseV's pairing)."""

    frames: np.ndarray  # uint8 (F, H, W, 3)
    controlnet: str = "controlnet"  # which of the pipeline's ControlNets (a weights-folder component)
    scale: float = 1.0
    at_video_size: bool = False  # the frames already have the video's size (e.g. drawn from keypoints): no crop


@dataclass
class Shot:
    """What `generate` yields when a shot is done: its frames (the condition frame first, for shot 0)."""

    index: int
    frames: np.ndarray  # uint8 (n, H, W, 3)
    latents: torch.Tensor  # (1, 4, n, H/8, W/8), clean
    seed: int | None


@dataclass
class RunState:
    """Where a generation is, after a sampler step or a shot: `generate(..., resume=state)` continues from
    it to the same video, bit for bit. Small: latents, not frames."""

    shot: int  # the shot in progress (n_batch: all done)
    step: int  # sampler steps done in it (0: not started)
    condition: torch.Tensor  # (1, 4, 1, h, w) its condition latent
    latents: torch.Tensor | None  # (1, 4, n, h, w) its latents after `step` steps; None before the first
    first_condition: torch.Tensor  # frame 0's latent (the reference images' stand-in when it was drawn)
    generator: torch.Tensor  # torch.Generator.get_state() at that point
    seed: int | None


@dataclass
class VideoResult:
    frames: np.ndarray | list[Image.Image]  # uint8 (F, H, W, 3), or PIL images
    latents: torch.Tensor  # (1, 4, F, H/8, W/8), clean
    seed: int | None


def resolve_device(device, key: str = "device") -> str:
    """`device` (a name or torch.device) checked against what this torch has; "auto" picks cuda, then mps,
    then cpu. `key` names the setting in errors."""
    name = str(device)
    has = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name == "auto":
        return next(kind for kind in ("cuda", "mps", "cpu") if has[kind])
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{key} = {name!r} is not a torch device; use \"auto\", \"cpu\", \"cuda\", "
                          "\"cuda:1\" or \"mps\"") from None
    if not has.get(device.type, False):
        raise ConfigError(f"{key} = {name!r} but this torch has no {device.type.upper()} device; "
                          f"use \"auto\" or one of {', '.join(k for k, ok in has.items() if ok)}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{key} = {name!r} but there are {torch.cuda.device_count()} CUDA devices")
    return name


def native_bfloat16(device: str) -> bool:
    """Whether `device` computes bfloat16 in hardware: a CUDA GPU that supports it, or an x86 CPU with
    AVX512-BF16 or AMX (Linux's /proc/cpuinfo says; elsewhere a CPU counts as without) whose bf16 torch's
    kernels use: oneDNN's (which `ONEDNN_MAX_CPU_ISA` can cap below it) and ATen's AVX-512 vector code
    (which `ATEN_CPU_CAPABILITY` can cap). Emulated bfloat16 is slower than float32."""
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    if device != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    onednn = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    return (("avx512_bf16" in flags or "amx_bf16" in flags) and torch.backends.cpu.get_cpu_capability() == "AVX512"
            and torch.backends.mkldnn.is_available() and onednn())


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """The models' dtype for a `model.dtype` setting on `device`. "auto" is bfloat16 where the hardware
    computes it (about 4x float32 for SD1.5's UNet on such a CPU, bench/roofline.py; frames within a few
    levels of float32's, tests/test_bf16.py) and float32 elsewhere, where emulated bfloat16 can be slower.
    float32 reproduces the original MuseV to rounding."""
    if name == "auto":
        return torch.bfloat16 if native_bfloat16(device) else torch.float32
    return getattr(torch, name)


def model_dtype(value, key: str = "dtype", device: str = "cpu") -> torch.dtype:
    """The models' dtype given as a torch.dtype or by name: one of settings.DTYPES ("auto" resolved for
    `device` by `resolve_dtype`), also written as str(torch.float16) writes it ("torch.float16"). Anything
    else is a ConfigError naming `key`. (diffusers takes a torch.dtype only and turns any other value into
    float32 with a warning; a name is accepted here, a wrong one refused.)"""
    name = str(value) if isinstance(value, torch.dtype) else value
    name = name.removeprefix("torch.") if isinstance(name, str) else None
    if name not in DTYPES:
        raise ConfigError(f"{key} = {value!r} is not one of {', '.join(DTYPES)} (a name, or torch.float32, "
                          "torch.bfloat16, torch.float16)")
    return resolve_dtype(name, device)


def fit_video_size(image_size: tuple[int, int] | None, height: int = 0, width: int = 0,
                   multiple: int = 8) -> tuple[int, int]:
    """(height, width) of a video: `height` and `width` as set; an unset one follows the condition image
    (`image_size` = (h, w)): both unset, the image scaled down (never up) to a long side of at most
    WORKING_SIZE, aspect kept; one set, the other by the image's aspect. Without an image, MuseV's 512x320.
    Then floored to `multiple`, as MuseV's scripts floor to 64. (MuseV's scripts take an image's own size,
    which for a camera photo needs far more memory than a machine has; the model was trained at 512x320.)"""
    if image_size is None:
        h, w = height or DEFAULT_SIZE[0], width or DEFAULT_SIZE[1]
    else:
        ih, iw = image_size
        if height and width:
            h, w = height, width
        elif height or width:
            h, w = height or ih * width // iw, width or iw * height // ih
        else:
            long = max(ih, iw, WORKING_SIZE)
            h, w = ih * WORKING_SIZE // long, iw * WORKING_SIZE // long
    h, w = h // multiple * multiple, w // multiple * multiple
    if h < 8 or w < 8:
        source = f" from the image's {image_size[1]}x{image_size[0]}" if image_size and not (height and width) else ""
        raise ConfigError(f"video size {w}x{h} (width x height){source} is too small; set generation.height/width "
                          f"to at least {multiple}")
    return h, w


def shot_frames(config: GenerationConfig, video, control: list, has_image: bool) -> list[int]:
    """New frames of each shot a call generates: video2video one pass over the video's frames after frame 0;
    else `num_frames` per shot, one fewer in the first when frame 0 is drawn."""
    if video is not None or control:
        return [len(video if video is not None else control[0].frames) - 1]
    return [config.num_frames - (shot == 0 and not has_image) for shot in range(config.n_batch)]


def check_resume(resume, config: GenerationConfig, latent_hw: tuple[int, int], frames: list[int]) -> None:
    """A ConfigError when `resume` is a state this call cannot have saved (`resume_problem`)."""
    problem = resume_problem(resume, config, latent_hw, frames)
    if problem:
        raise ConfigError(f"resume state: {problem}; resume with the settings and inputs that saved it (a run's "
                          "checkpoint: delete its folder to start over)")


def resume_problem(resume, config: GenerationConfig, latent_hw: tuple[int, int], frames: list[int]) -> str | None:
    """What makes `resume` a state this call cannot have saved (None: nothing): shot and step out of range,
    a seed that is no integer, latents of another shape or dtype than the call's (1, 4, frames, h, w)
    float32, a random-generator state of another size than torch's."""
    if not isinstance(resume, RunState):
        return f"resume must be a RunState (from on_state, or a checkpoint), got {type(resume).__name__}"
    whole = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    if not (whole(resume.shot) and 0 <= resume.shot <= len(frames)):
        return f"shot = {resume.shot!r}, but this call has shots 0..{len(frames) - 1} (and {len(frames)}: all done)"
    if not (whole(resume.step) and 0 <= resume.step <= config.steps):
        return f"step = {resume.step!r}, but this call has {config.steps} steps per shot"
    if not (resume.seed is None or whole(resume.seed)):
        return f"seed = {resume.seed!r} is not an integer"
    if resume.latents is not None and resume.shot == len(frames):
        return "it holds latents after the last shot"
    expected = {"condition": (1, 4, 1, *latent_hw), "first_condition": (1, 4, 1, *latent_hw)}
    if resume.latents is not None:
        expected["latents"] = (1, 4, frames[resume.shot], *latent_hw)
    for name, shape in expected.items():
        tensor = getattr(resume, name)
        if not torch.is_tensor(tensor) or tuple(tensor.shape) != shape or tensor.dtype != torch.float32:
            got = f"{tensor.dtype} {tuple(tensor.shape)}" if torch.is_tensor(tensor) else type(tensor).__name__
            return f"{name} is {got}; shot {resume.shot} of this call needs float32 {shape}"
    size = torch.Generator().get_state().shape
    if not (torch.is_tensor(resume.generator) and resume.generator.dtype == torch.uint8
            and resume.generator.shape == size):
        got = tuple(resume.generator.shape) if torch.is_tensor(resume.generator) else type(resume.generator).__name__
        return f"generator state is {got}, not torch's uint8 {tuple(size)} of a CPU generator"
    return None


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
                "image_proj": ImageProjectionConfig, "controlnet": ControlNetConfig}
# Widths a part of a weights folder shares with the UNet: (part, its setting, the UNet's setting, why)
SHARED_WIDTHS = [
    ("text_encoder", "hidden_size", "cross_attention_dim", "the UNet attends to the text encoder's output"),
    ("referencenet", "block_out_channels", "block_out_channels", "its features are fused into the UNet's blocks"),
    ("referencenet", "cross_attention_dim", "cross_attention_dim", "it reads the same text / IP-Adapter tokens"),
    ("image_proj", "cross_attention_dim", "cross_attention_dim", "the UNet attends to its IP-Adapter tokens"),
    ("controlnet", "in_channels", "in_channels", "it reads the UNet's latents"),
    ("controlnet", "block_out_channels", "block_out_channels", "its residuals are added to the UNet's skip connections"),
    ("controlnet", "layers_per_block", "layers_per_block", "it gives one residual per UNet skip connection"),
    ("controlnet", "cross_attention_dim", "cross_attention_dim", "it reads the same text embeddings as the UNet"),
]


def check_parts_fit(weights_dir: Path) -> None:
    """The parts of a weights folder must agree with the UNet on the widths they pass to each other
    (SHARED_WIDTHS), checked from their JSON configs before any weights load; else a WeightsError naming
    the part, the setting, both values and the fix."""
    unet = config_from_dict(UNet3DConfig, read_component_config(weights_dir, "unet"))
    for path in sorted(weights_dir.glob("*.json")):
        part = "controlnet" if path.stem.startswith("controlnet") else path.stem
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


class MuseVPipeline:
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
        self.negative_prompt = "V2"  # when a call gives none: MuseV's default preset (the demo's is V1)

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    def to(self, *args, device=None, dtype=None) -> MuseVPipeline:
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
                        torch_dtype=None) -> MuseVPipeline:
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
        merged = merge_lora(self.unet, self.text_encoder, [(load_lora(path), scale) for path, scale in loras])
        self.loras += [(str(path), scale) for path, scale in loras]
        return merged

    def unload_loras(self) -> None:
        unmerge_lora(self.unet, self.text_encoder)
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
    def demo(cls, seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32) -> MuseVPipeline:
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
                   controlnets={"controlnet": controlnet.to(device).eval()}, **models)
        pipe.negative_prompt = "V1"
        return pipe.to(dtype=dtype)

    # -----------------------------------------------------------------------------------------
    # One call, stage by stage

    @torch.no_grad()
    def __call__(self, *args, output_type: str = "uint8", **kwargs) -> VideoResult:
        """The whole video at once: every shot `generate` yields, joined. Takes `generate`'s arguments;
        `output_type="pil"` gives PIL images instead of a uint8 array."""
        if output_type not in OUTPUT_TYPES:
            raise ConfigError(f"output_type = {output_type!r}: use one of {', '.join(OUTPUT_TYPES)}")
        shots = list(self.generate(*args, **kwargs))
        frames = np.concatenate([shot.frames for shot in shots])
        latents = torch.cat([shot.latents for shot in shots], dim=2)
        if output_type == "pil":
            frames = [Image.fromarray(f) for f in frames]
        return VideoResult(frames, latents, shots[0].seed)

    @torch.no_grad()
    def generate(
        self,
        prompt: str = "",
        image=None,
        config: GenerationConfig | None = None,
        *,
        negative_prompt: str | None = None,
        refer_image=None,
        ip_adapter_image=None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        condition_latents: torch.Tensor | None = None,
        video: np.ndarray | None = None,
        control: ControlVideo | list[ControlVideo] | None = None,
        fit_images: bool = True,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        callback: Callable[[Progress], None] | None = None,
        resume: RunState | None = None,
        on_state: Callable[[RunState], None] | None = None,
        **settings,
    ) -> Iterator[Shot]:
        """Generate `n_batch` shots of `num_frames` new frames after the condition image, yielding each
        shot's decoded frames as it is done, so a long video never sits in memory as a whole.

        `config` holds the generation settings (MuseV's defaults); keyword `settings` override some of
        them, e.g. `pipe(prompt, image, steps=4)`. Without `image` the first frame is drawn from the
        prompt and the first shot adds `num_frames - 1`. `negative_prompt`: a preset (Empty, V1..V5) or
        text; None is the pipeline's `negative_prompt` (MuseV's V2; V1 for `demo`). `prompt_embeds` /
        `negative_prompt_embeds` (1, L, D) skip the text encoder. `condition_latents` (1, 4, 1, h, w) is
        frame 0 as a latent, instead of `image`. `fit_images=False`: the images already have the video's
        size and are used as they are (MuseV's centre crop is not the identity even at that size).
        `latents` (1,4,F,h,w): the first shot's starting noise instead of a draw. `generator` instead of
        `config.seed`.
        `on_state(RunState)` is called after every sampler step and every shot; `resume=` one of those
        states (with the same arguments otherwise) continues from it: the shots after it are yielded
        and equal those of the uninterrupted run.

        Video2video: `video` (F, H, W, 3) uint8 RGB frames to start from (SDEdit, `video_strength`) and/or
        `control`, one control video per ControlNet (a `ControlVideo` or a list of them); all F frames long.
        Frame 0 pairs with the condition image (the RGB video's frame 0 when no `image` is given); the other
        F - 1 frames are generated in one parallel-denoising pass, whatever `num_frames` / `n_batch` say.
        """
        config = self.generation_config(config, settings)
        image, video, control, (height, width) = self.checked(image, config, video, control, condition_latents)
        has_image = image is not None or condition_latents is not None
        negative_prompt = self.negative_prompt if negative_prompt is None else negative_prompt
        if resume is not None:
            check_resume(resume, config, (height // 8, width // 8), shot_frames(config, video, control, has_image))
        seed = config.seed if resume is None else resume.seed
        if generator is None:
            seed = random.randrange(10**8) if seed is None else seed
            ranks = distributed.current()
            if ranks is not None:  # distributed: every rank draws rank 0's noise
                seed = ranks.broadcast_seed(seed)
            generator = torch.Generator("cpu").manual_seed(seed)
        elif not isinstance(generator, torch.Generator):
            raise ConfigError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        report = callback or (lambda progress: None)
        image, refer_image, ip_adapter_image = self.fit_images(image, refer_image, ip_adapter_image, height, width,
                                                               fit_images)
        video, control = self.fit_videos(video, control, height, width, fit_images)
        text = self.encode_text(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        if resume is not None:
            condition = resume.first_condition.to(self.device)
        else:
            condition = self.condition_latent(image, condition_latents, refer_image, ip_adapter_image, text,
                                              (height, width), config, generator, report)
        if image is None or config.redraw_condition_image:
            # frame 0 as an image stands in for missing reference images; a redraw replaces them
            frame0 = Image.fromarray(self.decode(condition)[0])
            refer_image = frame0 if config.redraw_condition_image or refer_image is None else refer_image
            ip_adapter_image = frame0 if config.redraw_condition_image or ip_adapter_image is None else ip_adapter_image
        cond = self.image_conditioning(refer_image, ip_adapter_image, text, config)
        if resume is None:
            resume = RunState(0, 0, condition, None, condition, generator.get_state(), seed)
        else:
            generator.set_state(resume.generator)

        def state(shot: int, step: int, shot_condition, latents) -> None:
            if on_state is not None:
                on_state(RunState(shot, step, shot_condition, latents, condition, generator.get_state(), seed))

        if video is None and not control:
            shots = self.denoise_shots(cond, config, generator, latents, report, not has_image, resume, state)
            total = config.n_batch * config.num_frames + has_image  # frames of the whole video
        else:
            shots = self.denoise_video(cond, config, generator, video, control, report, resume, state)
            total = len(video if video is not None else control[0].frames)
        decoded, reference = 0, None
        for index, shot_latents in shots:
            frames = self.decode(shot_latents, progress=lambda done, _: report(
                Progress("decode", index, config.n_batch, decoded + done, total, 0)))
            decoded += len(frames)
            if config.hist_match:  # MuseV's need_hist_match: each generated frame gets frame 0's histograms
                if reference is None:  # frame 0: shot 0's first frame, or decoded again when resuming after it
                    reference = (frames[0].copy() if index == 0 else
                                 self.frame_0(condition, shot_frames(config, video, control, has_image)[0] + 1))
                generated = frames[1:] if index == 0 else frames  # a view: frame 0 is left as it is
                generated[:] = match_frames(generated, reference)
            yield Shot(index, frames, shot_latents, seed)

    def check(self, image=None, config: GenerationConfig | None = None, *, video: np.ndarray | None = None,
              control: list[ControlVideo] | None = None, condition_latents: torch.Tensor | None = None,
              **settings) -> tuple[int, int]:
        """The checks `generate` makes before it starts working, without the work: the settings, the
        videos and the ControlNets they name, the video's size, and that there is memory for it
        (`check_memory`). Raises the ConfigError `generate` would; returns (height, width). For callers
        that must not start unless the call can run (the CLI makes no output folder before)."""
        return self.checked(image, self.generation_config(config, settings), video, control, condition_latents)[3]

    @staticmethod
    def generation_config(config: GenerationConfig | None, overrides: dict) -> GenerationConfig:
        """`config` (MuseV's defaults when None) with keyword `overrides`."""
        if config is not None and not isinstance(config, GenerationConfig):
            raise ConfigError(f"config must be a GenerationConfig or None, got {type(config).__name__} {config!r:.40}; "
                              "give settings as keywords, e.g. pipe(prompt, image, steps=4)")
        return (config or GenerationConfig()).replace(**overrides)

    def checked(self, image, config: GenerationConfig, video, control, condition_latents):
        """(image, video, control, (height, width)) after `check`'s checks; the RGB video's frame 0 is the
        condition image when none is given."""
        control = [control] if isinstance(control, ControlVideo) else [] if control is None else control
        video, control = self.check_videos(video, control, image, condition_latents)
        if video is not None and image is None and condition_latents is None:
            image = video[0]  # the RGB video's first frame is the condition image
        config.validate(has_image=image is not None or condition_latents is not None)
        height, width = self.video_size(image, condition_latents, config)
        if video is None and not control:
            check_memory(self, height, width, config)
        else:  # video2video: one pass over the video's frames
            length = len(video if video is not None else control[0].frames)
            check_memory(self, height, width, config.replace(num_frames=length - 1, n_batch=1), length * len(control))
        return image, video, control, (height, width)

    def condition_latent(self, image, condition_latents, refer_image, ip_adapter_image, text, size: tuple[int, int],
                         config: GenerationConfig, generator, report) -> torch.Tensor:
        """Frame 0's clean latent (1, 4, 1, h, w): given, the image's, or drawn in 2D mode (no image, or
        MuseV's img2img redraw of the image)."""
        if condition_latents is not None:
            if image is not None or config.redraw_condition_image:
                raise ConfigError("condition_latents replace the condition image: give no image and leave "
                                  "redraw_condition_image off")
            return self.check_condition_latents(condition_latents, *size)
        if image is not None and not config.redraw_condition_image:
            return self.encode_images([image])[:, :, None]  # 1 4 1 h w
        first = self.image_conditioning(refer_image, ip_adapter_image, text, config)
        return self.draw_first_frame(image, first, (size[0] // 8, size[1] // 8), config, generator, report)

    @staticmethod
    def video_size(image, condition_latents, config: GenerationConfig) -> tuple[int, int]:
        """(height, width) of the video: `fit_video_size` of the condition image, or the condition latent's."""
        if condition_latents is not None:  # the latent fixes the size
            h, w = condition_latents.shape[-2] * 8, condition_latents.shape[-1] * 8
            return fit_video_size(None, config.height or h, config.width or w, config.size_multiple)
        size = None if image is None else as_pil(image).size[::-1]
        return fit_video_size(size, config.height, config.width, config.size_multiple)

    @staticmethod
    def fit_images(image, refer_image, ip_adapter_image, height: int, width: int, fit: bool = True):
        """The condition, ReferenceNet and IP-Adapter images as RGB PIL images of the video's size (the
        reference images default to the condition image). `fit=False`: they must have that size."""

        def fitted(im, name):
            im = as_pil(im)
            if fit:
                return fit_image(im, height, width)
            if im.size != (width, height):
                raise ConfigError(f"{name} is {im.width}x{im.height} but the video is {width}x{height}; "
                                  "pass fit_images=True to centre-crop and resize it")
            return im

        image = None if image is None else fitted(image, "image")
        refer_image = image if refer_image is None else fitted(refer_image, "refer_image")
        ip_adapter_image = image if ip_adapter_image is None else fitted(ip_adapter_image, "ip_adapter_image")
        return image, refer_image, ip_adapter_image

    def encode_text(self, prompt: str, negative_prompt: str, prompt_embeds=None, negative_prompt_embeds=None):
        """(2, L, D) text embeddings [negative; positive], from the prompts or given embeddings."""
        if prompt_embeds is None:
            if negative_prompt_embeds is not None:
                raise ConfigError("negative_prompt_embeds given without prompt_embeds; give both, or prompts")
            return encode_prompt_pair(self.tokenizer, self.text_encoder, prompt, negative_prompt).to(self.device)
        if negative_prompt_embeds is None:
            negative_prompt_embeds = encode_prompt_pair(self.tokenizer, self.text_encoder, "", negative_prompt)[:1]
        width = self.unet.config.cross_attention_dim
        for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if embeds.ndim != 3 or embeds.shape[0] != 1 or embeds.shape[2] != width:
                raise ConfigError(f"{name} must be (1, tokens, {width}); got {tuple(embeds.shape)}")
        if prompt_embeds.shape[1] != negative_prompt_embeds.shape[1]:
            raise ConfigError(f"prompt_embeds has {prompt_embeds.shape[1]} tokens, the negative prompt "
                              f"{negative_prompt_embeds.shape[1]}; pass negative_prompt_embeds of the same length")
        return torch.cat([negative_prompt_embeds, prompt_embeds]).to(self.device, self.dtype)

    def check_condition_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        shape = (1, 4, 1, height // 8, width // 8)
        if tuple(latents.shape) != shape:
            raise ConfigError(f"condition_latents have shape {tuple(latents.shape)}; this call needs {shape} "
                              "(batch, channels, one frame, height/8, width/8)")
        return latents.to(self.device, torch.float32)

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> clean latents (n, 4, h, w): VAE posterior mean x scaling factor."""
        pixels = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).contiguous()
        pixels = pixels.to(self.device, torch.float32) / 127.5 - 1  # n 3 H W in [-1, 1]
        return check_finite(self.vae.encode(pixels), "image encoding (VAE)")

    @torch.no_grad()
    def image_conditioning(self, refer_image, ip_image, text: torch.Tensor, config: GenerationConfig) -> Conditioning:
        """The text, plus IP-Adapter tokens [proj(0); proj(clip(image))] and ReferenceNet features (of
        the same image, made with each half's IP tokens or text) when the model has them, all batched
        [uncond; cond]."""
        cond = Conditioning(text, motion_speed=config.motion_speed)
        if self.image_proj is not None and ip_image is not None and config.ip_adapter_scale > 0:
            pixels = clip_image_preprocess([ip_image]).to(self.device, self.image_encoder.dtype)
            embeds = self.image_encoder(pixels)
            embeds = torch.cat([torch.zeros_like(embeds), embeds])  # the uncond tokens are proj(0), not 0
            cond.ip_tokens = self.image_proj(embeds.to(self.image_proj.proj.weight.dtype))
            cond.ip_scale = config.ip_adapter_scale
        if self.referencenet is not None and refer_image is not None:
            latent = self.encode_images([refer_image]).repeat(2, 1, 1, 1)  # same latent for both halves
            context = text if cond.ip_tokens is None else cond.ip_tokens  # IP tokens when there are, else text
            cond.refer = self.referencenet(latent, torch.zeros(()), context)
        return cond

    def _unet(self, sample, t, cond: Conditioning, condition_frames: int, temporal: bool = True, lengths=None):
        return self.unet(sample, t, cond, condition_frames=condition_frames, temporal=temporal, lengths=lengths).float()

    def draw_first_frame(self, image, cond: Conditioning, shape_hw, config: GenerationConfig, generator, report):
        """Draw (no image) or redraw (img2img from `image`) one frame with the temporal layers off. Every
        rank of a distributed run draws it itself: the same UNet calls give it the same frame."""
        steps = config.first_frame_steps
        sampler = make_sampler(config.sampler, self.scheduler, steps)
        noise = torch.randn((1, 4, 1, *shape_hw), generator=generator).to(self.device)
        if image is None:
            x = noise * sampler.init_noise_sigma
        else:  # MuseV's redraw noises the image to the first timestep: its `strength` is inert
            x = sampler.add_noise(self.encode_images([image])[:, :, None], noise, 0)
        denoiser = ImageDenoiser(self._unet, cond, sampler, [config.first_frame_guidance] * steps)

        def after_step(i, x):
            check_finite(x, f"first frame, step {i + 1}/{steps}", "lower generation.first_frame_guidance")
            report(Progress("first_frame", 0, config.n_batch, i + 1, steps, denoiser.calls_per_step))

        return sample(denoiser, sampler, x, generator, callback=after_step)

    def denoise_shots(self, cond: Conditioning, config: GenerationConfig, generator, latents, report, drawn: bool,
                      resume: RunState, state) -> Iterator[tuple[int, torch.Tensor]]:
        """(shot, its latents (1, 4, n, h, w)) shot by shot, from `resume` on; shot 0's start with the
        condition latent. Each shot starts from VideoFusion noise and is denoised in parallel windows
        around its condition latent: the image's for the first shot, the last latent of the shot before
        for the others."""
        g = config
        condition = resume.condition
        shape_hw = tuple(condition.shape[-2:])
        for shot in range(resume.shot, g.n_batch):
            frames = g.num_frames - 1 if shot == 0 and drawn else g.num_frames
            sampler = make_sampler(g.sampler, self.scheduler, g.steps, noise_type="video_fusion")
            start = 0
            if shot == resume.shot and resume.latents is not None:
                x, start = resume.latents.to(self.device), resume.step
            elif shot == 0 and latents is not None:
                if tuple(latents.shape) != (1, 4, frames, *shape_hw):
                    raise ConfigError(f"latents have shape {tuple(latents.shape)}; this call needs "
                                      f"{(1, 4, frames, *shape_hw)} (batch, channels, new frames, height/8, width/8)")
                x = latents.to(self.device, torch.float32) * sampler.init_noise_sigma
            else:
                x = initial_latents((1, 4, frames, *shape_hw), generator, sampler.init_noise_sigma, g.w_ind_noise,
                                    condition, g.img_weight).to(self.device)
            x = self.denoise_shot(x, condition, cond, sampler, config, generator, report, shot, start=start,
                                  state=lambda step, x, shot=shot, c=condition: state(shot, step, c, x))
            yield shot, (torch.cat([condition, x], dim=2) if shot == 0 else x)
            condition = x[:, :, -1:]  # the next shot continues from this shot's last frame
            state(shot + 1, 0, condition, None)

    def denoise_video(self, cond: Conditioning, config: GenerationConfig, generator, video: torch.Tensor | None,
                      control: list[ControlVideo], report, resume: RunState, state) -> Iterator[tuple[int, torch.Tensor]]:
        """Video2video: frames 1.. of the input video(s) in one parallel-denoising pass, yielded as one shot
        (1, 4, F, h, w) with the condition latent first. With an RGB `video` the pass starts from its latents
        noised to step N (1 - video_strength) (MuseV: strength 1, the first step); else from VideoFusion
        noise as image2video. Every window's ControlNet sees the control frames of its frames."""
        g = config
        if resume.shot > 0:  # resumed after the pass: nothing is left to do
            return
        condition = resume.condition
        frames = len(video if video is not None else control[0].frames) - 1
        shape = (1, 4, frames, *condition.shape[-2:])
        sampler = make_sampler(g.sampler, self.scheduler, g.steps, noise_type="video_fusion")
        start = 0
        if resume.latents is not None:
            x, start = resume.latents.to(self.device), resume.step
        elif video is None:
            x = initial_latents(shape, generator, sampler.init_noise_sigma, g.w_ind_noise, condition,
                                g.img_weight).to(self.device)
        else:
            start = g.steps - min(int(g.steps * g.video_strength), g.steps)  # as diffusers' img2img
            init = self.encode_frames(video[1:])
            noise = video_fusion_noise(shape, generator, g.w_ind_noise).to(self.device)
            x = init if start == g.steps else sampler.add_noise(init, noise, start)
        window_control = None
        if control:
            nets = [self.controlnets[c.controlnet] for c in control]
            window_control = WindowControl(MultiControlNet(nets), [c.frames for c in control], [c.scale for c in control],
                                           g.control_guidance_start, g.control_guidance_end)
        x = self.denoise_shot(x, condition, cond, sampler, config, generator, report, 0, window_control, start,
                              state=lambda step, x: state(0, step, condition, x))
        yield 0, torch.cat([condition, x], dim=2)
        state(1, 0, x[:, :, -1:], None)

    def denoise_shot(self, x, condition, cond, sampler, config: GenerationConfig, generator, report, shot: int,
                     control: WindowControl | None = None, start: int = 0, state=None) -> torch.Tensor:
        """One parallel-denoising pass over the latents `x` around `condition`, with progress, a NaN/Inf
        check and `state(steps done, latents)` after every step."""
        g = config
        windows = context_windows(g.context_schedule, x.shape[2], g.context_frames, g.context_overlap)
        guidance = guidance_scales(g.guidance_scale, g.steps, g.guidance_scale_end, g.guidance_method)
        denoiser = WindowedDenoiser(self._unet, x, condition, cond, sampler, windows, guidance, g.window_batch, control,
                                    distributed.current())  # distributed: each rank denoises its share of the windows

        def after_step(i, latents):
            check_finite(latents, f"shot {shot + 1}/{g.n_batch}, step {i + 1}/{g.steps}", GUIDANCE_FIX)
            report(Progress("video", shot, g.n_batch, i + 1, g.steps, denoiser.calls_per_step))
            if state is not None:
                state(i + 1, latents)

        return sample(denoiser, sampler, x, generator, start, after_step)

    def check_videos(self, video, control: list[ControlVideo], image, condition_latents):
        """The RGB and control videos as uint8 tensors (F, H, W, 3) of one length F >= 2, each control
        naming a ControlNet this pipeline has; a control video needs a condition image."""
        def frames(array, what):
            array = np.asarray(array)
            if array.dtype != np.uint8 or array.ndim != 4 or array.shape[3] != 3:
                raise ConfigError(f"{what} must be uint8 frames (F, H, W, 3); got {array.dtype} {array.shape}")
            if len(array) < 2:
                raise ConfigError(f"{what} has {len(array)} frame(s); video2video needs at least 2 (frame 0 pairs "
                                  "with the condition image, the rest are generated)")
            return torch.from_numpy(np.ascontiguousarray(array))

        video = None if video is None else frames(video, "video")
        if not isinstance(control, (list, tuple)):
            raise ConfigError(f"control must be a ControlVideo or a list of them, got {type(control).__name__}")
        checked = []
        for n, c in enumerate(control):
            if not isinstance(c, ControlVideo):
                raise ConfigError(f"control[{n}] must be a ControlVideo(frames, controlnet, scale), got {type(c).__name__}")
            if c.controlnet not in self.controlnets:
                have = ", ".join(self.controlnets) or "none"
                raise ConfigError(f"control[{n}] names ControlNet {c.controlnet!r}, but this pipeline has {have}; "
                                  "convert one into the weights folder (python -m musev_lite.convert.controlnet)")
            checked.append(dataclasses.replace(c, frames=frames(c.frames, f"control[{n}] video")))
        lengths = {len(v) for v in [video] + [c.frames for c in checked] if v is not None}
        if len(lengths) > 1:
            raise ConfigError(f"the RGB and control videos have different lengths {sorted(lengths)}; give videos of "
                              "the same frames (same length and frame rate)")
        if checked and video is None and image is None and condition_latents is None:
            raise ConfigError("a control video (pose2video) needs a condition image: the person to animate "
                              "(input.image), its pose being control frame 0")
        return video, checked

    @staticmethod
    def fit_videos(video, control: list[ControlVideo], height: int, width: int, fit: bool = True):
        """Every frame crop-resized to the video size as MuseV's video reader does; `fit=False`: the
        frames must already have it."""
        def fitted(frames, what):
            if not fit:
                if tuple(frames.shape[1:3]) != (height, width):
                    raise ConfigError(f"{what} frames are {frames.shape[2]}x{frames.shape[1]} but the video is "
                                      f"{width}x{height}; pass fit_images=True to crop and resize them")
                return frames
            return torch.stack([torch.from_numpy(crop_resize(f.numpy(), height, width)) for f in frames])

        video = None if video is None else fitted(video, "video")
        control = [c if c.at_video_size and tuple(c.frames.shape[1:3]) == (height, width)
                   else dataclasses.replace(c, frames=fitted(c.frames, f"control[{n}]")) for n, c in enumerate(control)]
        return video, control

    @torch.no_grad()
    def encode_frames(self, frames: torch.Tensor, chunk_size: int = 8) -> torch.Tensor:
        """uint8 frames (F, H, W, 3) -> clean latents (1, 4, F, h, w), `chunk_size` frames at a time."""
        chunks = [self.encode_images(list(frames[i : i + chunk_size].numpy())) for i in range(0, len(frames), chunk_size)]
        return torch.cat(chunks).transpose(0, 1)[None]

    def frame_0(self, condition: torch.Tensor, shot_0_frames: int, chunk_size: int = 8) -> np.ndarray:
        """Frame 0 (H, W, 3) bit for bit as `decode` made it at the head of shot 0 (`shot_0_frames` latents):
        in a chunk of as many frames as shot 0's first, since the VAE may round one frame alone differently."""
        return self.decode(condition.expand(-1, -1, min(chunk_size, shot_0_frames), -1, -1), chunk_size)[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, chunk_size: int = 8, progress=None) -> np.ndarray:
        """(1, 4, F, h, w) -> uint8 (F, H, W, 3), `chunk_size` frames in float at a time. Distributed,
        each rank decodes a block of the chunks and every rank gets all frames."""
        frames = latents[0].transpose(0, 1)  # f 4 h w
        starts = list(range(0, len(frames), chunk_size))
        ranks = distributed.current()
        if ranks is not None:  # distributed: this rank's block of chunks
            starts = ranks.block(starts)
        chunks = []
        for start in starts:
            images = self.vae.decode(frames[start : start + chunk_size].float().to(self.device), chunk_size)
            check_finite(images, f"decoding frames {start}-{start + len(images) - 1}")
            # (x / 2 + 0.5) clamped, x255 truncated: as MuseV writes its videos
            chunks.append(((images / 2 + 0.5).clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
            if progress:
                progress(start + len(chunks[-1]), len(frames))
        if ranks is not None:  # distributed: every rank's chunks, in rank order = frame order
            chunks = [chunk for part in ranks.all_gather(chunks, "gathering the decoded frames") for chunk in part]
        return np.concatenate(chunks)
