"""Regenerate the small committed parity fixtures in tests/fixtures/ from the reference libraries.

Run by hand in a venv with the `reference` extra (diffusers, transformers); CI never runs this:

    python tests/make_fixtures.py            # every part
    python tests/make_fixtures.py samplers   # one part

Each part builds tiny, seeded reference objects, saves their weights in the published layout, their
inputs and their outputs. The tests load the weights through musev_lite and compare.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent / "fixtures"


def round_to_fp16(model):
    """Round every parameter to float16 (stored so), keep computing in float32: small, exact fixtures."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def fp16_state(model) -> dict:
    return {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}


def compact_json(value) -> str:
    """json.dumps(indent=1), with lists of scalars (and of such lists) kept on one line."""
    import re

    text = json.dumps(value, indent=1)
    for inner in (r"[^\[\]{}]", r"(?:[^\[\]{}]|\[[^\[\]{}]*\])"):
        text = re.sub(rf"\[\s+({inner}*?)\s+\]", lambda m: "[" + re.sub(r"\n\s*", " ", m.group(1)) + "]", text)
    return text


def save(part: str, name: str, tensors: dict) -> None:
    (OUT / part).mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, OUT / part / f"{name}.safetensors")


def make_samplers():
    """Timesteps, sigmas and whole step sequences of diffusers' Euler and DDIM over a grid of configs."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    # runwayml SD1.5 scheduler/scheduler_config.json as published: PNDM, no timestep_spacing key
    sd15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
            "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
            "steps_offset": 1, "trained_betas": None}
    base = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    generator = torch.Generator().manual_seed(0)
    x_T = torch.randn((1, 4, 2, 3), generator=generator)  # unit noise; times init_noise_sigma = start
    outputs = torch.randn((25, 1, 4, 2, 3), generator=generator)  # a fixed fake model output per step
    clean = torch.randn((1, 4, 2, 3), generator=generator)  # an x0 for add_noise
    cases, tensors = [], {"x_T": x_T, "model_outputs": outputs, "clean": clean}

    def record(name, config, steps, eta=0.0):
        scheduler = {"euler": EulerDiscreteScheduler, "ddim": DDIMScheduler}[name].from_config(config)
        scheduler.set_timesteps(steps)
        x = x_T * scheduler.init_noise_sigma
        latents, scaled = [], []
        step_generator = torch.Generator().manual_seed(7)
        for i, t in enumerate(scheduler.timesteps):
            scaled.append(scheduler.scale_model_input(x, t))
            kwargs = {"eta": eta, "generator": step_generator} if name == "ddim" else {}
            x = scheduler.step(outputs[i], t, x, **kwargs).prev_sample
            latents.append(x)
        key = f"case{len(cases)}"
        tensors[f"{key}.timesteps"] = scheduler.timesteps.clone()
        tensors[f"{key}.latents"] = torch.stack(latents)
        if name == "euler" or "timestep_spacing" not in config:  # DDIM's is the identity: a few suffice
            tensors[f"{key}.scaled_inputs"] = torch.stack(scaled)
        if name == "euler":
            tensors[f"{key}.sigmas"] = scheduler.sigmas.clone()
        if steps == 10 and eta == 0 and not config.get("set_alpha_to_one"):  # add_noise ignores those
            noised = [scheduler.add_noise(clean, x_T, scheduler.timesteps[i : i + 1]) for i in range(steps)]
            tensors[f"{key}.noised"] = torch.stack(noised)
        cases.append(dict(key=key, sampler=name, config=config, steps=steps, eta=eta,
                          init_noise_sigma=float(scheduler.init_noise_sigma), step_generator_seed=7))

    for steps in (3, 7, 10, 25):
        for spacing in ("linspace", "leading", "trailing"):
            for prediction in ("epsilon", "v_prediction"):
                for offset in (0, 1):
                    config = dict(base, timestep_spacing=spacing, prediction_type=prediction, steps_offset=offset)
                    record("euler", config, steps)
                    for alpha_one in (False, True):
                        for eta in (0.0, 0.7):
                            record("ddim", dict(config, set_alpha_to_one=alpha_one, clip_sample=False), steps, eta)
    # SD1.5's file lacks timestep_spacing: Euler built from it (as MuseV does) uses linspace, DDIM leading
    record("euler", sd15, 10)
    record("ddim", sd15, 10)
    # an empty config = diffusers' defaults (linear betas; DDIM clips x0 to [-1, 1], alpha_prev 1 at the end)
    record("euler", {}, 10)
    record("ddim", {}, 10)
    record("ddim", {}, 7, eta=0.7)
    record("ddim", dict(base, timestep_spacing="trailing", clip_sample=True, clip_sample_range=1.5), 7)
    # trailing with 61 of 1000 steps: diffusers' arange yields 62 timesteps (the last -1)
    euler = EulerDiscreteScheduler(**base, timestep_spacing="trailing")
    euler.set_timesteps(61)
    tensors["trailing61.timesteps"] = euler.timesteps.clone()

    save("samplers", "steps", tensors)
    lines = ",\n".join(json.dumps(case) for case in cases)
    (OUT / "samplers" / "cases.json").write_text(f"[\n{lines}\n]\n")


def _musev_lcm_scheduler():
    """MuseV's own LCMScheduler (musev/schedulers/scheduling_lcm.py: diffusers' LCMScheduler whose step draws
    VideoFusion noise for videos) and its video_fusion_noise (musev/utils/noise_util.py), read from $MUSEV_SRC;
    the files' own imports are not run."""
    from typing import List, Optional, Tuple, Union

    import numpy as np
    from diffusers.schedulers.scheduling_lcm import LCMScheduler, LCMSchedulerOutput
    from diffusers.utils.torch_utils import randn_tensor

    typing_names = dict(List=List, Optional=Optional, Tuple=Tuple, Union=Union)
    noise = _original_definitions(_musev_file("noise_util.py", "musev/utils/noise_util.py"), {"video_fusion_noise"},
                                  dict(torch=torch, randn_tensor=randn_tensor, **typing_names))
    scheduler = _original_definitions(
        _musev_file("scheduling_lcm.py", "musev/schedulers/scheduling_lcm.py"), {"LCMScheduler"},
        dict(torch=torch, np=np, ndarray=np.ndarray, DiffusersLCMScheduler=LCMScheduler, randn_tensor=randn_tensor,
             LCMSchedulerOutput=LCMSchedulerOutput, video_fusion_noise=noise["video_fusion_noise"], **typing_names))
    return scheduler["LCMScheduler"]


def make_lcm():
    """diffusers' LCMScheduler as MuseV builds it (`LCMScheduler.from_config` of its Euler scheduler's config, made
    from the checkpoint's scheduler_config.json): timesteps, and every step's `denoised` and `prev_sample` on a
    5-D video latent with a seeded step generator, then one more draw from that generator (how many the steps
    took). With MUSEV_SRC set, also MuseV's own LCMScheduler with noise_type="video_fusion", its per-step noise
    for videos."""
    import os

    from diffusers import EulerDiscreteScheduler, LCMScheduler

    sd15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
            "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
            "steps_offset": 1, "trained_betas": None}
    other = dict(sd15, prediction_type="v_prediction", clip_sample=True, clip_sample_range=1.5,
                 original_inference_steps=100, timestep_scaling=5.0)
    generator = torch.Generator().manual_seed(0)
    x_T = torch.randn((1, 4, 3, 2, 3), generator=generator)  # (batch, channels, frames, h, w)
    outputs = torch.randn((50, 1, 4, 3, 2, 3), generator=generator)  # a fixed fake model output per step
    clean = torch.randn((1, 4, 3, 2, 3), generator=generator)  # an x0 for add_noise
    cases, tensors = [], {"x_T": x_T, "model_outputs": outputs, "clean": clean}
    musev_lcm = _musev_lcm_scheduler() if os.environ.get("MUSEV_SRC") else None

    def record(config, steps, noise_type=None, w_ind_noise=0.5):
        euler = EulerDiscreteScheduler.from_config(config)  # MuseV's pipeline scheduler, then swapped for LCM
        scheduler = (LCMScheduler if noise_type is None else musev_lcm).from_config(euler.config)
        for key in ("clip_sample", "original_inference_steps", "timestep_scaling"):  # carried over Euler's config
            assert key not in config or scheduler.config[key] == config[key], key
        scheduler.set_timesteps(steps)
        step_generator = torch.Generator().manual_seed(7)
        kwargs = {} if noise_type is None else dict(noise_type=noise_type, w_ind_noise=w_ind_noise)
        x, latents, denoised = x_T * scheduler.init_noise_sigma, [], []
        for i, t in enumerate(scheduler.timesteps):
            x, d = scheduler.step(outputs[i], t, x, generator=step_generator, return_dict=False, **kwargs)
            latents.append(x)
            denoised.append(d)
        key = f"lcm{len(cases)}"
        tensors[f"{key}.timesteps"] = scheduler.timesteps.clone()
        tensors[f"{key}.latents"] = torch.stack(latents)
        tensors[f"{key}.denoised"] = torch.stack(denoised)
        tensors[f"{key}.next_draw"] = torch.randn(4, generator=step_generator)
        if noise_type is None and steps in (4, 6):
            noised = [scheduler.add_noise(clean, x_T, scheduler.timesteps[i : i + 1]) for i in range(steps)]
            tensors[f"{key}.noised"] = torch.stack(noised)
        cases.append(dict(key=key, config=config, steps=steps, noise_type=noise_type or "random",
                          w_ind_noise=w_ind_noise, source="diffusers" if noise_type is None else "musev",
                          init_noise_sigma=float(scheduler.init_noise_sigma), step_generator_seed=7))

    for steps in (1, 2, 3, 4, 5, 6, 7, 8, 13, 50):
        record(sd15, steps)
    record(other, 6)
    record({}, 4)  # Euler's defaults (linear betas), then LCM's own (no clipping)
    if musev_lcm is not None:
        for steps, w_ind_noise in ((2, 0.5), (4, 0.5), (8, 0.3)):
            record(sd15, steps, "video_fusion", w_ind_noise)
        record(sd15, 4, "random")

    save("samplers", "lcm_steps", tensors)
    lines = ",\n".join(json.dumps(case) for case in cases)
    (OUT / "samplers" / "lcm_cases.json").write_text(f"[\n{lines}\n]\n")


def make_vae():
    """A tiny random diffusers AutoencoderKL (SD structure), images, posterior means and decodes."""
    from diffusers import AutoencoderKL

    config = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=2, norm_num_groups=4, latent_channels=4,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    torch.manual_seed(1)
    vae = round_to_fp16(AutoencoderKL(**config).eval())
    generator = torch.Generator().manual_seed(2)
    images = torch.rand((3, 3, 40, 56), generator=generator) * 2 - 1
    latents = torch.randn((3, 4, 5, 7), generator=generator)
    with torch.no_grad():
        mean = vae.encode(images).latent_dist.mean
        decoded = vae.decode(latents / vae.config.scaling_factor).sample
    save("vae", "weights", fp16_state(vae))
    save("vae", "io", {"images": images, "mean": mean, "latents": latents, "decoded": decoded})
    (OUT / "vae" / "config.json").write_text(json.dumps(dict(vae.config), indent=1, default=list) + "\n")


def make_clip_text():
    """A tiny random transformers CLIPTextModel and its last hidden states for some token ids."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                            bos_token_id=98, eos_token_id=99, pad_token_id=99)
    torch.manual_seed(3)
    model = CLIPTextModel(config).eval()
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 98, (3, 77), generator=generator)
    ids[:, 0] = 98
    ids[0, 10:] = 99  # short prompt: EOS then EOS-padding
    ids[1, 40] = 99  # an EOS in the middle, text after it
    ids[2, 76] = 99
    with torch.no_grad():
        hidden = model(ids).last_hidden_state
    # the published layout (transformers 4.x files, clip_text_sd15.json) has the text_model. prefix
    state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in model.state_dict().items()}
    save("clip_text", "weights", state)
    save("clip_text", "io", {"input_ids": ids, "last_hidden_state": hidden})
    (OUT / "clip_text" / "config.json").write_text(config.to_json_string())


def make_clip_vision():
    """A tiny CLIPVisionModelWithProjection, and CLIPImageProcessor() on small odd-sized images."""
    import numpy as np
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                              image_size=224, patch_size=32, projection_dim=24, hidden_act="gelu")
    torch.manual_seed(5)
    model = round_to_fp16(CLIPVisionModelWithProjection(config).eval())
    rng = np.random.default_rng(6)
    images = {}
    for name, (h, w) in {"portrait": (61, 37), "landscape": (30, 77), "tiny": (5, 9)}.items():
        y, x = np.mgrid[0:h, 0:w]
        smooth = np.stack([(x * 255 // w), (y * 255 // h), ((x + y) * 127 // (h + w))], -1)
        images[name] = (smooth + rng.integers(0, 40, (h, w, 3))).clip(0, 255).astype(np.uint8)
    processor = CLIPImageProcessor()
    pixels = processor(images=[Image.fromarray(a) for a in images.values()], return_tensors="pt").pixel_values
    with torch.no_grad():
        embeds = model(pixel_values=pixels).image_embeds  # from the float32 pixel values
    save("clip_vision", "weights", fp16_state(model))
    tensors = {f"image.{k}": torch.from_numpy(v) for k, v in images.items()}
    # pixel values in float16: 1e-3 error, far below one uint8 level after normalisation (~0.015)
    save("clip_vision", "io", dict(tensors, pixel_values_fp16=pixels.half(), image_embeds=embeds))
    (OUT / "clip_vision" / "config.json").write_text(config.to_json_string())


def make_unet2d():
    """A tiny random diffusers UNet2DConditionModel (SD1.5 structure) and one output."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(7)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 16, 16, 16), layers_per_block=2, attention_head_dim=2,
        norm_num_groups=4, cross_attention_dim=16,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    unet = round_to_fp16(unet.eval())
    generator = torch.Generator().manual_seed(8)
    sample = torch.randn((2, 4, 12, 10), generator=generator)  # 12x10 latent: not a multiple of 8
    text = torch.randn((2, 7, 16), generator=generator)
    with torch.no_grad():
        out = unet(sample, torch.tensor([499.5, 20.0]), encoder_hidden_states=text).sample
    save("unet2d", "weights", fp16_state(unet))
    save("unet2d", "io", {"sample": sample, "timestep": torch.tensor([499.5, 20.0]), "text": text, "out": out})
    (OUT / "unet2d" / "config.json").write_text(json.dumps(dict(unet.config), indent=1, default=list) + "\n")


def make_lora():
    """A kohya LoRA file (linear, 1x1 and 3x3 "LoCon" conv layers, alpha != rank) and a diffusers/PEFT
    one (saved by diffusers, LoRA config with alpha_pattern/rank_pattern in its metadata) for the unet2d
    and clip_text fixture models, and the weights diffusers' load_lora_weights + fuse_lora changes:
    kohya at 0.8, PEFT at 1.0, and both (kohya 0.8, PEFT -0.5) fused one after the other."""
    import tempfile

    import peft
    import transformers.integrations.peft as hf_peft
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from packaging.version import Version
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    if Version(peft.__version__) < Version(hf_peft.MIN_PEFT_VERSION):
        # transformers 5.x asks for peft >= 0.22, which the package index here lacks; the text-encoder
        # LoRA path diffusers takes works with the peft that is installed
        hf_peft.MIN_PEFT_VERSION = peft.__version__

    def base_models():
        unet = UNet2DConditionModel.from_config(json.loads((OUT / "unet2d/config.json").read_text()))
        unet.load_state_dict({k: v.float() for k, v in load_file(OUT / "unet2d/weights.safetensors").items()})
        text_encoder = CLIPTextModel(CLIPTextConfig.from_json_file(OUT / "clip_text/config.json"))
        text = load_file(OUT / "clip_text/weights.safetensors")  # transformers 5 has no text_model. level
        text_encoder.load_state_dict({k.removeprefix("text_model."): v for k, v in text.items()})
        return unet.eval(), text_encoder.eval()

    generator = torch.Generator().manual_seed(9)

    def factor(*shape, std=0.3):
        return (torch.randn(shape, generator=generator) * std).half()

    unet, text_encoder = base_models()
    attention = "down_blocks.0.attentions.0"
    block = f"{attention}.transformer_blocks.0"
    # kohya: linear and 1x1-conv layers rank 4 alpha 2 (network_dim/alpha), 3x3 convs rank 2 alpha 3
    # (conv_dim/alpha), text encoder rank 3 alpha 1.5. diffusers turns kohya's per-layer alphas into one
    # lora_alpha plus an alpha_pattern that matches only conv layers, so the attention layers carry the
    # most common alpha and the text encoder one alpha (kohya itself applies each layer's own alpha).
    kohya_unet = [f"{attention}.proj_in", f"{attention}.proj_out", f"{block}.ff.net.0.proj", f"{block}.ff.net.2",
                  "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
                  "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_q",
                  "down_blocks.1.resnets.0.conv_shortcut", "down_blocks.1.resnets.0.time_emb_proj"]
    kohya_unet += [f"{block}.{attn}.{proj}" for attn in ("attn1", "attn2")
                   for proj in ("to_q", "to_k", "to_v", "to_out.0")]
    kohya_conv = ["down_blocks.1.resnets.0.conv1", "down_blocks.0.downsamplers.0.conv",
                  "up_blocks.0.upsamplers.0.conv", "mid_block.resnets.1.conv2"]
    kohya_text = [f"encoder.layers.0.self_attn.{proj}" for proj in ("q_proj", "k_proj", "v_proj", "out_proj")]
    kohya_text += ["encoder.layers.0.mlp.fc1", "encoder.layers.0.mlp.fc2", "encoder.layers.1.self_attn.q_proj"]
    kohya = {}
    groups = [("lora_unet", unet, kohya_unet, 4, 2.0), ("lora_unet", unet, kohya_conv, 2, 3.0),
              ("lora_te_text_model", text_encoder, kohya_text, 3, 1.5)]
    for prefix, model, names, rank, alpha in groups:
        for name in names:
            weight = model.get_submodule(name).weight  # (out, in) or (out, in, k, k)
            key = f"{prefix}_{name.replace('.', '_')}"
            kohya[f"{key}.lora_down.weight"] = factor(rank, *weight.shape[1:])
            kohya[f"{key}.lora_up.weight"] = factor(weight.shape[0], rank, *([1, 1] if weight.ndim == 4 else []))
            kohya[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    (OUT / "lora").mkdir(parents=True, exist_ok=True)
    kohya_path = OUT / "lora/kohya.safetensors"
    save_file(kohya, kohya_path, metadata={"ss_base_model_version": "sd_v1", "ss_network_dim": "4",
                                           "ss_network_alpha": "2.0", "ss_network_module": "networks.lora"})

    # PEFT: made by peft on the diffusers models, saved by diffusers with its LoRA config as metadata
    peft_unet = [f"{block}.attn1.to_q", "mid_block.attentions.0.transformer_blocks.0.attn1.to_v",
                 "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2", "up_blocks.1.attentions.0.proj_out",
                 "up_blocks.2.resnets.1.conv2", "up_blocks.1.resnets.2.conv_shortcut"]
    unet_config = LoraConfig(r=4, lora_alpha=6, target_modules=peft_unet, rank_pattern={f"{block}.attn1.to_q": 2},
                             alpha_pattern={f"{block}.attn1.to_q": 5, "ff.net.2": 1})
    peft_text = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.self_attn.v_proj", "encoder.layers.0.mlp.fc2"]
    text_config = LoraConfig(r=3, lora_alpha=5, target_modules=peft_text)
    unet.add_adapter(unet_config)
    inject_adapter_in_model(text_config, text_encoder)
    layers = {name: {k: factor(*v.shape) for k, v in get_peft_model_state_dict(model).items()}
              for name, model in (("unet", unet), ("text_encoder", text_encoder))}
    with tempfile.TemporaryDirectory() as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
            unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=text_config.to_dict())
        peft_path = OUT / "lora/peft.safetensors"
        peft_path.write_bytes((Path(tmp) / "pytorch_lora_weights.safetensors").read_bytes())

    def fused(*loras):
        unet, text_encoder = base_models()
        base = {"unet": dict(unet.state_dict()), "text_encoder": dict(text_encoder.state_dict())}
        base = {part: {k: v.clone() for k, v in state.items()} for part, state in base.items()}
        vae = AutoencoderKL(block_out_channels=(4,), norm_num_groups=2, layers_per_block=1)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet,
                                       scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        for path, scale in loras:
            pipe.load_lora_weights(str(path))
            pipe.fuse_lora(lora_scale=scale)
            pipe.unload_lora_weights()
        out = {}
        for part, model in (("unet", unet), ("text_encoder", text_encoder)):
            for k, v in model.state_dict().items():
                if not torch.equal(v, base[part][k]):  # the published layout: text_model.<...> for CLIP
                    out[f"{part}.{'text_model.' if part == 'text_encoder' else ''}{k}"] = v
        io = load_file(OUT / "unet2d/io.safetensors")
        with torch.no_grad():
            out["unet_out"] = unet(io["sample"], io["timestep"], encoder_hidden_states=io["text"]).sample
        return out

    cases = {"kohya": fused((kohya_path, 0.8)), "peft": fused((peft_path, 1.0)),
             "both": fused((kohya_path, 0.8), (peft_path, -0.5))}
    save("lora", "fused", {f"{case}.{k}": v for case, tensors in cases.items() for k, v in tensors.items()})


PROMPTS = [
    "", " ", "a photo of a cat", "A Photo Of A CAT",
    "(masterpiece, best quality, highres:1), (1boy, solo:1), (eye blinks:1.8), (head wave:1.3)",
    "(((nsfw)))", "[[low quality]]", "(worst quality:2), (low quality:2)", "an (important) word",
    "(unbalanced", "unbalanced)", "[unbalanced", "a ]stray bracket", "\\(literal\\]", "\\\\ backslash",
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", "(a:-0.5) negative weight", "(a:+1.5) plus sign",
    "(word:1.2.3)", "(word:abc)", "colon: inside text", "(nested (deeper (deepest:2)) x)",
    "caf\u00e9 na\u00efve \u00c9COLE", "emoji \U0001f600\U0001f680 rocket", "\u732b\u732b cat \u6c34\u58a8\u753b",
    "\u65e5\u672c\u8a9e\u3068\u304b\u306a", "tabs\tand\nnewlines\r\nhere", "many     spaces   here",
    "zero\u200bwidth and\x00null", "numbers 1234567 and 3.14159", "don't can't we're you've I'm we'll he'd",
    "punctuation!!! ??? ... ,,, ;;", "a-b_c/d\\e|f", "<|startoftext|> literal specials <|endoftext|>",
    "UPPER lower MiXeD", "badhandv4, ng_deepnegative_v1_75t, EasyNegativeV2", "long " * 90, "(long:1.2) " * 60,
    "peaceful beautiful waterfall, an endless waterfall",
    "(best quality), ((masterpiece)), (highres), illustration, original, extremely detailed wallpaper",
    "(masterpiece, best quality, highres:1) , a girl is dancing, wearing a dress made of stars, animation",
    "(1man, solo:1),(eye blinks:1.8),(head wave:1.3),Chinese ink painting style",
    # what ftfy.fix_text changes: full-width forms, curly quotes, ligatures, entities, escapes, controls
    "\u4e00\u4e2a\u5973\u5b69\uff0c\u5fae\u7b11\uff08\u9ad8\u6e05\uff1a1.2\uff09\u3000\uff21\uff22\uff23\uff01",
    "\u201cquoted\u201d and \u2018single\u2019 it\u02bcs", "\ufb01ne \ufb02ower \u0132ssel", "salt &amp; pepper &lt;3 &eacute;t&eacute; &#39;x&#39;",
    "&lt;tag&gt; then <b>bold</b> &amp;", "line one &amp;\n<i>line two</i> &amp;", "\x1b[31mred\x1b[0m text\ufeff\u206a\x07",
    "e\u0301 composed \u00e9", "half-width \uff76\uff9e\uff71 \uffe5 \u2028next\u2029para",
]


def _original_definitions(source: Path, names: set[str], imports: dict | None = None) -> dict:
    """Top-level definitions `names` of an original MuseV source file, run at generation time only. The file's
    own imports are not run: `imports` gives the names its definitions use (re is always there)."""
    import ast
    import re

    tree = ast.parse(source.read_text())
    keep = [n for n in tree.body if getattr(n, "name", None) in names
            or (isinstance(n, ast.Assign) and any(getattr(t, "id", None) in names for t in n.targets))]
    namespace = {"re": re, **(imports or {})}
    exec(compile(ast.Module(keep, type_ignores=[]), str(source), "exec"), namespace)
    return namespace


def make_tokenizer():
    """MuseV's tokenizer ids (transformers 4.33's slow CLIPTokenizer with ftfy 6.1.1, both MuseV's pins; 5.x
    has only the fast one, which cleans text differently), the original's weighted-prompt parse, and its
    negative-prompt presets. Needs, at generation time only: transformers==4.33.*, ftfy==6.1.1, the CLIP vocab in
    $CLIP_TOKENIZER (default ../shared/reference/clip_tokenizer), and a MuseV checkout's files in $MUSEV_SRC
    (musev/utils/text_emb_util.py and configs/model/negative_prompt.py, or both flat in that folder).
    Writes prompts, ids, parses and preset texts only; the vocabulary is not copied."""
    import os

    import transformers
    from transformers import CLIPTokenizer

    import ftfy

    assert transformers.__version__.startswith("4.33"), "run this part with transformers 4.33 (MuseV's pin)"
    assert ftfy.__version__ == "6.1.1", "run this part with ftfy 6.1.1 (MuseV's pin; CLIPTokenizer uses it)"
    vocab = Path(os.environ.get("CLIP_TOKENIZER", Path(__file__).resolve().parents[2] / "shared/reference/clip_tokenizer"))
    src = Path(os.environ["MUSEV_SRC"])
    find = lambda name, nested: src / name if (src / name).is_file() else src / nested  # noqa: E731
    parse = _original_definitions(find("text_emb_util.py", "musev/utils/text_emb_util.py"),
                                  {"re_attention", "parse_prompt_attention"})["parse_prompt_attention"]
    presets = _original_definitions(find("negative_prompt.py", "configs/model/negative_prompt.py"),
                                    {"Negative_Prompt_CFG"})["Negative_Prompt_CFG"]
    tokenizer = CLIPTokenizer(str(vocab / "vocab.json"), str(vocab / "merges.txt"))
    preset_texts = {name: entry["prompt"] for name, entry in presets.items()}
    prompts = PROMPTS + list(preset_texts.values())
    def parsed(prompt):
        try:
            return parse(prompt)
        except ValueError as err:  # the original fails on weights such as "1.2.3"
            return {"error": type(err).__name__}

    data = {
        "source": f"transformers {transformers.__version__} CLIPTokenizer (slow, ftfy {ftfy.__version__}); "
                  "MuseV parse_prompt_attention",
        "negative_presets": preset_texts,
        "cases": [{"prompt": p, "ids": tokenizer(p).input_ids, "parse": parsed(p)} for p in prompts],
    }
    (OUT / "tokenizer").mkdir(parents=True, exist_ok=True)
    (OUT / "tokenizer" / "cases.json").write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def make_single_file():
    """An A1111 single-file checkpoint made from the vae/clip_text/unet2d fixtures by diffusers' own
    converter to the original layout (scripts/convert_diffusers_to_original_stable_diffusion.py of a
    diffusers checkout in $DIFFUSERS_SRC, run at generation time only). Its inverse, diffusers'
    single-file loader, is checked here to give the fixtures' weights back, so the file is a faithful
    LDM-named copy of them; the test then converts it with our tables and compares."""
    import importlib.util
    import os

    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint)
    from safetensors.torch import load_file

    script = Path(os.environ["DIFFUSERS_SRC"]) / "scripts/convert_diffusers_to_original_stable_diffusion.py"
    spec = importlib.util.spec_from_file_location("to_original", script)
    to_original = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(to_original)
    unet = load_file(OUT / "unet2d/weights.safetensors")
    vae = load_file(OUT / "vae/weights.safetensors")
    text = load_file(OUT / "clip_text/weights.safetensors")
    ldm = {f"model.diffusion_model.{k}": v for k, v in to_original.convert_unet_state_dict(unet).items()}
    ldm.update({f"first_stage_model.{k}": v for k, v in to_original.convert_vae_state_dict(vae).items()})
    ldm.update({f"cond_stage_model.transformer.{k}": v for k, v in to_original.convert_text_enc_state_dict(text).items()})
    ldm["model_ema.decay"] = torch.tensor(0.9999)  # files carry such extras; a converter skips them
    ldm["alphas_cumprod"] = torch.linspace(1, 0, 10)
    # diffusers' loader maps it back to exactly the fixtures' weights
    unet_config = json.loads((OUT / "unet2d/config.json").read_text())
    back = convert_ldm_unet_checkpoint(ldm, unet_config)
    assert back.keys() == unet.keys() and all(torch.equal(back[k], unet[k]) for k in unet)
    back = convert_ldm_vae_checkpoint(ldm, json.loads((OUT / "vae/config.json").read_text()))
    assert back.keys() == vae.keys() and all(torch.equal(back[k].reshape(vae[k].shape), vae[k]) for k in vae)
    save("single_file", "sd15_tiny", ldm)


def _musev_file(name: str, nested: str) -> Path:
    """A file of the MuseV checkout (with its submodules) in $MUSEV_SRC, or the file itself in that folder."""
    import os

    src = Path(os.environ["MUSEV_SRC"])
    return src / name if (src / name).is_file() else src / nested


def make_video_crop():
    """MuseV's centre-crop-resize of source-video chunks (MMCM batch_dynamic_crop_resize_images, the MMCM
    submodule of a MuseV checkout in $MUSEV_SRC; only that function is run, with its imports given, not its
    module's diffusers/cv2/transformers ones) on small noisy uint8 clips, fed as the original feeds them: decord's
    uint8 frames as a "c t h w" array. Cases: smaller, larger, the same size, and the aspect ratio both ways."""
    import math
    from typing import Literal, Union

    import numpy as np
    from einops import rearrange

    source = _musev_file("image_process.py", "MMCM/mmcm/vision/process/image_process.py")
    imports = {"math": math, "np": np, "torch": torch, "rearrange": rearrange, "Literal": Literal, "Union": Union}
    name = "batch_dynamic_crop_resize_images"
    crop = _original_definitions(source, {name}, imports)[name]
    rng = np.random.default_rng(9)
    sizes = [((37, 53), (24, 32)), ((37, 53), (56, 40)), ((40, 40), (40, 40)), ((30, 77), (16, 16)),
             ((61, 37), (24, 48)), ((20, 24), (44, 60)), ((45, 30), (45, 30)), ((33, 47), (20, 28))]
    tensors, cases = {}, []
    for i, ((h, w), (height, width)) in enumerate(sizes):
        y, x = np.mgrid[0:h, 0:w]
        smooth = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (h + w)], -1)
        clip = np.stack([(smooth + rng.integers(0, 60, (h, w, 3))).clip(0, 255) for _ in range(2)]).astype(np.uint8)
        out = crop(rearrange(clip, "t h w c -> c t h w"), target_height=height, target_width=width)
        assert out.dtype == torch.uint8
        tensors[f"case{i}.input"] = torch.from_numpy(clip)
        tensors[f"case{i}.output"] = rearrange(out, "c t h w -> t h w c").contiguous()
        cases.append({"key": f"case{i}", "source": [h, w], "target": [height, width]})
    save("video_crop", "cases", tensors)
    (OUT / "video_crop" / "cases.json").write_text(json.dumps({"torch": torch.__version__, "cases": cases}) + "\n")


def _pose_frames():
    """Keypoint frames in sd-webui-controlnet's JSON layout (normalised x, y; a canvas size): a full person,
    one with low-confidence points (0.2 hidden; 0.3 hidden on the body, shown on a hand), a hand point on the
    left edge, two people overlapping, bodies without hands, and hands with long bones."""
    import numpy as np

    rng = np.random.default_rng(10)
    # a standing figure facing the camera, OpenPose COCO-18 order, as fractions of the canvas (192 x 256)
    figure = np.array([[.50, .15], [.50, .27], [.42, .28], [.38, .42], [.36, .56], [.58, .28], [.62, .42],
                       [.64, .56], [.45, .58], [.44, .75], [.44, .92], [.55, .58], [.56, .75], [.56, .92],
                       [.48, .13], [.52, .13], [.46, .14], [.54, .14]])

    def hand(wrist, direction, step):
        angles = np.radians([-40, -20, 0, 20, 40]) + direction
        points = [wrist]
        for a in angles:
            points += [wrist + step * k * np.array([np.cos(a), np.sin(a)]) for k in range(1, 5)]
        return np.array(points)

    def person(shift, scale=1.0, confidence=None, hands=True, hand_step=0.04):
        body = (figure - 0.5) * scale + 0.5 + shift + rng.normal(0, 0.01, figure.shape)
        c = np.full(18, 0.9) if confidence is None else confidence
        entry = {"pose_keypoints_2d": np.column_stack([body, c]).ravel().round(5).tolist()}
        if hands:
            for side, wrist, direction in (("left", body[7], np.pi / 2), ("right", body[4], np.pi / 2)):
                points = hand(wrist, direction, hand_step)
                values = np.column_stack([points, np.full(21, 0.8)]).ravel().round(5).tolist()
                entry[f"hand_{side}_keypoints_2d"] = values
        return entry

    frames = []
    frames.append({"people": [person(np.zeros(2))]})
    low = np.full(18, 0.9)
    low[[4, 10, 15]] = 0.2
    low[[7, 12]] = 0.3
    p = person(np.array([0.05, 0.0]), confidence=low)
    p["hand_left_keypoints_2d"][3 * 5 + 2] = 0.3  # shown: hands hide below 0.3 only
    p["hand_left_keypoints_2d"][3 * 9 + 2] = 0.2
    p["hand_right_keypoints_2d"][3 * 13] = 0.0  # x = 0: on the left edge, not drawn
    frames.append({"people": [p]})
    frames.append({"people": [person(np.array([-0.15, 0.02]), 0.8), person(np.array([0.1, -0.03]), 1.1)]})
    frames.append({"people": [person(np.array([0.2, 0.05]), 0.7, hands=False),
                              person(np.array([-0.2, 0.0]), 0.9, hands=False)]})
    frames.append({"people": [person(np.array([0.0, -0.25]), 0.6, hand_step=0.1)]})  # long hand bones
    for frame in frames:
        frame.update(canvas_width=256, canvas_height=192)
    return frames


def make_pose():
    """OpenPose-style control images of `_pose_frames` drawn by controlnet_aux's DWPose annotator as MuseV
    pins it (the controlnet_aux submodule of a MuseV checkout in $MUSEV_SRC: dwpose/util.py, and from
    dwpose/__init__.py only candidate2pose and draw_pose, not the detector). Each frame goes in as the
    detector's output would: 134 whole-body points (18 body, 6 feet, 68 face, 21 + 21 hands), x and y
    divided by the canvas size, one score per point; no face, as MuseV's dwpose_body_hand. Needs cv2 and
    matplotlib at generation time."""
    import importlib.util

    import numpy as np
    from PIL import Image

    util_file = _musev_file("util.py", "controlnet_aux/src/controlnet_aux/dwpose/util.py")
    spec = importlib.util.spec_from_file_location("dwpose_util", util_file)
    util = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(util)
    glue = _original_definitions(_musev_file("__init__.py", "controlnet_aux/src/controlnet_aux/dwpose/__init__.py"),
                                 {"candidate2pose", "draw_pose"}, {"np": np, "util": util})
    frames = _pose_frames()
    (OUT / "pose").mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        people = frame["people"]
        candidate = np.zeros((len(people), 134, 2))
        subset = np.zeros((len(people), 134))
        for n, person in enumerate(people):
            fields = (("pose_keypoints_2d", 0), ("hand_left_keypoints_2d", 92), ("hand_right_keypoints_2d", 113))
            for field, start in fields:
                if field in person:
                    points = np.array(person[field]).reshape(-1, 3)
                    candidate[n, start:start + len(points)] = points[:, :2]
                    subset[n, start:start + len(points)] = points[:, 2]
        pose = glue["candidate2pose"](candidate, subset, include_face=False)
        image = glue["draw_pose"](pose, frame["canvas_height"], frame["canvas_width"], include_face=False)
        Image.fromarray(image).save(OUT / "pose" / f"frame{i}.png")
    (OUT / "pose" / "frames.json").write_text(json.dumps(frames) + "\n")


def make_histmatch():
    """MuseV's `need_hist_match` post-process: MMCM's `hist_match_video_bcthw` (mmcm/vision/process/
    correct_color.py, with the three functions it calls, of an MMCM checkout in $MMCM_SRC, or the file itself
    in that folder; its module's other import, a decord video dataset, is not run) over scikit-image's
    `match_histograms`, called as MuseV's predictor calls it: decoded frames 1.. of a video, float32 in [0, 1]
    as (1, 3, T, H, W), matched to frame 0 (1, 3, 1, H, W), value 255. Needs numpy and scikit-image, MuseV's
    pins (environment.yml: numpy 1.23.5, scikit-image 0.22.0), and einops.

    Cases, (1, 3, 2, 12, 16) frames, each with its own reference frame:
      drift            frames = the reference's colours shifted per channel (gain, offset, gamma) plus noise
      few_levels       the reference uses 6 levels per channel (ties, unused levels between)
      flat_channels    the frames' red is one level, their green two; blue as in `drift`
      level_edges      values k/255 in float32 and the float32 just below, where x * 255 truncates to k or k - 1
    Writes cases.safetensors (<case>.frames, <case>.reference float32; <case>.levels uint8, the function's float64
    output x 255, checked here to be whole numbers) and cases.json (versions, the source file's sha256)."""
    import hashlib
    import os

    import numpy as np
    import skimage
    import skimage.exposure
    from einops import rearrange

    assert (np.__version__, skimage.__version__) == ("1.23.5", "0.22.0"), "run this part with MuseV's numpy and scikit-image"
    src = Path(os.environ["MMCM_SRC"])
    source = src / "correct_color.py" if (src / "correct_color.py").is_file() else src / "mmcm/vision/process/correct_color.py"
    names = {"hist_match_color", "hist_match_color_video", "hist_match_color_video_batch", "hist_match_video_bcthw"}
    hist_match = _original_definitions(source, names, {"np": np, "rearrange": rearrange, "skimage": skimage})[
        "hist_match_video_bcthw"]
    rng = np.random.default_rng(18)
    t, h, w = 2, 12, 16
    y, x = np.mgrid[0:h, 0:w] / np.array([h - 1, w - 1])[:, None, None]
    smooth = np.stack([x, y, (x + y) / 2])[:, None]  # (3, 1, h, w) in [0, 1]

    def noisy(image, scale=0.08):
        return np.clip(image + rng.normal(0, scale, image.shape), 0, 1).astype(np.float32)

    def drifted(image):
        gain, offset, gamma = rng.uniform(0.7, 1.2, (3, 1, 1, 1)), rng.uniform(-0.1, 0.2, (3, 1, 1, 1)), rng.uniform(0.6, 1.5)
        return noisy(np.clip(gain * image**gamma + offset, 0, 1).repeat(t, 1))

    reference = noisy(smooth)
    few_levels = np.round(noisy(smooth) * 5) / 5
    flat = drifted(smooth)
    flat[0], flat[1] = 0.4, np.where(flat[1] > 0.5, 0.9, 0.1)
    levels = rng.integers(1, 256, (3, t, h, w))
    edges = (levels / 255).astype(np.float32)
    below = rng.random(edges.shape) < 0.5
    edges[below] = np.nextafter(edges[below], np.float32(0))
    cases = {"drift": (drifted(smooth), reference), "few_levels": (drifted(smooth), few_levels.astype(np.float32)),
             "flat_channels": (flat, reference), "level_edges": (edges, reference)}
    tensors = {}
    for name, (frames, ref) in cases.items():
        frames, ref = frames[None].astype(np.float32), ref[None].astype(np.float32)
        matched = hist_match(frames, ref, value=255.0)
        levels = np.round(matched * 255)
        assert matched.dtype == np.float64 and matched.shape == frames.shape and np.array_equal(levels / 255, matched)
        tensors.update({f"{name}.frames": torch.from_numpy(frames), f"{name}.reference": torch.from_numpy(ref),
                        f"{name}.levels": torch.from_numpy(levels.astype(np.uint8))})
    save("histmatch", "cases", tensors)
    (OUT / "histmatch" / "cases.json").write_text(json.dumps({
        "function": "MMCM hist_match_video_bcthw(frames, reference, value=255.0)", "cases": list(cases),
        "numpy": np.__version__, "scikit_image": skimage.__version__, "python": sys.version.split()[0],
        "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest()}, indent=1) + "\n")


def make_resampler():
    """IP-Adapter's projections and the plus models' CLIP feature, at tiny seeded sizes:
      * Resampler: the module file `ip_adapter/resampler.py` of an IP-Adapter checkout in $IP_ADAPTER_SRC (the
        file alone is imported; it needs torch and einops), built with heads x dim_head != dim so the widths
        cannot be confused; its LayerNorms given random affine weights;
      * ImageProjModel: the class alone, read from the checkout's `ip_adapter/ip_adapter.py` (the module's
        diffusers / transformers imports are not run);
      * the penultimate hidden states (`hidden_states[-2]`) of transformers' CLIPVisionModelWithProjection at
        the weights of the committed `clip_vision` fixture, for its three images' pixel values.
    Writes resampler/weights.safetensors (resampler.*, image_proj.*, fp16), resampler/io.safetensors (inputs
    and outputs, float32) and resampler/versions.json."""
    import hashlib
    import importlib.util
    import os

    import einops
    import transformers
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    src = Path(os.environ["IP_ADAPTER_SRC"]) / "ip_adapter"
    spec = importlib.util.spec_from_file_location("ip_adapter_resampler", src / "resampler.py")
    resampler_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(resampler_module)
    image_proj_model = _original_definitions(src / "ip_adapter.py", {"ImageProjModel"}, {"torch": torch})["ImageProjModel"]
    sizes = dict(dim=24, depth=2, dim_head=8, heads=2, num_queries=4, embedding_dim=20, output_dim=32, ff_mult=4)
    torch.manual_seed(23)
    resampler = resampler_module.Resampler(**sizes).eval()
    image_proj = image_proj_model(cross_attention_dim=32, clip_embeddings_dim=24, clip_extra_context_tokens=4).eval()
    with torch.no_grad():
        for model in (resampler, image_proj):
            for module in model.modules():
                if isinstance(module, torch.nn.LayerNorm):
                    module.weight.copy_(1 + 0.1 * torch.randn_like(module.weight))
                    module.bias.copy_(0.1 * torch.randn_like(module.bias))
    round_to_fp16(resampler), round_to_fp16(image_proj)
    hidden = torch.randn(2, 10, sizes["embedding_dim"])
    embeds = torch.randn(2, 24)
    with torch.no_grad():
        tokens, proj_tokens = resampler(hidden), image_proj(embeds)

    clip = OUT / "clip_vision"
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig.from_json_file(clip / "config.json")).eval()
    vision.load_state_dict({k: v.float() for k, v in load_file(clip / "weights.safetensors").items()}, strict=False)
    pixels = load_file(clip / "io.safetensors")["pixel_values_fp16"].float()
    with torch.no_grad():
        out = vision(pixel_values=pixels, output_hidden_states=True)
    # the same model as the clip_vision part's (whose embeds came from the pixels before their fp16 rounding)
    assert torch.allclose(out.image_embeds, load_file(clip / "io.safetensors")["image_embeds"], atol=1e-3)
    save("resampler", "weights", {**{f"resampler.{k}": v for k, v in fp16_state(resampler).items()},
                                  **{f"image_proj.{k}": v for k, v in fp16_state(image_proj).items()}})
    save("resampler", "io", {"resampler.hidden_states": hidden, "resampler.tokens": tokens,
                             "image_proj.image_embeds": embeds, "image_proj.tokens": proj_tokens,
                             "clip_vision.penultimate_hidden_states": out.hidden_states[-2]})
    (OUT / "resampler" / "versions.json").write_text(json.dumps({
        "resampler": sizes, "image_proj": dict(cross_attention_dim=32, clip_embeddings_dim=24, clip_extra_context_tokens=4),
        "torch": torch.__version__, "einops": einops.__version__, "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "sources_sha256": {name: hashlib.sha256((src / name).read_bytes()).hexdigest()
                           for name in ("resampler.py", "ip_adapter.py")}}, indent=1) + "\n")


CONTROLNET_TINY = dict(block_out_channels=(8, 16, 16, 16), norm_num_groups=4, cross_attention_dim=32,
                       attention_head_dim=2, conditioning_embedding_out_channels=(4, 8, 8, 16))
SD15_CONTROLNET = dict(cross_attention_dim=768)  # control_v11p_sd15_openpose/config.json: diffusers' defaults + 768


def ldm_controlnet_names(keys, hint_convs: int) -> dict:
    """diffusers ControlNet key -> the original (ldm `cldm`) name. Written here by hand from the cldm layout
    (time_embed, input_blocks, middle_block, zero_convs, middle_block_out, input_hint_block: conv, SiLU, ...),
    then checked below against diffusers' own ldm -> diffusers converter, which decides."""
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
              "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    names = {}
    for key in keys:
        part = key.split(".")
        if part[0] == "time_embedding":
            new = f"time_embed.{0 if part[1] == 'linear_1' else 2}.{part[2]}"
        elif part[0] == "conv_in":
            new = f"input_blocks.0.0.{part[1]}"
        elif part[0] == "controlnet_cond_embedding":
            index = {"conv_in": 0, "conv_out": 2 * hint_convs + 2}.get(part[1])
            new = f"input_hint_block.{2 * int(part[2]) + 2 if index is None else index}.{part[-1]}"
        elif part[0] == "controlnet_down_blocks":
            new = f"zero_convs.{part[1]}.0.{part[2]}"
        elif part[0] == "controlnet_mid_block":
            new = f"middle_block_out.0.{part[1]}"
        elif part[0] == "down_blocks":
            level, kind = int(part[1]), part[2]
            if kind == "downsamplers":
                new = f"input_blocks.{3 * level + 3}.0.op.{part[-1]}"
            else:
                block = f"input_blocks.{3 * level + int(part[3]) + 1}"
                rest = ".".join(part[4:])
                new = f"{block}.1.{rest}" if kind == "attentions" else f"{block}.0.{resnet[part[4]]}.{part[5]}"
        elif part[0] == "mid_block":
            rest = ".".join(part[3:])
            new = (f"middle_block.1.{rest}" if part[1] == "attentions"
                   else f"middle_block.{2 * int(part[2])}.{resnet[part[3]]}.{part[4]}")
        names[key] = new
    return names


def checked_ldm_names(model) -> dict:
    """ldm names for `model`'s keys, confirmed by diffusers' single-file converter: it maps the renamed
    state dict back to exactly the model's tensors (the same objects), one for one."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    state = model.state_dict()
    names = ldm_controlnet_names(state, 2 * (len(model.config.conditioning_embedding_out_channels) - 1))
    ldm = {f"control_model.{names[k]}": v for k, v in state.items()}
    back = convert_controlnet_checkpoint(ldm, dict(model.config))
    assert back.keys() == state.keys() and all(back[k] is state[k] for k in state), "ldm names do not round-trip"
    assert len(set(names.values())) == len(names)
    return names


def make_controlnet():
    """A tiny random diffusers ControlNetModel (SD1.5 structure), its residuals at conditioning scale 0.7, a
    second ControlNet (other hint encoder and zero convs) summed by diffusers' MultiControlNetModel, the
    original (ldm) names of every key as diffusers' single-file loader reads them, the full-size SD1.5
    ControlNet's keys and shapes (meta device), and diffusers' controlnet_keep for control_guidance_start/end."""
    from diffusers import (AutoencoderKL, ControlNetModel, EulerDiscreteScheduler, StableDiffusionControlNetPipeline,
                           UNet2DConditionModel)
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    torch.manual_seed(11)
    net = ControlNetModel(**CONTROLNET_TINY).eval()
    with torch.no_grad():
        for p in net.parameters():  # the zero-initialised convs would make every residual 0
            if not p.any():
                p.normal_(0, 0.2)
    net = round_to_fp16(net)
    second = ControlNetModel(**CONTROLNET_TINY).eval()
    second.load_state_dict(net.state_dict())
    own = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")
    with torch.no_grad():
        for name, p in second.named_parameters():
            if name.startswith(own):
                p.copy_((torch.randn_like(p) * 0.2).half().float())
    generator = torch.Generator().manual_seed(12)
    sample = torch.randn((2, 4, 6, 5), generator=generator)  # 6x5 latent: odd sizes on the way down
    timestep = torch.tensor([499.5, 20.0])
    text = torch.randn((2, 7, 32), generator=generator)
    images = torch.rand((2, 2, 3, 48, 40), generator=generator).half().float()  # two control images per sample
    with torch.no_grad():
        down, mid = net(sample, timestep, text, images[0], conditioning_scale=0.7, return_dict=False)
        multi_down, multi_mid = MultiControlNetModel([net, second])(
            sample, timestep, text, list(images), [0.7, 1.3], return_dict=False)
    io = {"sample": sample, "timestep": timestep, "text": text, "images": images.half(),
          "mid": mid, "multi.mid": multi_mid}
    io.update({f"down.{i}": d for i, d in enumerate(down)})
    io.update({f"multi.down.{i}": d for i, d in enumerate(multi_down)})
    save("controlnet", "weights", fp16_state(net))
    save("controlnet", "second_own", {k: v for k, v in fp16_state(second).items() if k.startswith(own)})
    save("controlnet", "io", io)
    config = {k: v for k, v in net.config.items() if k != "_use_default_values"}  # a set: no stable order
    (OUT / "controlnet" / "config.json").write_text(json.dumps(config, indent=1, default=list) + "\n")

    with torch.device("meta"):
        full = ControlNetModel(**SD15_CONTROLNET)
    names = checked_ldm_names(full)
    tiny_names = checked_ldm_names(net)
    assert all(names[k] == v for k, v in tiny_names.items())
    keys = {k: {"shape": list(v.shape), "ldm": names[k]} for k, v in full.state_dict().items()}
    lines = ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in keys.items())
    (OUT / "controlnet" / "sd15_keys.json").write_text(f"{{\n{lines}\n}}\n")

    # control_guidance_start/end: the scale diffusers' pipeline gives the ControlNet at each step
    torch.manual_seed(13)
    unet = UNet2DConditionModel(block_out_channels=(8, 16, 16, 16), layers_per_block=2, attention_head_dim=2,
                                norm_num_groups=4, cross_attention_dim=32,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    pipe = StableDiffusionControlNetPipeline(vae, None, None, unet, net, EulerDiscreteScheduler(), None, None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    net.register_forward_pre_hook(lambda module, args, kwargs: seen.append(float(kwargs["conditioning_scale"])),
                                  with_kwargs=True)
    cases = []
    for steps in (1, 3, 7, 10, 20):
        for start in (0.0, 0.1, 0.3, 0.7):
            for end in (e for e in (0.3, 0.8, 0.9, 1.0) if e > start):  # diffusers refuses start >= end
                seen.clear()
                pipe(prompt_embeds=text[:1], image=images[0, :1], num_inference_steps=steps, guidance_scale=1.0,
                     height=48, width=40, control_guidance_start=start, control_guidance_end=end, output_type="latent")
                cases.append({"steps": steps, "start": start, "end": end, "keep": list(seen)})
    (OUT / "controlnet" / "keep.json").write_text("[\n" + ",\n".join(json.dumps(c) for c in cases) + "\n]\n")


# ---------------------------------------------------------------------------------------------------------------
# video2video: the ORIGINAL MuseV predictor + pipeline with a tiny random ControlNet

CONTROLNET_CONFIG = dict(  # diffusers ControlNetModel matching the shared musev_referencenet fixture's UNet
    block_out_channels=(32, 32, 32, 32), layers_per_block=2, cross_attention_dim=32, norm_num_groups=16,
    attention_head_dim=2, conditioning_embedding_out_channels=(8, 16, 16, 32))
CONTROLNET_SEED = 11
ZERO_CONV_SCALE = 0.5  # the 13 output 1x1 convs ("zero convs", zero at init in diffusers) are random too
CONDITIONING_GAIN = 16.0  # the conditioning embedding's conv_out (zero at init too): control ~ latent at step 0


def controlnet_init_spec(state: dict) -> list:
    """[key, shape, mean, std] per ControlNet tensor, in state-dict order: the seeded draw of `seeded_weights`.
    Matrices and kernels N(0, 1/fan_in); norm weights 1 + 0.1 N; biases 0.1 N; the zero convs' weights x
    ZERO_CONV_SCALE and the conditioning embedding's conv_out weight x CONDITIONING_GAIN (without it the control
    image would move the residuals by 1% where the latent moves them by 100%)."""
    spec = []
    for key, value in state.items():
        if value.ndim > 1:
            mean, std = 0.0, value[0].numel() ** -0.5
            if key.startswith(("controlnet_down_blocks.", "controlnet_mid_block.")):
                std *= ZERO_CONV_SCALE
            if key == "controlnet_cond_embedding.conv_out.weight":
                std *= CONDITIONING_GAIN
        else:
            mean, std = (1.0 if "norm" in key and key.endswith(".weight") else 0.0), 0.1
        spec.append([key, list(value.shape), mean, float(f"{std:.6g}")])
    return spec


def seeded_weights(spec: list, seed: int) -> dict:
    """fp16 tensors drawn in `spec` order from one seeded generator (plain torch: a test can rebuild them)."""
    generator = torch.Generator().manual_seed(seed)
    return {key: (mean + std * torch.randn(shape, generator=generator)).half() for key, shape, mean, std in spec}


def tensors_sha256(tensors: dict) -> str:
    """Digest of names, dtypes, shapes and bytes, in the dict's order."""
    import hashlib

    digest = hashlib.sha256()
    for key, value in tensors.items():
        value = value.detach().contiguous()
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def crop_resize_frames(raw: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """What the original's batch_dynamic_crop_resize_images (MMCM image_process.py:202-261) does to a video
    chunk (c, t, h, w) uint8 of the target aspect: drop the last row and column, bilinear back to (height,
    width) with torch's uint8 kernel (uint8 out). Checked against the original at generation time."""
    h, w = raw.shape[-2:]
    assert w * height == h * width, "only the same-aspect case is written out here"
    return torch.nn.functional.interpolate(raw[..., : h - 1, : w - 1], (height, width), mode="bilinear")


def _original_musev(musev: Path, mmcm: Path, ip_adapter: Path):
    """Import the original predictor and models from checkouts, with stand-ins for what a CPU box without CUDA
    wheels lacks: xformers (memory_efficient_attention = torch SDPA, 3-D inputs unsqueezed to 4-D so the fused
    kernel runs; an explicit softmax after `xformers.ops.math = True`), torchvision (imported, never called on
    this path; PyPI's wheel needs CUDA torch), webp, the mmcm package __init__s (they import every MMCM tool),
    MMCM's colour correction (skimage; only for need_hist_match) and its ControlNet-processor loader
    (controlnet_aux, mmpose; the fixture hands its processor over directly)."""
    import importlib.machinery
    import logging
    import types

    import torch.nn.functional as F

    def module(name, path=None):  # a package when `path` (a list of folders) is given
        m = types.ModuleType(name)
        m.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=path is not None)
        if path is not None:
            m.__path__ = [str(p) for p in path]
        sys.modules[name] = m
        return m

    def not_on_this_path(*args, **kwargs):
        raise RuntimeError("not used by the video2video fixture")

    def attention(q, k, v, attn_bias=None, p=0.0, scale=None, op=None):  # xformers layout (B, M, [H,] K)
        three = q.ndim == 3
        q, k, v = (x.unsqueeze(2) if three else x for x in (q, k, v))
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, M, K)
        bias = attn_bias.unsqueeze(1) if three and attn_bias is not None else attn_bias
        if xformers.ops.math:
            logits = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
            out = (logits + (0 if bias is None else bias)).softmax(-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
        out = out.transpose(1, 2)
        return out.squeeze(2) if three else out

    sys.path[:0] = [str(musev), str(ip_adapter)]
    for name in ("mmcm", "mmcm/vision", "mmcm/vision/process", "mmcm/vision/data", "mmcm/vision/utils",
                 "mmcm/vision/feature_extractor"):
        module(name.replace("/", "."), [mmcm / name])
    colour = module("mmcm.vision.process.correct_color")
    colour.hist_match_color_video_batch = colour.hist_match_video_bcthw = not_on_this_path
    module("mmcm.vision.feature_extractor.controlnet").load_controlnet_model = not_on_this_path
    module("torchvision", [])
    module("webp")
    xformers = module("xformers", [])
    xformers.ops = module("xformers.ops")
    xformers.ops.memory_efficient_attention, xformers.ops.math = attention, False
    logging.disable(logging.INFO)  # the original logs tensors at DEBUG level

    import diffusers.models.attention_processor
    from diffusers.utils import import_utils

    import_utils._xformers_available = True  # the predictor switches to xformers when it is importable
    diffusers.models.attention_processor.xformers = xformers
    import musev.pipelines.pipeline_controlnet_predictor as predictor
    from ip_adapter.ip_adapter import ImageProjModel
    from mmcm.vision.data.video_dataset import SequentialDataset
    from mmcm.vision.process import image_process
    from musev.models.referencenet import ReferenceNet2D
    from musev.models.unet_3d_condition import UNet3DConditionModel
    from musev.schedulers import EulerDiscreteScheduler

    return types.SimpleNamespace(
        xformers=xformers, predictor=predictor, image_process=image_process, ImageProjModel=ImageProjModel,
        ReferenceNet2D=ReferenceNet2D, UNet3DConditionModel=UNet3DConditionModel,
        SequentialDataset=SequentialDataset, EulerDiscreteScheduler=EulerDiscreteScheduler)


V2V_FRAMES, V2V_TILE = 6, 8  # one chunk of time_size 6 (control frame 0 = the condition image's): 5 frames made
V2V_HW = (128, 192)
V2V_CALL = dict(  # run_pipe_video2video kwargs, as scripts/inference/video2video.py passes its defaults
    time_size=V2V_FRAMES, step=V2V_FRAMES, sample_rate=1, need_return_videos=False, need_return_condition=False,
    controlnet_conditioning_scale=1.0, control_guidance_start=0.0, control_guidance_end=1.0, end_to_end=True,
    video_strength=1.0, height=V2V_HW[0], width=V2V_HW[1], noise_type="video_fusion", max_batch_num=1,
    strength=0.8, need_img_based_video_noise=True, video_num_inference_steps=2, fix_condition_images=False,
    video_guidance_scale=3.5, guidance_scale=7.5, num_inference_steps=30, redraw_condition_image=False,
    img_weight=1e-3, w_ind_noise=0.5, n_vision_condition=1, motion_speed=8.0, need_hist_match=False,
    video_guidance_scale_end=None, video_guidance_scale_method="linear", vision_condition_latent_index=None,
    fixed_refer_image=True, redraw_condition_image_with_referencenet=True, refer_face_image=None,
    fixed_refer_face_image=True, facein_scale=1.0, redraw_condition_image_with_facein=True,
    ip_adapter_face_scale=1.0, redraw_condition_image_with_ip_adapter_face=False, fixed_ip_adapter_image=True,
    ip_adapter_scale=1.0, redraw_condition_image_with_ipdapter=True, prompt_only_use_image_prompt=False,
    controlnet_processor_params={"detect_resolution": 128, "image_resolution": 128},
    record_mid_video_noises=False, record_mid_video_latents=False, video_overlap=1,
    context_schedule="uniform_v2", context_frames=4, context_stride=1, context_overlap=2, context_batch_size=1,
    interpolation_factor=1, video_has_condition=True)
V2V_CASES = {  # which2video -> how video2video.py sets the predictor up for it
    "video_middle": dict(need_video2video=False, video_is_middle=True),
    "video": dict(need_video2video=True, video_is_middle=False),
}


def _v2v_pipeline(orig, shared: Path, meta: dict, i2v_tensors: dict, unet=None, with_controlnet: bool = True, **extra):
    """The predictor's pipeline (PR:110-309) from the shared fixture's models and a tiny random ControlNet
    (`with_controlnet`); `unet` instead of the shared one, `extra` components (ip_adapter_face)."""
    from unittest import mock

    from diffusers import AutoencoderKL, ControlNetModel, PNDMScheduler
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    variant = shared / "reference/fixtures/musev_referencenet"
    released = meta["variants"]["musev_referencenet"]

    def loaded(model_class, folder, kwargs=None, file="diffusion_pytorch_model.safetensors", prefix=""):
        if kwargs is None:
            config = json.loads((variant / folder / "config.json").read_text())
            kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
        model = model_class(**kwargs)
        state = load_file(variant / folder / file)
        model.load_state_dict({k.removeprefix(prefix): v.float() for k, v in state.items()})
        return model.eval()

    controlnet = ControlNetModel(**CONTROLNET_CONFIG)
    spec = controlnet_init_spec(controlnet.state_dict())
    weights = seeded_weights(spec, CONTROLNET_SEED)
    controlnet.load_state_dict({k: v.float() for k, v in weights.items()})
    text = CLIPTextConfig(**{k: released["text_encoder"]["config"][k] for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "max_position_embeddings", "hidden_act", "bos_token_id", "eos_token_id", "pad_token_id")})
    torch.manual_seed(4)
    text_encoder = CLIPTextModel(text).eval()
    vocab = shared / "reference/clip_tokenizer"

    class FixedClipImageEmbeds(torch.nn.Module):  # the CLIP-ViT-H image encoder's place
        def __init__(self, embeds):
            super().__init__()
            self.register_buffer("embeds", embeds)

        def extract_images(self, images, target_height, target_width, return_type):
            return self.embeds

    pipe = orig.predictor.MusevControlNetPipeline(
        vae=loaded(AutoencoderKL, "vae"), unet=loaded(orig.UNet3DConditionModel, "unet") if unet is None else unet,
        scheduler=PNDMScheduler.from_config(meta["variants"]["musev_referencenet"]["runs"]["t13_linspace3"][
            "checkpoint_scheduler_config"]),
        controlnet=controlnet.eval() if with_controlnet else None, text_encoder=text_encoder,
        tokenizer=CLIPTokenizer(str(vocab / "vocab.json"), str(vocab / "merges.txt"), model_max_length=77),
        safety_checker=None, feature_extractor=None, referencenet=loaded(orig.ReferenceNet2D, "referencenet"),
        vision_clip_extractor=FixedClipImageEmbeds(i2v_tensors["inputs.clip_image_embeds"]),
        ip_adapter_image_proj=loaded(orig.ImageProjModel, ".", released["image_proj_constructor_kwargs"],
                                     "ip_adapter_image_proj.safetensors", "image_proj."), **extra)
    pipe.scheduler = orig.EulerDiscreteScheduler.from_config(pipe.scheduler.config)  # PR:258-261
    pipe.enable_vae_slicing()  # PR:284
    randn = torch.randn
    with mock.patch("torch.cuda.is_available", lambda: True), \
            mock.patch("torch.randn", lambda *a, device=None, **k: randn(*a, **k)):
        pipe.enable_xformers_memory_efficient_attention()  # PR:288-290; its CUDA self-test run on CPU
    return pipe, spec, weights


def _v2v_run(orig, pipe, inputs: dict, case: str) -> dict:
    """One run_pipe_video2video call, everything captured by hooks/wrappers around the original objects."""
    import functools

    record = dict(controlnet=[], unet=[], steps=[], add_noise=[], referencenet=[], processor=[], pipeline=[],
                  text_ids=[])
    state = dict(step=0, window=0, residuals=None)

    class Chunks(orig.SequentialDataset):  # DecordVideoDataset with the frames in memory instead of a file
        @property
        def total_frames(self):
            return len(self.raw_datas)

        def get_batch_raw_data(self, indexs):
            return self.raw_datas[indexs]

    def processor(data, **kwargs):  # stands in for the DWPose processor: this chunk's control frames, uint8
        record["processor"].append(dict(data_shape=list(data.shape), **kwargs))
        control = crop_resize_frames(torch.from_numpy(inputs["control_video"]).permute(3, 0, 1, 2), *V2V_HW)
        return control.transpose(0, 1).numpy()  # (t, c, h, w)

    def on_controlnet(module, args, kwargs, output):
        record["controlnet"].append(dict(step=state["step"], window=state["window"], args=args, kwargs=kwargs,
                                         output=output))
        state["residuals"] = output

    def on_unet(module, args, kwargs, output):
        same = (kwargs["down_block_additional_residuals"] is state["residuals"][0]
                and kwargs["mid_block_additional_residual"] is state["residuals"][1])
        record["unet"].append(dict(step=state["step"], window=state["window"], args=args, kwargs=kwargs,
                                   output=output[0], residuals_from_controlnet=same))
        state["window"] += 1

    def on_referencenet(module, args, kwargs, output):
        record["referencenet"].append(dict(step=state["step"], kwargs=kwargs, output=output))

    scheduler = pipe.scheduler
    step, add_noise = scheduler.step, scheduler.add_noise

    @functools.wraps(step)  # keeps the signature: the pipeline inspects it for noise_type
    def recording_step(model_output, timestep, sample, **kwargs):
        out = step(model_output, timestep, sample, **kwargs)
        record["steps"].append(dict(t=timestep, eps=model_output.clone(), before=sample.clone(),
                                    after=out.prev_sample.clone()))
        state.update(step=state["step"] + 1, window=0)
        return out

    @functools.wraps(add_noise)
    def recording_add_noise(original_samples, noise, timesteps):
        out = add_noise(original_samples, noise, timesteps)
        record["add_noise"].append(dict(init=original_samples.clone(), noise=noise.clone(), t=timesteps.clone(),
                                        out=out.clone()))
        return out

    pipeline_class = type(pipe)
    pipeline_module = sys.modules[pipeline_class.__module__]
    prepare_global_context = pipeline_module.prepare_global_context

    def recording_context(**kwargs):
        record["global_context"] = prepare_global_context(**kwargs)
        return record["global_context"]

    class RecordingPipeline(pipeline_class):
        def __call__(self, *args, **kwargs):
            record["pipeline"].append(kwargs)
            record["pipeline_output"] = super().__call__(*args, **kwargs)
            return record["pipeline_output"]

    predictor = object.__new__(orig.predictor.DiffusersPipelinePredictor)  # its __init__ loads from disk
    predictor.pipeline, predictor.controlnet_processor, predictor.controlnet_processor_params = pipe, processor, {}
    pipe.__class__ = RecordingPipeline
    scheduler.step, scheduler.add_noise = recording_step, recording_add_noise
    pipeline_module.prepare_global_context = recording_context
    hooks = [pipe.controlnet.register_forward_hook(on_controlnet, with_kwargs=True),
             pipe.unet.register_forward_hook(on_unet, with_kwargs=True),
             pipe.referencenet.register_forward_hook(on_referencenet, with_kwargs=True),
             pipe.text_encoder.register_forward_pre_hook(lambda m, args: record["text_ids"].append(args[0].tolist()))]
    video = inputs["rgb_video" if case == "video" else "control_video"]
    try:
        with torch.no_grad():
            predictor.run_pipe_video2video(
                video=Chunks(video, time_size=V2V_FRAMES, step=V2V_FRAMES, sample_rate=1, drop_last=True,
                             data_type="rgb", channels_order="c t h w"),
                prompt=inputs["prompt"], negative_prompt=inputs["negative_prompt"],
                video_negative_prompt=inputs["negative_prompt"], generator=torch.Generator("cpu").manual_seed(1000),
                condition_images=inputs["condition_images"], refer_image=inputs["refer_image"],
                ip_adapter_image=inputs["condition_images"], **V2V_CALL, **V2V_CASES[case])
    finally:
        for hook in hooks:
            hook.remove()
        del scheduler.step, scheduler.add_noise
        pipeline_module.prepare_global_context = prepare_global_context
        pipe.__class__ = pipeline_class
    record.update(sigmas=scheduler.sigmas.tolist(), timesteps=scheduler.timesteps.tolist(),
                  init_noise_sigma=float(scheduler.init_noise_sigma))
    return record


def _v2v_stored(r: dict) -> dict:
    """The per-run tensors the fixture keeps: initial latents, guided eps per step, returned latents."""
    return {"latents.x_T": r["steps"][0]["before"],
            **{f"steps.{i}.noise_pred_guided": s["eps"] for i, s in enumerate(r["steps"])},
            "final.latents": torch.from_numpy(r["pipeline_output"].latents)}


def _v2v_calls(r: dict, text, ip, cond, control, checks: dict) -> tuple[list, list]:
    """Every UNet and ControlNet call of a run, checked and described for the manifest."""
    from einops import rearrange

    windows, steps = [c[0] for c in r["global_context"]], r["steps"]
    unet_calls, controlnet_calls = [], []
    for u, c in zip(r["unet"], r["controlnet"], strict=True):
        assert (u["step"], u["window"]) == (c["step"], c["window"]) and u["residuals_from_controlnet"]
        window, sample, kw = windows[u["window"]], u["args"][0], u["kwargs"]
        # the clean condition latent at frame 0 of both guidance halves, then the window scaled by its sigma
        x, sigma = steps[u["step"]]["before"][:, :, window], r["sigmas"][u["step"]]
        assert torch.equal(sample[:, :, :1], cond.expand(2, -1, -1, -1, -1))
        checks.setdefault("unet_sample_vs_x_over_sqrt_sigma2_plus_1", []).append(
            (sample[:, :, 1:] - torch.cat([x, x]) / (sigma**2 + 1) ** 0.5).abs().max().item())
        assert torch.equal(kw["encoder_hidden_states"], text) and torch.equal(kw["vision_clip_emb"], ip)
        unet_calls.append(dict(
            step=u["step"], window=u["window"], frames=window, sample_shape=list(sample.shape),
            timestep=float(u["args"][1]), sample_index=kw["sample_index"].tolist(),
            vision_conditon_frames_sample_index=kw["vision_conditon_frames_sample_index"].tolist(),
            sample_frame_rate=kw["sample_frame_rate"], ip_adapter_scale=kw["ip_adapter_scale"],
            do_classifier_free_guidance=kw["do_classifier_free_guidance"],
            encoder_hidden_states="text.prompt_embeds (2, 154, 32); the UNet repeats it per frame",
            vision_clip_emb="ip.image_emb", down_block_refer_embs="the ReferenceNet's 12 features of step 0",
            down_block_additional_residuals="this window's ControlNet call's 12 residuals (the same tensors)",
            mid_block_additional_residual="this window's ControlNet call's mid residual"))
        sample_c, t, ehs = c["args"]
        kw, rows = c["kwargs"], c["args"][0].shape[0] // 2
        assert torch.equal(sample_c, rearrange(sample, "b c t h w -> (b t) c h w"))
        assert torch.equal(ehs, text.repeat_interleave(rows, 0))  # [negative] x (L+1), then [prompt] x (L+1)
        image = kw["controlnet_cond"]
        seen = [next((j for j in range(control.shape[1]) if torch.equal(row, control[:, j])), None) for row in image]
        assert seen == ([0] + [1 + f for f in window]) * 2, seen
        down, mid = c["output"]
        controlnet_calls.append(dict(
            step=c["step"], window=c["window"], frames=window, sample_shape=list(sample_c.shape),
            sample="the UNet call's input as (b t) c h w: [uncond: cond latent, window; cond: the same]",
            timestep=float(t), encoder_hidden_states_shape=list(ehs.shape),
            encoder_hidden_states="text.prompt_embeds.repeat_interleave(L+1, 0): the negative rows first",
            controlnet_cond_shape=list(image.shape), control_frames=seen,
            controlnet_cond_row_sums=[round(v, 6) for v in image.double().flatten(1).sum(1).tolist()],
            conditioning_scale=kw["conditioning_scale"], guess_mode=kw["guess_mode"],
            controlnet_cond_latents=kw["controlnet_cond_latents"], return_dict=kw["return_dict"],
            residual_shapes=[list(d.shape) for d in [*down, mid]],
            residual_abs_mean=[round(d.abs().mean().item(), 5) for d in [*down, mid]]))
    assert len(controlnet_calls) == len(windows) * len(steps)
    # per step: windows averaged (P:2077-2079), then guidance 3.5 (P:2100-2105): the eps of the Euler step
    for i, s in enumerate(steps):
        acc, count = torch.zeros_like(torch.cat([s["eps"]] * 2)), torch.zeros(1, 1, s["eps"].shape[2], 1, 1)
        for u in r["unet"]:
            if u["step"] == i:
                acc[:, :, windows[u["window"]]] += u["output"][:, :, 1:]
                count[:, :, windows[u["window"]]] += 1
        acc = acc / count
        guided = acc[:1] + 3.5 * (acc[1:] - acc[:1])
        checks.setdefault("eps_vs_window_average_then_cfg", []).append((guided - s["eps"]).abs().max().item())
    assert max(checks["eps_vs_window_average_then_cfg"]) < 1e-5
    return unet_calls, controlnet_calls


def _v2v_write(runs, again, math, frames, tiles, inputs, spec, weights, i2v, i2v_tensors, provenance):
    """Checks what the runs recorded, then writes tests/fixtures/video2video (see make_video2video)."""
    import hashlib

    import numpy as np

    first_unet = runs["video_middle"]["unet"][0]
    text, ip = first_unet["kwargs"]["encoder_hidden_states"], first_unet["kwargs"]["vision_clip_emb"]
    cond = first_unet["args"][0][:1, :, :1]  # frame 0 of every UNet input: the clean condition latent
    refer = runs["video_middle"]["referencenet"][0]["kwargs"]["sample"]  # (2, 4, h, w), two equal halves
    assert torch.equal(refer[:1], refer[1:])
    known = {  # arrays that reach __call__, by what they are
        "control video frame 0 after the crop-resize": frames["control_video"][None, :, :1],
        "control video frames 1..5 after the crop-resize": frames["control_video"][None, :, 1:],
        "RGB video frames 1..5 after the crop-resize": frames["rgb_video"][None, :, 1:],
        "the shared inputs.condition_images after the predictor's crop-resize": frames["condition_images"],
        "the shared inputs.refer_image after the predictor's crop-resize": frames["refer_image"],
    }

    def describe(value):
        if isinstance(value, (torch.Tensor, np.ndarray)):
            kind, value = type(value).__name__, torch.as_tensor(value)
            name = next((k for k, v in known.items() if v.shape == value.shape and torch.equal(v, value)), None)
            assert name is not None, f"an unknown array {value.shape} reached the pipeline"
            return {"type": kind, "dtype": dtype(value), "shape": list(value.shape), "is": name}
        if isinstance(value, torch.Generator):
            return "the predictor's generator, torch.Generator('cpu').manual_seed(1000)"
        return value

    def dtype(value):
        return str(value.dtype).removeprefix("torch.")

    def source(module):
        return hashlib.sha256(Path(sys.modules[module].__file__).read_bytes()).hexdigest()[:16]

    manifest = {
        "what": "the ORIGINAL MuseV video2video path (run_pipe_video2video -> MusevControlNetPipeline.__call__) "
                "with a tiny random ControlNet; see tests/make_fixtures.py: make_video2video",
        "provenance": dict(provenance, source_sha256={m: source(m) for m in (
            "musev.pipelines.pipeline_controlnet", "musev.pipelines.pipeline_controlnet_predictor",
            "diffusers.models.controlnet")}),
        "shared_models": "../shared/reference/fixtures/musev_referencenet: unet/, referencenet/, vae/, "
                         "ip_adapter_image_proj.safetensors (fp16 on disk, run in fp32)",
        "vision_clip_extractor": "a stand-in returning the shared inputs.clip_image_embeds (1, 1024)",
        "shared_inputs": {k: tensors_sha256({k: i2v_tensors[k]}) for k in
                          ("inputs.condition_images", "inputs.refer_image", "inputs.clip_image_embeds")},
        "controlnet": {"class": "diffusers ControlNetModel (TMElyralab fork, tme = 0.24.0.dev0)",
                       "config": {k: list(v) if isinstance(v, tuple) else v for k, v in CONTROLNET_CONFIG.items()},
                       "weights": "seeded_weights(init_spec, seed) of tests/make_fixtures.py: fp16, run in fp32",
                       "seed": CONTROLNET_SEED, "sha256": tensors_sha256(weights), "init_spec": spec},
        "images": {"condition_images": "the shared inputs.condition_images, taken as the image file",
                   "refer_image": "the shared inputs.refer_image, taken as the image file",
                   "crop_resize": "MMCM batch_dynamic_crop_resize_images_v2 (PR:888-918): PIL, last row and column "
                                  "dropped, Lanczos to 128x192, as musev_lite.video_io.fit_image",
                   "crop_resized_sha256": {k: tensors_sha256({k: frames[k]})
                                           for k in ("condition_images", "refer_image")}},
        "video": {"frames": V2V_FRAMES,
                  "raw_frames": f"<name>_tiles (t, {V2V_HW[0] // V2V_TILE}, {V2V_HW[1] // V2V_TILE}, 3) uint8, each "
                                f"pixel repeated {V2V_TILE}x{V2V_TILE}: (t, 128, 192, 3) uint8 as decord reads a file",
                  "crop_resize": "crop_resize_frames (= MMCM batch_dynamic_crop_resize_images, PR:938-942, checked): "
                                 "last row and column dropped, uint8 bilinear back to 128x192",
                  "crop_resized_sha256": {k: tensors_sha256({k: frames[k]}) for k in ("control_video", "rgb_video")}},
        "prompt": inputs["prompt"], "negative_prompt": inputs["negative_prompt"],
        "cases": {},
    }
    save("video2video", "inputs", {"control_video_tiles": tiles["control_video"], "rgb_video_tiles": tiles["rgb_video"],
                                   "text.prompt_embeds": text, "cond.condition_latents": cond, "ip.image_emb": ip,
                                   "refnet.refer_latent": refer[:1]})
    for case, r in runs.items():
        steps, tensors = r["steps"], _v2v_stored(r)
        x_t, final = tensors["latents.x_T"], tensors["final.latents"]
        checks = {}
        unet_calls, controlnet_calls = _v2v_calls(r, text, ip, cond, frames["control_video"].float() / 255, checks)
        assert torch.equal(final[:, :, :1], cond) and torch.equal(final[:, :, 1:], steps[-1]["after"])
        # initial latents from the generator: video_fusion_noise (musev/utils/noise_util.py:31-83), two draws
        generator = torch.Generator().manual_seed(1000)
        common = torch.randn((1, 4, 1, *x_t.shape[3:]), generator=generator)
        individual = torch.randn(tuple(x_t.shape), generator=generator)
        half = torch.tensor(0.5)
        noise = torch.sqrt(1 - half) * common + torch.sqrt(half) * individual
        if case == "video":  # P:417: scheduler.add_noise(VAE latents of the RGB frames, noise, first timestep)
            (added,) = r["add_noise"]
            assert torch.equal(added["noise"], noise) and added["t"].tolist() == [r["timesteps"][0]]
            assert torch.equal(added["out"], x_t)
            checks["x_T_vs_init_plus_sigma0_noise"] = (added["init"] + noise * r["sigmas"][0] - x_t).abs().max().item()
        else:  # P:322-344, 413: a 1e-3 share of the condition latent, times init_noise_sigma
            assert not r["add_noise"]
            expected = (1e-3**0.5 * cond.expand_as(x_t) + (1 - 1e-3) ** 0.5 * noise) * r["init_noise_sigma"]
            checks["x_T_vs_img_based_video_noise"] = (expected - x_t).abs().max().item()
        (referencenet,) = r["referencenet"]
        kw = referencenet["kwargs"]
        assert torch.equal(kw["sample"], refer) and torch.equal(kw["encoder_hidden_states"], ip)
        checks["ip_tokens_vs_shared_t13_linspace3"] = (ip - i2v_tensors["ip.image_emb"]).abs().max().item()
        assert r["text_ids"] == i2v["text_encoder_calls"]  # same prompts, same tokenizer path as the shared run
        checks["token_ids"] = "the 4 text-encoder calls (2 chunks of 77 per prompt) got the shared run's token ids"
        save("video2video", case, tensors)
        manifest["cases"][case] = dict(
            predictor_kwargs=dict(
                V2V_CALL, **V2V_CASES[case], video=("the RGB" if case == "video" else "the control") + " video",
                prompt="prompt", negative_prompt="negative_prompt", video_negative_prompt="negative_prompt",
                condition_images="the shared inputs.condition_images", refer_image="the shared inputs.refer_image",
                ip_adapter_image="the shared inputs.condition_images",
                generator="torch.Generator('cpu').manual_seed(1000)"),
            controlnet_processor_calls=r["processor"],
            pipeline_call_kwargs={k: describe(v) for k, v in r["pipeline"][0].items()},
            windows=[c[0] for c in r["global_context"]], timesteps=r["timesteps"], sigmas=r["sigmas"],
            init_noise_sigma=r["init_noise_sigma"], guidance=[3.5] * len(steps),
            controlnet_calls=controlnet_calls, unet_calls=unet_calls,
            referencenet_calls=[dict(step=referencenet["step"], sample="refnet.refer_latent twice (uncond = cond)",
                                     timestep=float(kw["timestep"]), encoder_hidden_states="ip.image_emb",
                                     num_frames=kw["num_frames"], return_ndim=kw["return_ndim"])],
            out_videos_shape=list(r["pipeline_output"].videos.shape), checks=checks,
            determinism={name: {k: (v - tensors[k]).abs().max().item() for k, v in _v2v_stored(other[case]).items()}
                         for name, other in (("same_settings_again", again), ("math_attention_not_sdpa", math))},
            tensors={k: dict(shape=list(v.shape), dtype=dtype(v)) for k, v in tensors.items()})
    (OUT / "video2video" / "manifest.json").write_text(compact_json(manifest) + "\n")


def make_video2video():
    """The ORIGINAL MuseV video2video (pose2video) path with a tiny random ControlNet, for parity tests.

    What ran: `DiffusersPipelinePredictor.run_pipe_video2video` (MuseV musev/pipelines/
    pipeline_controlnet_predictor.py:760-1290) and through it `MusevControlNetPipeline.__call__`
    (pipeline_controlnet.py:1295-2202), unedited, with scripts/inference/video2video.py's defaults (V2V_CALL),
    on one 6-frame chunk, on CPU in float32, 1 torch thread. Models: the shared `musev_referencenet` fixture's
    UNet3D, ReferenceNet, IP-Adapter projection and VAE (read from ../shared/reference/fixtures, not copied);
    a tiny diffusers ControlNetModel (CONTROLNET_CONFIG) with every weight random (zero convs included) and
    fp16-rounded; a tiny random CLIPTextModel with the real CLIP tokenizer; a stand-in CLIP image encoder
    returning the shared fixture's embedding. Set up as the predictor: Euler from the SD1.5 scheduler config
    (linspace), VAE slicing, the original enable_xformers_memory_efficient_attention (xformers = torch SDPA).

    Cases, both with the shared condition image (control frame 0 belongs to it: video_has_condition), the
    shared ReferenceNet image, IP image = condition image, 2 Euler steps, guidance 3.5, context_frames 4 /
    overlap 2 -> windows [0..3], [2..4] over the 5 generated frames:
      video_middle  video_is_middle: the video is the control video (MuseV's pose2video, its README command)
      video         which2video=video: the video is RGB, its frames 1..5 (VAE means) are the initial latents
                    noised to the first timestep; the control frames come from a stand-in processor (the
                    DWPose detector's place) giving the same control frames as in video_middle.

    Files in tests/fixtures/video2video/ (~390 KB):
      inputs.safetensors   control_video_tiles, rgb_video_tiles (6, 16, 24, 3) uint8 (each pixel repeated 8x8 is
                           a raw 128x192 frame); text.prompt_embeds (2, 154, 32) [negative; prompt];
                           cond.condition_latents (1, 4, 1, 16, 24); ip.image_emb (2, 4, 32) [proj(0); proj(clip)];
                           refnet.refer_latent (1, 4, 16, 24), the ReferenceNet's input
      <case>.safetensors   latents.x_T, steps.<i>.noise_pred_guided (1, 4, 5, 16, 24) (window-averaged, guided:
                           what the Euler step got); final.latents (1, 4, 6, 16, 24) (cond latent at frame 0)
      manifest.json        set-up, the ControlNet's config and weights (controlnet_init_spec + seeded_weights:
                           rebuilt by the tests from 20 KB of JSON instead of 930 KB of fp16, sha256 checked),
                           predictor and __call__ kwargs, windows, timesteps, every ControlNet / UNet / ReferenceNet
                           call, the checks made while running and the spread of a rerun with another attention.
    Needs, at generation time only: the original's environment (see bench/bench_vs_original.py) and checkouts
    of TMElyralab/MuseV, TMElyralab/MMCM and tencent-ailab/IP-Adapter in MUSEV_SRC, MMCM_SRC, IP_ADAPTER_SRC.
    """
    import os

    import diffusers
    import ftfy
    import numpy as np
    import transformers
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    shared = Path(os.environ.get("MUSEV_LITE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    meta = json.loads((shared / "reference/fixtures/manifest.json").read_text())
    i2v = meta["variants"]["musev_referencenet"]["runs"]["t13_linspace3"]
    i2v_tensors = load_file(shared / "reference/fixtures/musev_referencenet/t13_linspace3.safetensors")
    orig = _original_musev(*(Path(os.environ[k]) for k in ("MUSEV_SRC", "MMCM_SRC", "IP_ADAPTER_SRC")))
    pipe, spec, weights = _v2v_pipeline(orig, shared, meta, i2v_tensors)

    generator = torch.Generator().manual_seed(12)
    tiles = {name: torch.randint(0, 256, (V2V_FRAMES, V2V_HW[0] // V2V_TILE, V2V_HW[1] // V2V_TILE, 3),
                                 generator=generator, dtype=torch.uint8) for name in ("control_video", "rgb_video")}
    raw = {name: t.repeat_interleave(V2V_TILE, 1).repeat_interleave(V2V_TILE, 2) for name, t in tiles.items()}
    inputs = dict(control_video=raw["control_video"].numpy(), rgb_video=raw["rgb_video"].numpy(),
                  condition_images=i2v_tensors["inputs.condition_images"].numpy(),
                  refer_image=i2v_tensors["inputs.refer_image"].numpy(),
                  prompt=meta["prompt"], negative_prompt=meta["video_negative_prompt"]["text"])
    frames = {}  # what the predictor's crop-resize makes of each chunk (c, t, h, w) and image, uint8
    for name in raw:
        frames[name] = crop_resize_frames(raw[name].permute(3, 0, 1, 2), *V2V_HW)
        theirs = orig.image_process.batch_dynamic_crop_resize_images(inputs[name].transpose(3, 0, 1, 2), *V2V_HW)
        assert torch.equal(theirs, frames[name])
    for name in ("condition_images", "refer_image"):
        frames[name] = torch.from_numpy(orig.image_process.batch_dynamic_crop_resize_images_v2(inputs[name], *V2V_HW))
    runs = {case: _v2v_run(orig, pipe, inputs, case) for case in V2V_CASES}
    again = {case: _v2v_run(orig, pipe, inputs, case) for case in V2V_CASES}
    orig.xformers.ops.math = True
    math = {case: _v2v_run(orig, pipe, inputs, case) for case in V2V_CASES}
    _v2v_write(runs, again, math, frames, tiles, inputs, spec, weights, i2v, i2v_tensors,
               dict(torch=torch.__version__, diffusers=diffusers.__version__, transformers=transformers.__version__,
                    ftfy=ftfy.__version__, numpy=np.__version__, python=sys.version.split()[0],
                    torch_num_threads=torch.get_num_threads()))


FACE_SEED, FACE_SCALE = 18, 0.7  # the face weights' draw; ip_adapter_face_scale of both runs (not MuseV's 1.0: a
FACE_FRAMES = 4  # scale the UNet must apply); the forward's window: the condition frame and 3 frames


def init_spec(state: dict) -> list:
    """[key, shape, mean, std] per tensor: matrices N(0, 1/fan_in), norm weights 1 + 0.1 N, biases 0.1 N
    (controlnet_init_spec's draw, whose ControlNet-only factors match no key here)."""
    return controlnet_init_spec(state)


def make_ip_adapter_face():
    """The ORIGINAL MuseV with IPAdapterFaceID at tiny random weights, for tests/test_ip_adapter_face.py.

    Models: the shared `musev_referencenet` fixture (UNet3D, ReferenceNet, IP-Adapter projection, VAE; read from
    ../shared, not copied), its UNet built with `need_t2i_ip_adapter_face=True` (MuseV's text2video.py does so
    for --ip_adapter_face_model_name) and the face K/V loaded by the original loader
    (ip_adapter_face_loader.update_unet_ip_adapter_cross_attn_param) from a dict in the published layout
    `ip_adapter` {"1.to_k_ip.weight", ...}; IP-Adapter's MLPProjModel (tencent-ailab/IP-Adapter
    ip_adapter/ip_adapter_faceid.py) at cross_attention_dim 32, 512-d embeddings, 4 tokens. Both drawn by
    `seeded_weights(init_spec, FACE_SEED)` (fp16, run in fp32): the files hold the spec, the tests redraw them.
    The face embedding: a seeded N(0, 1) 512-d vector, L2-normalised (insightface's normed_embedding).

    1. forward: the original UNet3DConditionModel on the shared t13_linspace3 run's second window of step 0,
       cut to FACE_FRAMES frames (condition frame first), with its text, IP tokens and ReferenceNet features,
       and ip_adapter_face_emb = [proj(0); proj(face)] as the original pipeline's get_ip_adapter_face_emb
       makes them (called, with a stand-in extractor returning the embedding), ip_adapter_face_scale
       FACE_SCALE. Also recorded: that the same call without vision_clip_emb raises in the original.
    2. call: the whole image2video call of the shared t13_linspace3 run (MusevControlNetPipeline.__call__ with
       the manifest's call_kwargs: 13 frames, 3 Euler steps, generator 1000) with ip_adapter_face_image given
       (the stand-in extractor returns the embedding for it) and ip_adapter_face_scale FACE_SCALE; the run's
       recorded text embeddings as prompt_embeds (its text encoder is not in ../shared); rerun with an
       explicit-softmax attention for the spread.

    Files in tests/fixtures/ip_adapter_face/ (~145 KB): inputs.safetensors (face_embedding (512,), face_tokens
    (2, 4, 32) of the original's projection), outputs.safetensors (forward.out (2, 4, FACE_FRAMES, 16, 24),
    call.final_latents (1, 4, 14, 16, 24)), manifest.json (specs, seeds, the forward's inputs, checks, spreads).
    Needs the original's environment and checkouts, as the video2video part:

        MUSEV_SRC=path/to/MuseV MMCM_SRC=path/to/MMCM IP_ADAPTER_SRC=path/to/IP-Adapter \
            venv-orig/bin/python tests/make_fixtures.py ip_adapter_face
    """
    import os
    import types

    import diffusers
    import numpy as np
    import transformers
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    shared = Path(os.environ.get("MUSEV_LITE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    meta = json.loads((shared / "reference/fixtures/manifest.json").read_text())
    run = meta["variants"]["musev_referencenet"]["runs"]["t13_linspace3"]
    shared_tensors = load_file(shared / "reference/fixtures/musev_referencenet/t13_linspace3.safetensors")
    orig = _original_musev(*(Path(os.environ[k]) for k in ("MUSEV_SRC", "MMCM_SRC", "IP_ADAPTER_SRC")))
    from ip_adapter.ip_adapter_faceid import MLPProjModel
    from musev.models import ip_adapter_face_loader

    folder = shared / "reference/fixtures/musev_referencenet/unet"
    config = {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if not k.startswith("_")}
    config["need_t2i_ip_adapter_face"] = True
    unet = orig.UNet3DConditionModel(**config)
    state = {k: v.float() for k, v in load_file(folder / "diffusion_pytorch_model.safetensors").items()}
    missing, unexpected = unet.load_state_dict(state, strict=False)
    assert not unexpected and missing and all(".ip_adapter_face_to_" in k for k in missing), (missing, unexpected)
    unet_state = unet.state_dict()
    layout = {published: unet_state[ours.replace(".processor.", ".")].shape for ours, published in
              ip_adapter_face_loader.UNET2IPAadapter_Keys_MAPIING.items()}
    ip_spec = init_spec({k: torch.empty(shape) for k, shape in layout.items()})
    ip_adapter = {k: v.float() for k, v in seeded_weights(ip_spec, FACE_SEED).items()}
    ip_adapter_face_loader.update_unet_ip_adapter_cross_attn_param(unet, ip_adapter)
    unet.eval()
    proj = MLPProjModel(cross_attention_dim=config["cross_attention_dim"], id_embeddings_dim=512, num_tokens=4)
    proj_spec = init_spec(proj.state_dict())
    proj.load_state_dict({k: v.float() for k, v in seeded_weights(proj_spec, FACE_SEED + 1).items()})
    proj.eval()
    embedding = torch.randn(512, generator=torch.Generator().manual_seed(FACE_SEED + 2))
    embedding = embedding / embedding.norm()

    class FaceEmbedding(torch.nn.Module):  # InsightFaceExtractorNormEmb's place: the embedding, for any image
        def extract_images(self, images, return_type):
            return embedding[None].clone(), None

    holder = types.SimpleNamespace(print_idx=1, ip_adapter_face_emb_extractor=FaceEmbedding(),
                                   ip_adapter_face_image_proj=proj)
    with torch.no_grad():
        face_tokens = orig.predictor.MusevControlNetPipeline.get_ip_adapter_face_emb(
            holder, np.zeros((1, 3, 1, 8, 8), np.uint8), "cpu", torch.float32, 1, True)

    # 1. one UNet forward
    sample = shared_tensors["unet.step0.win1.sample"][:, :, :FACE_FRAMES]
    refer = [shared_tensors[f"refnet.down_block_refer_embs.{i}"] for i in range(12)]
    kwargs = dict(sample_index=torch.arange(1, FACE_FRAMES), vision_conditon_frames_sample_index=torch.tensor([0]),
                  sample_frame_rate=8.0, do_classifier_free_guidance=True, return_dict=False,
                  encoder_hidden_states=shared_tensors["text.prompt_embeds"], vision_clip_emb=shared_tensors["ip.image_emb"],
                  down_block_refer_embs=refer, mid_block_refer_emb=shared_tensors["refnet.mid_block_refer_emb"],
                  ip_adapter_face_emb=face_tokens, ip_adapter_face_scale=FACE_SCALE)
    timestep = shared_tensors["unet.step0.win1.timestep"]
    with torch.no_grad():
        out = unet(sample, timestep, **kwargs)[0]
        orig.xformers.ops.math = True
        spread = (unet(sample, timestep, **kwargs)[0] - out).abs().max().item()
        orig.xformers.ops.math = False
        without_face = unet(sample, timestep, **dict(kwargs, ip_adapter_face_scale=0.0))[0]
        fresh = orig.UNet3DConditionModel(**config).eval()  # print_idx 0 again
        fresh.load_state_dict(unet.state_dict())
        try:
            fresh(sample, timestep, **dict(kwargs, vision_clip_emb=None))
            alone = "ran"
        except Exception as err:  # noqa: BLE001 - what the original does is the record
            alone = f"{type(err).__name__}: {err}"

    # 2. the whole image2video call
    call_kwargs = {k: v for k, v in run["call_kwargs"].items() if not isinstance(v, dict)}
    images = {k: shared_tensors[f"inputs.{k}"].numpy() for k in ("condition_images", "refer_image")}
    text = shared_tensors["text.prompt_embeds"]  # the shared run's text encoder is not in ../shared: its output
    call_kwargs.update(condition_images=images["condition_images"], refer_image=images["refer_image"],
                       ip_adapter_image=images["condition_images"], ip_adapter_face_image=images["condition_images"],
                       ip_adapter_face_scale=FACE_SCALE, prompt=None, negative_prompt=None,
                       prompt_embeds=text[1:], negative_prompt_embeds=text[:1])
    del call_kwargs["generator"]
    pipe = _v2v_pipeline(orig, shared, meta, shared_tensors, unet=unet, with_controlnet=False,
                         ip_adapter_face_emb_extractor=FaceEmbedding(), ip_adapter_face_image_proj=proj)[0]
    seen = {}

    def on_unet(module, args, kw, output):  # the shared run's inputs reach the UNet, and the face tokens
        seen.setdefault("face", kw["ip_adapter_face_emb"])
        seen.setdefault("text", kw["encoder_hidden_states"])
        seen.setdefault("ip", kw["vision_clip_emb"])
        seen.setdefault("first_sample", args[0])

    def whole_call():
        hook = pipe.unet.register_forward_hook(on_unet, with_kwargs=True)
        try:
            with torch.no_grad():
                result = pipe(generator=torch.Generator("cpu").manual_seed(run["generator_seed"]), **call_kwargs)
        finally:
            hook.remove()
        return torch.from_numpy(result.latents)

    final = whole_call()
    orig.xformers.ops.math = True
    call_spread = (whole_call() - final).abs().max().item()
    orig.xformers.ops.math = False
    checks = dict(
        forward_face_changes_output_by=(out - without_face).abs().max().item(),
        forward_without_vision_clip_emb=alone,
        call_face_tokens_vs_get_ip_adapter_face_emb=(seen["face"] - face_tokens).abs().max().item(),
        call_text_ip_first_sample_vs_shared_run=max((seen[k] - shared_tensors[v]).abs().max().item() for k, v in (
            ("text", "text.prompt_embeds"), ("ip", "ip.image_emb"), ("first_sample", "unet.step0.win0.sample"))),
        call_final_vs_shared_run_without_face=(final - shared_tensors["final.latents"]).abs().max().item(),
    )
    assert checks["call_face_tokens_vs_get_ip_adapter_face_emb"] == checks["call_text_ip_first_sample_vs_shared_run"] == 0
    save("ip_adapter_face", "inputs", {"face_embedding": embedding, "face_tokens": face_tokens})
    save("ip_adapter_face", "outputs", {"forward.out": out, "call.final_latents": final})
    manifest = {
        "what": "the ORIGINAL MuseV UNet3DConditionModel forward and MusevControlNetPipeline.__call__ with "
                "IPAdapterFaceID; see tests/make_fixtures.py: make_ip_adapter_face",
        "provenance": dict(torch=torch.__version__, diffusers=diffusers.__version__, transformers=transformers.__version__,
                           python=sys.version.split()[0], torch_num_threads=torch.get_num_threads()),
        "shared_models": "../shared/reference/fixtures/musev_referencenet (fp16 on disk, run in fp32)",
        "face_scale": FACE_SCALE,
        "ip_adapter": {"seed": FACE_SEED, "init_spec": ip_spec,
                       "loaded_by": "musev.models.ip_adapter_face_loader.update_unet_ip_adapter_cross_attn_param"},
        "image_proj": {"class": "ip_adapter.ip_adapter_faceid.MLPProjModel(cross_attention_dim=32, "
                                "id_embeddings_dim=512, num_tokens=4)", "seed": FACE_SEED + 1, "init_spec": proj_spec},
        "face_embedding": f"torch.randn(512, generator=torch.Generator().manual_seed({FACE_SEED + 2})), L2-normalised",
        "face_tokens": "MusevControlNetPipeline.get_ip_adapter_face_emb: [proj(zeros); proj(embedding)]",
        "forward": {"sample": f"t13_linspace3 unet.step0.win1.sample[:, :, :{FACE_FRAMES}]",
                    "timestep": float(timestep), "condition_frames": 1, "sample_frame_rate": 8.0,
                    "encoder_hidden_states": "t13_linspace3 text.prompt_embeds", "vision_clip_emb": "t13_linspace3 ip.image_emb",
                    "refer": "t13_linspace3 refnet.down_block_refer_embs.* / mid_block_refer_emb",
                    "rerun_math_attention_max_abs_diff": spread},
        "call": {"call_kwargs": "t13_linspace3 call_kwargs, with ip_adapter_face_image (the extractor's input), "
                                f"ip_adapter_face_scale {FACE_SCALE}, and its text.prompt_embeds as prompt_embeds / "
                                "negative_prompt_embeds instead of the prompts", "generator_seed": run["generator_seed"],
                 "rerun_math_attention_final_max_abs_diff": call_spread},
        "checks": checks,
    }
    (OUT / "ip_adapter_face" / "manifest.json").write_text(compact_json(manifest) + "\n")


PARTS = {
    "samplers": make_samplers,
    "lcm": make_lcm,
    "vae": make_vae,
    "clip_text": make_clip_text,
    "clip_vision": make_clip_vision,
    "unet2d": make_unet2d,
    "tokenizer": make_tokenizer,
    "single_file": make_single_file,
    "lora": make_lora,
    "video_crop": make_video_crop,
    "pose": make_pose,
    "histmatch": make_histmatch,
    "resampler": make_resampler,
    "controlnet": make_controlnet,
    "video2video": make_video2video,
    "ip_adapter_face": make_ip_adapter_face,
}

if __name__ == "__main__":
    torch.manual_seed(0)
    wanted = sys.argv[1:] or list(PARTS)
    unknown = [p for p in wanted if p not in PARTS]
    if unknown:
        sys.exit(f"unknown part(s) {unknown}; choose from {list(PARTS)}")
    for part in wanted:
        print(f"making {part} ...", flush=True)
        PARTS[part]()
