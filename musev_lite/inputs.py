"""What a run reads, per its configuration: the input files, read before any model is loaded (the images,
the LoRA files and prompts checked, the video2video videos, keypoints and controls), then the models
(`load_pipeline`); and what they are, said on stderr. A mistake in any of them is one error (a ValueError)
naming the setting or the file, raised before anything is written.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import distributed
from .config import RunConfig
from .pipeline import MuseVPipeline
from .plan import ControlVideo
from .pose import PoseFrame, draw_pose, read_keypoints
from .prompts import NEGATIVE_PROMPTS, parse_weights
from .settings import ConfigError
from .unet import compile_model
from .video_io import VideoFrames, read_image, read_video
from .weights import missing_weights

DEMO_NOTE = ("note: preset 'tiny' runs seeded random weights: a pipeline demo, not a trained model, so its frames "
             "are noise. Set preset = \"musev_referencenet\" and a converted weights_dir for real videos.")


@dataclass
class RunInputs:
    """The run's inputs as read (`read_inputs`)."""

    images: dict[str, Image.Image]  # input.image, refer_image, ip_adapter_image: those that are set, by key
    video: VideoFrames | None  # input.video (video2video)
    sources: list[VideoFrames | list[PoseFrame]]  # each [[input.control]]: a video, or keypoints drawn later


def read_inputs(config: RunConfig) -> RunInputs:
    """Every input file of `config`, opened and checked."""
    return RunInputs(check_inputs(config), *read_videos(config))


def check_inputs(config: RunConfig) -> dict:
    """Open every input image now (and see that every LoRA file is there and the prompts parse), so a
    mistake fails before any model is loaded or any output folder made."""
    for n, entry in enumerate(config.model.lora):
        if not Path(entry.path).is_file():
            raise ConfigError(f"model.lora[{n}].path: {entry.path}: no such file{config.path_note(f'model.lora[{n}].path')}")
    for key in ("prompt", "negative_prompt"):
        text = getattr(config.input, key) or ""
        try:
            parse_weights(NEGATIVE_PROMPTS.get(text, text))
        except ValueError as err:
            raise ConfigError(f"input.{key}: {err}") from None
    images = {}
    for key in ("image", "refer_image", "ip_adapter_image"):
        path = getattr(config.input, key)
        if path:
            try:
                images[key] = read_image(path)
            except ValueError as err:
                raise ConfigError(f"input.{key}: {err}{config.path_note(f'input.{key}')}") from None
    return images


def read_videos(config: RunConfig) -> tuple[VideoFrames | None, list]:
    """video2video inputs, read now so a bad file fails before any model is loaded: the RGB video and
    every control (a video as VideoFrames, keypoint JSON as its PoseFrames), sampled alike."""
    i = config.input
    fps, sample_rate = (i.video_fps, 1) if i.video_fps else (None, i.video_sample_rate)  # config.check: not both

    def read(path, where):
        try:
            return read_video(path, fps=fps, sample_rate=sample_rate)
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None

    video = read(i.video, "input.video") if i.video else None
    controls = []
    for n, c in enumerate(i.control):
        where = f"input.control[{n}]"
        if Path(c.path).is_dir() or c.path.endswith(".json"):
            if i.video_fps:
                raise ConfigError(f"{where}: keypoint JSON has no frame rate, so input.video_fps cannot apply; "
                                  "use input.video_sample_rate")
            try:
                poses = read_keypoints(c.path, tuple(c.pose_canvas) or None)[::i.video_sample_rate]
            except ValueError as err:
                raise ConfigError(f"{where}: {err}") from None
            controls.append(poses)
        else:
            controls.append(read(c.path, where))
    lengths = {name: len(source.frames) if isinstance(source, VideoFrames) else len(source)
               for name, source in [("input.video", video)] + [(f"input.control[{n}]", c) for n, c in enumerate(controls)]
               if source is not None}
    for name, length in lengths.items():
        if length < 2:
            raise ConfigError(f"{name} gives {length} frame(s); video2video needs at least 2 (frame 0 pairs with the "
                              "condition image, the others are generated)")
    if len(set(lengths.values())) > 1:
        raise ConfigError(f"the videos give different numbers of frames ({', '.join(f'{k}: {v}' for k, v in lengths.items())}); "
                          "use videos of the same length and frame rate")
    return video, controls


def control_videos(config: RunConfig, controls: list, height: int, width: int) -> list[ControlVideo]:
    """The controls as the pipeline takes them; keypoints are drawn at the video size."""
    out = []
    for c, source in zip(config.input.control, controls):
        if isinstance(source, VideoFrames):
            out.append(ControlVideo(source.frames, c.controlnet, c.scale))
        else:
            frames = np.stack([draw_pose(frame, height, width) for frame in source])
            out.append(ControlVideo(frames, c.controlnet, c.scale, at_video_size=True))
    return out


def with_video_motion_speed(config: RunConfig, inputs: RunInputs, say: bool = False) -> RunConfig:
    """A video2video run without generation.motion_speed takes the rate its frames were taken at, as MuseV's
    video2video gives the UNet its video reader's sample rate: input.video_sample_rate, or with
    input.video_fps the source's frame rate over it; `say`: on stderr (rank 0's)."""
    g, i = config.generation, config.input
    if g.motion_speed is not None or (inputs.video is None and not inputs.sources):
        return config
    videos = [s for s in [inputs.video, *inputs.sources] if isinstance(s, VideoFrames) and s.source_fps]
    rate = videos[0].source_fps / i.video_fps if i.video_fps and videos else float(i.video_sample_rate)
    if say and distributed.is_main():
        print(f"motion_speed: {rate:.4g}, the rate the video's frames were taken at, as MuseV's video2video "
              "(set generation.motion_speed to choose)", file=sys.stderr)
    return dataclasses.replace(config, generation=g.replace(motion_speed=rate))


def describe_video2video(video: VideoFrames | None, controls: list) -> str:
    """What video2video will do, for stderr: which frames were read and how many are generated."""
    lengths = [len(video.frames)] if video is not None else []
    lengths += [len(c.frames) if isinstance(c, VideoFrames) else len(c) for c in controls]
    parts = []
    for name, source in [("input.video", video)] + [(f"input.control[{n}]", c) for n, c in enumerate(controls)]:
        if isinstance(source, VideoFrames):
            parts.append(f"{name}: {len(source.frames)} of {source.source_frames} frames "
                         f"({source.source_fps or 0:.4g} fps -> {source.fps or 0:.4g} fps)")
        elif source is not None:
            parts.append(f"{name}: {len(source)} keypoint frames")
    return (f"video2video: {'; '.join(parts)}; frame 0 pairs with the condition image, the other "
            f"{min(lengths) - 1} frames are generated in one parallel-denoising pass")


def size_note(image, height: int, width: int, config: RunConfig) -> str:
    """Where the video's size comes from, for stderr."""
    g = config.generation
    if g.height and g.width:
        return f"size: {height}x{width} (height x width: generation.height, generation.width)"
    choose = "set generation.height/width to choose"
    if image is None:
        return f"size: {height}x{width} (height x width), MuseV's default without an image ({choose})"
    return f"size: {height}x{width} (height x width) from the image's {image.height}x{image.width} ({choose})"


def load_pipeline(config: RunConfig, device: str, dtype: torch.dtype) -> MuseVPipeline:
    """The models `config` names on `device` in `dtype` (resolved from model.device and model.dtype): the
    demo's seeded random weights, or a converted weights folder checked to hold the preset's models; its
    LoRAs merged, the UNet compiled if asked. What was chosen is said on stderr (rank 0's)."""
    m = config.model
    if m.dtype == "auto" and distributed.is_main():
        why = "this device computes it in hardware" if dtype == torch.bfloat16 else "this device has no bfloat16 hardware"
        print(f"dtype: {str(dtype).removeprefix('torch.')} (model.dtype = \"auto\": {why}; set \"float32\" to "
              "reproduce the original MuseV to rounding)", file=sys.stderr)
    if m.preset == "tiny":
        if distributed.is_main():
            print(DEMO_NOTE, file=sys.stderr)
        pipe = MuseVPipeline.demo(seed=0, device=device, dtype=dtype)
    else:
        missing = missing_weights(m.weights_dir)
        if missing:
            raise ConfigError(
                f"model.weights_dir {m.weights_dir!r} lacks {', '.join(missing)}{config.path_note('model.weights_dir')}; "
                f"fetch and convert them with: python -m musev_lite.fetch {m.preset} --dest {m.weights_dir}   "
                "(see weights/README.md)")
        pipe = MuseVPipeline.from_pretrained(m.weights_dir, device=device, dtype=dtype)
        folder_has_referencenet = pipe.referencenet is not None
        if folder_has_referencenet != (m.preset != "musev"):
            holds = "a referencenet model" if folder_has_referencenet else "the musev model (no ReferenceNet)"
            raise ConfigError(f"model.preset = {m.preset!r} but model.weights_dir {m.weights_dir!r} holds {holds}; "
                              "set the preset that matches the folder, or point weights_dir at the right folder")
    if m.lora:
        merged = pipe.load_loras([(entry.path, entry.scale) for entry in m.lora])
        if distributed.is_main():
            for entry, layers in zip(m.lora, merged):
                print(f"lora: {Path(entry.path).name} (scale {entry.scale:g}): {lora_summary(layers)}", file=sys.stderr)
    if m.compile:
        pipe.unet = compile_model(pipe.unet)
    return pipe


def lora_summary(layers: dict[str, int]) -> str:
    """What merging a LoRA changed, from `merge_lora`'s counts."""
    temporal = layers["unet_temporal"] or "none"
    return (f"merged into {layers['unet']} UNet layers ({temporal} temporal) and {layers['text_encoder']} "
            "text-encoder layers")
