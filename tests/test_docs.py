"""The README stays true: every configuration key is documented, CI runs the README's commands."""

import dataclasses
import re

from conftest import REPO
from musev_lite.config import RunConfig

README = (REPO / "README.md").read_text()


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
