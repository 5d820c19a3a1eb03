"""MuseVPipeline end to end at tiny size (the `tiny` preset at seeded random weights)."""

import numpy as np
import pytest
import torch

from conftest import max_abs_error, reduction_depth, rounding_tolerance
from musev_lite.models import MODEL_PARTS
from musev_lite.pipeline import MuseVPipeline
from musev_lite.weights import WeightsError, load_component

pytestmark = pytest.mark.filterwarnings("ignore:prompt truncated")  # the byte tokenizer makes V2 long
IMAGE = np.random.default_rng(0).integers(0, 255, (40, 72, 3)).astype(np.uint8)
FAST = dict(steps=2, first_frame_steps=2, context_frames=4, context_overlap=2)


@pytest.fixture(scope="module")
def pipe():
    return MuseVPipeline.demo(seed=0)


@pytest.mark.slow
def test_frame_counts_and_size(pipe):
    with_image = pipe("a face", image=IMAGE, num_frames=5, n_batch=2, seed=1, **FAST)
    assert with_image.frames.shape == (2 * 5 + 1, 40, 72, 3) and with_image.frames.dtype == np.uint8
    assert with_image.latents.shape == (1, 4, 11, 5, 9)
    drawn = pipe("a face", num_frames=5, n_batch=2, height=32, width=48, seed=1, **FAST)
    assert drawn.frames.shape == (2 * 5, 32, 48, 3)
    rounded = pipe("a face", image=IMAGE, num_frames=2, size_multiple=64, height=130, width=72, seed=1, **FAST)
    assert rounded.frames.shape[1:3] == (128, 64)


def test_same_seed_same_video(pipe):
    a = pipe("a face", image=IMAGE, num_frames=6, seed=7, **FAST)
    b = pipe("a face", image=IMAGE, num_frames=6, seed=7, **FAST)
    c = pipe("a face", image=IMAGE, num_frames=6, seed=8, **FAST)
    assert np.array_equal(a.frames, b.frames) and a.seed == 7
    assert not np.array_equal(a.frames, c.frames)


def test_batched_windows_give_the_same_video(pipe):
    one = pipe("a face", image=IMAGE, num_frames=9, seed=3, window_batch=1, **FAST)
    many = pipe("a face", image=IMAGE, num_frames=9, seed=3, window_batch=8, **FAST)
    steps = FAST["steps"]  # each step's UNet calls in other batches: rounding through the UNet, per step
    tolerance = rounding_tolerance(one.latents, steps * reduction_depth(pipe.unet))
    assert max_abs_error(many.latents, one.latents, "window_batch 8 vs 1") <= tolerance
    assert np.abs(one.frames.astype(int) - many.frames.astype(int)).max() <= 1


def test_shots_continue_from_the_last_latent(pipe, monkeypatch):
    seen = []
    original = pipe._unet

    def recording(sample, t, cond, condition_frames, **kwargs):
        seen.append((sample.shape[2], sample[:1, :, :condition_frames].clone()))
        return original(sample, t, cond, condition_frames, **kwargs)

    monkeypatch.setattr(pipe, "_unet", recording)
    result = pipe("a face", image=IMAGE, num_frames=3, n_batch=2, seed=2, **FAST)
    first_shot, second_shot = seen[: len(seen) // 2], seen[len(seen) // 2 :]
    assert torch.equal(first_shot[0][1], result.latents[:, :, :1])  # the image's latent
    assert torch.equal(second_shot[0][1], result.latents[:, :, 3:4])  # shot 1's last frame


def test_first_frame_is_drawn_in_2d_mode(pipe, monkeypatch):
    calls = []
    original = pipe._unet

    def recording(sample, t, cond, condition_frames, **kwargs):
        calls.append((sample.shape[2], condition_frames, kwargs.get("temporal", True)))
        return original(sample, t, cond, condition_frames, **kwargs)

    monkeypatch.setattr(pipe, "_unet", recording)
    pipe("a face", num_frames=3, height=32, width=32, seed=2, **FAST)
    assert calls[:2] == [(1, 0, False), (1, 0, False)]  # 2 first-frame steps: one frame, temporal off
    assert all(c == (3, 1, True) for c in calls[2:])  # then the condition + 2 new frames


def test_callback_reports_every_step(pipe):
    events = []
    pipe("a face", image=IMAGE, num_frames=3, n_batch=2, seed=2, callback=events.append, **FAST)
    video = [(e.shot, e.step, e.steps) for e in events if e.stage == "video"]
    assert video == [(0, 1, 2), (0, 2, 2), (1, 1, 2), (1, 2, 2)]
    assert events[-1].stage == "decode" and events[-1].step == events[-1].steps == 7


def test_explicit_latents_replace_the_noise(pipe):
    latents = torch.randn(1, 4, 4, 5, 9, generator=torch.Generator().manual_seed(0))
    a = pipe("a face", image=IMAGE, num_frames=4, seed=1, latents=latents, **FAST)
    b = pipe("a face", image=IMAGE, num_frames=4, seed=2, latents=latents, **FAST)
    assert np.array_equal(a.frames, b.frames)
    with pytest.raises(ValueError, match=r"latents have shape \(1, 4, 4, 5, 9\); this call needs \(1, 4, 3, 5, 9\)"):
        pipe("a face", image=IMAGE, num_frames=3, latents=latents, **FAST)


def test_redraw_and_pil_output(pipe):
    result = pipe("a face", image=IMAGE, num_frames=2, seed=1, redraw_condition_image=True, output_type="pil", **FAST)
    assert len(result.frames) == 3 and result.frames[0].size == (72, 40)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_frames=0), "num_frames = 0"),
        (dict(guidance_scale=0.5), "must be >= 1"),
        (dict(steps=0), "steps"),
        (dict(context_overlap=4), "context_overlap"),
        (dict(sampler="heun"), "sampler = 'heun' is not one of"),
        (dict(output_type="tensor"), "output_type"),
        (dict(height=4), "too small"),
    ],
)
def test_bad_arguments(pipe, kwargs, message):
    args = dict(FAST, num_frames=3, seed=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        pipe("a face", image=IMAGE, **args)


@pytest.mark.slow
def test_save_and_load_a_weights_folder(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = MuseVPipeline.from_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        "controlnet.safetensors", "image_encoder.safetensors", "image_proj.safetensors", "referencenet.safetensors",
        "text_encoder.safetensors", "unet.safetensors", "vae.safetensors"]
    assert (pipe.negative_prompt, loaded.negative_prompt) == ("V1", "V2")  # the demo's default is not saved
    a = pipe("a face", image=IMAGE, num_frames=3, seed=5, **FAST)
    b = loaded("a face", image=IMAGE, num_frames=3, seed=5, negative_prompt="V1", **FAST)
    assert np.array_equal(a.frames, b.frames)
    (tmp_path / "vae.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"missing vae.safetensors; see weights/README.md"):
        MuseVPipeline.from_pretrained(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_loaded_folder_holds_the_saved_weights(pipe, tmp_path, dtype):
    """from_pretrained (models built on the meta device, then given the file's tensors) gives every model
    the tensors the saved pipeline has after .to(dtype): same values, dtype (the VAE's float32) and memory
    layout (bfloat16 convolutions channels-last); no parameter or buffer left on the meta device."""
    pipe.save_pretrained(tmp_path)
    loaded = MuseVPipeline.from_pretrained(tmp_path, dtype=dtype)
    expected = MuseVPipeline.demo(seed=0).to(dtype=dtype)
    models = [(name, getattr(expected, name), getattr(loaded, name)) for name in MODEL_PARTS]
    models += [(name, net, loaded.controlnets[name]) for name, net in expected.controlnets.items()]
    for name, want, got in models:
        assert not got.training, name
        tensors = dict(got.named_parameters()) | dict(got.named_buffers())
        assert tensors.keys() == want.state_dict().keys(), name
        for key, value in want.state_dict().items():
            assert not tensors[key].is_meta and tensors[key].dtype == value.dtype, (name, key)
            assert tensors[key].stride() == value.stride() and torch.equal(tensors[key], value), (name, key)


@pytest.mark.slow
def test_textual_inversions_are_saved_beside_the_base_vocabulary(tmp_path):
    """An embedding loaded into a pipeline travels as embeddings/<word>.safetensors; the text encoder and
    tokenizer are saved without it, and loading the folder adds it back with all its vectors."""
    pipe = MuseVPipeline.demo(seed=0)
    base_rows = pipe.tokenizer.vocab_size
    vectors = torch.randn(3, pipe.text_encoder.config.hidden_size)
    torch.save({"string_to_param": {"*": vectors}, "name": "badhandv4"}, tmp_path / "badhandv4.pt")
    assert pipe.load_textual_inversion(tmp_path / "badhandv4.pt") == "badhandv4"
    pipe.save_pretrained(tmp_path / "w")
    saved, _ = load_component(tmp_path / "w", "text_encoder")
    assert saved["text_model.embeddings.token_embedding.weight"].shape[0] == base_rows
    assert "badhandv4" not in (tmp_path / "w/tokenizer/vocab.json").read_text()
    loaded = MuseVPipeline.from_pretrained(tmp_path / "w")
    ids = loaded.tokenizer.encode("badhandv4")
    assert ids == list(range(base_rows, base_rows + 3))
    assert torch.equal(loaded.text_encoder.text_model.embeddings.token_embedding.weight[ids], vectors)
    assert str(tmp_path / "w/embeddings/badhandv4.safetensors") in loaded.files
    a = pipe("a face", image=IMAGE, num_frames=2, seed=5, negative_prompt="badhandv4, blurry", **FAST)
    b = loaded("a face", image=IMAGE, num_frames=2, seed=5, negative_prompt="badhandv4, blurry", **FAST)
    assert np.array_equal(a.frames, b.frames)


def test_generator_is_drawn_as_in_the_original(pipe):
    """Per shot: VideoFusion's two draws for x_T, then two per Euler step (drawn and unused in MuseV),
    so the next shot's noise comes from where the original's does."""
    generator = torch.Generator().manual_seed(4)
    pipe("a face", image=IMAGE, num_frames=3, n_batch=2, generator=generator, **FAST)
    replay = torch.Generator().manual_seed(4)
    for _ in range(2 * (1 + FAST["steps"])):  # 2 shots x (x_T + steps)
        torch.randn((1, 4, 1, 5, 9), generator=replay)
        torch.randn((1, 4, 3, 5, 9), generator=replay)
    assert torch.equal(generator.get_state(), replay.get_state())


@pytest.mark.parametrize("image, at", [(IMAGE, (1, 1)), (IMAGE, (1, 0)), (None, (0, 1))])
def test_resume_from_any_state_gives_the_same_shots(pipe, image, at):
    """A run resumed from a RunState taken mid-shot or between shots yields the shots of the uninterrupted
    run after that point, bit for bit (latents and frames), with or without a drawn first frame."""
    states = []
    args = dict(num_frames=4, n_batch=2, seed=3, height=32, width=48, **FAST)
    whole = list(pipe.generate("a face", image, on_state=states.append, **args))
    assert [(s.shot, s.step) for s in states] == [(0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
    state = next(s for s in states if (s.shot, s.step) == at)
    resumed = list(pipe.generate("a face", image, resume=state, **args))
    assert [s.index for s in resumed] == [s.index for s in whole[at[0]:]]
    for a, b in zip(resumed, whole[at[0]:]):
        assert torch.equal(a.latents, b.latents) and np.array_equal(a.frames, b.frames)


def test_generate_yields_the_video_shot_by_shot(pipe):
    shots = list(pipe.generate("a face", IMAGE, num_frames=3, n_batch=3, seed=2, **FAST))
    assert [len(s.frames) for s in shots] == [4, 3, 3]  # the condition frame comes with shot 0
    whole = pipe("a face", IMAGE, num_frames=3, n_batch=3, seed=2, **FAST)
    assert np.array_equal(np.concatenate([s.frames for s in shots]), whole.frames)


def test_lcm_sampler_is_seeded_and_differs_from_euler(pipe):
    """sampler="lcm" (4 steps) makes a video of the same size, the same twice with a seed, not Euler's; its step
    noise is VideoFusion noise of `w_ind_noise` (from the same starting latents, w_ind_noise changes LCM's video,
    which Euler's deterministic steps never draw from)."""
    kwargs = dict(image=IMAGE, num_frames=5, seed=3, **dict(FAST, steps=4))
    lcm, again, euler = (pipe("a face", sampler=name, **kwargs) for name in ("lcm", "lcm", "euler"))
    assert lcm.frames.shape == euler.frames.shape == (6, 40, 72, 3)
    assert np.array_equal(lcm.frames, again.frames) and torch.equal(lcm.latents, again.latents)
    assert not torch.equal(lcm.latents, euler.latents)
    start = torch.randn((1, 4, 5, 5, 9), generator=torch.Generator().manual_seed(0))
    for name, differs in (("lcm", True), ("euler", False)):
        a, b = (pipe("a face", sampler=name, latents=start, w_ind_noise=w, **kwargs).latents for w in (0.5, 0.2))
        assert torch.equal(a, b) is not differs, name
