"""The simulator's head: cortical sources mixed into the electrodes by a spherical head model.

Why it exists: real scalp channels are highly redundant. Every electrode sees every cortical
source through the poorly conducting skull, which smears a source's field over many
centimetres, and every channel shares the reference electrode's own signal. In EEGMMIDB
(4 s windows, 0.5-75 Hz) a channel correlates 0.92 with its nearest neighbour and still
0.35 with the farthest one; about 60% of the variance is common to all channels. A
simulator with only local mixing (neighbours ~0.6, far channels uncorrelated) poses an
easier-looking but different problem, so `synthetic` draws its background from this model
(tests/test_simulator_realism.py holds the two corpora side by side with shards.spatial).

The model: radial current dipoles spread evenly over a sphere at 80% of the head radius
(cortex under the skull and scalp), neighbouring patches co-active over ~2 cm, their fields
computed by MNE's four-shell spherical head model (brain, CSF, skull, scalp) fitted to the
template electrode positions. What the simulator needs is only the resulting correlation of
the background between electrodes; it is computed once per process for the 64 electrodes of
the 10-10 cap that EEGMMIDB (BCI2000) uses, which holds every electrode the simulator knows.
"""

from __future__ import annotations

import functools

import numpy as np

from shards.channels import standard_positions

# The 64-channel 10-10 cap of EEGMMIDB / BCI2000, in MNE's spelling.
TEN_TEN = (
    "FC5", "FC3", "FC1", "FCz", "FC2", "FC4", "FC6", "C5", "C3", "C1", "Cz", "C2", "C4", "C6",
    "CP5", "CP3", "CP1", "CPz", "CP2", "CP4", "CP6", "Fp1", "Fpz", "Fp2", "AF7", "AF3", "AFz",
    "AF4", "AF8", "F7", "F5", "F3", "F1", "Fz", "F2", "F4", "F6", "F8", "FT7", "FT8", "T7",
    "T8", "T9", "T10", "TP7", "TP8", "P7", "P5", "P3", "P1", "Pz", "P2", "P4", "P6", "P8",
    "PO7", "PO3", "POz", "PO4", "PO8", "O1", "Oz", "O2", "Iz",
)  # fmt: skip

_SOURCE_DEPTH = 0.75  # source sphere radius / head radius
_SOURCE_SPACING = 600  # points on the whole source sphere (about 1.2 cm apart)
_SOURCE_FLOOR = -0.4  # lowest source, as cos(polar angle): none below the temporal lobes
_SOURCE_SMOOTHING_M = 0.02  # cortical patches closer than this tend to co-activate


def _sphere_points(n: int) -> np.ndarray:
    """n nearly evenly spaced unit vectors (a Fibonacci lattice). Returns [n, 3]."""
    i = np.arange(n) + 0.5
    polar, azimuth = np.arccos(1 - 2 * i / n), np.pi * (1 + 5**0.5) * i
    return np.stack(
        [np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], axis=1
    )


@functools.cache
def _lead_field() -> tuple[np.ndarray, np.ndarray]:
    """Potential at each TEN_TEN electrode per unit radial dipole, and the dipoles' positions.

    Returns [64, S] (reference-free) and [S, 3] metres.
    """
    import mne

    table = standard_positions()
    info = mne.create_info(list(TEN_TEN), 200.0, "eeg")
    montage = mne.channels.make_dig_montage({n: table[n] for n in TEN_TEN}, coord_frame="head")
    info.set_montage(montage)
    sphere = mne.make_sphere_model("auto", "auto", info, verbose=False)
    normals = _sphere_points(_SOURCE_SPACING)
    normals = normals[normals[:, 2] > _SOURCE_FLOOR]  # [S, 3]
    rr = sphere["r0"] + _SOURCE_DEPTH * sphere.radius * normals
    src = mne.setup_volume_source_space(pos={"rr": rr, "nn": normals}, sphere=sphere, verbose=False)
    fwd = mne.make_forward_solution(
        info, trans=None, src=src, bem=sphere, meg=False, eeg=True, verbose=False
    )
    fwd = mne.convert_forward_solution(fwd, force_fixed=True, use_cps=False, verbose=False)
    return fwd["sol"]["data"], rr


@functools.cache
def _correlation() -> np.ndarray:
    """[64, 64] correlation of the cortical background between TEN_TEN electrodes."""
    lead, rr = _lead_field()  # [64, S], [S, 3]
    d2 = ((rr[:, None] - rr[None]) ** 2).sum(-1)  # [S, S]
    sources = np.exp(-d2 / (2 * _SOURCE_SMOOTHING_M**2))  # [S, S] covariance of the sources
    cov = lead @ sources @ lead.T  # [64, 64]
    sd = np.sqrt(np.diag(cov))
    return cov / np.outer(sd, sd)


def background_mixing(names: list[str] | tuple[str, ...]) -> np.ndarray:
    """A matrix M with M @ M.T = the background's correlation among `names` (TEN_TEN names).

    Mixing independent unit-variance noise with M gives each channel unit variance and the
    head model's correlations -- the same distribution as the sources pushed through the lead
    field, at the cost of C noise series instead of hundreds. Returns [C, C].
    """
    index = [TEN_TEN.index(n) for n in names]
    corr = _correlation()[np.ix_(index, index)]  # [C, C]
    values, vectors = np.linalg.eigh(corr)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T  # symmetric square root
