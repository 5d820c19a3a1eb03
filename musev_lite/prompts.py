"""Prompts to text embeddings, as MuseV does it: A1111-style weights, long prompts in 77-token chunks,
negative-prompt presets, and textual-inversion embeddings.

    (word)      weight x 1.1        [word]      weight / 1.1       (word:1.8)  weight x 1.8
    \\( \\) \\[ \\] \\\\  literal characters;  brackets nest and multiply; an unclosed one runs to the end

Each weighted run is tokenized on its own; the prompt and the negative prompt are padded to the same
number k <= 3 of 75-token chunks; every chunk is encoded separately as [BOS] 75 tokens [EOS] and the
outputs are concatenated (77k vectors); each vector is scaled by its token's weight and the whole is
rescaled to keep its original mean, unless that mean is ~0 (`restore_mean`). The result is
[negative; positive].
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .limits import file_stem
from .weights import WeightsError, atomic_path, check_finite, read_state_dict

CHUNK = 75  # tokens per chunk, between BOS and EOS

# MuseV's presets (configs/model/negative_prompt.py), selected by name, and its default.
DEFAULT_NEGATIVE_PROMPT = "V2"
NEGATIVE_PROMPTS = {
    "Empty": "",
    "V1": "nsfw, lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, "
    "worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry, tail, "
    "watermarks",
    "V2": "badhandv4, ng_deepnegative_v1_75t, (((multiple heads))), (((bad body))), (((two people))), ((extra arms)), "
    "((deformed body)), (((sexy))), paintings,(((two heads))), ((big head)),sketches, (worst quality:2), "
    "(low quality:2), (normal quality:2), lowres, ((monochrome)), ((grayscale)), skin spots, acnes, skin blemishes, "
    "age spot, glans, (((nsfw))), nipples, extra fingers, (extra legs), (long neck), mutated hands, (fused fingers), "
    "(too many fingers)",
    "V3": "badhandv4, ng_deepnegative_v1_75t, bad quality",
    "V4": "badhandv4,ng_deepnegative_v1_75t,EasyNegativeV2,bad_prompt_version2-neg,bad quality",
    "V5": "(((multiple heads))), (((bad body))), (((two people))), ((extra arms)), ((deformed body)), (((sexy))), "
    "paintings,(((two heads))), ((big head)),sketches, (worst quality:2), (low quality:2), (normal quality:2), "
    "lowres, ((monochrome)), ((grayscale)), skin spots, acnes, skin blemishes, age spot, glans, (((nsfw))), nipples, "
    "extra fingers, (extra legs), (long neck), mutated hands, (fused fingers), (too many fingers)",
}

PRESET_NAME = re.compile(r"V\d+")  # the form of the presets' names (V1..V5): another one is most likely a typo


class PromptError(ValueError):
    """A prompt cannot be parsed (e.g. a weight that is not a number)."""


# One token of the weight syntax per match: an escape, a bracket, ":<weight>)", plain text, or a lone ":".
ATTENTION_TOKEN = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:([+-]?[.\d]+)\)|\)|\]|[^\\()\[\]:]+|:")


def parse_weights(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) runs; runs of equal weight are merged."""
    runs: list[list] = []
    open_round: list[int] = []  # index into runs where each open "(" started
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in ATTENTION_TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            runs.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(runs))
        elif token == "[":
            open_square.append(len(runs))
        elif weight is not None and open_round:
            try:
                factor = float(weight)
            except ValueError:
                raise PromptError(f"prompt weight {weight!r} in {text!r} is not a number; write e.g. (word:1.2)") from None
            scale_from(open_round.pop(), factor)
        elif token == ")" and open_round:
            scale_from(open_round.pop(), 1.1)
        elif token == "]" and open_square:
            scale_from(open_square.pop(), 1 / 1.1)
        else:
            runs.append([token, 1.0])
    for start in open_round:  # unclosed brackets apply to the end of the prompt
        scale_from(start, 1.1)
    for start in open_square:
        scale_from(start, 1 / 1.1)
    merged: list[list] = []
    for run in runs or [["", 1.0]]:
        if not math.isfinite(run[1]):  # a weight of 400 digits, or thousands of nested brackets
            raise PromptError(f"prompt weight of {run[0][:30]!r} in {text[:60]!r} is {run[1]}; "
                              "write a weight such as (word:1.2)")
        if merged and merged[-1][1] == run[1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(t, w) for t, w in merged]


def weighted_tokens(tokenizer, text: str, max_tokens: int) -> tuple[list[int], list[float]]:
    """Token ids (no BOS/EOS) and a weight per token, at most `max_tokens`."""
    ids: list[int] = []
    weights: list[float] = []
    for run, weight in parse_weights(text):
        run_ids = tokenizer.encode(run)
        ids += run_ids
        weights += [weight] * len(run_ids)
    if len(ids) > max_tokens:
        warnings.warn(f"prompt truncated to {max_tokens} tokens (it has {len(ids)}): {text[:60]!r}...", stacklevel=3)
    return ids[:max_tokens], weights[:max_tokens]


def encode_prompt_pair(tokenizer, text_encoder, prompt: str, negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
                       max_chunks: int = 3) -> torch.Tensor:
    """(2, 77k, D) text embeddings, [negative; positive]. `negative_prompt` is a preset name
    (`NEGATIVE_PROMPTS`: Empty, V1..V5) or else taken as literal text."""
    for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if not isinstance(text, str):
            raise PromptError(f"{name} must be a string, got {type(text).__name__} {text!r:.60}")
    if negative_prompt not in NEGATIVE_PROMPTS and PRESET_NAME.fullmatch(negative_prompt):
        warnings.warn(f"negative_prompt {negative_prompt!r} looks like a preset name but is none "
                      f"({', '.join(NEGATIVE_PROMPTS)}), so it is used as literal text", stacklevel=2)
    negative_name, negative_prompt = negative_prompt, NEGATIVE_PROMPTS.get(negative_prompt, negative_prompt)
    pairs = [weighted_tokens(tokenizer, text, CHUNK * max_chunks) for text in (negative_prompt, prompt)]
    longest = max(len(ids) for ids, _ in pairs)
    k = max(1, min(max_chunks, (longest - 1) // CHUNK + 1))
    length = CHUNK * k + 2
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = torch.tensor([[bos] + t + [pad] * (length - 2 - len(t)) + [eos] for t, _ in pairs])  # 2 (75k+2)
    content_weights = torch.tensor([w + [1.0] * (length - 2 - len(w)) for _, w in pairs])  # 2 75k

    # chunk j = positions [75j, 75j+77) with its first/last overwritten by BOS/EOS; all 2k chunks at once
    chunks = ids.unfold(1, CHUNK + 2, CHUNK).clone()  # 2 k 77
    chunks[:, :, 0], chunks[:, :, -1] = bos, eos
    device = text_encoder.text_model.embeddings.token_embedding.weight.device
    with torch.no_grad():
        embeddings = text_encoder(chunks.flatten(0, 1).to(device))  # (2 k) 77 D
    embeddings = embeddings.unflatten(0, (2, k)).flatten(1, 2)  # 2 (k 77) D: BOS/EOS of every chunk kept
    weights = torch.ones(2, k, CHUNK + 2)
    weights[:, :, 1:-1] = content_weights.unflatten(1, (k, CHUNK))
    weights = weights.flatten(1).to(embeddings)

    # scale each vector by its weight, then restore each prompt's overall mean
    names = (f"negative prompt {negative_name[:60]!r}", f"prompt {prompt[:60]!r}")
    weighted = restore_mean(embeddings, embeddings * weights[..., None], names)
    return check_finite(weighted, "text encoding", "lower any large prompt weight, e.g. (word:1.2)")


# A mean smaller than this fraction of the mean |value| is a cancellation of positive and negative
# values: dividing by it gives rounding noise (NaN for an exact 0). The demo's text encoder (final
# LayerNorm without bias) gives 1e-8; the tests' encoders, with a LayerNorm bias as trained CLIP has,
# give 0.15-0.45. At 1e-3 the float32 rounding of the mean (~2e-6 of the mean |value|) moves the
# ratio by at most 0.2%.
MEAN_TOLERANCE = 1e-3


def restore_mean(plain: torch.Tensor, weighted: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
    """Rescale each row of `weighted` (n, L, D) to the mean of the same row of `plain` (means in float32),
    as MuseV does. A row whose mean is ~0 (see MEAN_TOLERANCE) before or after weighting is left as
    weighted; if only one of the two is ~0 its mean changes, and a warning names it."""
    means, usable = [], []
    for x in (plain, weighted):
        mean = x.float().mean(dim=(1, 2))
        means.append(mean.to(x.dtype))
        usable.append(mean.abs() > MEAN_TOLERANCE * x.float().abs().mean(dim=(1, 2)))
    before, after = means
    for name, ok_before, ok_after in zip(names, usable[0].tolist(), usable[1].tolist()):
        if ok_before != ok_after:
            warnings.warn(f"{name}: the mean of its text embedding is ~0 {'after' if ok_before else 'before'} "
                          "weighting, so it is not restored (the weights are applied as written)", stacklevel=3)
    ratio = before / after
    restore = usable[0] & usable[1] & ratio.isfinite()
    return weighted * torch.where(restore, ratio, torch.ones_like(ratio))[:, None, None]


def read_textual_inversion(path: str | Path, width: int) -> torch.Tensor:
    """The (n, width) vectors of an A1111 embedding: `.pt` with `string_to_param`, or `.safetensors`
    with `emb_params`."""
    path = Path(path)
    state = read_state_dict(path)
    if "string_to_param" in state and isinstance(state["string_to_param"], dict):
        vectors = next(iter(state["string_to_param"].values()))
    elif "emb_params" in state:
        vectors = state["emb_params"]
    else:
        raise WeightsError(f"{path}: not an A1111 textual-inversion file (no 'string_to_param' or 'emb_params')")
    vectors = vectors.detach().reshape(-1, vectors.shape[-1]) if torch.is_tensor(vectors) else None
    if vectors is None or vectors.shape[-1] != width:
        raise WeightsError(f"{path}: embedding vectors do not fit this text encoder "
                           f"(width {None if vectors is None else vectors.shape[-1]}, expected {width})")
    return vectors


def save_textual_inversion(folder: str | Path, word: str, vectors: torch.Tensor) -> Path:
    """Write (n, width) vectors as the A1111 `.safetensors` embedding (`emb_params`) `<folder>/<word>.safetensors`,
    the file that names the word; `word` must be one plain name (`limits.file_stem`). Returns the path."""
    path = Path(folder) / f"{file_stem('textual-inversion word', word, WeightsError)}.safetensors"
    with atomic_path(path) as tmp:
        save_file({"emb_params": vectors.detach().contiguous().cpu()}, tmp)
    return path


def load_textual_inversion(path: str | Path, tokenizer, text_encoder, word: str | None = None) -> list[int]:
    """Add an A1111 embedding as `word` (default: the file name). The word then stands for all its
    vectors. (MuseV's text encoding used only the first vector of a multi-vector embedding, its
    expansion to several tokens being commented out; all of them are used here.)"""
    table = text_encoder.text_model.embeddings.token_embedding
    vectors = read_textual_inversion(path, table.embedding_dim)
    if tokenizer.vocab_size != table.num_embeddings:
        raise WeightsError(f"tokenizer ({tokenizer.vocab_size} ids) and text encoder ({table.num_embeddings} rows) "
                           "disagree; load textual inversions before anything else changes either")
    ids = tokenizer.add_word(word or Path(path).stem, len(vectors))
    grown = nn.Embedding(table.num_embeddings + len(vectors), table.embedding_dim,
                         device=table.weight.device, dtype=table.weight.dtype)
    with torch.no_grad():
        grown.weight[: table.num_embeddings] = table.weight
        grown.weight[table.num_embeddings :] = vectors.to(table.weight)
    text_encoder.text_model.embeddings.token_embedding = grown
    return ids
