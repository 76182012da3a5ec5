"""`python -m finetune.report --probe P.json --eval E.json`: one table of what was learnt.

Why one table: each number of a run means something only beside its controls and its chance
level, and they live in two files (the pretraining probe, the finetune's eval.json). Reading
them side by side, row by row, is what tells learning from a template, a class prior or a
language model talking to itself. Rows whose section is missing (a run without the text
head, no probe given) are left out; every row that can be made is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HEADER = ("metric", "model", "controls", "chance")
CAPTION_METRICS = (("bleu1", "BLEU-1"), ("bleu4", "BLEU-4"), ("rougeL", "ROUGE-L"))


def _num(x: float) -> str:
    return f"{x:.3f}"


def probe_rows(probe: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """One row per probe file: the frozen linear probe, or the fine-tuning one (its controls
    also say in how many folds the pretrained encoder beat its twins)."""
    kind = "fine-tuned probe" if probe.get("protocol") == "finetune" else "probe"
    controls = f"random-init {_num(probe['random_init'])}"
    diff = probe.get("difference")
    if diff:
        controls += f" ({diff['n_positive']}/{diff['n_folds']} folds above it)"
    return [
        (
            f"{kind} balanced accuracy ({probe['classes']} classes)",
            _num(probe["pretrained"]),
            controls,
            _num(probe["chance"]),
        )
    ]


def retrieval_rows(scores: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    n, report = scores["stimuli"], scores["report"]
    names = {
        "top1": (f"retrieval top-1 ({n} held-out stimuli)", 1.0 / n),
        "top5": (f"retrieval top-5 ({n} held-out stimuli)", min(1.0, 5.0 / n)),
        "window_top1": (f"per-window top-1 ({n}-way)", 1.0 / n),
        "zero_shot": ("zero-shot concept accuracy", scores.get("chance_zero_shot")),
    }
    rows = []
    for key, (label, chance) in names.items():
        if key in report:
            row = report[key]
            chance_text = "-" if chance is None else _num(chance)
            rows.append(
                (label, _num(row["value"]), f"shuffled {_num(row['control'])}", chance_text)
            )
    return rows


def text_rows(scores: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows = []
    if "distinct_captions" in scores:
        rows.append(
            (
                f"distinct captions ({scores['windows']} held-out windows)",
                str(scores["distinct_captions"]),
                f"classes {scores['concepts']}, from noise {scores['distinct_noise_captions']}",
                "-",
            )
        )
    # eval.json written before the noise and prior controls has only the shuffled one
    controls = scores.get("controls") or {
        "shuffled": {k: v["control"] for k, v in scores["report"].items()}
    }
    for key, label in CAPTION_METRICS:
        if key in scores["report"]:
            shown = ", ".join(f"{name} {_num(c[key])}" for name, c in controls.items())
            rows.append((label, _num(scores["report"][key]["value"]), shown, "-"))
    return rows


def image_rows(scores: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    report, rows = scores["report"], []
    if "clip_similarity" in report:
        row = report["clip_similarity"]
        rows.append(
            (
                f"CLIP similarity ({scores['images']} images)",
                _num(row["value"]),
                f"shuffled {_num(row['control'])}",
                "-",
            )
        )
    if "semantic_top1" in report:
        row, n_way = report["semantic_top1"], scores["n_way"]
        rows.append(
            (
                f"semantic top-1 ({n_way}-way)",
                _num(row["value"]),
                f"shuffled {_num(row['control'])}",
                _num(1.0 / n_way),
            )
        )
    return rows


def table_rows(
    probes: list[dict[str, Any]] | None, scores: dict[str, Any]
) -> list[tuple[str, str, str, str]]:
    from finetune.heads.registry import HEADS

    rows = [row for probe in probes or [] for row in probe_rows(probe)]
    for name, section in scores.items():  # eval.json's order: the run's tasks
        if name in HEADS:
            rows += HEADS[name].report_rows(section)
    return rows


def format_table(rows: list[tuple[str, str, str, str]]) -> str:
    """A Markdown table, its columns padded so it also reads as plain text."""
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]

    def line(cells) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(HEADER), rule, *(line(r) for r in rows)])


def _load(path: str, what: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{what} file {path!r} does not exist")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} file {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} file {path} holds a {type(data).__name__}, not an object")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.report", description=__doc__)
    parser.add_argument(
        "--probe",
        action="append",
        default=[],
        help="probe result JSON (brainmoe probe ... --json); repeat for several probes",
    )
    parser.add_argument("--eval", required=True, help="a finetune run's eval.json")
    args = parser.parse_args(argv)
    probes = [_load(path, "probe") for path in args.probe]
    scores = _load(args.eval, "eval")
    rows = table_rows(probes, scores)
    if not rows:
        from finetune.heads.registry import HEADS

        raise ValueError(f"{args.eval} holds no scores of a head ({', '.join(HEADS)}) to report")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as err:
        sys.exit(f"error: {err}")
