"""Which channels of a recording are broken: flagged once per recording, never per window.

A loose or bridged electrode spoils every window of its recording, and rejecting those windows
would throw the good channels away with it; so such channels are *flagged*: they stay in the
shard (the data are kept, nothing is interpolated) and the reader masks them out, as if the
montage lacked them.

The criteria are PREP's (Bigdely-Shamlo et al. 2015), made montage-free and robust to the
transient artifacts (blinks, movement) that every recording has. pyprep's NoisyChannels was
tried first: with its defaults it flags 3 to 20 channels per PhysioNet recording (its
correlation test fails a channel for 1% of bad seconds), and its RANSAC needs a montage. Here
every statistic is a median over 1 s segments, and each channel is compared with the other
channels of the same recording by a robust z-score (median / MAD):

* uncorrelated: the channel's best absolute correlation with any other channel is low (a
  noise source local to one electrode, the signature of a bad contact);
* high- or low-amplitude: its typical segment std is far off the montage's;
* hf-noise: its share of power above `bad_hf_hz` is high (line noise, EMG on a bad contact).

The z-scores have floors on their scale: a montage whose channels are nearly alike (a small
MAD) would otherwise flag normal physiology, e.g. frontal channels twice the median amplitude.
On the shared PhysioNet EEGMMIDB subjects this flags FT8 in every S004 run and 0-2 channels
per recording elsewhere (tests/test_bad_channels.py prints the counts).

Shape legend: C channels, T samples, S segments, L samples per segment.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import scipy.signal

if TYPE_CHECKING:
    from shards.preprocess import PreprocessConfig

MODES = ("flag", "keep")
SEGMENT_S = 1.0  # PREP's correlation window
# Below these a robust z-score is not meaningful (and a short recording has no "typical").
MIN_CHANNELS = 6
MIN_SEGMENTS = 10
# Evenly spaced segments at most: the statistics are medians, so more buys nothing but time.
MAX_SEGMENTS = 300
# Floors of the robust scales (see the module docstring): with z = 5 a channel needs at least
# 4.5x (or 1/4.5) the median amplitude, a best correlation 0.25 below the median channel's,
# or 7.4x its share of high-frequency power, however alike the other channels are. Set on
# PhysioNet EEGMMIDB S001-S005: S004's FT8 passes two of them in most runs, one in all.
_AMPLITUDE_FLOOR = 0.3  # natural log units
_CORRELATION_FLOOR = 0.05
_HF_FLOOR = 0.4  # natural log units
_TINY = 1e-12


def flag_bad_channels(
    data: np.ndarray, sfreq: float, names: list[str], cfg: PreprocessConfig
) -> dict[str, str]:
    """{name: reason} of the broken channels of one recording, in channel order.

    `data` is `[C, T]` microvolts, already band-passed (and notched) as the shards are;
    `cfg.bad_channels == "keep"` flags nothing. Too few channels or seconds to judge a
    channel against the others also flags nothing.
    """
    data = np.asarray(data, dtype=np.float64)
    if data.ndim != 2 or data.shape[0] != len(names):
        raise ValueError(f"data must be [C, T] with C = {len(names)} names, got {data.shape}")
    if cfg.bad_channels not in MODES:
        raise ValueError(
            f"preprocess.bad_channels must be one of {MODES}, got {cfg.bad_channels!r}"
        )
    seg_len = round(SEGMENT_S * sfreq)
    n_ch, n_seg = data.shape[0], data.shape[1] // max(seg_len, 1)
    if cfg.bad_channels == "keep" or n_ch < MIN_CHANNELS or n_seg < MIN_SEGMENTS:
        return {}

    picks = np.unique(np.linspace(0, n_seg - 1, min(n_seg, MAX_SEGMENTS)).round().astype(int))
    segs = data[:, : n_seg * seg_len].reshape(n_ch, n_seg, seg_len)[:, picks]  # [C, S, L]
    segs = segs - segs.mean(axis=-1, keepdims=True)

    amplitude = np.log(np.median(segs.std(axis=-1), axis=1) + _TINY)  # [C]
    unit = segs / (np.linalg.norm(segs, axis=-1, keepdims=True) + _TINY)
    corr = np.abs(np.einsum("csl,dsl->scd", unit, unit))  # [S, C, C]
    corr[:, np.arange(n_ch), np.arange(n_ch)] = 0.0
    best_corr = np.median(corr.max(axis=2), axis=0)  # [C]

    z_corr = _robust_z(best_corr, _CORRELATION_FLOOR)
    z_amp = _robust_z(amplitude, _AMPLITUDE_FLOOR)
    z_hf = _high_frequency_z(segs, sfreq, cfg)
    bad: dict[str, str] = {}
    for i, name in enumerate(names):
        if z_corr[i] < -cfg.bad_z:
            bad[name] = "uncorrelated"
        elif z_amp[i] > cfg.bad_z:
            bad[name] = "high-amplitude"
        elif z_amp[i] < -cfg.bad_z:
            bad[name] = "low-amplitude"
        elif z_hf[i] > cfg.bad_z:
            bad[name] = "hf-noise"
    return bad


def _high_frequency_z(segs: np.ndarray, sfreq: float, cfg: PreprocessConfig) -> np.ndarray:
    """Robust z of each channel's log share of power above `bad_hf_hz` (0 where no such band)."""
    top = min(sfreq / 2, cfg.h_freq if cfg.h_freq is not None else np.inf)
    if top < cfg.bad_hf_hz + 10:  # the band-pass left (almost) nothing up there to judge
        return np.zeros(segs.shape[0])
    freqs, power = scipy.signal.periodogram(segs, sfreq, window="hann", axis=-1)  # [C, S, F]
    power = np.median(power, axis=1)  # [C, F]
    share = power[:, freqs >= cfg.bad_hf_hz].sum(axis=1) / (
        power[:, freqs >= 1.0].sum(axis=1) + _TINY
    )
    return _robust_z(np.log(share + _TINY), _HF_FLOOR)


def _robust_z(values: np.ndarray, floor: float) -> np.ndarray:
    median = np.median(values)
    scale = max(1.4826 * float(np.median(np.abs(values - median))), floor)
    return (values - median) / scale
