"""The encoder on MOABB's own evaluations, beside the field's baselines and MOABB's figures.

    python bench/moabb.py --model runs/eegmmidb-cpu/encoder --fmin 0.5 --fmax 45
    python bench/moabb.py --model models:/eeg-base@prod --layer 3 --results /tmp/RESULTS.md

Runs the cross-subject evaluation, the same with every pipeline aligned per subject on an
unlabeled half of the held-out subject (``--target unlabeled-50p``: MOABB's transfer
protocol, scored on the other half; pretrain/alignment.py), and the within-session
evaluation (pretrain/moabb_eval.py) of the frozen encoder + LR, its random-init twins + LR,
CSP+LDA and TS+LR on identical folds, and writes the "MOABB" section of bench/RESULTS.md (or of ``--results``). The default dataset,
PhysionetFists (pretrain/moabb_local.py), gives PhysionetMI's LeftRightImagery epochs and
also reaches the local S004/S005, whose feet runs PhysionetMI would try to download.

Without MNE_DATA set, the local EEGMMIDB copy beside the repo (../shared/data) is used,
with MOABB_DOWNLOAD_PROVIDER=upstream so nothing waits on the network.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, where "moabb" is this file:
# put the repo root there instead, so `import moabb` finds the library.
if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])
else:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import results  # noqa: E402

LOCAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "physionet-eegmmidb"
# MOABB's benchmark, PhysionetMI, 109 subjects, LeftRightImagery, within-session ROC-AUC.
PUBLISHED = {"CSP+LDA": 0.6575, "TS+LR": 0.6728}
# column -> (MOABB evaluation, unlabeled target slice)
EVALUATIONS = {
    "cross-subject": ("cross-subject", "none"),
    "cross-subject, aligned": ("cross-subject", "unlabeled-50p"),
    "within-session": ("within-session", "none"),
}


def cell(row: dict) -> str:
    return f"{row['score']:.3f} +- {row['std']:.3f}"


def table(runs: dict[str, dict]) -> str:
    """Pipelines x evaluations, then the fold-wise gap of the encoder over its twins."""
    first = next(iter(runs.values()))
    head = (
        "| pipeline | " + " | ".join(runs) + " | MOABB published (109 subjects, within-session) |"
    )
    lines = [head, "| --- |" + " ---: |" * (len(runs) + 1)]
    for name in first["pipelines"]:
        cells = [cell(run["pipelines"][name]) for run in runs.values()]
        published = f"{PUBLISHED[name]:.3f}" if name in PUBLISHED else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {published} |")
    gaps = [
        f"{d['mean']:+.3f} +- {d['std']:.3f} ({d['n_positive']}/{d['n_folds']} folds above)"
        for d in (run["difference"] for run in runs.values())
    ]
    lines.append("| brainmoe - brainmoe-random, per fold | " + " | ".join(gaps) + " | - |")
    return "\n".join(lines)


def main() -> None:
    from pretrain.moabb_eval import evaluate, parse_subjects

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="encoder folder or models:/name@alias")
    parser.add_argument("--tracking-uri")
    parser.add_argument("--dataset", default="PhysionetFists")
    parser.add_argument("--subjects", default="1-5")
    parser.add_argument("--pooling", default="regions", choices=["mean", "regions", "moments"])
    parser.add_argument("--layer", type=int, help="encoder block to probe (default: the last)")
    parser.add_argument("--fmin", type=float, help="band-pass low edge (paradigm default: 8)")
    parser.add_argument("--fmax", type=float, help="band-pass high edge (paradigm default: 32)")
    parser.add_argument("--random-seeds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--results", help="write the section here instead of bench/RESULTS.md")
    parser.add_argument("--json", help="also write both evaluations' results here")
    args = parser.parse_args()
    if "MNE_DATA" not in os.environ and LOCAL_DATA.exists():
        os.environ["MNE_DATA"] = str(LOCAL_DATA)
    os.environ.setdefault("MOABB_DOWNLOAD_PROVIDER", "upstream")
    if args.results:
        results.RESULTS = Path(args.results)

    subjects = parse_subjects(args.subjects)
    runs, seconds = {}, {}
    for column, (evaluation, target) in EVALUATIONS.items():
        start = time.perf_counter()
        runs[column] = evaluate(
            model=args.model,
            dataset=args.dataset,
            subjects=subjects,
            evaluation=evaluation,
            target=target,
            fmin=args.fmin,
            fmax=args.fmax,
            pooling=args.pooling,
            layer=args.layer,
            random_seeds=args.random_seeds,
            device=args.device,
            tracking_uri=args.tracking_uri,
        )
        seconds[column] = time.perf_counter() - start
    first = runs["cross-subject"]
    bands = ", ".join(f"{lo}-{hi} Hz" for lo, hi in first["bands"])
    body = f"""
MOABB evaluations (`bench/moabb.py`, pretrain/moabb_eval.py): {first["dataset"]} subjects
{args.subjects}, {first["paradigm"]} ({bands}), metric {first["metric"]}, mean +- std over
folds (cross-subject: one fold per held-out subject; within-session: one per session, each
MOABB's 5-fold mean). Identical folds for every pipeline. "Aligned": MOABB's cross-subject
protocol with an unlabeled half of the held-out subject's trials given to every pipeline
(`--target unlabeled-50p`), scored on the other half; each subject's encoder features are
z-scored by their own statistics, and CSP+LDA / TS+LR re-centre each subject's covariances at
their Riemannian mean (pretrain/alignment.py).

brainmoe = `{args.model}`, frozen, block {first["layer"]} of 0..{first["depth"] - 1}
({first["pooling"]} pooling) + StandardScaler + logistic regression; brainmoe-random = the
same on its random-init twins (mean of seeds {first["random_seeds"]}); CSP+LDA and TS+LR are
MOABB's benchmark pipelines (pyriemann).

{table(runs)}

Wall time: {", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())}. Measured earlier on EEGMMIDB 1-5 (ROC-AUC): cross-subject
TS+LR 0.71, CSP+LDA 0.53; within-session CSP+LDA 0.69, TS+LR 0.69.
"""
    results.write_section("MOABB", body)
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1) + "\n")
    print(table(runs))


if __name__ == "__main__":
    main()
