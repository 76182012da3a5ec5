"""Linear probe: is the pretrained representation better than a random one of the same shape?

Freezes the encoder, pools its tokens per window, and fits a logistic regression on a
labelled source, cross-validated across subjects (or runs) so a probe cannot win by
recognising the person. The same is done for a randomly initialised encoder of the same
config, and chance is printed beside both: the gap is the pretraining's worth.

The poolings (``mean``, and ``regions`` which keeps left and right apart) live in
:mod:`pretrain.features`, shared with the scikit-learn transformer MOABB evaluates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pretrain.encoder import Encoder
from pretrain.features import (  # noqa: F401  (re-exported: the probe's public names)
    POOLINGS,
    REGION_SITES,
    pooled_features,
    random_twin,
    region_of,
    region_pool,
)
from shards.preprocess import PreprocessConfig, preprocessed


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
    data = ProbeData([], [], [], np.array([]), np.array([]))
    labels, groups = [], []
    for rec, processed in preprocessed(spec, preprocess_cfg):
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


def features(
    encoder: Encoder, data: ProbeData, batch_size: int = 32, pooling: str = "mean"
) -> np.ndarray:
    """Pooled encoder features: `[N, D]` (``mean``) or `[N, 20 * D]` (``regions``)."""
    return pooled_features(
        encoder,
        data.eeg,
        data.ch_names,
        data.ch_pos,
        encoder.config.sfreq,
        pooling=pooling,
        batch_size=batch_size,
    )


def folds(y: np.ndarray, groups: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) indices: leave groups (subjects/sessions) out, 5 folds at most; stratified
    folds within the data when there are fewer than 3 groups. Every probe uses these."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    n_groups = len(set(groups))
    x = np.zeros(len(y))
    if n_groups >= 3:
        return list(StratifiedGroupKFold(n_splits=min(5, n_groups)).split(x, y, groups))
    return list(StratifiedKFold(n_splits=5, shuffle=True, random_state=0).split(x, y))


def balanced_accuracy_cv(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
    """Leave-groups-out (subjects/sessions) logistic regression; stratified folds if one group."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    truth, pred = [], []
    for train, test in folds(y, groups):
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.5))
        clf.fit(x[train], y[train])
        truth.append(y[test])
        pred.append(clf.predict(x[test]))
    return float(balanced_accuracy_score(np.concatenate(truth), np.concatenate(pred)))


def check_probe_args(pooling: str, random_seeds: int) -> None:
    """What every probe refuses before it loads a window."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if random_seeds < 1:
        raise ValueError(f"random_seeds must be at least 1, got {random_seeds}")


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
    check_probe_args(pooling, random_seeds)
    data = load_labelled(spec, preprocess_cfg, max_windows)
    randoms = []
    for k in range(random_seeds):
        twin = random_twin(encoder, seed + k)
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
    kind = "fine-tuning probe" if result.get("protocol") == "finetune" else "linear probe"
    text = (
        f"{kind} ({result.get('pooling', 'mean')} pooling) on {result['source']} "
        f"({result['windows']} windows, {result['classes']} classes, cross-validated over "
        f"{result['groups']} subjects/sessions)\n"
        f"  balanced accuracy  pretrained {result['pretrained']:.3f}   "
        f"random-init {result['random_init']:.3f} (mean of "
        f"{len(result.get('random_init_each', [0]))} seeds)   chance {result['chance']:.3f}"
    )
    diff = result.get("difference")
    if diff:
        text += (
            f"\n  per fold, pretrained - random-init: {diff['mean']:+.3f} +- {diff['std']:.3f}"
            f" ({diff['n_positive']} of {diff['n_folds']} folds above)"
        )
    return text
