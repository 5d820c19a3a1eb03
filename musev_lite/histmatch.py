"""Histogram matching: the generated frames take on the colours of the condition frame.

A video drifts in colour as it goes on: each shot continues from the last frame of the one before, and
small shifts of tone add up. MuseV offers a post-process against it (`need_hist_match` of its predictor):
every generated frame is remapped, level by level, so that the distribution of its values is that of
frame 0, the condition frame. It is classic histogram specification, as scikit-image's
`exposure.match_histograms` computes it (MuseV calls it through MMCM's `hist_match_video_bcthw`).

For one channel of one frame (the *source*, N pixels) and the same channel of the reference (M pixels):

1. The source's cumulative distribution at each level v: the share of its pixels at or below v,
   F(v) = #{x <= v} / N.
2. The reference's cumulative distribution at each level u it uses (levels without a pixel are left
   out): G(u) = #{y <= u} / M, for its levels u_0 < u_1 < ... < u_K, so G(u_K) = 1.
3. Source level v goes to the reference level with the same share of pixels below it, G^-1(F(v)), read
   off the points (G(u_k), u_k) by linear interpolation (`np.interp`); below G(u_0) it is u_0. The
   result is truncated to a byte (scikit-image writes it into an array of the source's dtype, uint8).

The three steps make a table of 256 levels, and the frame is looked up in it. Each channel (R, G, B) is
matched on its own, and each frame on its own against the same reference, so matching shot by shot
gives what MuseV gives for the whole video at once. A frame matched to itself comes back unchanged: each
of its levels v has F(v) = G(v), a point of the interpolation.

Numerics, as MuseV runs it: its decoded frames are floats in [0, 1], made bytes by `x * 255` truncated
(what `MuseVPipeline.decode` does), matched as bytes, divided by 255 and stored as float32, then written
by `x * 255` truncated again. That round trip returns every level k to k, so the frames MuseV writes are
the matched bytes this module returns.
"""

from __future__ import annotations

import numpy as np

from .settings import ConfigError

LEVELS = 256  # of a uint8 channel


def level_map(source: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The table (256,) uint8 that matches the histogram of `source` to that of `reference` (uint8 arrays
    of one channel, any shapes): level v of the source becomes table[v]."""
    source_cdf = np.cumsum(np.bincount(source.ravel(), minlength=LEVELS)) / source.size  # F(v), v = 0..255
    counts = np.bincount(reference.ravel(), minlength=LEVELS)
    used = np.flatnonzero(counts)  # u_0 < ... < u_K
    reference_cdf = np.cumsum(counts[used]) / reference.size  # G(u_k)
    return np.interp(source_cdf, reference_cdf, used).astype(np.uint8)  # truncated, as scikit-image stores it


def match_frame(frame: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """`frame` (H, W, C) uint8 with each channel's histogram matched to that channel of `reference`
    (H', W', C) uint8."""
    matched = np.empty_like(frame)
    for c in range(frame.shape[-1]):
        matched[..., c] = level_map(frame[..., c], reference[..., c])[frame[..., c]]
    return matched


def match_frames(frames: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """`frames` (F, H, W, C) uint8, each matched to `reference` (H', W', C) uint8 on its own (`match_frame`)."""
    frames, reference = np.asarray(frames), np.asarray(reference)
    if frames.dtype != np.uint8 or frames.ndim != 4:
        raise ConfigError(f"histogram matching needs uint8 frames (F, H, W, C); got {frames.dtype} {frames.shape}")
    channels = frames.shape[-1]
    if reference.dtype != np.uint8 or reference.shape[2:] != (channels,) or not reference.size:
        raise ConfigError(f"histogram matching needs a uint8 reference image (H, W, {channels}), as many channels "
                          f"as the frames; got {reference.dtype} {reference.shape}")
    return np.stack([match_frame(frame, reference) for frame in frames]) if len(frames) else frames.copy()
