"""How strongly EEG channels co-vary as a function of the distance between their electrodes.

Why it exists: volume conduction makes scalp channels highly redundant -- in EEGMMIDB a
channel correlates ~0.9 with its nearest neighbour and still ~0.3 with the farthest one --
and a model pretrained on a simulator that lacks that redundancy learns a different problem.
This profile is the yardstick used to compare the simulator with real shards (see
tests/test_simulator_realism.py). Montages differ in density (19 to 64+ channels), so the
nearest-neighbour correlation alone is not comparable across corpora; the correlation per
distance bin is.

What is measured, per window: the Pearson correlation of every channel pair (each
channel's mean over the window removed), binned by the 3D distance between the electrode
positions (metres, as in a sample's `ch_pos`); and each channel's correlation with its
nearest electrode. Both are averaged over all pairs / channels of all windows. Channels
without a known position, and flat channels, are left out.

Shape legend: B batch, C channels, T samples, K distance bins.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from shards.reader import ReaderConfig, make_loader
from shards.shard_list import Source

# Bin edges in metres: neighbours on a dense cap (2-4 cm) up to across the head (>12 cm).
DEFAULT_EDGES_M = (0.02, 0.04, 0.06, 0.08, 0.12, 0.16)


@dataclass(frozen=True)
class SpatialProfile:
    edges_m: tuple[float, ...]  # [K + 1] bin edges
    corr: np.ndarray  # [K] mean pair correlation per distance bin (nan where no pair fell)
    pairs: np.ndarray  # [K] pairs counted per bin, over all windows
    nearest_corr: float  # mean correlation of a channel with its nearest electrode
    nearest_dist_m: float  # mean distance to that electrode
    farthest_corr: float  # mean correlation of a channel with its farthest electrode
    windows: int

    def describe(self) -> str:
        bins = ", ".join(
            f"{lo * 100:.0f}-{hi * 100:.0f} cm {c:.2f}"
            for lo, hi, c in zip(self.edges_m[:-1], self.edges_m[1:], self.corr, strict=True)
        )
        return (
            f"nearest {self.nearest_corr:.2f} (at {self.nearest_dist_m * 100:.1f} cm), "
            f"farthest {self.farthest_corr:.2f}; by distance: {bins} ({self.windows} windows)"
        )


def correlation_profile(
    windows: Iterable[tuple[np.ndarray, np.ndarray]],
    edges_m: tuple[float, ...] = DEFAULT_EDGES_M,
) -> SpatialProfile:
    """The profile of (eeg [C, T], positions [C, 3] metres) windows; nan positions are skipped."""
    edges = np.asarray(edges_m, dtype=float)
    if edges.ndim != 1 or len(edges) < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"edges_m must be increasing distances in metres, got {edges_m!r}")
    k = len(edges) - 1
    sums, pairs = np.zeros(k), np.zeros(k, dtype=np.int64)
    nearest, nearest_dist, farthest, n_windows = [], [], [], 0
    for eeg, pos in windows:
        x = np.asarray(eeg, dtype=np.float64)  # [C, T]
        pos = np.asarray(pos, dtype=np.float64)  # [C, 3]
        if x.ndim != 2 or pos.shape != (x.shape[0], 3):
            raise ValueError(f"need eeg [C, T] and positions [C, 3], got {x.shape}, {pos.shape}")
        x = x - x.mean(axis=1, keepdims=True)
        keep = np.isfinite(pos).all(axis=1) & (x.std(axis=1) > 0)
        if keep.sum() < 2:
            continue
        x, pos = x[keep], pos[keep]
        corr = np.corrcoef(x)  # [C, C]
        dist = np.linalg.norm(pos[:, None] - pos[None], axis=-1)  # [C, C]
        iu = np.triu_indices(len(x), 1)
        which = np.digitize(dist[iu], edges) - 1  # bin of each pair; -1 / k: outside
        inside = (which >= 0) & (which < k)
        sums += np.bincount(which[inside], corr[iu][inside], minlength=k)
        pairs += np.bincount(which[inside], minlength=k)
        np.fill_diagonal(dist, np.inf)
        near = dist.argmin(axis=1)  # [C]
        rows = np.arange(len(x))
        nearest.append(corr[rows, near])
        nearest_dist.append(dist[rows, near])
        np.fill_diagonal(dist, -np.inf)
        farthest.append(corr[rows, dist.argmax(axis=1)])
        n_windows += 1
    if n_windows == 0:
        raise ValueError("no window with at least two positioned, non-flat channels")
    with np.errstate(invalid="ignore"):
        mean = sums / pairs
    return SpatialProfile(
        edges_m=tuple(float(e) for e in edges),
        corr=mean,
        pairs=pairs,
        nearest_corr=float(np.concatenate(nearest).mean()),
        nearest_dist_m=float(np.concatenate(nearest_dist).mean()),
        farthest_corr=float(np.concatenate(farthest).mean()),
        windows=n_windows,
    )


def shard_windows(
    source: Source, max_windows: int | None = None
) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """(eeg [C, T], positions [C, 3]) of the samples of a shard folder, in shard order.

    Unknown positions come back as nan, so `correlation_profile` leaves those channels out.
    """
    loader = make_loader(source, ReaderConfig(batch_size=64, num_workers=0, shuffle=False))
    seen = 0
    for batch in loader:
        eeg, pos = batch["eeg"].numpy(), batch["ch_pos"].numpy()  # [B, C, T], [B, C, 3]
        channels, known = batch["channel_mask"].numpy(), batch["pos_known"].numpy()  # [B, C]
        times = batch["time_mask"].numpy()  # [B, T]
        for b in range(len(eeg)):
            if max_windows is not None and seen >= max_windows:
                return
            c = channels[b]
            p = np.where(known[b][:, None], pos[b], np.nan)[c]
            yield eeg[b][c][:, times[b]], p
            seen += 1


def shard_profile(
    source: Source, edges_m: tuple[float, ...] = DEFAULT_EDGES_M, max_windows: int | None = None
) -> SpatialProfile:
    """The correlation-vs-distance profile of a shard folder (or list of shards)."""
    return correlation_profile(shard_windows(source, max_windows), edges_m)
