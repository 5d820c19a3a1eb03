"""The TOML configuration: defaults, overrides, and a clear error for every kind of mistake."""

import pytest

from musev_lite.config import ConfigError, RunConfig, load_config, parse_override


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_defaults_are_musevs():
    config = load_config(None)
    g = config.generation
    assert (g.steps, g.guidance_scale, g.context_frames, g.context_overlap, g.motion_speed) == (10, 3.5, 12, 4, None)
    assert (g.w_ind_noise, g.img_weight, g.num_frames, g.sampler) == (0.5, 0.001, 12, "euler")
    assert config.input.negative_prompt is None and config.output.formats == ["mp4"]  # unset: the model's, MuseV's V2
    assert load_config(None, ["input.negative_prompt=none"]).input.negative_prompt == "none"  # text, not "unset"
    assert RunConfig().as_dict()["model"]["preset"] == "musev_referencenet"


def test_file_and_overrides(tmp_path):
    path = write(tmp_path, '[model]\npreset = "tiny"\n[generation]\nsteps = 4\nguidance_scale = 5\n')
    config = load_config(path, ["generation.steps=7", "input.prompt=a cat", 'output.formats=["gif", "png"]',
                                "generation.guidance_scale_end=1.5", "generation.seed=none"])
    assert config.generation.steps == 7 and config.generation.guidance_scale == 5.0
    assert config.input.prompt == "a cat" and config.output.formats == ["gif", "png"]
    assert config.generation.guidance_scale_end == 1.5 and config.generation.seed is None


def test_override_syntax():
    assert parse_override("generation.steps=4") == ("generation", "steps", 4)
    assert parse_override("input.prompt=two words") == ("input", "prompt", "two words")
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_override("steps=4")


@pytest.mark.parametrize(
    "text, message",
    [
        ("[generation]\nstep = 4\n", "unknown key generation.step; did you mean 'steps'?"),
        ("[generaton]\nsteps = 4\n", r"unknown section \[generaton\]; did you mean 'generation'?"),
        ('[generation]\nsteps = "ten"\n', r"generation.steps must be an integer; got 'ten'"),
        ("[generation]\nsteps = true\n", "generation.steps must be an integer; got True"),
        ("[generation]\nnum_frames = -3\n", "generation.num_frames = -3 must be at least 1"),
        ("[generation]\nheight = 100\n", "generation.height = 100 is not divisible by 8; use e.g. 96"),
        ("[generation]\ncontext_overlap = 12\n", "context_overlap = 12 must be >= 0 and smaller than"),
        ("[generation]\nguidance_scale = 0.5\n", "guidance_scale = 0.5 must be >= 1"),
        ('[model]\npreset = "musev3"\n', "model.preset = 'musev3' is not one of"),
        ('[output]\nformats = ["mov"]\n', "output.formats entry = 'mov' is not one of"),
        ("[output]\nfps = 0\n", "output.fps = 0.0 must be a number from 1 to 240"),
        ('[generation]\nsampler = "dpm"\n', "generation.sampler = 'dpm' is not one of"),
        ("[generation]\nw_ind_noise = 2\n", r"w_ind_noise = 2.0 must be in \[0, 1\]"),
        ('[output]\nname = "a/b"\n', "must be a file stem"),
        ("[generation\n", "is not valid TOML"),
        ('generation = 3\n', r"\[generation\] must be a table"),
        ("[input]\nprompt = 3\n", "input.prompt must be a string; got 3"),
    ],
)
def test_mistakes_are_named(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file .*nope.toml not found"):
        load_config(tmp_path / "nope.toml")
