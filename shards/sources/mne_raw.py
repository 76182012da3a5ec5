"""Turn an MNE Raw or Epochs into a Recording: the one place MNE objects cross into brainmoe."""

from __future__ import annotations

import numpy as np

from shards.recording import Event, Provenance, Recording, Trial


def _positions(info) -> np.ndarray | None:
    """File positions `[C, 3]` (metres), NaN where a file stores none (all-zero locs)."""
    locs = np.array([ch["loc"][:3] for ch in info["chs"]], dtype=np.float64)
    missing = ~np.isfinite(locs).all(axis=1) | (np.abs(locs).sum(axis=1) == 0)
    if missing.all():
        return None
    locs[missing] = np.nan
    return locs


def recording_from_raw(raw, provenance: Provenance) -> Recording:
    """Scalp channels of a Raw (EEG-typed, plus anything typed EEG by the file), in volts."""
    raw = raw.copy().pick(picks="eeg", exclude=[])
    events = [
        Event(
            onset=float(a["onset"] - raw.first_time),
            duration=float(a["duration"]),
            label=str(a["description"]),
        )
        for a in raw.annotations
    ]
    return Recording(
        data=raw.get_data(),  # [C, T] volts
        sfreq=float(raw.info["sfreq"]),
        ch_names=list(raw.ch_names),
        unit="V",
        provenance=provenance,
        events=events,
        ch_pos=_positions(raw.info),
        line_freq=raw.info.get("line_freq"),
    )


def recording_from_epochs(epochs, labels, provenance: Provenance, extras=None) -> Recording:
    """Epochs (MOABB paradigms) as an epoched Recording; one label per epoch."""
    epochs = epochs.copy().pick(picks="eeg", exclude=[])
    extras = extras or [{} for _ in labels]
    trials = [Trial(label=str(lab), extra=ex) for lab, ex in zip(labels, extras, strict=True)]
    return Recording(
        data=epochs.get_data(copy=True),  # [N, C, T] volts
        sfreq=float(epochs.info["sfreq"]),
        ch_names=list(epochs.ch_names),
        unit="V",
        provenance=provenance,
        trials=trials,
        ch_pos=_positions(epochs.info),
        line_freq=epochs.info.get("line_freq"),
    )
