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
    "lora": make_lora,
    "video_crop": make_video_crop,
    "pose": make_pose,
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
