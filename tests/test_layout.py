"""The code stays readable as it grows: counts over musev_lite/'s syntax trees that DEVELOPERS.md promises.
Every module says what it is for; no function is longer than a screen; the sampler loop reads like
docs/method.md's pseudo-code; `generate` is a skeleton of named stages; run.py keeps to the command line;
one model per file, so only unet.py (MuseV's whole 3D UNet) may be long."""

import ast

import pytest

from conftest import REPO

PACKAGE = REPO / "musev_lite"
MAX_FUNCTION = 60  # lines of body (after the docstring)
MAX_MODULE = 550  # lines
LONG_MODULES = {"unet.py"}  # one model, one file
LIMITS = {("denoise.py", "sample"): 15, ("pipeline.py", "generate"): 50}


def sources():
    return sorted(PACKAGE.rglob("*.py"))


def functions(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body[1:] if ast.get_docstring(node) and len(node.body) > 1 else node.body
            yield node.name, node.end_lineno - body[0].lineno + 1


def name(path):
    return str(path.relative_to(PACKAGE))


@pytest.mark.parametrize("path", sources(), ids=name)
def test_module_has_a_docstring_and_stays_short(path):
    assert ast.get_docstring(ast.parse(path.read_text())), f"{name(path)} has no module docstring"
    if path.name not in LONG_MODULES:
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_MODULE, f"{name(path)} has {lines} lines (at most {MAX_MODULE}): split it by what it does"


def test_no_function_is_longer_than_a_screen():
    long = [f"{name(p)}:{fn} ({n} lines)" for p in sources() for fn, n in functions(p) if n > MAX_FUNCTION]
    assert not long, f"functions over {MAX_FUNCTION} lines of body: {long}"


@pytest.mark.parametrize("module, function", LIMITS)
def test_the_loop_and_the_skeleton_stay_short(module, function):
    [length] = [n for fn, n in functions(PACKAGE / module) if fn == function]
    assert length <= LIMITS[module, function], f"{module}:{function} has {length} lines of body"


def test_run_py_keeps_to_the_command_line():
    lines = len((PACKAGE / "run.py").read_text().splitlines())
    assert lines <= 300, f"run.py has {lines} lines; move what is not the command line into its own module"
