"""Property-based tests (hypothesis): the weighted-prompt parser and the window schedules take any
input without crashing, and their invariants hold. Small examples, no deadline: a few seconds in all."""

import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from musev_lite.denoise import CONTEXT_SCHEDULES, context_windows
from musev_lite.prompts import PromptError, parse_weights

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
