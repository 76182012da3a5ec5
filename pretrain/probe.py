"""Linear probe: is the pretrained representation better than a random one of the same shape?

Freezes the encoder, pools its tokens per window, and fits a logistic regression on a
labelled source, cross-validated across subjects (or runs) so a probe cannot win by
recognising the person. The same is done for a randomly initialised encoder of the same
config, and chance is printed beside both: the gap is the pretraining's worth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

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


@torch.no_grad()
def features(encoder: Encoder, data: ProbeData, batch_size: int = 32) -> np.ndarray:
    """Pooled encoder features `[N, D]` (mean over valid tokens)."""
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
        out.append(Encoder.pool(encoder(batch)).float().numpy())
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
) -> dict[str, Any]:
    """Balanced accuracy of the encoder, a random-init twin, and chance, on `spec`."""
    data = load_labelled(spec, preprocess_cfg, max_windows)
    torch.manual_seed(seed)
    random_twin = Encoder(encoder.config, channel_vocab=encoder.vocab.names)
    classes = sorted(set(data.labels))
    return {
        "source": spec,
        "windows": len(data.labels),
        "classes": len(classes),
        "groups": len(set(data.groups)),
        "pretrained": balanced_accuracy_cv(features(encoder, data), data.labels, data.groups),
        "random_init": balanced_accuracy_cv(features(random_twin, data), data.labels, data.groups),
        "chance": 1.0 / len(classes),
    }


def format_result(result: dict[str, Any]) -> str:
    return (
        f"linear probe on {result['source']} ({result['windows']} windows, {result['classes']} "
        f"classes, cross-validated over {result['groups']} subjects/sessions)\n"
        f"  balanced accuracy  pretrained {result['pretrained']:.3f}   "
        f"random-init {result['random_init']:.3f}   chance {result['chance']:.3f}"
    )
