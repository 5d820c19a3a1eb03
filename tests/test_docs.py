"""The README stays true: every configuration key is documented, CI runs the README's commands."""

import dataclasses

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
