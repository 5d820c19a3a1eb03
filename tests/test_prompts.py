"""Weighted prompts against the ORIGINAL MuseV parser and chunking, presets, textual inversion."""

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

from conftest import FIXTURES, max_abs_error, rounding_tolerance
from musev_lite.clip import CLIPTextConfig, CLIPTextModel
from musev_lite.prompts import (
    NEGATIVE_PROMPTS,
    PromptError,
    encode_prompt_pair,
    load_textual_inversion,
    parse_weights,
    restore_mean,
)
from musev_lite.tokenizer import CLIPTokenizer
from musev_lite.weights import NumericError, WeightsError

DATA = json.loads((FIXTURES / "tokenizer/cases.json").read_text())


def test_parse_equals_the_original():
    cases = [c for c in DATA["cases"] if isinstance(c["parse"], list)]
    assert len(cases) >= 30
    for case in cases:
        ours = parse_weights(case["prompt"])
        assert [t for t, _ in ours] == [t for t, _ in case["parse"]], case["prompt"]
        assert [w for _, w in ours] == pytest.approx([w for _, w in case["parse"]], rel=1e-12), case["prompt"]


def test_bad_weight_is_a_clear_error():
    failing = [c["prompt"] for c in DATA["cases"] if isinstance(c["parse"], dict)]
    assert failing == ["(word:1.2.3)"]  # the original raises ValueError here
    with pytest.raises(PromptError, match=r"prompt weight '1.2.3' in '\(word:1.2.3\)' is not a number"):
        parse_weights("(word:1.2.3)")


def test_presets_are_the_originals():
    assert NEGATIVE_PROMPTS == DATA["negative_presets"]


class RecordingEncoder(CLIPTextModel):
    def __init__(self, vocab_size, width=8):
        super().__init__(CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=16,
                                        num_hidden_layers=1, num_attention_heads=2))
        self.calls = []
        with torch.no_grad():  # a non-zero mean, as trained CLIP weights have (the rescaling divides by it)
            self.text_model.final_layer_norm.bias.normal_()

    def forward(self, input_ids):
        self.calls.append(input_ids.clone())
        return super().forward(input_ids)


def test_chunk_ids_equal_the_original(shared, clip_tokenizer):
    """The ids MuseV fed its text encoder (manifest text_encoder_calls): prompt chunks, then negative."""
    manifest = json.loads((shared / "reference/fixtures/manifest.json").read_text())
    calls = manifest["variants"]["musev"]["runs"]["t20_linspace"]["text_encoder_calls"]
    encoder = RecordingEncoder(clip_tokenizer.vocab_size)
    embeddings = encode_prompt_pair(clip_tokenizer, encoder, manifest["prompt"], manifest["video_negative_prompt"]["text"])
    assert embeddings.shape == (2, 154, 8)
    rows = encoder.calls[0]  # [negative chunk 0, negative chunk 1, prompt chunk 0, prompt chunk 1]
    assert [rows[2].tolist(), rows[3].tolist(), rows[0].tolist(), rows[1].tolist()] == [c[0] for c in calls]


def test_weighting_math():
    tok = CLIPTokenizer.byte_level()
    torch.manual_seed(0)
    encoder = RecordingEncoder(tok.vocab_size).eval()
    plain = encode_prompt_pair(tok, encoder, "a cat", "a dog")
    ids = torch.tensor([tok("a dog"), tok("a cat")])
    with torch.no_grad():
        direct = encoder(ids)
    # the mean restore: two means (one reduction each), their ratio and the product: 4 roundings (fp32)
    assert max_abs_error(plain, direct, "weights 1.0 = plain encoding") <= rounding_tolerance(direct, 4)
    weighted = encode_prompt_pair(tok, encoder, "a (cat:1.5)", "a dog")
    runs = [tok.bos_token_id] + tok.encode("a") + tok.encode("cat") + [tok.eos_token_id]  # each run on its own
    with torch.no_grad():
        direct = encoder(torch.tensor([tok("a dog"), runs + [tok.pad_token_id] * (77 - len(runs))]))
    kept = rounding_tolerance(direct, 4)  # a mean's rounding is that of the values it averages
    assert max_abs_error(weighted.mean(dim=(1, 2)), direct.mean(dim=(1, 2)), "mean kept") <= kept
    # byte-level ids: BOS, "a", then "cat" (3 bytes) at positions 2..4
    c = (weighted[1, 0] @ direct[1, 0]) / (direct[1, 0] @ direct[1, 0])  # the global rescale factor
    expected = direct[1] * c
    expected[2:5] *= 1.5
    # and the factor c from two dot products: 6 roundings
    assert max_abs_error(weighted[1], expected, "weighted tokens x1.5, all x mean factor") <= rounding_tolerance(expected, 6)


@pytest.fixture(scope="module")
def demo():
    from musev_lite.pipeline import MuseVPipeline

    return MuseVPipeline.demo()


@pytest.mark.parametrize("prompt,negative", [("", "V2"), ("a", "V2"), ("a cat", ""), ("", ""), ("x", "Empty"),
                                             ("(a cat:1.5)", ""), ("[[a]]", "(,:0)")])
def test_zero_mean_embeddings_stay_finite(demo, prompt, negative):
    """The demo's text encoder (final LayerNorm without bias) has a mean of ~0 (exactly 0 for some
    prompts): the mean restore divided by it and made NaN latents. Now it is skipped, silently,
    since a mean of ~0 before and after weighting is kept anyway."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        embeddings = encode_prompt_pair(demo.tokenizer, demo.text_encoder, prompt, negative)
    assert torch.isfinite(embeddings).all()
    assert not [w for w in caught if "mean" in str(w.message)]
    # a LayerNorm output (unit weight, no bias) is at most sqrt(width); only the weights (<= 1.5) scale it
    assert embeddings.abs().max() <= 1.5 * embeddings.shape[-1] ** 0.5


def old_restore(plain, weighted):  # the formula before the guard, MuseV's
    before = plain.float().mean(dim=(1, 2)).to(plain.dtype)
    after = weighted.float().mean(dim=(1, 2)).to(weighted.dtype)
    return weighted * (before / after)[:, None, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_normal_prompts_restore_bit_identical(dtype):
    tok = CLIPTokenizer.byte_level()
    torch.manual_seed(0)
    encoder = RecordingEncoder(tok.vocab_size).eval()
    with torch.no_grad():
        plain = encoder(torch.tensor([tok("a dog"), tok("a cat")])).to(dtype)
    weights = torch.ones(2, 77, dtype=dtype)
    weights[1, 2:5], weights[0, 3] = 1.5, 1 / 1.1
    weighted = plain * weights[..., None]
    assert torch.equal(restore_mean(plain, weighted, ("n", "p")), old_restore(plain, weighted))
    # end to end, weighted prompt and negative: the result keeps each row's mean (the restore ran)
    out = encode_prompt_pair(tok, encoder, "a (cat:1.5)", "[a] dog")
    plain = encode_prompt_pair(tok, encoder, "a cat", "a dog")
    assert max_abs_error(out.mean(dim=(1, 2)), plain.mean(dim=(1, 2)), "mean kept") <= rounding_tolerance(plain, 4)


def test_mean_lost_by_weighting_warns():
    torch.manual_seed(0)
    plain = torch.randn(2, 6, 4) + 1  # mean ~1
    weighted = plain.clone()
    weighted[1] -= weighted[1].mean()  # row 1: mean exactly ~0 after weighting
    with pytest.warns(UserWarning, match="prompt 'p': the mean of its text embedding is ~0 after weighting"):
        out = restore_mean(plain, weighted, ("negative prompt 'n'", "prompt 'p'"))
    assert torch.equal(out[1], weighted[1])  # not rescaled
    assert torch.equal(out[0], old_restore(plain, weighted)[0])
    with pytest.warns(UserWarning, match="negative prompt 'n': .* ~0 before weighting"):
        out = restore_mean(weighted.flip(0), plain.flip(0), ("negative prompt 'n'", "prompt 'p'"))
    assert torch.isfinite(out).all() and torch.equal(out[0], plain[1])


def test_non_finite_text_encoding_is_an_error():
    tok = CLIPTokenizer.byte_level()
    encoder = RecordingEncoder(tok.vocab_size)
    with torch.no_grad():
        encoder.text_model.final_layer_norm.bias[0] = float("inf")  # as an overflowing float16 encoder gives
    with pytest.raises(NumericError, match=r"^text encoding: 0 NaN and 154 infinite values among 1232; stopped"):
        encode_prompt_pair(tok, encoder, "a cat", "a dog")


def test_long_prompts_chunk_and_truncate():
    tok = CLIPTokenizer.byte_level()
    encoder = RecordingEncoder(tok.vocab_size)
    assert encode_prompt_pair(tok, encoder, "x" * 80, "").shape == (2, 154, 8)
    with pytest.warns(UserWarning, match="prompt truncated to 225 tokens"):
        out = encode_prompt_pair(tok, encoder, "x" * 300, "")
    assert out.shape == (2, 231, 8)
    assert encode_prompt_pair(tok, encoder, "", "Empty").shape == (2, 77, 8)


def test_unbalanced_brackets_do_not_crash():
    assert parse_weights("((a) b") == [("a", pytest.approx(1.21)), (" b", pytest.approx(1.1))]
    assert parse_weights("a)]") == [("a)]", 1.0)]
    assert parse_weights("") == [("", 1.0)]


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_textual_inversion(tmp_path, clip_tokenizer, suffix):
    vectors = torch.randn(3, 8)
    path = tmp_path / f"badhandv4{suffix}"
    if suffix == ".pt":
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "badhandv4", "step": 10}, path)
    else:
        save_file({"emb_params": vectors}, path)
    tokenizer = CLIPTokenizer(dict(clip_tokenizer.vocab), [], "<|endoftext|>")
    encoder = RecordingEncoder(tokenizer.vocab_size)
    ids = load_textual_inversion(path, tokenizer, encoder)
    assert ids == [49408, 49409, 49410]
    assert torch.equal(encoder.text_model.embeddings.token_embedding.weight[49408:], vectors)
    encode_prompt_pair(tokenizer, encoder, "hello", "badhandv4, bad")
    assert encoder.calls[-1][0, 1:4].tolist() == ids  # all three vectors, not only the first


def test_textual_inversion_errors(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    tok = CLIPTokenizer.byte_level()
    encoder = RecordingEncoder(tok.vocab_size)
    torch.save({"string_to_param": {"*": torch.zeros(1, 8)}, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="refused to unpickle"):
        load_textual_inversion(tmp_path / "evil.pt", tok, encoder)
    save_file({"emb_params": torch.zeros(2, 5)}, tmp_path / "wide.safetensors")
    with pytest.raises(WeightsError, match=r"width 5, expected 8"):
        load_textual_inversion(tmp_path / "wide.safetensors", tok, encoder)
    save_file({"other": torch.zeros(2, 8)}, tmp_path / "other.safetensors")
    with pytest.raises(WeightsError, match="not an A1111 textual-inversion file"):
        load_textual_inversion(tmp_path / "other.safetensors", tok, encoder)
