"""Write small EEG files with MNE's own writers, for tests of bad and odd inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CHANNELS = ["Fp1", "Fp2", "F3", "F4", "C3", "C4", "P3", "P4", "O1", "O2", "Cz", "Pz"]


def eeg_array(n_channels: int, seconds: float, sfreq: float, seed: int = 0) -> np.ndarray:
    """Plausible EEG in volts `[C, T]`: smoothed noise of ~20 uV plus a 10 Hz rhythm."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sfreq)) / sfreq
    noise = np.cumsum(rng.standard_normal((n_channels, t.size)), axis=1)
    noise -= noise.mean(axis=1, keepdims=True)
    noise /= noise.std(axis=1, keepdims=True)
    return (15 * noise + 8 * np.sin(2 * np.pi * 10 * t)) * 1e-6


def write_raw(path: Path, data: np.ndarray, sfreq: float, ch_names: list[str]) -> Path:
    """Save `[C, T]` volts as FIF, EDF or BrainVision (by the suffix) through MNE."""
    import mne

    info = mne.create_info(ch_names, sfreq, ch_types="eeg")
    raw = mne.io.RawArray(data, info, verbose="error")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".fif":
        raw.save(path, overwrite=True, verbose="error")
    else:
        mne.export.export_raw(path, raw, overwrite=True, verbose="error")
    return path
