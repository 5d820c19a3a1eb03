"""CLIP's byte-level BPE tokenizer, from a checkpoint's vocab.json + merges.txt (or, for the offline
demo, made on the fly with one token per byte and no merges).

`CLIPTokenizer` gives the ids of transformers' slow CLIPTokenizer as MuseV ran it (transformers 4.33,
no ftfy): text clean-up as BERT's BasicTokenizer (control characters dropped, whitespace runs to one
space, CJK characters split apart, NFC, lower case), then CLIP's word regex, byte-to-unicode mapping
and BPE with a `</w>` end-of-word mark, done by the `tokenizers` library. Words added with
`add_word` (textual inversion) are matched in the raw text first, case-sensitively, as transformers
does with added tokens, and stand for one or more new ids.
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_MERGES = 49152 - 256 - 2  # CLIP's vocabulary size minus bytes and specials: merges used
WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
              (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


class TokenizerError(ValueError):
    """A tokenizer folder is missing or malformed."""


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in CJK_RANGES)


def clean_text(text: str) -> str:
    """BasicTokenizer(strip_accents=False, do_split_on_punc=False) as transformers' CLIPTokenizer
    uses it without ftfy: drop control/format characters, whitespace -> space, space out CJK
    characters, NFC, lower case, single spaces."""
    out = []
    for ch in text:
        if ch in "\t\n\r" or unicodedata.category(ch) == "Zs":
            out.append(" ")
        elif ord(ch) == 0 or ord(ch) == 0xFFFD or unicodedata.category(ch).startswith("C"):
            continue
        elif _is_cjk(ch):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    return " ".join(word.lower() for word in unicodedata.normalize("NFC", "".join(out)).split())


class CLIPTokenizer:
    model_max_length = 77

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str = EOS):
        for token in (BOS, EOS, pad_token):
            if token not in vocab:
                raise TokenizerError(f"the vocabulary has no {token!r} token")
        self._merges = list(merges)
        self.bpe = Tokenizer(models.BPE(vocab, merges, end_of_word_suffix="</w>", continuing_subword_prefix=""))
        self.bpe.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        self.bpe.decoder = decoders.ByteLevel()
        self.vocab = dict(vocab)
        self.base_vocab_size = len(self.vocab)
        self.bos_token_id, self.eos_token_id, self.pad_token_id = vocab[BOS], vocab[EOS], vocab[pad_token]
        self.added: dict[str, list[int]] = {BOS: [self.bos_token_id], EOS: [self.eos_token_id]}
        self._split = None

    @classmethod
    def from_folder(cls, folder: str | Path) -> CLIPTokenizer:
        """A diffusers `tokenizer/` folder: vocab.json, merges.txt, optionally special_tokens_map.json."""
        folder = Path(folder)
        for name in ("vocab.json", "merges.txt"):
            if not (folder / name).is_file():
                raise TokenizerError(f"{folder}: missing {name} (a CLIP tokenizer folder has vocab.json and merges.txt)")
        try:
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise TokenizerError(f"{folder}: unreadable tokenizer files ({err})") from None
        # like transformers: the first line is a header, at most MAX_MERGES merges are used
        lines = "\n".join(lines).strip().split("\n")[1 : MAX_MERGES + 1]
        return cls(vocab, [tuple(line.split()) for line in lines], pad_token=_pad_token(folder))

    @classmethod
    def byte_level(cls) -> CLIPTokenizer:
        """A tokenizer made on the fly: one token per UTF-8 byte (a `</w>` variant ends each word), no
        merges, BOS/EOS. For the demo's tiny random text encoder; not a real vocabulary."""
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        vocab = {ch: i for i, ch in enumerate(alphabet)}
        vocab.update({f"{ch}</w>": len(alphabet) + i for i, ch in enumerate(alphabet)})
        vocab.update({BOS: len(vocab), EOS: len(vocab) + 1})
        return cls(vocab, [])

    def save(self, folder: str | Path) -> None:
        """vocab.json + merges.txt, readable by `from_folder`. Words added by `add_word` are not saved:
        they belong with their embeddings (see MuseVPipeline.save_pretrained)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        vocab = {token: i for token, i in self.vocab.items() if i < self.base_vocab_size}
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        merges = "".join(f"{a} {b}\n" for a, b in self._merges)
        (folder / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def add_word(self, word: str, num_ids: int = 1) -> list[int]:
        """A new word (e.g. a textual-inversion name) standing for `num_ids` new ids at the end of the
        vocabulary; returns them."""
        if word in self.added or word in self.vocab or not word.strip():
            raise TokenizerError(f"token {word!r} is empty or already in the vocabulary; choose another name")
        ids = list(range(len(self.vocab), len(self.vocab) + num_ids))
        for i, token_id in enumerate(ids):
            self.vocab[word if i == 0 else f"{word}_{i}"] = token_id
        self.added[word] = ids
        self._split = None
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS, not truncated."""
        if self._split is None:
            names = sorted(self.added, key=len, reverse=True)
            self._split = re.compile("(" + "|".join(map(re.escape, names)) + ")")
        ids = []
        for piece in self._split.split(text):
            if piece in self.added:
                ids.extend(self.added[piece])
            elif piece:
                cleaned = clean_text(piece)
                if cleaned:
                    ids.extend(self.bpe.encode(cleaned, add_special_tokens=False).ids)
        return ids

    def __call__(self, text: str) -> list[int]:
        """[BOS] ids [EOS], truncated and padded to 77, as CLIPTokenizer(padding="max_length", truncation=True)."""
        ids = [self.bos_token_id] + self.encode(text)[: self.model_max_length - 2] + [self.eos_token_id]
        return ids + [self.pad_token_id] * (self.model_max_length - len(ids))


def _pad_token(folder: Path) -> str:
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            pad = json.loads(path.read_text(encoding="utf-8")).get("pad_token")
            if isinstance(pad, dict):
                pad = pad.get("content")
            if pad:
                return pad
    return EOS

