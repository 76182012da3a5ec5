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


def log_spectrum(patches: Tensor, bands: int = 0) -> Tensor:
    """`[..., L]` -> log amplitude spectrum `[..., F]` float32 (Parseval-scaled: the mean of
    amp**2 over bins is about the patch's mean power), floored at ``SPECTRUM_FLOOR``; with
    ``bands`` the log of the RMS amplitude in each of that many log-spaced bands."""
    amp = torch.fft.rfft(patches.float(), dim=-1).abs() / math.sqrt(patches.shape[-1])
    if bands:
        weights = band_matrix(amp.shape[-1], bands).to(amp.device)
        amp = (amp.pow(2) @ weights).sqrt()
    return torch.log(amp + SPECTRUM_FLOOR)
