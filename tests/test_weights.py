import pytest
import torch

from musev_lite.weights import (
    NumericError,
    WeightsError,
    check_finite,
    check_state_dict,
    load_component,
    load_weights,
    read_state_dict,
    save_component,
)


def test_component_round_trip(tmp_path):
    state = {"a.weight": torch.randn(3, 2), "b": torch.arange(4)}
    save_component(tmp_path, "thing", state, {"width": 3})
    loaded, config = load_component(tmp_path, "thing")
    assert config == {"width": 3}
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing.json", "thing.safetensors"]


def test_truncated_safetensors_is_named(tmp_path):
    save_component(tmp_path, "thing", {"w": torch.randn(64, 64)}, {})
    path = tmp_path / "thing.safetensors"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(WeightsError, match="thing.safetensors.*truncated"):
        read_state_dict(path)


class Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_with_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.bin"
    torch.save({"w": torch.zeros(1), "payload": Exploit()}, path)
    with pytest.raises(WeightsError, match="evil.bin: refused to unpickle"):
        read_state_dict(path)
    assert "this must never run" not in capsys.readouterr().out


def test_plain_bin_loads(tmp_path):
    path = tmp_path / "ok.bin"
    torch.save({"w": torch.ones(2)}, path)
    assert torch.equal(read_state_dict(path)["w"], torch.ones(2))


def test_bad_inputs(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        read_state_dict(tmp_path / "absent.safetensors")
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(WeightsError, match="unknown checkpoint type '.onnx'"):
        read_state_dict(tmp_path / "w.onnx")
    with pytest.raises(WeightsError, match="component 'vae' is not in"):
        load_component(tmp_path, "vae")


def test_key_report_names_every_kind_of_problem():
    expected = {"a": (2, 2), "b": (3,), "c": (1,)}
    got = {"a": torch.zeros(2, 3), "b": torch.zeros(3), "d": torch.zeros(1)}
    with pytest.raises(WeightsError) as info:
        check_state_dict(expected, got, "demo.safetensors")
    message = str(info.value)
    assert "demo.safetensors" in message
    assert "1 missing: c" in message
    assert "1 unexpected: d" in message
    assert "a (file (2, 3), model (2, 2))" in message


def test_load_weights_fills_module():
    model = torch.nn.Linear(2, 3)
    state = {"weight": torch.randn(3, 2), "bias": torch.randn(3)}
    load_weights(model, state, "linear")
    assert torch.equal(model.weight.data, state["weight"])
    with pytest.raises(WeightsError, match="bias"):
        load_weights(model, {"weight": state["weight"]}, "linear")


def test_check_finite_names_the_stage_and_the_fix():
    latents = torch.randn(1, 4, 3, 2, 2)
    assert check_finite(latents, "step 3/20") is latents
    latents[0, 0, 0, 0, :] = torch.tensor([float("nan"), float("inf")])
    latents[0, 1, 0, 0, 0] = -float("inf")
    with pytest.raises(NumericError, match=r"^step 3/20: 1 NaN and 2 infinite values among 48; stopped .* Try: "
                                           r"lower generation.guidance_scale; check that the weights are finite"):
        check_finite(latents, "step 3/20", "lower generation.guidance_scale")
    with pytest.raises(ValueError, match=r"^decode: .* Try: run in float32 \(model.dtype = \"float32\"\): float16 "):
        check_finite(latents.half(), "decode")
    assert issubclass(NumericError, ValueError)  # the CLI prints ValueErrors as one "error:" line, exit 2
