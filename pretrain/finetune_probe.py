"""Fine-tuning probe: is the pretrained encoder a better *starting point* than random weights?

A frozen linear probe asks whether the classes are linearly readable from pooled tokens.
Masked-reconstruction encoders are known to answer that poorly and still fine-tune well (MAE:
68% linear probe against 83.6% fine-tuned on ImageNet; LaBraM and CBraMod report fine-tuning),
so the linear probe alone can call an encoder useless that fine-tunes better than its
random-init twin. Here each fold trains the whole encoder plus a linear head on the pooled
tokens, leave-subjects-out as the linear probe, with the same folds, batch order, head
initialisation and budget for the pretrained encoder and each random-init twin: the
difference per fold is what pretraining gave.

Shape legend: B batch, C channels, T samples, P patches per channel, D width, F features.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.encoder import Encoder
from pretrain.features import batch_regions, pool_encoded, pooled_width, random_twin
from pretrain.probe import ProbeData, check_probe_args, folds, load_labelled
from shards.preprocess import PreprocessConfig


@dataclass
class FinetuneProbeConfig:
    """The fine-tuning budget, the same for the pretrained encoder and its twins."""

    epochs: int = 10
    lr: float = 3e-4  # the encoder's
    head_lr: float = 1e-3
    weight_decay: float = 0.05
    batch_size: int = 32

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(
                f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}"
            )
        if self.lr < 0 or self.head_lr <= 0 or self.weight_decay < 0:
            raise ValueError(
                f"need lr >= 0, head_lr > 0, weight_decay >= 0; got {self.lr}, {self.head_lr}, "
                f"{self.weight_decay} (lr 0 trains the head alone on frozen tokens)"
            )


class _Prepared:
    """Samples collated on demand, their 10-20 sites, integer labels: built once per probe."""

    def __init__(self, data: ProbeData, sfreq: float):
        from shards.sample import window_sample

        self.samples = [
            window_sample(x, n, p, sfreq, key=str(i))
            for i, (x, n, p) in enumerate(zip(data.eeg, data.ch_names, data.ch_pos, strict=True))
        ]
        self.ch_pos = data.ch_pos
        self.classes = sorted(set(data.labels))
        self.y = torch.tensor([self.classes.index(label) for label in data.labels])

    def features(self, encoder: Encoder, idx: np.ndarray, pooling: str) -> torch.Tensor:
        from shards.sample import collate_eeg

        batch = collate_eeg([self.samples[i] for i in idx])
        enc = encoder(batch)
        regions = batch_regions([self.ch_pos[i] for i in idx], enc.n_channels)  # [B, C]
        return pool_encoded(enc, regions, pooling)  # [B, F]


def fit_predict(
    encoder: Encoder,
    data: _Prepared,
    train: np.ndarray,
    test: np.ndarray,
    cfg: FinetuneProbeConfig,
    pooling: str,
    seed: int,
) -> np.ndarray:
    """Fine-tune ``encoder`` (in place) and a linear head on ``train``; class indices of ``test``.

    ``seed`` fixes the head's initialisation and the batch order, so two encoders given the
    same seed see the same batches in the same order.
    """
    gen = torch.Generator().manual_seed(seed)
    width = pooled_width(encoder.config.dim, pooling)
    head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, len(data.classes)))
    with torch.no_grad():
        head[1].weight.normal_(0.0, 0.02, generator=gen)
        head[1].bias.zero_()
    groups = [{"params": head.parameters(), "lr": cfg.head_lr}]
    if cfg.lr > 0:
        groups.append({"params": encoder.parameters(), "lr": cfg.lr})
    else:
        encoder.requires_grad_(False)
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    encoder.train(cfg.lr > 0)
    for _ in range(cfg.epochs):
        order = train[torch.randperm(len(train), generator=gen).numpy()]
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            if len(idx) < 2:  # a LayerNorm over one window is fine; a batch of one is noise
                continue
            loss = F.cross_entropy(head(data.features(encoder, idx, pooling)), data.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    encoder.eval()
    preds = []
    with torch.no_grad():
        for start in range(0, len(test), 64):
            idx = test[start : start + 64]
            preds.append(head(data.features(encoder, idx, pooling)).argmax(1))
    return torch.cat(preds).numpy()


def finetune_probe(
    encoder: Encoder,
    spec: str,
    cfg: FinetuneProbeConfig | None = None,
    seed: int = 0,
    max_windows: int | None = 2000,
    preprocess_cfg: PreprocessConfig | None = None,
    pooling: str = "regions",
    random_seeds: int = 3,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Balanced accuracy after fine-tuning: the encoder, its random-init twins, chance, and
    the per-fold difference (pretrained minus the twins' mean)."""
    from sklearn.metrics import balanced_accuracy_score

    cfg = cfg or FinetuneProbeConfig()
    cfg.validate()
    check_probe_args(pooling, random_seeds)
    raw = load_labelled(spec, preprocess_cfg, max_windows)
    data = _Prepared(raw, encoder.config.sfreq)
    splits = folds(raw.labels, raw.groups)
    twins = [random_twin(encoder, seed + j) for j in range(random_seeds)]
    truth, pre_pred, rnd_pred = [], [], [[] for _ in twins]
    per_fold = []
    for k, (train, test) in enumerate(splits):
        # each fold trains fresh copies of the same starting points, on the same batches
        start = seed + 1000 * k
        pred = fit_predict(copy.deepcopy(encoder), data, train, test, cfg, pooling, start)
        y = data.y[test].numpy()
        truth.append(y)
        pre_pred.append(pred)
        scores = []
        for j, twin in enumerate(twins):
            rnd_pred[j].append(
                fit_predict(copy.deepcopy(twin), data, train, test, cfg, pooling, start)
            )
            scores.append(balanced_accuracy_score(y, rnd_pred[j][-1]))
        per_fold.append({"pretrained": balanced_accuracy_score(y, pred), "random_init": scores})
        if progress:
            progress(
                f"fold {k + 1}/{len(splits)}: pretrained {per_fold[-1]['pretrained']:.3f}, "
                f"random-init {np.mean(scores):.3f}"
            )
    truth = np.concatenate(truth)
    randoms = [balanced_accuracy_score(truth, np.concatenate(p)) for p in rnd_pred]
    diff = np.array([f["pretrained"] - np.mean(f["random_init"]) for f in per_fold])
    return {
        "protocol": "finetune",
        "source": spec,
        "windows": len(truth),
        "classes": len(data.classes),
        "groups": len(set(raw.groups)),
        "pooling": pooling,
        "finetune": asdict(cfg),
        "pretrained": float(balanced_accuracy_score(truth, np.concatenate(pre_pred))),
        "random_init": float(np.mean(randoms)),
        "random_init_each": [float(r) for r in randoms],
        "chance": 1.0 / len(data.classes),
        "folds": per_fold,
        "difference": {
            "of": "pretrained - mean of the random-init twins, per fold",
            "mean": float(diff.mean()),
            "std": float(diff.std()),
            "n_folds": len(diff),
            "n_positive": int((diff > 0).sum()),
        },
    }
