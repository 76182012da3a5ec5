"""The one sample type, from the shard reader to the heads: decoding a shard's members into it,
building it for a window that did not come from a shard, and collating samples into a batch.

Batching of variable montages: pad + mask here, packed in the encoder. A batch mixes samples
with 19..128 channels (and, for epoched trials, different lengths); `collate_eeg` zero-pads
to the batch's largest C and T and returns `channel_mask` / `time_mask`. The encoder
tokenises each channel separately (embedding it from its name and 3D position) and packs the
valid tokens into one sequence (pretrain/packing.py), so padding costs no compute and never
leaks into the result, and one batch can hold any mix of corpora -- which keeps the per-rank
sample order (and thus the shuffle) independent of montage. Channels the build flagged as broken
(the sample JSON's `bad_channels`) stay in `eeg` but get `channel_mask` False, so the encoder
treats them as absent, exactly like padding; `batch["bad_channels"]` lists them per sample.

Shape legend: B batch, C channels, T samples.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Raw tar members -> arrays collate_eeg can pad without further checks.

    Everything that could be malformed is checked here, per sample, so a bad sample is
    dropped alone instead of failing the whole batch in collate.
    """
    for part in ("eeg.npy", "json"):
        if part not in raw:
            raise ValueError(f"no {part} member")
    eeg = np.load(io.BytesIO(raw["eeg.npy"]), allow_pickle=False)  # [C, T] float16
    if eeg.ndim != 2 or not np.issubdtype(eeg.dtype, np.floating):
        raise ValueError(f"eeg.npy must be a float [C, T] array, got {eeg.dtype} {eeg.shape}")
    n_ch, n_t = eeg.shape
    if n_ch == 0 or n_t == 0:
        raise ValueError(f"eeg.npy is empty: {eeg.shape}")
    if not np.isfinite(eeg).all():  # one NaN would poison the loss of the whole batch
        raise ValueError("eeg.npy holds NaN or inf")
    meta = json.loads(raw["json"].decode("utf-8"))
    if not isinstance(meta, dict):
        raise ValueError("json is not an object")
    ch_names = meta.get("ch_names")
    if not isinstance(ch_names, list) or len(ch_names) != n_ch:
        raise ValueError(f"ch_names must list {n_ch} channels, got {ch_names!r:.80}")
    sfreq = float(meta.get("sfreq") or 0)
    if not sfreq > 0:
        raise ValueError(f"sfreq must be positive, got {meta.get('sfreq')!r}")
    if meta.get("n_samples", n_t) != n_t:
        raise ValueError(f"n_samples {meta['n_samples']} but eeg.npy has T={n_t}")
    ch_known = meta.get("ch_known") or [False] * n_ch
    positions = meta.get("ch_pos") or [None] * n_ch
    if len(ch_known) != n_ch or len(positions) != n_ch:
        raise ValueError(f"ch_known/ch_pos must have {n_ch} entries")
    bad_channels = meta.get("bad_channels") or []
    if not isinstance(bad_channels, list) or not set(bad_channels) <= set(ch_names):
        raise ValueError(f"bad_channels must list some of ch_names, got {bad_channels!r:.80}")
    ch_pos = np.zeros((n_ch, 3), dtype=np.float32)  # [C, 3], 0 where unknown
    pos_known = np.zeros(n_ch, dtype=bool)  # [C]
    for i, pos in enumerate(positions):
        if pos is not None:
            ch_pos[i] = np.asarray(pos, dtype=np.float32).reshape(3)
            pos_known[i] = bool(np.isfinite(ch_pos[i]).all())
            if not pos_known[i]:
                ch_pos[i] = 0.0
    return {
        "key": raw["__key__"],
        "shard": raw.get("__url__"),
        "eeg": eeg,  # [C, T], still float16: half the memory in the shuffle/prefetch queues
        "ch_names": [str(n) for n in ch_names],
        "bad_channels": [str(n) for n in bad_channels],
        "ch_known": np.asarray(ch_known, dtype=bool),  # [C]
        "ch_pos": ch_pos,
        "pos_known": pos_known,
        "sfreq": sfreq,
        "label": meta.get("label"),
        "stimulus_id": meta.get("stimulus_id"),
        "meta": meta,
    }


def window_sample(
    eeg: np.ndarray,
    ch_names: Sequence[str],
    ch_pos: np.ndarray,
    sfreq: float,
    bad_channels: Sequence[str] = (),
    key: str = "",
    *,
    shard: str = "",
    ch_known: Sequence[bool] | None = None,
    label: str | None = None,
    stimulus_id: str | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The one sample type (what `decode_sample` gives and `collate_eeg` takes) for a window
    that did not come from a shard -- a file at inference, probe and evaluation windows, the
    benchmarks: `eeg [C, T]` uV, `ch_pos [C, 3]` metres with NaN where unknown."""
    return {
        "key": key,
        "shard": shard,
        "eeg": np.asarray(eeg, dtype=np.float32),
        "ch_names": list(ch_names),
        "ch_known": (
            np.ones(len(ch_names), dtype=bool)
            if ch_known is None
            else np.asarray(ch_known, dtype=bool)
        ),
        "ch_pos": np.nan_to_num(ch_pos).astype(np.float32),
        "pos_known": np.isfinite(ch_pos).all(axis=1),
        "sfreq": float(sfreq),
        "label": label,
        "stimulus_id": stimulus_id,
        "bad_channels": sorted(bad_channels),
        "meta": dict(meta or {}),
    }


def collate_eeg(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Zero-pad to the batch's largest montage and length, with masks (module docstring)."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    n_b = len(samples)
    c_max = max(s["eeg"].shape[0] for s in samples)
    t_max = max(s["eeg"].shape[1] for s in samples)
    eeg = np.zeros((n_b, c_max, t_max), dtype=np.float32)  # [B, C, T]
    channel_mask = np.zeros((n_b, c_max), dtype=bool)  # [B, C] True = real, unflagged channel
    time_mask = np.zeros((n_b, t_max), dtype=bool)  # [B, T] True = real sample
    ch_pos = np.zeros((n_b, c_max, 3), dtype=np.float32)  # [B, C, 3]
    pos_known = np.zeros((n_b, c_max), dtype=bool)  # [B, C]
    ch_known = np.zeros((n_b, c_max), dtype=bool)  # [B, C] name is a 10-05 electrode
    for b, s in enumerate(samples):
        n_ch, n_t = s["eeg"].shape
        eeg[b, :n_ch, :n_t] = s["eeg"]
        flagged = set(_bad_channels(s))
        channel_mask[b, :n_ch] = [name not in flagged for name in s["ch_names"]]
        time_mask[b, :n_t] = True
        ch_pos[b, :n_ch] = s["ch_pos"]
        pos_known[b, :n_ch] = s["pos_known"]
        ch_known[b, :n_ch] = s["ch_known"]
    return {
        "eeg": torch.from_numpy(eeg),
        "channel_mask": torch.from_numpy(channel_mask),
        "time_mask": torch.from_numpy(time_mask),
        "ch_pos": torch.from_numpy(ch_pos),
        "pos_known": torch.from_numpy(pos_known),
        "ch_known": torch.from_numpy(ch_known),
        "ch_names": [s["ch_names"] for s in samples],
        "bad_channels": [_bad_channels(s) for s in samples],
        "sfreq": torch.tensor([s["sfreq"] for s in samples], dtype=torch.float32),  # [B]
        "label": [s["label"] for s in samples],
        "stimulus_id": [s["stimulus_id"] for s in samples],
        "key": [s["key"] for s in samples],
        "shard": [s["shard"] for s in samples],
        "meta": [s["meta"] for s in samples],
    }


def _bad_channels(sample: dict[str, Any]) -> list[str]:
    """A decoded sample's flagged channels; samples rebuilt from a batch carry them in meta."""
    if "bad_channels" in sample:
        return sample["bad_channels"]
    return list((sample.get("meta") or {}).get("bad_channels") or [])
