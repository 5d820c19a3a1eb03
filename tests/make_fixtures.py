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


def _original_definitions(source: Path, names: set[str]) -> dict:
    """Top-level definitions `names` of an original MuseV source file, run at generation time only."""
    import ast
    import re

    tree = ast.parse(source.read_text())
    keep = [n for n in tree.body if getattr(n, "name", None) in names
            or (isinstance(n, ast.Assign) and any(getattr(t, "id", None) in names for t in n.targets))]
    namespace = {"re": re}
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


PARTS = {
    "samplers": make_samplers,
    "vae": make_vae,
    "clip_text": make_clip_text,
    "clip_vision": make_clip_vision,
    "unet2d": make_unet2d,
    "tokenizer": make_tokenizer,
    "single_file": make_single_file,
    "controlnet": make_controlnet,
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
