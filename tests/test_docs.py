"""The docs stay true: every configuration key is in the README, CI runs the README's commands, docs/method.md
matches the code and is what the code points at."""

import dataclasses
import re

from conftest import REPO
from musev_lite.config import RunConfig
from musev_lite.denoise import context_windows, uniform_v2_windows, uniform_windows

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


def test_weights_readme_commands_use_real_options():
    """Every `python -m musev_lite.<cli> ... --option` in weights/README.md names an option that CLI has."""
    text = (REPO / "weights/README.md").read_text().replace("\\\n", " ")
    sources = {"musev_lite.fetch": REPO / "musev_lite/fetch.py", "musev_lite.convert.musev": REPO / "convert/musev.py",
               "musev_lite.convert.sd15": REPO / "convert/sd15.py",
               "musev_lite.convert.controlnet": REPO / "convert/controlnet.py"}
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
