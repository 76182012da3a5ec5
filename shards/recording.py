"""The one small protocol every source speaks.

A source yields `Recording`s (or `Rejected` for an input it could not use); everything after
that -- channel naming, filtering, resampling, windowing, quality checks, writing -- is shared
and lives outside the sources, so a new source is a loader and nothing else.

Shape legend used across brainmoe: B batch, C channels, T samples, P patches, D width,
E experts, K top-k; N trials.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

UNITS = ("V", "uV", "auto")


@dataclass(frozen=True)
class Provenance:
    """Where a recording came from; becomes part of every sample's key and JSON."""

    dataset: str
    subject: str
    session: str = "0"
    run: str = "0"
    file: str | None = None

    def key_prefix(self) -> str:
        parts = [
            self.dataset,
            f"sub-{self.subject}",
            f"ses-{self.session}",
            f"run-{self.run}",
        ]
        return "_".join(safe_key(p) for p in parts)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Event:
    """An annotation on a continuous recording (seconds from the recording's first sample)."""

    onset: float
    duration: float
    label: str
    stimulus_id: str | None = None


@dataclass(frozen=True)
class Trial:
    """Metadata of one epoch of an epoched recording."""

    label: str | None = None
    stimulus_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recording:
    """A continuous `[C, T]` or an epoched `[N, C, T]` signal with what is known about it.

    `unit` is what the source believes ("V" for anything MNE read, "uV" for arrays published
    in microvolts, "auto" when unknown); the preprocessor checks it against the amplitude.
    `ch_pos` are positions from the file itself (metres, `[C, 3]`, NaN where unknown); the
    standard montage is consulted for the rest.
    """

    data: np.ndarray
    sfreq: float
    ch_names: list[str]
    unit: str
    provenance: Provenance
    events: list[Event] = field(default_factory=list)
    trials: list[Trial] | None = None
    ch_pos: np.ndarray | None = None
    line_freq: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert self.unit in UNITS, self.unit
        expect_ndim = 3 if self.trials is not None else 2
        assert self.data.ndim == expect_ndim, (self.data.shape, expect_ndim)
        assert self.data.shape[-2] == len(self.ch_names), (self.data.shape, len(self.ch_names))
        if self.trials is not None:
            assert len(self.trials) == self.data.shape[0], (len(self.trials), self.data.shape)

    @property
    def epoched(self) -> bool:
        return self.trials is not None

    @property
    def duration_s(self) -> float:
        n_samples = self.data.shape[-1] * (self.data.shape[0] if self.epoched else 1)
        return n_samples / self.sfreq


@dataclass(frozen=True)
class Rejected:
    """An input a source found but could not turn into a Recording, with the reason."""

    provenance: Provenance
    reason: str


@dataclass(frozen=True)
class WorkUnit:
    """One task of a build: what a worker loads and processes in one go.

    `id` names the unit's shards, so it must be stable across runs; `fingerprint` changes
    when the unit's inputs change (file sizes, parameters), which invalidates finished work.
    `payload` is whatever the source needs to load it (picklable, JSON-serialisable).
    """

    id: str
    fingerprint: str
    payload: dict[str, Any] = field(default_factory=dict)


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe_key(text: str) -> str:
    """A WebDataset key part: no dots (WebDataset splits keys at the first dot), no slashes."""
    return _UNSAFE.sub("-", str(text)).strip("-") or "x"


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (for WorkUnit.fingerprint and builds)."""
    import hashlib
    import json

    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
