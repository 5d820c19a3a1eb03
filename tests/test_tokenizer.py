"""The CLIP tokenizer against MuseV's (transformers 4.33 slow CLIPTokenizer), on the real vocabulary."""

import json

import pytest

from conftest import FIXTURES
from musev_lite.tokenizer import MAX_MERGES, CLIPTokenizer, TokenizerError

CASES = json.loads((FIXTURES / "tokenizer/cases.json").read_text())["cases"]


def test_ids_equal_transformers(clip_tokenizer):
    assert len(CASES) >= 40
    for case in CASES:
        ids = [clip_tokenizer.bos_token_id] + clip_tokenizer.encode(case["prompt"]) + [clip_tokenizer.eos_token_id]
        assert ids == case["ids"], case["prompt"]


def test_padded_call(clip_tokenizer):
    short = clip_tokenizer("a photo of a cat")
    assert len(short) == 77 and short[:7] == [49406, 320, 1125, 539, 320, 2368, 49407] and set(short[7:]) == {49407}
    long = clip_tokenizer("long " * 100)
    assert len(long) == 77 and long[0] == 49406 and long[-1] == 49407 and long[1:76] == [clip_tokenizer.encode("long")[0]] * 75


def test_added_word_is_case_sensitive_and_expands(clip_tokenizer):
    ids = clip_tokenizer.encode("EasyNegativeV2, bad")
    fresh = CLIPTokenizer(dict(clip_tokenizer.vocab), [], "<|endoftext|>")  # no merges needed for this check
    new = fresh.add_word("EasyNegativeV2", 3)
    assert new == [49408, 49409, 49410] and fresh.vocab_size == 49411
    assert fresh.encode("x EasyNegativeV2, y")[1:4] == new
    assert fresh.encode("easynegativev2")[:1] != new[:1]  # lower case is plain text
    assert ids != fresh.encode("EasyNegativeV2, bad")
    with pytest.raises(TokenizerError, match="already in the vocabulary"):
        fresh.add_word("EasyNegativeV2")


def test_bad_folders(tmp_path):
    with pytest.raises(TokenizerError, match="missing vocab.json"):
        CLIPTokenizer.from_folder(tmp_path)
    (tmp_path / "vocab.json").write_text('{"a": 0}')
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(TokenizerError, match="no '<|startoftext|>' token"):
        CLIPTokenizer.from_folder(tmp_path)


def test_byte_level_tokenizer_round_trips(tmp_path):
    tok = CLIPTokenizer.byte_level()
    ids = tok.encode("Hé, x")
    assert len(ids) == len("Hé,x".encode()) and tok.vocab_size == 514  # one id per byte, spaces dropped
    assert tok("Hé")[0] == tok.bos_token_id and len(tok("Hé")) == 77
    tok.save(tmp_path)
    assert CLIPTokenizer.from_folder(tmp_path).encode("Hé, x") == ids


def test_merges_are_capped_like_transformers(tmp_path, clip_tokenizer):
    """transformers reads at most 48894 merges after the header line; extra lines are ignored."""
    clip_tokenizer.save(tmp_path)
    with open(tmp_path / "merges.txt", "a") as f:
        f.write("c at</w>\n")
    capped = CLIPTokenizer.from_folder(tmp_path)
    assert len(capped._merges) == MAX_MERGES == len(clip_tokenizer._merges)
    assert capped._merges[-1] == clip_tokenizer._merges[-1]


def test_added_words_are_not_saved(tmp_path):
    """They belong with their embeddings: a saved vocabulary stays the base one."""
    tok = CLIPTokenizer.byte_level()
    tok.add_word("badhandv4", 2)
    tok.save(tmp_path)
    again = CLIPTokenizer.from_folder(tmp_path)
    assert again.vocab_size == tok.base_vocab_size == 514 and again.encode("badhandv4") != tok.encode("badhandv4")
