"""From a source's Recording to clean, canonical, fixed-rate windows in microvolts.

One pipeline for every source, so a corpus mixes datasets without per-dataset surprises:
pick scalp EEG, canonical names and positions, units to uV, band-pass and notch (MNE),
resample (scipy's polyphase), cut windows, and reject bad windows *with the reason* so the
manifest can say what was thrown away and why. Whole channels that are unusable (flat,
all-NaN, not EEG) are dropped rather than rejecting every window; every other channel
survives to the shard -- nothing is padded to a fixed montage. Channels that carry a signal
but a broken one (shards/bad_channels.py) are kept and *flagged* per recording: the reader
masks them out, and window rejection ignores them so one bad electrode cannot cost windows.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import scipy.signal

from shards.bad_channels import MODES as BAD_CHANNEL_MODES
from shards.bad_channels import flag_bad_channels
from shards.channels import ChannelInfo, canonicalize, is_non_eeg
from shards.recording import Recording

# Raw values whose robust scale is below this are volts (EEG in volts is ~1e-5).
_VOLT_SCALE_LIMIT = 5e-3


@dataclass
class PreprocessConfig:
    """How recordings become windows. Frequencies in Hz, durations in s, amplitudes in uV."""

    sfreq: float = 200.0
    l_freq: float | None = 0.5
    h_freq: float | None = 75.0
    # None: the recording's line frequency if the source knows it, else both 50 and 60.
    notch: list[float] | None = None
    window_s: float = 4.0
    stride_s: float = 4.0
    # Epoched sources (trials) are usually already filtered and too short for a 0.5 Hz
    # high-pass; they are only resampled unless this is set.
    filter_trials: bool = False
    drop_non_eeg: bool = True
    max_abs_uv: float = 800.0
    flat_uv: float = 0.1
    clip_fraction: float = 0.01
    min_channels: int = 1
    # "flag": broken channels are marked per recording (kept, masked by the reader);
    # "keep": nothing is flagged. Thresholds: robust z-score, and where "high frequency" starts.
    bad_channels: str = "flag"
    bad_z: float = 5.0
    bad_hf_hz: float = 30.0

    def validate(self) -> None:
        if self.sfreq <= 0:
            raise ValueError(f"preprocess.sfreq must be positive, got {self.sfreq}")
        if self.window_s <= 0 or self.stride_s <= 0:
            raise ValueError(
                f"preprocess.window_s and stride_s must be positive, got {self.window_s}/{self.stride_s}"
            )
        if self.l_freq is not None and self.h_freq is not None and self.l_freq >= self.h_freq:
            raise ValueError(
                f"preprocess.l_freq ({self.l_freq}) must be below h_freq ({self.h_freq}); "
                "set one of them to null to disable that side of the band-pass"
            )
        if self.h_freq is not None and self.h_freq >= self.sfreq / 2:
            raise ValueError(
                f"preprocess.h_freq ({self.h_freq} Hz) must be below the Nyquist frequency of the "
                f"target rate ({self.sfreq / 2} Hz); lower h_freq or raise preprocess.sfreq"
            )
        if round(self.window_s * self.sfreq) < 2:
            raise ValueError("preprocess.window_s is shorter than two samples at preprocess.sfreq")
        if self.bad_channels not in BAD_CHANNEL_MODES:
            raise ValueError(
                f"preprocess.bad_channels must be one of {BAD_CHANNEL_MODES}, "
                f"got {self.bad_channels!r}"
            )
        if self.bad_z <= 0 or self.bad_hf_hz <= 0:
            raise ValueError(
                f"preprocess.bad_z and bad_hf_hz must be positive, got {self.bad_z}/{self.bad_hf_hz}"
            )


@dataclass
class Window:
    """One sample for a shard: `[C, T]` float32 microvolts plus what it came with."""

    data: np.ndarray
    index: int
    start_s: float
    kind: str  # "window" (cut from continuous data) or "trial" (an epoch of the source)
    label: str | None = None
    stimulus_id: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Processed:
    """A preprocessed recording: its windows and an account of everything dropped."""

    channels: ChannelInfo | None
    sfreq: float
    windows: list[Window]
    rejected: Counter
    dropped_channels: dict[str, str]
    notes: dict[str, Any]
    rejected_reason: str | None = None
    # {canonical name: reason} of channels kept in the windows but broken (bad_channels.py)
    bad_channels: dict[str, str] = field(default_factory=dict)

    @property
    def n_candidates(self) -> int:
        return len(self.windows) + sum(self.rejected.values())


def preprocessed(spec: str, cfg: PreprocessConfig | None = None):
    """Every usable recording of a source spec, cleaned as a shard build would clean it:
    yields (Recording, Processed); rejected recordings are skipped. For tools that read a
    source directly (probe, evaluation) instead of its shards."""
    from shards.recording import Rejected
    from shards.sources import get_source

    cfg = cfg or PreprocessConfig()
    source = get_source(spec)
    for unit in source.units():
        for rec in source.load(unit):
            if isinstance(rec, Rejected):
                continue
            processed = preprocess(rec, cfg)
            if processed.channels is not None:
                yield rec, processed


def detect_scale(data: np.ndarray) -> tuple[str, float]:
    """Which unit the values are in, judged from their amplitude; returns (unit, factor to uV).

    Uses the first difference, so DC offsets (common in BDF/ANT files) do not fool it.
    """
    finite = data[..., :: max(1, data.shape[-1] // 20000)]
    diffs = np.abs(np.diff(finite, axis=-1))
    diffs = diffs[np.isfinite(diffs) & (diffs > 0)]
    if diffs.size == 0:
        return "uV", 1.0
    scale = float(np.median(diffs))
    return ("V", 1e6) if scale < _VOLT_SCALE_LIMIT else ("uV", 1.0)


def preprocess(rec: Recording, cfg: PreprocessConfig) -> Processed:
    """Run the whole pipeline on one recording (never raises for bad data: it rejects)."""
    data = np.asarray(rec.data, dtype=np.float64)
    notes: dict[str, Any] = {"unit_declared": rec.unit, "sfreq_native": rec.sfreq}
    dropped: dict[str, str] = {}

    keep = np.ones(len(rec.ch_names), dtype=bool)
    if cfg.drop_non_eeg:
        for i, name in enumerate(rec.ch_names):
            if is_non_eeg(name):
                keep[i] = False
                dropped[name] = "non-eeg"

    # [C, X] with X = T (continuous) or N*T (trials): channel statistics over everything.
    flat_view = np.moveaxis(data, -2, 0).reshape(len(rec.ch_names), -1)
    finite = np.isfinite(flat_view)
    for i, name in enumerate(rec.ch_names):
        if keep[i] and finite[i].mean() < 0.5:
            keep[i] = False
            dropped[name] = "nonfinite"

    unit, factor = detect_scale(flat_view[keep]) if keep.any() else ("uV", 1.0)
    notes["unit_detected"] = unit
    if rec.unit != "auto" and rec.unit != unit:
        notes["unit_warning"] = f"declared {rec.unit}, amplitude says {unit}; used {unit}"

    for i, name in enumerate(rec.ch_names):
        if keep[i] and np.nanstd(flat_view[i]) * factor < cfg.flat_uv:
            keep[i] = False
            dropped[name] = "flat"

    def reject(reason: str) -> Processed:
        return Processed(None, cfg.sfreq, [], Counter(), dropped, notes, reason)

    if keep.sum() < cfg.min_channels:
        return reject(f"no usable EEG channels (kept {int(keep.sum())}, need {cfg.min_channels})")

    names = [n for n, k in zip(rec.ch_names, keep, strict=True) if k]
    file_pos = rec.ch_pos[keep] if rec.ch_pos is not None else None
    channels = canonicalize(names, file_pos)
    notes["unknown_channels"] = [
        n for n, k in zip(channels.names, channels.known, strict=True) if not k
    ]
    data = data[..., keep, :] * factor

    if rec.epoched:
        windows, rejected, bad = _trials(rec, data, cfg, notes, channels.names)
    else:
        span = round(cfg.window_s * rec.sfreq)
        if data.shape[-1] < span:
            return reject(
                f"shorter than one window ({data.shape[-1] / rec.sfreq:.2f} s < {cfg.window_s} s)"
            )
        windows, rejected, bad = _continuous(rec, data, cfg, notes, channels.names)
    if len(channels.names) - len(bad) < cfg.min_channels:
        return reject(
            f"too few good EEG channels ({len(channels.names) - len(bad)} after flagging "
            f"{len(bad)} bad, need {cfg.min_channels})"
        )
    return Processed(channels, cfg.sfreq, windows, rejected, dropped, notes, bad_channels=bad)


def _filter(
    x: np.ndarray,
    sfreq: float,
    line_freq: float | None,
    cfg: PreprocessConfig,
    notes: dict[str, Any],
) -> np.ndarray:
    """Band-pass and notch at the native rate with MNE's FIR filters (zero phase)."""
    import mne

    nyq = sfreq / 2
    l_freq = cfg.l_freq
    h_freq = cfg.h_freq if cfg.h_freq is not None and cfg.h_freq < 0.95 * nyq else None
    if cfg.h_freq is not None and h_freq is None:
        notes["lowpass_skipped"] = f"h_freq {cfg.h_freq} Hz above native Nyquist {nyq} Hz"
    notes["bandpass"] = [l_freq, h_freq]
    notch = cfg.notch if cfg.notch is not None else ([line_freq] if line_freq else [50.0, 60.0])
    freqs = [f for f in notch if f < 0.95 * nyq and (h_freq is None or f < h_freq + 5)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # e.g. "filter_length is longer than the signal"
        if l_freq is not None or h_freq is not None:
            x = mne.filter.filter_data(
                x, sfreq, l_freq, h_freq, pad="reflect_limited", verbose=False
            )
        if freqs:
            x = mne.filter.notch_filter(x, sfreq, freqs, verbose=False)
    notes["notch"] = freqs
    if caught:
        notes["filter_warnings"] = sorted({str(w.message).split(".")[0] for w in caught})
    return x


def _resample(x: np.ndarray, sfreq: float, target: float) -> np.ndarray:
    if sfreq == target:
        return x
    ratio = Fraction(target / sfreq).limit_denominator(1000)
    return scipy.signal.resample_poly(x, ratio.numerator, ratio.denominator, axis=-1)


def _continuous(
    rec: Recording,
    data: np.ndarray,
    cfg: PreprocessConfig,
    notes: dict[str, Any],
    names: list[str],
) -> tuple[list[Window], Counter, dict[str, str]]:
    # data: [C, Tn] at the native rate, uV
    bad_t = ~np.isfinite(data).all(axis=0)  # [Tn]
    if bad_t.any():
        data = np.where(np.isfinite(data), data, 0.0)
        notes["nonfinite_samples"] = int(bad_t.sum())
    rails = (data >= data.max(axis=1, keepdims=True)) | (data <= data.min(axis=1, keepdims=True))
    rail_cum = np.concatenate([np.zeros((data.shape[0], 1)), np.cumsum(rails, axis=1)], axis=1)
    bad_cum = np.concatenate([[0], np.cumsum(bad_t)])
    bad_annotations = [e for e in rec.events if e.label.upper().startswith("BAD")]

    x = _filter(data, rec.sfreq, rec.line_freq, cfg, notes)
    x = _resample(x, rec.sfreq, cfg.sfreq)  # [C, T] at the target rate
    bad = flag_bad_channels(x, cfg.sfreq, names, cfg)
    good = np.array([n not in bad for n in names])  # [C]
    span, stride = round(cfg.window_s * cfg.sfreq), round(cfg.stride_s * cfg.sfreq)

    windows: list[Window] = []
    rejected: Counter = Counter()
    for index, start in enumerate(range(0, x.shape[1] - span + 1, stride)):
        t0, t1 = start / cfg.sfreq, (start + span) / cfg.sfreq
        n0, n1 = round(t0 * rec.sfreq), min(round(t1 * rec.sfreq), data.shape[1])
        seg = x[:, start : start + span]
        reason = None
        if bad_cum[n1] - bad_cum[n0] > 0:
            reason = "nonfinite"
        elif any(e.onset < t1 and e.onset + e.duration > t0 for e in bad_annotations):
            reason = "bad-annotation"
        elif ((rail_cum[good, n1] - rail_cum[good, n0]) > cfg.clip_fraction * (n1 - n0)).any():
            reason = "clipped"
        else:
            reason = _amplitude_problem(seg[good], cfg)
        if reason:
            rejected[reason] += 1
            continue
        events = [
            {
                "onset": round(e.onset - t0, 6),
                "duration": e.duration,
                "label": e.label,
                "stimulus_id": e.stimulus_id,
            }
            for e in rec.events
            if e.onset < t1 and e.onset + max(e.duration, 1e-9) > t0
        ]
        main = _main_event(rec, t0, t1)
        windows.append(
            Window(
                data=seg.astype(np.float32),
                index=index,
                start_s=round(t0, 6),
                kind="window",
                label=main.label if main else None,
                stimulus_id=main.stimulus_id if main else None,
                events=events,
            )
        )
    return windows, rejected, bad


def _main_event(rec: Recording, t0: float, t1: float):
    """The event that overlaps the window most (BAD spans excluded), or None."""
    best, best_overlap = None, 0.0
    for e in rec.events:
        if e.label.upper().startswith("BAD"):
            continue
        overlap = min(t1, e.onset + max(e.duration, 1e-9)) - max(t0, e.onset)
        if overlap > best_overlap:
            best, best_overlap = e, overlap
    return best


def _amplitude_problem(seg: np.ndarray, cfg: PreprocessConfig) -> str | None:
    if np.abs(seg).max() > cfg.max_abs_uv:
        return "amplitude"
    if (seg.std(axis=-1) < cfg.flat_uv).any():
        return "flat"
    return None


def _trials(
    rec: Recording,
    data: np.ndarray,
    cfg: PreprocessConfig,
    notes: dict[str, Any],
    names: list[str],
) -> tuple[list[Window], Counter, dict[str, str]]:
    # data: [N, C, Tn] at the native rate, uV
    nonfinite = ~np.isfinite(data).all(axis=(1, 2))  # [N]
    data = np.where(np.isfinite(data), data, 0.0)
    if cfg.filter_trials:
        data = _filter(data, rec.sfreq, rec.line_freq, cfg, notes)
    x = _resample(data, rec.sfreq, cfg.sfreq)  # [N, C, T]
    # Flags per recording: the trials end to end, [C, N*T].
    bad = (
        flag_bad_channels(np.concatenate(list(x), axis=-1), cfg.sfreq, names, cfg) if len(x) else {}
    )
    good = np.array([n not in bad for n in names])  # [C]
    windows: list[Window] = []
    rejected: Counter = Counter()
    assert rec.trials is not None
    for index, trial in enumerate(rec.trials):
        reason = "nonfinite" if nonfinite[index] else _amplitude_problem(x[index][good], cfg)
        if reason:
            rejected[reason] += 1
            continue
        windows.append(
            Window(
                data=x[index].astype(np.float32),
                index=index,
                start_s=0.0,
                kind="trial",
                label=trial.label,
                stimulus_id=trial.stimulus_id,
                extra=dict(trial.extra),
            )
        )
    return windows, rejected, bad
