"""The docs stay true: every configuration key is in the README, CI runs the README's commands, docs/method.md
matches the code and is what the code points at, the imports go down DEVELOPERS.md's floors."""

import ast
import dataclasses
import inspect
import re

from conftest import REPO
from musev_lite.config import RunConfig
from musev_lite.denoise import WindowedDenoiser, context_windows, sample, uniform_v2_windows, uniform_windows

README = (REPO / "README.md").read_text()
METHOD = (REPO / "docs/method.md").read_text()


def test_every_config_key_is_in_the_readme():
    config = RunConfig()
    keys = [f"{section.name}.{f.name}" for section in dataclasses.fields(config)
            for f in dataclasses.fields(getattr(config, section.name))]
    missing = [k for k in keys if f"`{k}`" not in README]
    assert not missing, f"README's Configuration table lacks {missing}"


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci/run").read_text()
    assert "pip install torch==2.13.0" in README and "pip install -q torch==2.13.0" in ci
    assert '.venv/bin/pip install -e ".[test]" && .venv/bin/python -m pytest -q' in README
    assert '.venv/bin/pip install -q -e ".[test]"' in ci and ".venv/bin/python -m pytest -q" in ci
    assert "python -m musev_lite.run examples/demo.toml" in README and (REPO / "examples/demo.toml").is_file()


def layout_floors() -> dict[str, int]:
    """DEVELOPERS.md's layout table: the floor of each module of musev_lite/ ("" is the package's __init__,
    "convert" the converters' package), by its name in the package."""
    text = (REPO / "DEVELOPERS.md").read_text()
    floors = {}
    for floor, paths in re.findall(r"^\| (\d+) \| ([^|]+) \|", text, re.M):
        for path in re.findall(r"`([\w./]+)`", paths):
            name = path.removeprefix("musev_lite/").removesuffix("/").removesuffix(".py")
            floors["" if name == "__init__" else name] = int(floor)
    return floors


def imported_modules(path) -> set[str]:
    """The modules of musev_lite a file imports, by name in the package ("" for the package itself; a name
    `from . import` takes is a module if there is one of that name)."""
    package = path.parent.relative_to(REPO / "musev_lite").parts
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(package[:len(package) - node.level + 1]) + (node.module.split(".") if node.module else [])
            names.add(".".join(base))
            if node.module is None:
                names.update(".".join(base + [alias.name]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "musev_lite":
            names.add(node.module.removeprefix("musev_lite").removeprefix("."))
        elif isinstance(node, ast.Import):
            names.update(a.name.removeprefix("musev_lite").removeprefix(".") for a in node.names
                         if a.name.split(".")[0] == "musev_lite")
    return names


def test_imports_go_down_the_floors():
    """Every module of musev_lite/ has a floor in DEVELOPERS.md's layout table, and imports only modules on
    lower floors (within the convert package, its modules import each other)."""
    floors = layout_floors()
    sources = sorted((REPO / "musev_lite").rglob("*.py"))
    modules = {".".join(p.relative_to(REPO / "musev_lite").with_suffix("").parts).removesuffix("__init__").rstrip(".")
               for p in sources}
    unplaced = [m for m in modules if m.split(".")[0] not in floors]
    assert not unplaced, f"DEVELOPERS.md's layout table gives no floor to {unplaced}"
    upward = []
    for path in sources:
        importer = ".".join(path.relative_to(REPO / "musev_lite").with_suffix("").parts).split(".")[0]
        importer = "" if importer == "__init__" else importer
        for name in imported_modules(path) & modules:
            imported = name.split(".")[0]
            if imported != importer and floors[imported] >= floors[importer]:
                upward.append(f"{path.relative_to(REPO)} (floor {floors[importer]}) imports {name or 'musev_lite'} "
                              f"(floor {floors[imported]})")
    assert not upward, "imports that do not go down DEVELOPERS.md's floors: " + "; ".join(upward)


def test_weights_readme_commands_use_real_options():
    """Every `python -m musev_lite.<cli> ... --option` in weights/README.md names an option that CLI has."""
    text = (REPO / "weights/README.md").read_text().replace("\\\n", " ")
    sources = {"musev_lite.fetch": REPO / "musev_lite/fetch.py", "musev_lite.convert.musev": REPO / "musev_lite/convert/musev.py",
               "musev_lite.convert.sd15": REPO / "musev_lite/convert/sd15.py",
               "musev_lite.convert.controlnet": REPO / "musev_lite/convert/controlnet.py"}
    commands = re.findall(r"python -m (musev_lite[\w.]*)([^\n`]*)", text)
    assert set(sources) <= {module for module, _ in commands}
    for module, args in commands:
        if module not in sources:
            continue
        source = sources[module].read_text()
        for option in re.findall(r"(--[\w-]+)", args):
            assert f'"{option}"' in source, f"weights/README.md: {module} has no option {option}"


# ---------------------------------------------------------------------------------------------
# docs/method.md: the code points there, not at files a user's clone lacks, and its diagrams are the code's


def windows_diagram(schedule: str, num_frames: int, context_frames: int, overlap: int) -> str:
    """Which frames each window holds, as text: a cell is the frame's position in its UNet call (the
    condition frame C at 0), '.' not in the window; a window context_windows drops is shown as such."""
    windows = context_windows(schedule, num_frames, context_frames, overlap)
    raw = (uniform_v2_windows if schedule == "uniform_v2" else uniform_windows)(num_frames, context_frames, overlap)

    def row(label, first, cells):
        return f"{label:<14}{first:>3} |" + "".join(f"{cell:>3}" for cell in cells)

    def positions(window):
        position = {frame: i + 1 for i, frame in enumerate(window)}
        return [position.get(frame, ".") for frame in range(num_frames)]

    lines = [row("frame", "C", range(num_frames))]
    lines += [row(f"window {k}", 0, positions(w)) for k, w in enumerate(windows)]
    lines += [row("dropped", 0, positions(w)) for w in raw if w not in windows]
    lines.append(row("averaged over", "", [sum(frame in w for w in windows) for frame in range(num_frames)]))
    return "\n".join(lines)


def test_method_diagram_matches_the_code():
    diagrams = re.findall(r"<!-- windows: (\w+) (\d+) (\d+) (\d+) -->\n```text\n(.*?)\n```", METHOD, re.S)
    assert len(diagrams) == 2, "docs/method.md should hold the uniform_v2 and uniform window diagrams"
    for schedule, frames, context, overlap, shown in diagrams:
        expected = windows_diagram(schedule, int(frames), int(context), int(overlap))
        assert shown == expected, f"docs/method.md's {schedule} diagram is stale; it should read:\n{expected}"


def code_lines(text: str) -> list[str]:
    """The lines of Python `text` without comments, indentation or blank lines."""
    lines = (re.sub(r"\s+#\s.*$", "", line).strip() for line in text.splitlines())
    return [line for line in lines if line]


def test_method_shows_the_loop_as_the_code_has_it():
    """docs/method.md's `sample` and `WindowedDenoiser.__call__` are the code's, line for line (comments aside)."""
    blocks = [code_lines(block) for block in re.findall(r"```python\n(.*?)```", METHOD, re.S)]
    for function in (sample, WindowedDenoiser.__call__):
        body = code_lines(inspect.getsource(function).split('"""')[-1])  # after the docstring
        shown = [block[1:] for block in blocks if block and block[0].startswith(f"def {function.__name__}(")]
        assert shown == [body], f"docs/method.md should show {function.__qualname__}'s body as:\n" + "\n".join(body)


def test_code_points_only_at_docs_a_clone_has():
    """No `§` references into the spec files (absent on a user's clone); every docs/method.md#anchor
    cited in the code or the README, and every #anchor link inside docs/method.md, is one of its headings."""
    headings = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", METHOD, re.M)}
    for anchor in re.findall(r"\]\(#([\w-]+)\)", METHOD):
        assert anchor in headings, f"docs/method.md links to #{anchor}, which is not one of its headings"
    sources = sorted((REPO / "musev_lite").rglob("*.py")) + sorted((REPO / "convert").rglob("*.py"))
    for path in sources + [REPO / "README.md"]:
        text = path.read_text()
        where = path.relative_to(REPO)
        assert "§" not in text and "model.md" not in text and "pipeline.md" not in text, f"{where} cites the spec"
        for anchor in re.findall(r"docs/method\.md#([\w-]+)", text):
            assert anchor in headings, f"{where}: docs/method.md has no heading for #{anchor}"


def test_generation_defaults_in_the_readme_are_the_dataclass_defaults():
    """The README's Configuration table states each generation default as GenerationConfig has it (the one
    place defaults are written), as TOML (`unset` for None)."""
    from musev_lite.config import toml_value
    from musev_lite.settings import GenerationConfig

    rows = re.findall(r"^\| (`generation\.[^|]+) \| ([^|]+) \|", README, re.M)
    documented = {key: default.strip() for keys, default in rows for key in re.findall(r"`generation\.(\w+)`", keys)}
    defaults = {f.name: "unset" if f.default is None else f"`{toml_value(f.default)}`"
                for f in dataclasses.fields(GenerationConfig)}
    assert documented == defaults
