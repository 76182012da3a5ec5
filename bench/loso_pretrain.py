"""Does pretraining transfer to a person it never saw? Leave-one-subject-out pretraining.

    python bench/loso_pretrain.py --corpus runs/eegmmidb --hold 1,2,3,4,5 --seeds 1 \
        --config configs/pretrain/eegmmidb-cpu-features.yaml [--other-runs]

MOABB's cross-subject evaluation trains the classifier on the other subjects and scores the
held-out one, but the encoder under the classifier was pretrained without labels, and if its
corpus held the scored subject's recordings, its "cross-subject" fold is partly transductive:
the encoder has adapted to that person's (and those very trials') signal. A foundation model's
claim is the other one, features that help on a person it never saw. So each row here
pretrains with one subject left out of the corpus, exports, and runs `brainmoe evaluate moabb
--evaluation cross-subject` (and `within-session`, where the same question holds for a
classifier trained on the subject's own trials); only the left-out subject's fold is on a
person the encoder never saw, the other four are seen folds of the same run. `--other-runs` puts the left-out subject's
unscored runs back (a folder `S00Nx` beside `S00N` in the corpus, e.g. built with
`pattern=*R0[37].edf`): the person seen, the scored recordings not -- a user's calibration
session.

The summary pairs the folds by subject (subjects differ more than encoders do: one is below its
random-init twins in every run): per subject, the mean fold difference (brainmoe - mean of its
random twins) over runs that saw its recordings, saw only its other runs, or never saw it.
Runs made elsewhere join the summary with `--add NAME=RUN_DIR:SEEN[:OTHER]` (SEEN: the
subjects whose recordings the corpus held, e.g. `1,2,4,5`; OTHER: those it held only the
unscored runs of; the run's MOABB JSONs beside its folder as
`RUN_DIR.cross-subject.json` / `RUN_DIR.within-session.json`). A finished row is not re-run; an interrupted one
resumes from its newest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ablation import run  # noqa: E402  (a logged CLI step, as the ablation runs it)
from bench.results import write_section  # noqa: E402

GROUPS = ("seen", "other runs", "unseen")


def plan(args, hold: int) -> tuple[list[str], dict[int, str]]:
    """The corpus without `hold` (plus its unscored runs with --other-runs) and what it saw;
    checked for every row before the first one trains."""
    corpus, subjects = Path(args.corpus), [int(s) for s in args.subjects.split(",")]
    if hold not in subjects:
        raise ValueError(f"--hold {hold} is not among --subjects {args.subjects}")
    shards = [str(corpus / f"S{s:03d}") for s in subjects if s != hold]
    seen = {s: "seen" for s in subjects if s != hold}
    if args.other_runs:
        shards.append(str(corpus / f"S{hold:03d}x"))
        seen[hold] = "other runs"
    missing = [s for s in shards if not Path(s, "manifest.json").is_file()]
    if missing:
        raise ValueError(
            f"no shard build at {missing}: build each subject into {corpus}/S00N "
            "(and its unscored runs into S00Nx for --other-runs)"
        )
    return shards, seen


def pretrain_and_score(args, hold: int, seed: int) -> dict:
    """One row: pretrain without `hold` (or with its other runs only) -> its MOABB JSONs."""
    shards, seen = plan(args, hold)
    name = f"{'pers' if args.other_runs else 'loso'}{hold}s{seed}"
    run_dir = Path(args.work) / name
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    brainmoe = [sys.executable, "-m", "cluster.cli"]
    if not (run_dir / "encoder").is_dir():
        resume = (run_dir / "checkpoints").is_dir()
        run(
            [*brainmoe, "pretrain", "--num-gpus", str(args.ranks), "--config", args.config,
             f"data.shards=[{','.join(shards)}]", f"train.run_dir={run_dir}",
             f"train.seed={seed}", f"train.resume={str(resume).lower()}", *args.overrides],
            run_dir.with_suffix(".train.log"),
        )  # fmt: skip
        run([*brainmoe, "export", str(run_dir / "checkpoints"), str(run_dir / "encoder")],
            run_dir.with_suffix(".export.log"))  # fmt: skip
    reports = {}
    for evaluation in args.evaluations.split(","):
        report = run_dir.with_suffix(f".{evaluation}.json")
        if not report.exists():
            run(
                [*brainmoe, "evaluate", "moabb", "--model", str(run_dir / "encoder"),
                 "--dataset", args.dataset, "--subjects", args.scored, "--evaluation",
                 evaluation, "--pooling", args.pooling, "--fmin", str(args.fmin),
                 "--fmax", str(args.fmax), "--json", str(report)],
                run_dir.with_suffix(f".{evaluation}.log"),
            )  # fmt: skip
        reports[evaluation] = json.loads(report.read_text())
    return {"name": name, "seen": seen, "reports": reports}


def added(spec: str, evaluations: list[str]) -> dict:
    """NAME=RUN_DIR:SEEN[:OTHER] -> a row made elsewhere (SEEN: subjects whose recordings its
    corpus held; OTHER: subjects of which it held only the unscored runs)."""
    name, rest = spec.split("=", 1)
    run_dir, *groups = rest.split(":")
    if not 1 <= len(groups) <= 2:
        raise ValueError(f"--add {spec}: expected NAME=RUN_DIR:SEEN[:OTHER], e.g. a=runs/a:1,2,4")
    reports = {e: Path(run_dir).with_suffix(f".{e}.json") for e in evaluations}
    missing = [str(f) for f in reports.values() if not f.is_file()]
    if missing:
        raise ValueError(f"--add {spec}: no {missing} (the run's `brainmoe evaluate moabb` JSONs)")
    named = zip(GROUPS[: len(groups)], groups, strict=True)
    seen = {int(s): g for g, part in named for s in part.split(",") if s}
    return {
        "name": name,
        "seen": seen,
        "reports": {e: json.loads(f.read_text()) for e, f in reports.items()},
    }


def summary(rows: list[dict], evaluation: str) -> str:
    folds = {g: {} for g in GROUPS}  # group -> subject -> [fold differences]
    for row in rows:
        for fold in row["reports"][evaluation]["folds"]:
            group = row["seen"].get(fold["subject"], "unseen")
            folds[group].setdefault(fold["subject"], []).append(fold["difference"])
    subjects = sorted({s for by in folds.values() for s in by})

    def cell(values):
        return f"{np.mean(values):+.3f} ({len(values)})" if values else "-"

    lines = [
        "| subject | saw its recordings | saw its other runs only | never saw it | seen - unseen |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    paired = []
    for s in subjects:
        seen, other, unseen = (folds[g].get(s, []) for g in GROUPS)
        gap = np.mean(seen) - np.mean(unseen) if seen and unseen else None
        if gap is not None:
            paired.append(gap)
        gap_cell = f"{gap:+.3f}" if gap is not None else "-"
        lines.append(f"| S{s:03d} | {cell(seen)} | {cell(other)} | {cell(unseen)} | {gap_cell} |")
    every = [[v for by in folds[g].values() for v in by] for g in GROUPS]
    cells = [f"{np.mean(v):+.3f} ({len(v)}; {int((np.array(v) > 0).sum())} above)" if v else "-"
             for v in every]  # fmt: skip
    gap = f"{np.mean(paired):+.3f} over {len(paired)} subjects" if paired else "-"
    lines.append(f"| all folds | {' | '.join(cells)} | {gap} |")
    runs = ", ".join(
        f"{r['name']} (saw {','.join(str(s) for s, g in sorted(r['seen'].items()) if g == 'seen')}"
        + "".join(f"; {s}: other runs" for s, g in r["seen"].items() if g == "other runs")
        + ")"
        for r in rows
    )
    return (
        f"Fold figure = brainmoe - mean of 3 random-init twins (ROC-AUC), MOABB {evaluation}; "
        f"cell = mean (number of folds). Runs: {runs}.\n\n" + "\n".join(lines)
    )


def per_run(rows: list[dict], evaluations: list[str]) -> str:
    """Each encoder's own MOABB figures: a run whose mean is carried by one fold shows here."""
    head = " | ".join(
        f"{e}: brainmoe / random / TS+LR, difference (folds above)" for e in evaluations
    )
    lines = [f"| run | {head} |", "| --- |" + " ---: |" * len(evaluations)]
    for row in rows:
        cells = []
        for e in evaluations:
            r = row["reports"][e]
            score = {k: v["score"] for k, v in r["pipelines"].items()}
            above = sum(f["difference"] > 0 for f in r["folds"])
            cells.append(
                f"{score['brainmoe']:.3f} / {score['brainmoe-random']:.3f} / {score['TS+LR']:.3f}, "
                f"{r['difference']['mean']:+.3f} ({above}/{len(r['folds'])})"
            )
        lines.append(f"| {row['name']} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default="runs/eegmmidb", help="holds S001, S002, ... builds")
    parser.add_argument("--subjects", default="1,2,3,4,5", help="subjects in the corpus")
    parser.add_argument("--hold", default="", help="subjects to leave out, one run each")
    parser.add_argument("--seeds", default="1")
    parser.add_argument("--other-runs", action="store_true")
    parser.add_argument("--config", default="configs/pretrain/eegmmidb-cpu-features.yaml")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--dataset", default="PhysionetFists")
    parser.add_argument("--scored", default="1-5", help="subjects MOABB scores")
    parser.add_argument("--pooling", default="moments")
    parser.add_argument("--evaluations", default="cross-subject,within-session")
    parser.add_argument("--fmin", type=float, default=0.5)
    parser.add_argument("--fmax", type=float, default=45.0)
    parser.add_argument("--work", default="bench/_work/loso")
    parser.add_argument("--add", action="append", default=[], help="NAME=RUN_DIR:SEEN[:OTHER]")
    parser.add_argument("--section", default=None, help="write this RESULTS.md section")
    parser.add_argument("overrides", nargs="*", help="key=value for every pretraining run")
    args = parser.parse_args(argv)
    evaluations = args.evaluations.split(",")
    unknown = set(evaluations) - {"cross-subject", "within-session"}
    if unknown:
        raise ValueError(f"--evaluations: {sorted(unknown)}; use cross-subject, within-session")
    rows = [added(spec, evaluations) for spec in args.add]  # checked before any training
    holds = [int(h) for h in args.hold.split(",") if h]
    for hold in holds:
        plan(args, hold)
    for hold in holds:
        for seed in (int(s) for s in args.seeds.split(",")):
            rows.append(pretrain_and_score(args, hold, seed))
            print(f"{rows[-1]['name']}: done", flush=True)
    if not rows:
        raise ValueError("nothing to summarise: give --hold subjects to run, or --add runs")
    config = " ".join([f"`{args.config}`", *args.overrides])
    body = (
        f"{config}; {args.dataset} subjects {args.scored}, {args.fmin}-{args.fmax} Hz, "
        f"{args.pooling} pooling.\n\n"
        + "\n\n".join(f"**{e}.** " + summary(rows, e) for e in evaluations)
        + "\n\n"
        + per_run(rows, evaluations)
    )
    print(body)
    if args.section:
        write_section(args.section, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
