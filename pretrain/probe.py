"""Linear probe: is the pretrained representation better than a random one of the same shape?

Freezes the encoder, pools its tokens per window, and fits a logistic regression on a
labelled source, cross-validated across subjects (or runs) so a probe cannot win by
recognising the person. The same is done for a randomly initialised encoder of the same
config, and chance is printed beside both: the gap is the pretraining's worth.

Two poolings. ``mean`` averages every valid token (the usual foundation-model probe).
``regions`` keeps coarse space: tokens are averaged over time per channel, channels are
assigned to the nearest of the 19 10-20 sites by 3D position (any montage maps onto the
same grid; channels without a position only enter a global mean), and the 20 vectors are
concatenated. Much of what EEG labels mean is lateralised (left vs right motor imagery
moves mu/beta power between C3 and C4), which a global mean cannot see.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pretrain.encoder import Encoder
from shards.preprocess import PreprocessConfig, preprocess
from shards.recording import Rejected
from shards.sources import get_source


@dataclass
class ProbeData:
    eeg: list[np.ndarray]  # each [C, T] float32 uV
    ch_names: list[list[str]]
    ch_pos: list[np.ndarray]  # each [C, 3], NaN unknown
    labels: np.ndarray
    groups: np.ndarray  # subject (or run) per window: the cross-validation unit


def load_labelled(
    spec: str, preprocess_cfg: PreprocessConfig | None = None, max_windows: int | None = None
) -> ProbeData:
    """Windows with labels from a source, through the same preprocessing as the shards."""
    cfg = preprocess_cfg or PreprocessConfig()
    source = get_source(spec)
    data = ProbeData([], [], [], np.array([]), np.array([]))
    labels, groups = [], []
    for unit in source.units():
        for rec in source.load(unit):
            if isinstance(rec, Rejected):
                continue
            processed = preprocess(rec, cfg)
            if processed.channels is None:
                continue
            for win in processed.windows:
                if win.label is None:
                    continue
                data.eeg.append(win.data)
                data.ch_names.append(processed.channels.names)
                data.ch_pos.append(processed.channels.positions)
                labels.append(win.label)
                groups.append(f"{rec.provenance.subject}/{rec.provenance.session}")
    if not labels:
        raise ValueError(f"source {spec!r} yielded no labelled windows to probe with")
    data.labels, data.groups = np.array(labels), np.array(groups)
    if max_windows and len(labels) > max_windows:
        keep = np.random.default_rng(0).choice(len(labels), max_windows, replace=False)
        keep.sort()
        data.eeg = [data.eeg[i] for i in keep]
        data.ch_names = [data.ch_names[i] for i in keep]
        data.ch_pos = [data.ch_pos[i] for i in keep]
        data.labels, data.groups = data.labels[keep], data.groups[keep]
    return data


POOLINGS = ("mean", "regions")
REGION_SITES = (
    "Fp1", "Fp2", "F7", "F3", "Fz", "F4", "F8", "T7", "C3", "Cz",
    "C4", "T8", "P7", "P3", "Pz", "P4", "P8", "O1", "O2",
)  # fmt: skip


@functools.cache
def _site_positions() -> np.ndarray:
    from shards.channels import standard_positions

    std = standard_positions()
    return np.stack([std[name] for name in REGION_SITES])  # [R, 3]


def region_of(positions: np.ndarray) -> np.ndarray:
    """`[C, 3]` metres (NaN unknown) -> index of the nearest 10-20 site per channel `[C]`,
    -1 where the position is unknown."""
    sites = _site_positions()
    known = np.isfinite(positions).all(axis=1)
    dist = np.linalg.norm(np.nan_to_num(positions)[:, None] - sites[None], axis=-1)  # [C, R]
    return np.where(known, dist.argmin(axis=1), -1)


def region_pool(grid: Tensor, valid: Tensor, regions: np.ndarray) -> Tensor:
    """One sample's tokens `[C, P, D]` -> `[(R + 1) * D]`: per-site means of the time-pooled
    channels (zeros for a site no channel is near), then the mean of every channel."""
    w = valid[..., None].to(grid.dtype)  # [C, P, 1]
    per_channel = (grid * w).sum(1) / w.sum(1).clamp_min(1.0)  # [C, D]
    has = valid.any(1)  # [C]
    out = grid.new_zeros(len(REGION_SITES) + 1, grid.shape[-1])
    for r in range(len(REGION_SITES)):
        members = torch.from_numpy(regions == r) & has
        if members.any():
            out[r] = per_channel[members].mean(0)
    out[-1] = per_channel[has].mean(0) if has.any() else 0.0
    return out.reshape(-1)


@torch.no_grad()
def features(
    encoder: Encoder, data: ProbeData, batch_size: int = 32, pooling: str = "mean"
) -> np.ndarray:
    """Pooled encoder features: `[N, D]` (``mean``) or `[N, 20 * D]` (``regions``)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    from shards.reader import collate_eeg

    encoder.eval()
    out = []
    for start in range(0, len(data.eeg), batch_size):
        samples = []
        for i in range(start, min(start + batch_size, len(data.eeg))):
            pos = data.ch_pos[i]
            samples.append(
                {
                    "eeg": torch.from_numpy(data.eeg[i]),
                    "ch_names": data.ch_names[i],
                    "ch_known": [True] * len(data.ch_names[i]),
                    "ch_pos": torch.from_numpy(np.nan_to_num(pos).astype(np.float32)),
                    "pos_known": torch.from_numpy(np.isfinite(pos).all(axis=1)),
                    "sfreq": encoder.config.sfreq,
                    "label": None,
                    "stimulus_id": None,
                    "key": str(i),
                    "meta": {},
                    "shard": "",
                }
            )
        batch = collate_eeg(samples)
        enc = encoder(batch)
        if pooling == "mean":
            out.append(Encoder.pool(enc).float().numpy())
            continue
        grid = enc.grid().float()  # [B, C, P, D]
        valid = enc.valid.view(grid.shape[:3])
        for j, i in enumerate(range(start, start + grid.shape[0])):
            c = len(data.ch_names[i])
            pooled = region_pool(grid[j, :c], valid[j, :c], region_of(data.ch_pos[i]))
            out.append(pooled[None].numpy())
    return np.concatenate(out)


def balanced_accuracy_cv(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
    """Leave-groups-out (subjects/sessions) logistic regression; stratified folds if one group."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n_groups = len(set(groups))
    folds = (
        StratifiedGroupKFold(n_splits=min(5, n_groups)).split(x, y, groups)
        if n_groups >= 3
        else StratifiedKFold(n_splits=5, shuffle=True, random_state=0).split(x, y)
    )
    truth, pred = [], []
    for train, test in folds:
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.5))
        clf.fit(x[train], y[train])
        truth.append(y[test])
        pred.append(clf.predict(x[test]))
    return float(balanced_accuracy_score(np.concatenate(truth), np.concatenate(pred)))


def probe(
    encoder: Encoder,
    spec: str,
    seed: int = 0,
    max_windows: int | None = 2000,
    preprocess_cfg: PreprocessConfig | None = None,
    pooling: str = "mean",
    random_seeds: int = 3,
) -> dict[str, Any]:
    """Balanced accuracy of the encoder, random-init twins, and chance, on `spec`.

    The random baseline is the mean over `random_seeds` twins (seeds seed, seed+1, ...): one
    twin's score moves by a few points with its seed, which is the size of effect in question.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if random_seeds < 1:
        raise ValueError(f"random_seeds must be at least 1, got {random_seeds}")
    data = load_labelled(spec, preprocess_cfg, max_windows)
    randoms = []
    for k in range(random_seeds):
        torch.manual_seed(seed + k)
        twin = Encoder(encoder.config, channel_vocab=encoder.vocab.names)
        randoms.append(
            balanced_accuracy_cv(features(twin, data, pooling=pooling), data.labels, data.groups)
        )
    classes = sorted(set(data.labels))
    return {
        "source": spec,
        "windows": len(data.labels),
        "classes": len(classes),
        "groups": len(set(data.groups)),
        "pooling": pooling,
        "pretrained": balanced_accuracy_cv(
            features(encoder, data, pooling=pooling), data.labels, data.groups
        ),
        "random_init": float(np.mean(randoms)),
        "random_init_each": randoms,
        "chance": 1.0 / len(classes),
    }


def format_result(result: dict[str, Any]) -> str:
    return (
        f"linear probe ({result.get('pooling', 'mean')} pooling) on {result['source']} "
        f"({result['windows']} windows, {result['classes']} classes, cross-validated over "
        f"{result['groups']} subjects/sessions)\n"
        f"  balanced accuracy  pretrained {result['pretrained']:.3f}   "
        f"random-init {result['random_init']:.3f} (mean of "
        f"{len(result.get('random_init_each', [0]))} seeds)   chance {result['chance']:.3f}"
    )
