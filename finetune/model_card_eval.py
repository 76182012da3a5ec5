"""The held-out evaluation as a finetune model card states it: each figure beside its controls
and chance, a verdict that names what does not beat them, and the Hub's ``model-index``
entries. Kept apart from the card's layout (finetune/model_card.py) so the judgement of what
counts as beating a control has one home.
"""

from __future__ import annotations

import math
from typing import Any

TASK_TYPES = {"retrieval": "eeg-to-image-retrieval", "image": "eeg-to-image",
              "text": "eeg-to-text"}  # fmt: skip
TASK_NAMES = {"retrieval": "EEG-to-image retrieval (CLIP space)",
              "image": "EEG-to-image generation", "text": "EEG-to-text captioning"}  # fmt: skip
LABELS = {"top1": "top-1", "top5": "top-5", "window_top1": "per-window top-1",
          "zero_shot": "zero-shot concept accuracy", "clip_similarity": "CLIP similarity",
          "semantic_top1": "semantic top-1", "bleu1": "BLEU-1", "bleu4": "BLEU-4",
          "rougeL": "ROUGE-L"}  # fmt: skip
DETAILS = ("windows", "stimuli", "images", "n_way", "concepts", "distinct_captions",
           "distinct_noise_captions", "prior_caption", "decoding")  # fmt: skip


def _float(x: Any) -> float | None:
    """A plain float for YAML; NaN (a metric without its control) as None."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def _chance(metric: str, section: dict[str, Any]) -> float | None:
    """The chance level of one held-out metric, where it has one (finetune/report.py)."""
    if metric in ("top1", "window_top1"):
        return _float(section.get("chance_top1"))
    if metric == "top5" and section.get("chance_top1"):
        return min(1.0, 5.0 * float(section["chance_top1"]))
    if metric == "zero_shot":
        return _float(section.get("chance_zero_shot"))
    if metric == "semantic_top1" and section.get("n_way"):
        return 1.0 / int(section["n_way"])
    return None


def evaluation(scores: dict[str, Any] | None) -> dict[str, Any]:
    """eval.json (finetune/evaluate.py) as ``{"windows", task: {"metrics": {metric: {"model",
    "controls": {name: value}, "chance", "beats_controls", "beats_chance"}}, details...}}``.

    ``beats_controls``: above every control (None without one); a point estimate of one
    held-out split, no significance test.
    """
    from finetune.heads.registry import HEADS

    if not scores:
        return {}
    out: dict[str, Any] = {"windows": scores.get("windows")}
    for task, section in scores.items():
        if task not in HEADS or not isinstance(section, dict) or "report" not in section:
            continue
        metrics = {}
        for metric, row in section["report"].items():
            if "controls" in section:  # captions: shuffled, noise and prior
                controls = {n: _float(c.get(metric)) for n, c in section["controls"].items()}
            else:
                controls = {"shuffled": _float(row.get("control"))}
            controls = {n: v for n, v in controls.items() if v is not None}
            model, chance = _float(row["value"]), _chance(metric, section)
            metrics[metric] = {
                "model": model,
                "controls": controls,
                "chance": chance,
                "beats_controls": (
                    None
                    if model is None or not controls
                    else all(model > v for v in controls.values())
                ),
                "beats_chance": None if model is None or chance is None else model > chance,
            }
        out[task] = {"metrics": metrics, **{k: section[k] for k in DETAILS if k in section}}
    return out


def verdict(evals: dict[str, Any]) -> list[str]:
    """Plain sentences on what the held-out figures do and do not show: every metric that is
    not above all its controls, or not above chance, is named."""
    rows = [
        (task, metric, row)
        for task, section in evals.items()
        if isinstance(section, dict)
        for metric, row in section["metrics"].items()
        if row["beats_controls"] is not None or row["beats_chance"] is not None
    ]
    if not rows:
        return []
    failed = [(t, m, r) for t, m, r in rows if False in (r["beats_controls"], r["beats_chance"])]
    if len(failed) == len(rows):
        return [
            "**The model beats its controls on none of these metrics**: the held-out scores "
            "give no evidence that the heads read the EEG rather than the stimulus prior, the "
            "language model or chance."
        ]
    lines = []
    if failed:
        lines += [
            "**Not above its controls or chance** (no evidence these outputs depend on the EEG):",
            "",
        ]
        for task, metric, row in failed:
            against = [f"{n} {v:.3f}" for n, v in row["controls"].items()]
            if row["chance"] is not None:
                against.append(f"chance {row['chance']:.3f}")
            label = LABELS.get(metric, metric)
            lines.append(f"- {task} {label}: model {row['model']:.3f} vs {', '.join(against)}")
        lines.append("")
    lines.append(
        f"{len(rows) - len(failed)} of {len(rows)} metrics are above every control (and "
        "chance, where it has one). These are point estimates of one run on one held-out "
        "split, without confidence intervals; read a result by its margin over the controls, "
        "not by its absolute value."
    )
    return lines


def eval_results(evals: dict[str, Any], dataset: str) -> list[Any]:
    """model-index: each model figure, and each control as a metric of its own."""
    from huggingface_hub import EvalResult

    results = []
    for task, section in evals.items():
        if not isinstance(section, dict):
            continue
        for metric, row in section["metrics"].items():
            if row["model"] is None:
                continue
            label = LABELS.get(metric, metric)
            common = {
                "task_type": TASK_TYPES.get(task, f"eeg-{task}"),
                "task_name": TASK_NAMES.get(task, task),
                "dataset_type": dataset,
                "dataset_name": f"{dataset} (held-out split)",
                "dataset_split": "test",
            }
            results.append(
                EvalResult(
                    **common, metric_type=metric, metric_name=label, metric_value=row["model"]
                )
            )
            for name, value in row["controls"].items():
                results.append(
                    EvalResult(
                        **common,
                        metric_type=f"{metric}_{name}_control",
                        metric_name=f"{label} ({name} control)",
                        metric_value=value,
                    )
                )
    return results


def eval_text(scores: dict[str, Any], evals: dict[str, Any], split: dict[str, Any]) -> list[str]:
    from finetune.report import format_table, table_rows

    by = ", ".join(f"{k} {v}" for k, v in split.items()) if split else "not recorded"
    lines = [
        f"Held-out split ({by}): {evals.get('windows')} windows never trained on. Every "
        "figure stands beside its controls -- the same metric on randomly re-paired "
        "EEG/stimuli (`shuffled`); for captions also the head fed matched-power noise instead "
        "of EEG (`noise`) and the most frequent training caption written for every window "
        "(`prior`) -- and its chance level where it has one.",
        "",
    ]
    rows = table_rows(None, scores)
    if rows:
        lines += [format_table(rows), ""]
    text = evals.get("text")
    if text and "prior_caption" in text:
        lines += [f'Prior caption: "{text["prior_caption"]}".', ""]
    return lines + verdict(evals)
