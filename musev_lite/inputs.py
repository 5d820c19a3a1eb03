"""What a run reads, per its configuration: the input files, read before any model is loaded (the images,
the LoRA files and prompts checked, the video2video videos, keypoints and controls, the face embedding of
IPAdapterFaceID: a file, or a face image through insightface where it is installed), then the models
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
from .ip_adapter import face_embedding_checked
from .settings import ConfigError
from .unet import compile_model
from .video_io import VideoFrames, read_image, read_video
from .weights import missing_weights, read_state_dict

DEMO_NOTE = ("note: preset 'tiny' runs seeded random weights: a pipeline demo, not a trained model, so its frames "
             "are noise. Set preset = \"musev_referencenet\" and a converted weights_dir for real videos.")


@dataclass
class RunInputs:
    """The run's inputs as read (`read_inputs`)."""

    images: dict[str, Image.Image]  # input.image, refer_image, ip_adapter_image: those that are set, by key
    video: VideoFrames | None  # input.video (video2video)
    sources: list[VideoFrames | list[PoseFrame]]  # each [[input.control]]: a video, or keypoints drawn later
    face: torch.Tensor | None = None  # input.face_embedding (or face_image's): checked, (512,) of norm 1

    def references(self) -> dict:
        """The pipeline's keywords for the reference inputs read: the ReferenceNet and IP-Adapter images, the face."""
        return dict(refer_image=self.images.get("refer_image"), ip_adapter_image=self.images.get("ip_adapter_image"),
                    face_embedding=self.face)


def read_inputs(config: RunConfig) -> RunInputs:
    """Every input file of `config`, opened and checked."""
    return RunInputs(check_inputs(config), *read_videos(config), read_face(config))


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


NO_INSIGHTFACE = ("input.face_image needs insightface to find the face and embed it; it is not installed (nor a "
                  "dependency of musev_lite): make face.npy where insightface is (README: IPAdapterFaceID, four "
                  "lines) and set input.face_embedding = \"face.npy\" instead of input.face_image")


def read_face(config: RunConfig) -> torch.Tensor | None:
    """IPAdapterFaceID's face embedding: input.face_embedding (.npy, or .safetensors holding one tensor), or
    the first face insightface finds in input.face_image; checked (`face_embedding_checked`)."""
    i = config.input
    if i.face_image:
        return face_from_image(i.face_image, config.path_note("input.face_image"))
    if not i.face_embedding:
        return None
    path, where = Path(i.face_embedding), f"input.face_embedding: {i.face_embedding}"
    if not path.is_file():
        raise ConfigError(f"{where}: no such file{config.path_note('input.face_embedding')}")
    if path.suffix == ".npy":
        try:
            value = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise ConfigError(f"{where}: not a readable .npy array ({str(err).splitlines()[0]}); write it with "
                              "np.save(path, face.normed_embedding)") from None
    elif path.suffix == ".safetensors":
        tensors = read_state_dict(path)
        if len(tensors) != 1:
            raise ConfigError(f"{where}: holds {len(tensors)} tensors ({', '.join(list(tensors)[:4])}); a face "
                              "embedding file holds one, the 512-d vector")
        value = next(iter(tensors.values()))
    else:
        raise ConfigError(f"{where}: a face embedding is a .npy or .safetensors file, not {path.suffix or 'no suffix'!r}")
    return face_embedding_checked(value, where)


def face_from_image(path: str, note: str) -> torch.Tensor:
    """The normed ArcFace embedding of the first face insightface (buffalo_l, 640x640 detection, as MuseV's
    InsightFaceExtractorNormEmb) finds in the image; an error saying how to make the .npy without it."""
    where = f"input.face_image: {path}"
    try:
        import insightface.app
    except ImportError:
        raise ConfigError(NO_INSIGHTFACE) from None
    try:
        image = read_image(path)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}{note}") from None
    app = insightface.app.FaceAnalysis(name="buffalo_l", allowed_modules=["detection", "recognition"],
                                       providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=0, det_size=(640, 640))
    faces = app.get(np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1]))  # insightface takes BGR
    if not faces:
        raise ConfigError(f"{where}: insightface found no face in it; use an image with a clear, frontal face")
    return face_embedding_checked(faces[0].normed_embedding, where)


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
