import pytest
import torch

from musev_lite.unet import LayoutFollowsDtype
from musev_lite.weights import (
    NumericError,
    WeightsError,
    check_finite,
    check_state_dict,
    load_component,
    load_model,
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
    with pytest.raises(WeightsError, match="thing.safetensors.*truncated"):
        load_component(tmp_path, "thing")  # read into memory of its own


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


def test_a_component_is_read_into_memory_of_its_own(tmp_path):
    """load_component's tensors equal the memory-mapped ones (read_state_dict, safetensors' load_file) in
    every dtype and shape, in file order, and no longer depend on the file: rewriting it in place, which
    changes the mapped tensors, leaves them."""
    state = {"z.f32": torch.randn(3, 5), "a.bf16": torch.randn(4, 2).bfloat16(), "m.f16": torch.randn(7).half(),
             "ids": torch.arange(6).reshape(2, 3), "mask": torch.tensor([True, False]), "scalar": torch.tensor(2.5),
             "empty": torch.zeros(0, 4)}
    save_component(tmp_path, "thing", state, {})
    path = tmp_path / "thing.safetensors"
    ours, mapped = load_component(tmp_path, "thing")[0], read_state_dict(path)
    assert list(ours) == list(mapped)
    for key, value in state.items():
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape and torch.equal(ours[key], value)
    with open(path, "r+b") as f:  # same file, new bytes
        size = f.seek(0, 2)
        header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
        f.seek(header)
        f.write(bytes(size - header))
    assert not torch.equal(mapped["z.f32"], state["z.f32"])  # what a memory map gives
    assert all(torch.equal(ours[key], value) for key, value in state.items())


class WithConv(LayoutFollowsDtype):
    """A LayoutFollowsDtype model (its conv weights go channels-last in bfloat16), an int buffer and a
    Parameter made in __init__ from a value."""

    def __init__(self, width: int):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(3, width, 3)
        self.norm = torch.nn.LayerNorm(width)
        self.gate = torch.nn.Parameter(torch.tensor([1e-5]))
        self.register_buffer("steps", torch.arange(4))


@pytest.mark.parametrize("file_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_model_gives_what_building_and_loading_gave(file_dtype, dtype):
    """load_model = build at random init, load_weights, .to(dtype): the same values, dtypes, strides
    (memory layout) and requires_grad, with no random number drawn and nothing left on the meta device."""
    torch.manual_seed(0)
    state = {k: v.to(file_dtype) if v.is_floating_point() else v for k, v in WithConv(8).state_dict().items()}
    state["norm.weight"] = torch.randn(8).to(file_dtype)
    before = WithConv(8)
    load_weights(before, state, "file")
    before.to(dtype=dtype)
    rng = torch.random.get_rng_state()
    loaded = load_model(WithConv, 8, dict(state), "file", "cpu", dtype)
    assert torch.equal(torch.random.get_rng_state(), rng)  # no random init
    for (name, a), (name_b, b) in zip(before.state_dict(keep_vars=True).items(),
                                      loaded.state_dict(keep_vars=True).items(), strict=True):
        assert name == name_b and not b.is_meta and b.device.type == "cpu"
        assert b.dtype == a.dtype and b.stride() == a.stride() and b.requires_grad == a.requires_grad, name
        assert torch.equal(a, b), name
    assert loaded.conv_in.weight.is_contiguous(
        memory_format=torch.channels_last if dtype == torch.bfloat16 else torch.contiguous_format)


def test_load_model_checks_the_keys_and_consumes_the_state_dict():
    state = WithConv(8).state_dict()
    bad = {k: v for k, v in state.items() if k != "norm.bias"} | {"extra": torch.zeros(1), "norm.weight": torch.zeros(9)}
    with pytest.raises(WeightsError, match=r"^file: .*1 missing: norm.bias; 1 unexpected: extra; "
                                           r"1 with wrong shape: norm.weight \(file \(9,\), model \(8,\)\)"):
        load_model(WithConv, 8, bad, "file")
    model = load_model(WithConv, 8, state, "file")
    assert state == {} and not any(t.is_meta for t in model.state_dict().values())


class Computed(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.proj = torch.nn.Linear(2, 2)
        self.register_buffer("positions", torch.arange(5), persistent=False)


def test_load_model_refuses_to_leave_a_buffer_without_values():
    """A buffer outside the state dict would stay on the meta device, without values: named, not used."""
    with pytest.raises(RuntimeError, match="Computed: positions are not in the state dict and have no values"):
        load_model(Computed, None, Computed(None).state_dict(), "file")
