"""Downstream evaluation the field's way: MOABB's own evaluation classes, folds and metric.

``brainmoe evaluate moabb --model M --dataset PhysionetMI --subjects 1,2,3`` scores four
kinds of pipeline on identical folds: the frozen encoder + logistic regression, its
random-init twins + the same (the baseline that says what pretraining added; the mean of
``--random-seeds`` twins, since one twin's score moves with its seed), and MOABB's
benchmark pipelines CSP+LDA and TS+LR (pyriemann), so a figure can be read beside MOABB's
published ones. The fold-wise difference (encoder minus random twins, per held-out subject
or per session) is reported with its spread: a mean gap smaller than its spread is noise.

Every pipeline sees the paradigm's data (LeftRightImagery: 8-32 Hz, 0-3 s after the cue);
the encoder resamples to its own rate and reads the amplitude in uV.

Offline, MOABB reads a dataset already under ``MNE_DATA``; for the local EEGMMIDB copy::

    export MNE_DATA=$(realpath ../shared/data/physionet-eegmmidb)
    export MOABB_DOWNLOAD_PROVIDER=upstream   # else MOABB 1.7 waits on a mirror first

``--dataset PhysionetFists`` (:mod:`pretrain.moabb_local`) reaches subjects whose feet runs
are missing (S004, S005 here) with the same epochs PhysionetMI gives subjects 1-3.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

EVALUATIONS = {
    "cross-subject": "CrossSubjectEvaluation",
    "within-session": "WithinSessionEvaluation",
}
BASELINES = ("CSP+LDA", "TS+LR")
# --target -> MOABB's CrossSubjectMode: which unlabeled trials of the held-out subject every
# pipeline may align to (pretrain/alignment.py); "none" is the plain protocol
TARGETS = {
    "none": "train",
    "unlabeled-20p": "train_and_target_unlabeled_20p",
    "unlabeled-50p": "train_and_target_unlabeled_50p",
    "unlabeled-full": "train_and_target_unlabeled_full",
}


def parse_subjects(text: str) -> list[int]:
    """``"1,2,3"``, ``"1-5"`` or ``"1-3,7"`` -> sorted subject numbers."""
    subjects: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            subjects.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ValueError(f"--subjects: expected e.g. 1,2,3 or 1-5, got {text!r}") from None
    if not subjects:
        raise ValueError(f"--subjects: no subjects in {text!r}")
    return sorted(subjects)


def make_dataset(name: str, subjects: Sequence[int]):
    """A MOABB dataset by class name (or this project's PhysionetFists), on `subjects`."""
    import moabb.datasets

    from pretrain.moabb_local import PhysionetFists

    cls = PhysionetFists if name == "PhysionetFists" else getattr(moabb.datasets, name, None)
    if not isinstance(cls, type):
        raise ValueError(f"--dataset {name!r} is not a MOABB dataset (nor PhysionetFists)")
    dataset = cls()
    missing = sorted(set(subjects) - set(dataset.subject_list))
    if missing:
        raise ValueError(f"{name} has no subjects {missing} (it has {dataset.subject_list[:5]}...)")
    dataset.subject_list = list(subjects)
    return dataset


def make_paradigm(name: str, fmin: float | None = None, fmax: float | None = None):
    import moabb.paradigms

    cls = getattr(moabb.paradigms, name, None)
    if not isinstance(cls, type):
        raise ValueError(f"--paradigm {name!r} is not a MOABB paradigm")
    if fmin is not None and fmax is not None and not 0 <= fmin < fmax:
        raise ValueError(f"need 0 <= --fmin < --fmax, got {fmin} and {fmax}")
    bands = {k: v for k, v in {"fmin": fmin, "fmax": fmax}.items() if v is not None}
    return cls(**bands)


def baseline_pipelines(aligned: bool = False) -> dict[str, Any]:
    """MOABB's benchmark pipelines (its pipelines/CSP.yml and TSLR.yml); ``aligned``: each
    subject's covariances re-centred at the identity first (Riemannian alignment)."""
    from pyriemann.estimation import Covariances
    from pyriemann.spatialfilters import CSP
    from pyriemann.tangentspace import TangentSpace
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    from pretrain.alignment import AlignedCovariances, request_alignment_metadata

    def cov():
        if aligned:
            return request_alignment_metadata(AlignedCovariances("oas"))
        return Covariances("oas")

    return {
        "CSP+LDA": make_pipeline(cov(), CSP(nfilter=6), LinearDiscriminantAnalysis(solver="svd")),
        "TS+LR": make_pipeline(cov(), TangentSpace(metric="riemann"), LogisticRegression(C=1.0)),
    }


def encoder_pipeline(features, c: float | None = 0.5, aligned: bool = False):
    """Frozen features -> standardised -> logistic regression (the probe's classifier).

    ``c=None`` picks the regularisation inside each training fold (5-fold inner
    cross-validation over a log grid, MOABB's metric): thousands of pooled features against
    a few hundred trials make a fixed C favour whichever encoder has the lower effective
    rank, so a comparison of encoders should not hang on one C. ``aligned``: each subject's
    features are z-scored by their own statistics instead of the pooled ones
    (pretrain/alignment.py)."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from pretrain.alignment import AlignedFeatures, request_alignment_metadata

    if c is None:
        clf = LogisticRegressionCV(
            Cs=np.logspace(-4, 1, 11), cv=5, scoring="roc_auc", max_iter=3000
        )
    else:
        clf = LogisticRegression(C=c, max_iter=3000)
    if aligned:
        return make_pipeline(request_alignment_metadata(AlignedFeatures(features)), clf)
    return make_pipeline(features, StandardScaler(), clf)


def _spread(values: np.ndarray) -> dict[str, float]:
    return {
        "score": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
    }


def summarise(scores, random_names: Sequence[str]) -> dict[str, Any]:
    """MOABB's result frame -> per-pipeline mean/std over folds, the per-fold table, and the
    fold-wise difference of the encoder and the mean of its random twins."""
    table = scores.pivot_table(index=["subject", "session"], columns="pipeline", values="score")
    random = table[list(random_names)].mean(axis=1)
    pipelines = {
        "brainmoe": _spread(table["brainmoe"].to_numpy()),
        "brainmoe-random": {
            **_spread(random.to_numpy()),
            "seeds": {name: float(table[name].mean()) for name in random_names},
        },
        **{name: _spread(table[name].to_numpy()) for name in BASELINES},
    }
    diff = (table["brainmoe"] - random).to_numpy()
    folds = [
        {
            "subject": int(subject),
            "session": str(session),
            **{
                name: float(table.loc[(subject, session), name])
                for name in ("brainmoe", *BASELINES)
            },
            "brainmoe-random": float(random.loc[(subject, session)]),
            "difference": float(d),
        }
        for (subject, session), d in zip(table.index, diff, strict=True)
    ]
    difference = {
        "of": "brainmoe - brainmoe-random, per fold",
        "mean": float(diff.mean()),
        "std": float(diff.std(ddof=1)) if len(diff) > 1 else 0.0,
        "n_folds": len(diff),
        "n_positive": int((diff > 0).sum()),
    }
    return {"pipelines": pipelines, "difference": difference, "folds": folds}


def evaluate(
    model: str,
    dataset: str = "PhysionetMI",
    subjects: Sequence[int] = (1, 2, 3),
    evaluation: str = "cross-subject",
    paradigm: str = "LeftRightImagery",
    fmin: float | None = None,
    fmax: float | None = None,
    pooling: str = "regions",
    layer: int | None = None,
    random_seeds: int = 3,
    seed: int = 0,
    c: float | None = 0.5,
    target: str = "none",
    batch_size: int = 32,
    device: str = "auto",
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Run one MOABB evaluation of the encoder, its random twins and the baselines."""
    import moabb.evaluations

    from pretrain.features import (
        POOLINGS,
        EncoderFeatures,
        load_encoder,
        resolve_device,
        resolve_layer,
    )

    if evaluation not in EVALUATIONS:
        raise ValueError(f"--evaluation must be one of {list(EVALUATIONS)}, got {evaluation!r}")
    if pooling not in POOLINGS:
        raise ValueError(f"--pooling must be one of {POOLINGS}, got {pooling!r}")
    if random_seeds < 1:
        raise ValueError(f"--random-seeds must be at least 1, got {random_seeds}")
    if evaluation == "cross-subject" and len(subjects) < 2:
        raise ValueError("cross-subject evaluation needs at least 2 subjects")
    if c is not None and c <= 0:
        raise ValueError(f"--C must be positive or 'auto', got {c}")
    if target not in TARGETS:
        raise ValueError(f"--target must be one of {list(TARGETS)}, got {target!r}")
    if target != "none" and evaluation != "cross-subject":
        raise ValueError(
            f"--target {target} aligns to unlabeled trials of a held-out subject: it needs "
            "--evaluation cross-subject"
        )
    aligned = target != "none"
    data = make_dataset(dataset, subjects)
    task = make_paradigm(paradigm, fmin, fmax)
    if not task.is_valid(data):
        raise ValueError(f"{dataset} does not fit the {paradigm} paradigm")
    # Load (and so check) the model before any data; the transformers reuse this copy.
    encoder = load_encoder(model, tracking_uri, resolve_device(device), False, 0)
    layer_index = resolve_layer(layer, len(encoder.blocks))

    # The channel names and rate the paradigm gives (X itself carries neither).
    epochs = task.get_data(data, subjects=[subjects[0]], return_epochs=True)[0]
    common = {
        "model": model,
        "pooling": pooling,
        "layer": layer_index,
        "batch_size": batch_size,
        "ch_names": list(epochs.ch_names),
        "sfreq": float(epochs.info["sfreq"]),
        "device": device,
        "tracking_uri": tracking_uri,
    }
    pipelines = {"brainmoe": encoder_pipeline(EncoderFeatures(**common), c, aligned)}
    random_names = [f"brainmoe-random-s{seed + k}" for k in range(random_seeds)]
    for k, name in enumerate(random_names):
        twin = EncoderFeatures(**common, random_init=True, seed=seed + k)
        pipelines[name] = encoder_pipeline(twin, c, aligned)
    pipelines.update(baseline_pipelines(aligned))

    cls = getattr(moabb.evaluations, EVALUATIONS[evaluation])
    protocol = {"cs_mode": TARGETS[target]} if evaluation == "cross-subject" else {}
    with tempfile.TemporaryDirectory(prefix="brainmoe-moabb-") as results_dir:
        runner = cls(
            paradigm=task,
            datasets=[data],
            random_state=seed,  # one seed: every pipeline gets the same folds
            overwrite=True,
            hdf5_path=results_dir,  # MOABB's results cache, never ~ or the repo
            n_jobs=1,
            **protocol,
        )
        scores = runner.process(pipelines)
    return {
        "metric": str(task.scoring),
        "evaluation": EVALUATIONS[evaluation],
        "dataset": data.code,
        "paradigm": paradigm,
        "bands": [list(band) for band in getattr(task, "filters", [])],  # Hz
        "subjects": list(subjects),
        "model": model,
        "layer": layer_index,
        "depth": len(encoder.blocks),
        "pooling": pooling,
        "C": "auto" if c is None else c,
        "target": target,
        "aligned": aligned,
        "random_seeds": [seed + k for k in range(random_seeds)],
        **summarise(scores, random_names),
    }


def format_result(result: dict[str, Any]) -> str:
    lines = [
        f"MOABB {result['evaluation']} on {result['dataset']} subjects "
        f"{','.join(map(str, result['subjects']))}, {result['paradigm']} "
        f"({', '.join(f'{lo}-{hi}' for lo, hi in result['bands'])} Hz), "
        f"metric {result['metric']}",
        f"  brainmoe: {result['model']}, layer {result['layer']} of 0..{result['depth'] - 1}, "
        f"{result['pooling']} pooling, LR C={result.get('C', 0.5)}; random-init: mean of seeds {result['random_seeds']}",
    ]
    if result.get("aligned"):
        lines.append(
            f"  every pipeline aligned per subject (unlabeled target: {result['target']}): "
            "encoders z-score each subject's features, CSP/TS re-centre its covariances"
        )
    for name, row in result["pipelines"].items():
        lines.append(f"  {name:<16} {row['score']:.3f} +- {row['std']:.3f}")
    d = result["difference"]
    lines.append(
        f"  brainmoe - random, per fold: {d['mean']:+.3f} +- {d['std']:.3f} "
        f"({d['n_positive']}/{d['n_folds']} folds above)"
    )
    return "\n".join(lines)


def _c_value(text: str) -> float | None:
    if text.strip().lower() == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--C takes a positive number or 'auto', got {text!r}"
        ) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="encoder folder or models:/name@alias")
    parser.add_argument("--tracking-uri", help="MLflow server/store for models:/ URIs")
    parser.add_argument(
        "--dataset", default="PhysionetMI", help="MOABB dataset class, or PhysionetFists"
    )
    parser.add_argument("--subjects", default="1,2,3", help="e.g. 1,2,3 or 1-5 (default 1,2,3)")
    parser.add_argument("--evaluation", choices=list(EVALUATIONS), default="cross-subject")
    parser.add_argument("--paradigm", default="LeftRightImagery", help="MOABB paradigm class")
    parser.add_argument("--fmin", type=float, help="band-pass low edge (paradigm default: 8)")
    parser.add_argument("--fmax", type=float, help="band-pass high edge (paradigm default: 32)")
    parser.add_argument("--pooling", choices=["mean", "regions", "moments"], default="regions")
    parser.add_argument(
        "--layer", type=int, help="block whose output to probe (default: the last; -2 = one below)"
    )
    parser.add_argument("--random-seeds", type=int, default=3, help="random-init twins (mean)")
    parser.add_argument("--seed", type=int, default=0, help="folds and first twin's seed")
    parser.add_argument(
        "--C",
        dest="c",
        type=_c_value,
        default=0.5,
        help="LR inverse regularisation, or 'auto': chosen by inner 5-fold CV in each fold",
    )
    parser.add_argument(
        "--target",
        choices=list(TARGETS),
        default="none",
        help="cross-subject: align every pipeline per subject, the held-out one by this share "
        "of its trials, unlabeled (MOABB's cs_mode; scored on the rest, or on all for 'full')",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--json", help="write the result here")


def run(args: argparse.Namespace) -> int:
    result = evaluate(
        model=args.model,
        dataset=args.dataset,
        subjects=parse_subjects(args.subjects),
        evaluation=args.evaluation,
        paradigm=args.paradigm,
        fmin=args.fmin,
        fmax=args.fmax,
        pooling=args.pooling,
        layer=args.layer,
        random_seeds=args.random_seeds,
        seed=args.seed,
        c=args.c,
        target=args.target,
        batch_size=args.batch_size,
        device=args.device,
        tracking_uri=args.tracking_uri,
    )
    print(format_result(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0
