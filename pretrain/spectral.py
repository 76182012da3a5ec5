"""Log amplitude spectra of patches: the MSM's phase-free target and the encoder's optional
spectral patch embedding (shared so both mean the same thing).

Shape legend: L samples per patch, F spectral values per patch.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

SPECTRUM_FLOOR = 0.01  # amplitude floor of the log spectrum: 1 uV at input_scale_uv=100


@functools.cache
def band_matrix(n_bins: int, n_bands: int) -> Tensor:
    """`[n_bins, n_bands]` averaging weights: bins 1.. grouped into log-spaced bands (the DC
    bin is left out; every band holds at least one bin)."""
    edges = torch.logspace(0, math.log10(n_bins), n_bands + 1)  # bin indices 1 .. n_bins
    weights = torch.zeros(n_bins, n_bands)
    for k in range(n_bands):
        lo = min(int(edges[k]), n_bins - 1)
        hi = max(lo + 1, min(int(edges[k + 1]), n_bins))
        weights[lo:hi, k] = 1.0 / (hi - lo)
    return weights


# The classic EEG bands in Hz (delta, theta, alpha, low and high beta, gamma up to 45 Hz)
EEG_BANDS_HZ = ((1.0, 4.0), (4.0, 8.0), (8.0, 13.0), (13.0, 20.0), (20.0, 30.0), (30.0, 45.0))


@functools.cache
def hz_band_matrix(n_bins: int, patch_seconds: float) -> Tensor:
    """`[n_bins, 6]` averaging weights of the rFFT bins (bin k is k / patch_seconds Hz) in
    each of ``EEG_BANDS_HZ``; built once per patch length, as :func:`band_matrix` is."""
    hz = torch.arange(n_bins) / patch_seconds
    weights = torch.stack([((hz >= lo) & (hz < hi)).float() for lo, hi in EEG_BANDS_HZ], dim=1)
    return weights / weights.sum(0).clamp_min(1.0)


def channel_band_power(patches: Tensor, seen: Tensor, patch_seconds: float) -> Tensor:
    """`patches [B, C, P, L]`, `seen [B, C, P]` -> log RMS amplitude of each channel in
    ``EEG_BANDS_HZ``, averaged over its seen patches `[B, C, 6]` float32 (0 for a channel with
    none). Power is averaged before the log, across the window, as Welch's estimate does:
    on the simulator's held-out stimuli this read-out carries the classes (0.65 for 4 classes)
    where one patch's spectrum does not (bench/RESULTS.md, "Demo")."""
    x = patches.float()
    x = x - x.mean(-1, keepdim=True)
    power = torch.fft.rfft(x, dim=-1).abs().pow(2) / x.shape[-1]  # [B, C, P, L//2+1]
    w = seen[..., None].float()  # [B, C, P, 1]
    per_patch = power @ hz_band_matrix(power.shape[-1], patch_seconds).to(x.device)  # [B, C, P, 6]
    mean = (per_patch * w).sum(2) / w.sum(2).clamp_min(1.0)  # [B, C, 6]
    out = torch.log(mean.sqrt() + SPECTRUM_FLOOR)
    return out * seen.any(2)[..., None].float()


def log_spectrum(patches: Tensor, bands: int = 0) -> Tensor:
    """`[..., L]` -> log amplitude spectrum `[..., F]` float32 (Parseval-scaled: the mean of
    amp**2 over bins is about the patch's mean power), floored at ``SPECTRUM_FLOOR``; with
    ``bands`` the log of the RMS amplitude in each of that many log-spaced bands."""
    amp = torch.fft.rfft(patches.float(), dim=-1).abs() / math.sqrt(patches.shape[-1])
    if bands:
        weights = band_matrix(amp.shape[-1], bands).to(amp.device)
        amp = (amp.pow(2) @ weights).sqrt()
    return torch.log(amp + SPECTRUM_FLOOR)
