"""What makes masked-signal pretraining learn real EEG: one change at a time.

Each row pretrains the EEGMMIDB CPU recipe (configs/pretrain/eegmmidb-cpu.yaml) with some of
its parts switched back to the earlier design, for the same short schedule on the same
subjects, and scores it with `brainmoe evaluate reconstruction` on a subject it never saw.
The classical baselines of the same windows stand in the first rows.

    python bench/ablation.py --corpus runs/eegmmidb --train S001,S002 --eval S003 --steps 300

(`--corpus` holds one `brainmoe shards build` folder per subject, e.g. built with
`files:<EEGMMIDB>/S001?dataset=eegmmidb ... preprocess.h_freq=45`.) Writes the section
"Pretraining ablation" of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results import write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE = "configs/pretrain/eegmmidb-cpu.yaml"

# The recipe's parts in the order they were added, each with the overrides that switch it
# back to the earlier design; row i keeps the first i parts (row 0: the earlier design).
PARTS = [
    ("per-window robust scale from visible patches", ["model.overrides.input_norm=fixed"]),
    ("MAE: encoder sees visible patches only", ["msm.encoder_input=all"]),
    ("per-patch mean removed from target and prediction", ["msm.center_patches=false"]),
    ("electrode-distance attention bias", ["model.overrides.spatial_bias=false"]),
    ("decoder mixes visible raw patches of nearby channels", ["msm.mix_heads=0"]),
    (
        "decoder maps neighbouring patches in time; one time patch of four hidden",
        ["msm.time_mix=false", "msm.block_ratio=null"],
    ),
    ("decoder starts from the spherical-spline estimate (= the recipe)", ["msm.spline_path=false"]),
]
VARIANTS = [
    (
        "earlier design (BERT mask tokens, fixed scale, raw target, token-width decoder)"
        if i == 0
        else "+ " + PARTS[i - 1][0],
        [o for _, overrides in PARTS[i:] for o in overrides],
    )
    for i in range(len(PARTS) + 1)
]


def run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as fh:
        done = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}; see {log}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default="runs/eegmmidb")
    parser.add_argument("--train", default="S001,S002")
    parser.add_argument("--eval", default="S003")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--max-windows", type=int, default=128)
    parser.add_argument("--work", default="bench/_work/ablation")
    parser.add_argument("--only", type=int, nargs="*", help="row indices to run (default all)")
    args = parser.parse_args()
    corpus, work = Path(args.corpus), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    shards = ",".join(str(corpus / s) for s in args.train.split(","))
    brainmoe = [sys.executable, "-m", "cluster.cli"]
    rows = []
    for i, (name, overrides) in enumerate(VARIANTS):
        if args.only and i not in args.only:
            continue
        run_dir = work / f"v{i}"
        shutil.rmtree(run_dir, ignore_errors=True)
        started = time.perf_counter()
        run(
            [*brainmoe, "pretrain", "--num-gpus", "2", "--config", RECIPE,
             f"data.shards=[{shards}]", f"train.run_dir={run_dir}",
             f"train.steps={args.steps}", f"train.ckpt_every={args.steps}",
             "train.plots=false", "train.log_every=50", *overrides],
            work / f"v{i}-train.log",
        )  # fmt: skip
        minutes = (time.perf_counter() - started) / 60
        report = work / f"v{i}.json"
        run(
            [*brainmoe, "evaluate", "reconstruction", "--run", str(run_dir),
             "--source", str(corpus / args.eval), "--max-windows", str(args.max_windows),
             "--json", str(report)],
            work / f"v{i}-eval.log",
        )  # fmt: skip
        result = json.loads(report.read_text())
        rows.append((i, name, result, minutes))
        print(f"{i} {name}: random {result['random']['model']:.3f} "
              f"time-block {result['time_block']['model']:.3f} ({minutes:.1f} min)")  # fmt: skip
    if not rows:
        return
    first = rows[0][2]
    rnd, blk = first["random"], first["time_block"]
    lines = [
        f"Recipe `{RECIPE}` with parts switched back, {args.steps} steps (batch 2 x 16, 2 CPU "
        f"ranks under DeepSpeed), trained on {args.train}, scored on {args.eval} "
        f"({first['windows']} windows; `brainmoe evaluate reconstruction`: R^2 of hidden "
        "samples in uV after removing each patch's mean, | mean per-patch r). Random: 60% of "
        "patches hidden; time-block: one interior 1-s patch hidden on every channel.",
        "",
        "| change | random R^2 \\| r | time-block R^2 \\| r | train min |",
        "| --- | ---: | ---: | ---: |",
        f"| spherical spline (MNE) / linear in time | {rnd['spline']:.3f} \\| "
        f"{rnd['r']['spline']:.3f} | {blk['linear']:.3f} \\| {blk['r']['linear']:.3f} | |",
        f"| nearest visible channel / zero | {rnd['neighbour']:.3f} \\| "
        f"{rnd['r']['neighbour']:.3f} | {blk['zero']:.3f} \\| - | |",
    ]
    for _, name, res, minutes in rows:
        r, b = res["random"], res["time_block"]
        lines.append(
            f"| {name} | {r['model']:.3f} \\| {r['r']['model']:.3f} | {b['model']:.3f} \\| "
            f"{b['r']['model']:.3f} | {minutes:.1f} |"
        )
    write_section("Pretraining ablation", "\n".join(lines))


if __name__ == "__main__":
    main()
