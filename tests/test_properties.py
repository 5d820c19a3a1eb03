"""Property-based tests (hypothesis): the weighted-prompt parser, the window schedules and config
loading take any input without crashing, and their invariants hold. Small examples, no deadline: a few
seconds in all."""

import dataclasses
import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from musev_lite.checkpoint import flat
from musev_lite.config import SECTIONS, RunConfig, check, load_config, to_toml, toml_value
from musev_lite.denoise import CONTEXT_SCHEDULES, context_windows
from musev_lite.prompts import PromptError, parse_weights
from musev_lite.settings import DTYPES, FORMATS, PRESETS, SAMPLERS, TASKS, ConfigError

SETTINGS = settings(max_examples=300, deadline=None)
SYNTAX = "()[]:\\"
# prompt-like text: the weight syntax, digits, signs and dots appear often; any other character too
prompts = st.text(st.one_of(st.sampled_from(SYNTAX + "0123456789.+- a"), st.characters()), max_size=40)
plain_text = st.text(st.characters(blacklist_characters=SYNTAX), max_size=20)


def escape(text: str) -> str:
    return "".join("\\" + c if c in "()[]\\" else c for c in text)


@SETTINGS
@given(prompts)
@example("(a:" + "9" * 400 + ")")  # float() of it is inf
@example("(" * 8000 + "a")  # 1.1 ** 8000 is inf
@example("[" * 8000 + "a")  # 1.1 ** -8000 is subnormal: finite, kept
def test_any_prompt_parses_or_is_a_prompt_error(text):
    try:
        runs = parse_weights(text)
    except PromptError as err:
        assert "prompt weight" in str(err)  # a bad number, e.g. (a:1.2.3): named with the fix
        return
    assert runs and all(isinstance(t, str) and math.isfinite(w) for t, w in runs)
    assert all(a[1] != b[1] for a, b in zip(runs, runs[1:]))  # equal weights are merged
    assert all(t for t, _ in runs) or runs == [("", 1.0)]
    assert sum(len(t) for t, _ in runs) <= len(text)  # the syntax is taken out, nothing is added
    if ":" not in text:  # only brackets: every weight is 1.1^n / 1.1^m, so positive
        assert all(w > 0 for _, w in runs)


@SETTINGS
@given(plain_text)
def test_text_without_syntax_round_trips(text):
    assert parse_weights(text) == [(text, 1.0)]


@pytest.mark.slow
@SETTINGS
@given(st.text(max_size=30))
def test_escaped_text_round_trips(text):
    """Any string, its brackets and backslashes escaped, comes back as one run of weight 1."""
    assert parse_weights(escape(text)) == [(text, 1.0)]


@SETTINGS
@given(st.text(min_size=1, max_size=20), st.decimals(0, 100, places=3, allow_nan=False, allow_infinity=False),
       st.sampled_from(["({}:{})", "({})", "[{}]"]))
def test_weighted_text_round_trips(text, weight, form):
    runs = parse_weights(form.format(escape(text), weight))
    expected = float(weight) if ":" in form else 1.1 if form == "({})" else 1 / 1.1
    if expected == 1.0:
        assert runs == [(text, 1.0)]
    else:
        assert [t for t, _ in runs] == [text] and runs[0][1] == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Window schedules


@SETTINGS
@given(st.sampled_from(CONTEXT_SCHEDULES), st.integers(1, 60), st.integers(-2, 20), st.integers(-3, 20))
def test_windows_cover_every_frame_within_range(schedule, num_frames, context_frames, overlap):
    if not 0 <= overlap < context_frames:
        with pytest.raises(ValueError, match=r"context_overlap \(-?\d+\) must be >= 0 and smaller than"):
            context_windows(schedule, num_frames, context_frames, overlap)
        return
    windows = context_windows(schedule, num_frames, context_frames, overlap)
    assert windows == context_windows(schedule, num_frames, context_frames, overlap)  # deterministic
    assert windows and all(w for w in windows)
    assert {f for w in windows for f in w} == set(range(num_frames))
    assert all(0 <= f < num_frames for w in windows for f in w)
    assert all(len(w) <= context_frames and len(set(w)) == len(w) for w in windows)
    stride = context_frames - overlap
    sliding = math.ceil(num_frames / stride) if schedule == "uniform_v2" or num_frames > context_frames else 1
    ends = [min(k * stride + context_frames, num_frames) - 1 for k in range(sliding)]
    if schedule == "uniform_v2" and sliding >= 2 and ends[-1] == ends[-2]:
        sliding -= 1  # a last window ending where the one before ends adds nothing: dropped (as the original)
    assert len(windows) == sliding
    starts = [w[0] for w in windows]
    assert starts == list(range(0, stride * len(windows), stride))  # a window every context_frames - overlap
    for before, after in zip(windows, windows[1:]):
        if schedule == "uniform_v2":  # consecutive frames, the last may be short
            assert after == list(range(after[0], min(after[0] + context_frames, num_frames)))
            assert len(set(before) & set(after)) == min(overlap, len(after))
        else:  # full length, wrapping round to frame 0; neighbours share `overlap` frames in order
            assert len(after) == context_frames
            assert after == [(after[0] + j) % num_frames for j in range(context_frames)]
            assert before[stride:] == after[:overlap]
    if schedule == "uniform" and num_frames <= context_frames:
        assert windows == [list(range(num_frames))]


@settings(max_examples=30, deadline=None)
@given(st.text(max_size=12), st.integers(1, 30))
def test_unknown_schedule_is_named(schedule, num_frames):
    if schedule in CONTEXT_SCHEDULES:
        return
    with pytest.raises(ValueError, match=r"context_schedule .* is unknown; use one of"):
        context_windows(schedule, num_frames)


# ---------------------------------------------------------------------------------------------
# Config loading: any TOML file or --set override either loads to a checked RunConfig or is one
# ConfigError; what loads writes back (to_toml) to the same config


FIELDS = {section: {f.name: f.type for f in dataclasses.fields(factory())} for section, factory in SECTIONS.items()}
junk = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(), st.text(max_size=8),
                 st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
choices = st.sampled_from(PRESETS + DTYPES + FORMATS + SAMPLERS + TASKS + ("tiny", "auto", "cpu", "V2", ""))
by_type = {"int": st.one_of(st.integers(1, 16), st.integers(-5, 5000)), "float": st.one_of(st.floats(0, 10), st.floats()),
           "bool": st.booleans(), "str": st.one_of(choices, st.text(max_size=8)),
           "list[str]": st.lists(choices, max_size=3), "list[int]": st.lists(st.integers(-5, 600), max_size=3),
           "list[LoraConfig]": st.lists(st.fixed_dictionaries({"path": st.text(max_size=5), "scale": st.floats()}), max_size=2),
           "list[ControlConfig]": st.lists(st.fixed_dictionaries({"path": st.text(max_size=5)}), max_size=2)}


@st.composite
def config_tables(draw):
    """Tables of a config file: mostly known keys with values of about the right type (so that about
    half the files load), some junk."""
    tables = {"model": {"preset": "tiny"}} if draw(st.booleans()) else {}
    for _ in range(draw(st.integers(0, 4))):
        known = draw(st.integers(0, 9)) > 0
        section = draw(st.sampled_from(sorted(FIELDS)) if known else st.text(max_size=6))
        fields = FIELDS.get(section, {})
        key = draw(st.sampled_from(sorted(fields)) if fields and known else st.text(max_size=6))
        kind = by_type.get(fields.get(key, "").removesuffix(" | None"), junk)
        tables.setdefault(section, {})[key] = draw(kind if draw(st.integers(0, 9)) > 0 else junk)
    return tables


def toml_document(tables: dict) -> str:
    return "".join(f"[{json.dumps(section)}]\n" + "".join(f"{json.dumps(key)} = {toml_value(value)}\n"
                                                          for key, value in keys.items()) for section, keys in tables.items())


def load_or_config_error(text: str, overrides=()):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.toml"
        path.write_text(text)
        try:
            return load_config(path, overrides)
        except ConfigError as err:
            assert str(err) and "\n" not in str(err)  # one line
            return None


def check_loaded(config: RunConfig) -> None:
    """A loaded config passes its checks again, has only finite floats, and its TOML (paths made
    absolute) loads back to a config that prints the same."""
    check(config)
    assert all(math.isfinite(v) for v in flat(config.as_dict()).values() if isinstance(v, float))
    printed = to_toml(config)
    again = load_or_config_error(printed)
    assert again is not None and to_toml(again) == printed
    assert again.generation == config.generation and again.input.prompt == config.input.prompt


@pytest.mark.slow
@SETTINGS
@given(config_tables())
def test_any_config_file_loads_or_is_a_config_error(tables):
    config = load_or_config_error(toml_document(tables))
    if config is not None:
        check_loaded(config)


@pytest.mark.slow
@SETTINGS
@given(st.text(max_size=60))
@example("[generation]\nsteps = 1e400")  # a TOML float that overflows
@example('[generation\nsteps = 4')
def test_any_text_as_a_config_file_loads_or_is_a_config_error(text):
    config = load_or_config_error(text)
    if config is not None:
        check_loaded(config)


@pytest.mark.slow
@SETTINGS
@given(st.lists(st.one_of(st.text(max_size=30), st.builds("{}.{}={}".format, st.sampled_from(sorted(FIELDS)),
                                                          st.sampled_from(sorted({k for f in FIELDS.values() for k in f})),
                                                          st.one_of(st.text(max_size=8), st.integers().map(str)))),
                max_size=3))
def test_any_set_override_loads_or_is_a_config_error(overrides):
    config = load_or_config_error("", overrides)
    if config is not None:
        check_loaded(config)
