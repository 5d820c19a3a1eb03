"""VAE against diffusers' AutoencoderKL (tiny random weights, fixtures from tests/make_fixtures.py).

Tolerance: rounding through the encoder's or decoder's reductions, fp32 (conftest.rounding_tolerance).
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, max_abs_error, reduction_depth, rounding_tolerance
from musev_lite.vae import AutoencoderKL, VAEConfig
from musev_lite.weights import WeightsError, load_weights, read_state_dict

IO = load_file(FIXTURES / "vae/io.safetensors")


@pytest.fixture(scope="module")
def vae():
    config = json.loads((FIXTURES / "vae/config.json").read_text())
    model = AutoencoderKL(VAEConfig(block_out_channels=config["block_out_channels"], norm_num_groups=config["norm_num_groups"],
                                    layers_per_block=config["layers_per_block"])).eval()
    weights = FIXTURES / "vae/weights.safetensors"
    load_weights(model, {k: v.float() for k, v in read_state_dict(weights).items()}, str(weights))
    return model


def test_encode_is_the_posterior_mean_times_scaling(vae):
    with torch.no_grad():
        latents = vae.encode(IO["images"])
    reference = IO["mean"] * 0.18215
    depth = reduction_depth(vae.encoder, vae.quant_conv) + 1  # and the scaling
    assert max_abs_error(latents, reference, "VAE encode") <= rounding_tolerance(reference, depth)


def test_decode(vae):
    with torch.no_grad():
        images = vae.decode(IO["latents"])
    depth = reduction_depth(vae.decoder, vae.post_quant_conv) + 1  # and the scaling
    assert max_abs_error(images, IO["decoded"], "VAE decode") <= rounding_tolerance(IO["decoded"], depth)


def test_chunked_decode_equals_whole(vae):
    with torch.no_grad():
        whole, chunked = vae.decode(IO["latents"], chunk_size=8), vae.decode(IO["latents"], chunk_size=1)
    depth = reduction_depth(vae.decoder, vae.post_quant_conv) + 1  # the batch size changes the conv kernels
    assert max_abs_error(chunked, whole, "chunk_size 1 vs 8") <= rounding_tolerance(whole, depth)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        vae.decode(IO["latents"], chunk_size=0)


def test_sampling_adds_seeded_noise(vae):
    with torch.no_grad():
        mean = vae.encode(IO["images"])
        a = vae.encode(IO["images"], sample=True, generator=torch.Generator().manual_seed(0))
        b = vae.encode(IO["images"], sample=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.allclose(a, mean)


def test_wrong_shape_names_the_key(vae):
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    state["decoder.conv_in.weight"] = torch.zeros(3, 3, 3, 3)
    with pytest.raises(WeightsError, match=r"decoder.conv_in.weight \(file \(3, 3, 3, 3\)"):
        load_weights(AutoencoderKL(vae.config), state, "vae")


def test_large_frames_are_decoded_a_few_at_a_time():
    """The pipeline decodes at most DECODE_PIXELS pixels per VAE call (a 512x320 video 2 frames at a time), so
    decoding a long video at full size adds about 1 GB, not the 4 GB of 8 frames; small frames go 8 at a time."""
    from musev_lite.pipeline import MuseVPipeline
    from musev_lite.vae import DECODE_CHUNK, DECODE_PIXELS

    pipe = MuseVPipeline.demo(seed=0)
    calls = []
    decode = pipe.vae.decode
    pipe.vae.decode = lambda z, chunk_size: calls.append(tuple(z.shape)) or decode(z, chunk_size)
    for (h, w), frames, most in (((40, 64), 5, 2), ((8, 8), 11, DECODE_CHUNK)):  # 512x320: 2 at a time
        calls.clear()
        out = pipe.decode(torch.randn(1, 4, frames, h, w))
        assert out.shape == (frames, 8 * h, 8 * w, 3)
        assert sum(n for n, *_ in calls) == frames
        assert all(n * 64 * h * w <= DECODE_PIXELS or n == 1 for n, *_ in calls), calls
        assert max(n for n, *_ in calls) == most
