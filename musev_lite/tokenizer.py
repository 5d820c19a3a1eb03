"""CLIP's byte-level BPE tokenizer, from a checkpoint's vocab.json + merges.txt (or, for the offline
demo, made on the fly with one token per byte and no merges).

`CLIPTokenizer` gives the ids of transformers' slow CLIPTokenizer as MuseV ran it (transformers 4.33
with ftfy 6.1.1): text clean-up as `ftfy.fix_text` (HTML entities, full-width forms, curly quotes,
ligatures, control characters, NFC), whitespace runs to one space, lower case; then CLIP's word regex,
byte-to-unicode mapping and BPE with a `</w>` end-of-word mark, done by the `tokenizers` library. Words added with
`add_word` (textual inversion) are matched in the raw text first, case-sensitively, as transformers
does with added tokens, and stand for one or more new ids.
"""

from __future__ import annotations

import html
import html.entities
import json
import re
import unicodedata
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from .limits import parse_nested

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_MERGES = 49152 - 256 - 2  # CLIP's vocabulary size minus bytes and specials: merges used
WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class TokenizerError(ValueError):
    """A tokenizer folder is missing or malformed."""


# ---------------------------------------------------------------------------------------------
# Text clean-up: transformers' CLIPTokenizer runs `ftfy.fix_text` when ftfy is installed, and MuseV's
# environment pins ftfy 6.1.1. These are the fixes of its default configuration that can change a
# prompt, in its order; its mojibake repair (e.g. "cafÃ©" -> "café") is not reproduced.

HTML_ENTITY = re.compile(r"&#?[0-9A-Za-z]{1,24};")
# named HTML5 entities that end in ";", plus all-caps spellings of the lower-case ones that are unambiguous
HTML_ENTITIES = {f"&{name}": char for name, char in html.entities.html5.items() if name.endswith(";")}
HTML_ENTITIES.update({f"&{name.upper()}": char.upper() for name, char in html.entities.html5.items()
                      if name.endswith(";") and name == name.lower() and html.unescape(f"&{name.upper()}") == f"&{name.upper()}"})
C1_CONTROL = re.compile(r"[\x80-\x9f]")
LIGATURES = str.maketrans({"Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž",
                           "ǆ": "dž", "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj", "ﬀ": "ff",
                           "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st"})
# full-width and half-width forms (and the ideographic space) -> their usual characters
WIDTH = str.maketrans({0x3000: " ", **{i: unicodedata.normalize("NFKC", chr(i)) for i in range(0xFF01, 0xFFF0)
                                        if unicodedata.normalize("NFKC", chr(i)) != chr(i)}})
SINGLE_QUOTES, DOUBLE_QUOTES = re.compile("[\u02bc\u2018-\u201b]"), re.compile("[\u201c-\u201f]")
LINE_BREAKS = re.compile("\r\n|[\r\u2028\u2029\x85]")
SURROGATE_PAIR, SURROGATE = re.compile("[\ud800-\udbff][\udc00-\udfff]"), re.compile("[\ud800-\udfff]")
TERMINAL_ESCAPE = re.compile("\033\\[((?:\\d|;)*)([a-zA-Z])")
CONTROL_CHARS = dict.fromkeys([*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF,
                               *range(0xFFF9, 0xFFFD)])


def _unescape(match: re.Match) -> str:
    entity = match[0]
    if entity in HTML_ENTITIES:
        return HTML_ENTITIES[entity]
    if entity.startswith("&#"):
        text = html.unescape(entity)
        return entity if ";" in text else text
    return entity


def _windows_1252(match: re.Match) -> str:
    try:
        return match[0].encode("latin-1").decode("cp1252")
    except UnicodeDecodeError:  # 0x81, 0x8d, 0x8f, 0x90, 0x9d are undefined there and stay
        return match[0]


def _surrogates(match: re.Match) -> str:
    high, low = match[0]
    return chr(0x10000 + (ord(high) - 0xD800) * 0x400 + (ord(low) - 0xDC00))


def fix_text(text: str) -> str:
    """ftfy.fix_text's effect on a prompt, line by line, each line fixed until nothing changes. HTML
    entities are decoded until a line contains "<" (from then on the text may be markup)."""
    out, unescape = [], True
    for line in re.findall(r"[^\n]*\n|[^\n]+", text):  # lines, each with its "\n"
        unescape = unescape and "<" not in line
        while True:
            before = line
            if unescape:
                line = HTML_ENTITY.sub(_unescape, line)
            line = C1_CONTROL.sub(_windows_1252, line).translate(LIGATURES).translate(WIDTH)
            line = SINGLE_QUOTES.sub("'", DOUBLE_QUOTES.sub('"', line))
            line = LINE_BREAKS.sub("\n", line)
            line = SURROGATE.sub("\ufffd", SURROGATE_PAIR.sub(_surrogates, line))
            line = TERMINAL_ESCAPE.sub("", line).translate(CONTROL_CHARS)
            line = unicodedata.normalize("NFC", line)
            if line == before:
                break
        out.append(line)
    return "".join(out)


def clean_text(text: str) -> str:
    """What CLIPTokenizer does before splitting words: fix_text, whitespace runs to one space, lower case."""
    return re.sub(r"\s+", " ", fix_text(text)).strip().lower()


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
            vocab = parse_nested(json.loads, (folder / "vocab.json").read_text(encoding="utf-8"), str(folder / "vocab.json"),
                                 TokenizerError)
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
            config = parse_nested(json.loads, path.read_text(encoding="utf-8"), str(path), TokenizerError)
            pad = config.get("pad_token") if isinstance(config, dict) else None
            if isinstance(pad, dict):
                pad = pad.get("content")
            if pad:
                return pad
    return EOS

