"""Is the cross-subject gap a probe artefact? Every probe setting over many encoders at once.

    python bench/probe_screen.py --encoders "runs/*/encoder" --keep 1.0,0.4

`brainmoe evaluate moabb` answers for one encoder and one read-out (layer, pooling). When
pretrained features fail to beat their random-init twins across subjects, the first question
is whether another read-out would show what pretraining added: a middle block, a pooling
that keeps space or power, or the encoder shown only the share of patches it saw in MAE
pretraining (its training distribution, where the full window is not). Answering that one
MOABB run at a time over a dozen encoders takes hours; here the epochs are loaded once and
each encoder is run once per layer and visibility.

The score is MOABB's cross-subject figure: leave one subject out, StandardScaler + logistic
regression (C 0.5) on the pooled frozen features, ROC-AUC per held-out subject -- the same
folds and pipeline as `brainmoe evaluate moabb --evaluation cross-subject` (at the last
block with moments pooling it reproduces that command's figures). Every setting compares
the encoder with the mean of its random-init twins read the same way, with the same masks.
The summary is over encoders, so one lucky seed cannot carry a setting: the mean per-encoder
difference, its standard error, and how many encoders and folds are above their twins.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

import numpy as np
import torch

# As in bench/moabb.py: this folder holds a "moabb.py", so the repo root goes first instead.
if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])
else:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import results  # noqa: E402
from bench.moabb import LOCAL_DATA  # noqa: E402
from pretrain.features import (  # noqa: E402
    batch_regions,
    encode_at_layer,
    load_encoder,
    random_twin,
    region_pool_batch,
)
from pretrain.moabb_eval import make_dataset, make_paradigm, parse_subjects  # noqa: E402

POOLINGS = ("mean", "regions", "moments")


def load_epochs(args) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], float]:
    """MOABB's epochs for the paradigm -> (X [n, C, T] uV, binary y, subject, names, sfreq)."""
    import os

    if "MNE_DATA" not in os.environ and LOCAL_DATA.is_dir():
        os.environ["MNE_DATA"] = str(LOCAL_DATA)
        os.environ.setdefault("MOABB_DOWNLOAD_PROVIDER", "upstream")
    subjects = parse_subjects(args.subjects)
    dataset = make_dataset(args.dataset, subjects)
    paradigm = make_paradigm(args.paradigm, args.fmin, args.fmax)
    epochs, labels, meta = paradigm.get_data(dataset, subjects, return_epochs=True)
    classes = sorted(set(labels))
    if len(classes) != 2:
        raise ValueError(f"the screen scores ROC-AUC of two classes; got {classes}")
    X = (epochs.get_data(copy=False) * 1e6).astype(np.float32)  # V -> uV
    y = (np.asarray(labels) == classes[1]).astype(int)
    return X, y, meta.subject.to_numpy(), list(epochs.ch_names), float(epochs.info["sfreq"])


def cross_subject(features: np.ndarray, y: np.ndarray, subject: np.ndarray, c: float):
    """Leave-one-subject-out ROC-AUC `[subjects]`, as MOABB's CrossSubjectEvaluation."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    scores = []
    for held_out in np.unique(subject):
        train, test = subject != held_out, subject == held_out
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
        clf.fit(features[train], y[train])
        scores.append(roc_auc_score(y[test], clf.predict_proba(features[test])[:, 1]))
    return np.array(scores)


@torch.no_grad()
def layer_features(encoder, batch, regions, keep: float, draws: int, seed: int):
    """-> {(layer, pooling): features [n, F]} for every block, the encoder shown ``keep`` of
    the patches (at random, ``draws`` times, features averaged; 1.0 = everything, once)."""
    encoder.eval()
    inp = encoder.prepare(batch)
    b, c, p, _ = inp.patches.shape
    runs = draws if keep < 1 else 1
    out: dict[tuple[int, str], np.ndarray] = {}
    for layer in range(len(encoder.blocks)):
        gen = torch.Generator().manual_seed(seed)  # the same masks for every encoder
        total = 0.0
        for _ in range(runs):
            mask = torch.rand(b, c, p, generator=gen) < keep if keep < 1 else None
            enc = encode_at_layer(encoder, inp, layer, keep=mask)
            d = enc.tokens.shape[-1]
            if enc.index is None:
                tokens, valid = enc.tokens.float(), enc.valid
            else:  # kept tokens back to their grid places; the rest count as absent
                tokens = torch.zeros(b, c * p, d).scatter_(
                    1, enc.index[..., None].expand(-1, -1, d), enc.tokens.float()
                )
                valid = torch.zeros(b, c * p, dtype=torch.bool).scatter_(1, enc.index, enc.valid)
            grid = tokens.view(b, c, p, d) * valid.view(b, c, p, 1)
            grid = torch.cat([grid, grid.pow(2)], dim=-1)  # [B, C, P, 2D]
            total = total + region_pool_batch(grid, valid.view(b, c, p), regions).numpy()
        sites = total.reshape(b, -1, 2 * d) / runs  # [B, sites + 1, 2D]; the last: every channel
        out[(layer, "mean")] = sites[:, -1, :d]
        out[(layer, "regions")] = sites[..., :d].reshape(b, -1)
        out[(layer, "moments")] = sites.reshape(b, -1)
    return out


def screen(args) -> dict:
    from shards.channels import canonicalize
    from shards.sample import collate_eeg, window_sample

    folders = sorted({f for pattern in args.encoders for f in glob.glob(pattern)})
    if not folders:
        raise ValueError(f"--encoders {args.encoders} matched no encoder folder")
    keeps = [float(k) for k in args.keep.split(",")]
    if any(not 0 < k <= 1 for k in keeps):
        raise ValueError(f"--keep values must be in (0, 1], got {args.keep}")
    torch.set_num_threads(args.threads)
    X, y, subject, names, sfreq = load_epochs(args)
    channels = canonicalize(names)
    samples = [
        window_sample(x, channels.names, channels.positions, sfreq, key=str(i))
        for i, x in enumerate(X)
    ]
    batch = collate_eeg(samples)
    regions = batch_regions([channels.positions] * len(X), len(channels.names))
    twins: dict[tuple[str, float], dict] = {}  # (encoder config, keep) -> twins' scores
    per_encoder: dict[str, dict] = {}
    for folder in folders:
        encoder = load_encoder(folder, None, "cpu", False, 0).float()
        config_key = json.dumps(str(encoder.config))
        scores = {}
        for keep in keeps:
            feats = layer_features(encoder, batch, regions, keep, args.draws, args.seed)
            if (config_key, keep) not in twins:  # twins depend on the config, not the weights
                runs = [
                    layer_features(
                        random_twin(encoder, s).float(), batch, regions, keep, args.draws, args.seed
                    )
                    for s in range(args.twins)
                ]
                twins[(config_key, keep)] = {
                    k: np.mean([cross_subject(r[k], y, subject, args.C) for r in runs], 0)
                    for k in runs[0]
                }
            for (layer, pooling), f in feats.items():
                pre = cross_subject(f, y, subject, args.C)
                twin = twins[(config_key, keep)][(layer, pooling)]
                scores[f"{layer}/{pooling}/{keep}"] = {
                    "brainmoe": pre.tolist(),
                    "random": twin.tolist(),
                }
        per_encoder[folder] = scores
        best = max(scores, key=lambda k: np.mean(np.subtract(*scores[k].values())))
        print(
            f"{folder}: best setting {best} ({np.mean(np.subtract(*scores[best].values())):+.3f})",
            flush=True,
        )
    return {"subjects": sorted(set(subject.tolist())), "windows": len(X), "encoders": per_encoder}


def summary(result: dict) -> str:
    encoders = result["encoders"]
    settings = list(next(iter(encoders.values())))
    lines = [
        "| layer | pooling | patches shown | random twins (mean AUC) | brainmoe - random, mean over encoders (SE) | encoders above | folds above |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for setting in settings:
        layer, pooling, keep = setting.split("/")
        diffs = np.array(
            [np.subtract(e[setting]["brainmoe"], e[setting]["random"]) for e in encoders.values()]
        )
        per = diffs.mean(1)
        se = per.std(ddof=1) / np.sqrt(len(per)) if len(per) > 1 else 0.0
        twin = np.mean([np.mean(e[setting]["random"]) for e in encoders.values()])
        shown = "all" if float(keep) == 1 else f"{float(keep):.0%} x {result['draws']}"
        lines.append(
            f"| {layer} | {pooling} | {shown} | {twin:.3f} | {per.mean():+.3f} ({se:.3f}) | "
            f"{int((per > 0).sum())} / {len(per)} | {int((diffs > 0).sum())} / {diffs.size} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoders", nargs="+", required=True, help="encoder folders or globs")
    parser.add_argument("--dataset", default="PhysionetFists")
    parser.add_argument("--subjects", default="1-5")
    parser.add_argument("--paradigm", default="LeftRightImagery")
    parser.add_argument("--fmin", type=float, default=0.5)
    parser.add_argument("--fmax", type=float, default=45.0)
    parser.add_argument("--keep", default="1.0", help="shares of patches shown, comma-separated")
    parser.add_argument(
        "--draws", type=int, default=8, help="random masks per window when keep < 1"
    )
    parser.add_argument("--twins", type=int, default=3)
    parser.add_argument("--C", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--section", default=None, help="write this RESULTS.md section")
    args = parser.parse_args(argv)
    result = screen(args)
    result["draws"] = args.draws
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    body = (
        f"{args.dataset} subjects {args.subjects}, {args.paradigm} ({args.fmin}-{args.fmax} Hz), "
        f"{result['windows']} windows; {len(result['encoders'])} encoders: "
        + ", ".join(Path(f).parent.name or f for f in result["encoders"])
        + f". Leave-one-subject-out logistic regression (C {args.C}) on frozen features, ROC-AUC; "
        f"random = mean of {args.twins} random-init twins read the same way.\n\n" + summary(result)
    )
    print(body)
    if args.section:
        results.write_section(args.section, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
