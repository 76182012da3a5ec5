"""The README.md model card of an exported encoder folder (Hub conventions: YAML metadata + text).

What a user of a Hub repo needs before downloading the weights: what the model is (sizes,
patch length, rate), what it was trained on (from the shard manifests the run read, checked
against the sha256 the run recorded in lineage.json, so a corpus rebuilt since is not
described as the training data), how it was trained (the resolved config) and how it scored
(the `brainmoe evaluate reconstruction | moabb --json` results given to `brainmoe export
--eval`). The figures are also in the YAML metadata (``brainmoe:``, ``model-index``), so
``huggingface_hub.ModelCard.load(...).data`` reads them without parsing the text.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TAGS = ["eeg", "bci", "brain-computer-interface", "neuroscience", "mixture-of-experts",
        "self-supervised", "foundation-model"]  # fmt: skip
ARCHITECTURE = ("dim", "depth", "heads", "ffn_hidden", "n_experts", "top_k", "n_shared_experts",
                "gate", "patch_seconds", "sfreq", "input_norm", "spectral_bands",
                "spatial_bias")  # fmt: skip
PRIVATE_CONFIG = ("tracking",)  # tracking server URIs stay out of a public card
EVAL_KINDS = {"reconstruction": {"random", "time_block", "windows"},
              "moabb": {"pipelines", "difference", "dataset", "metric"}}  # fmt: skip


def load_evals(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """The `brainmoe evaluate ... --json` results, each tagged with its ``kind``; a file that
    is not one is a ValueError (checked before the export does any work)."""
    out = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"--eval {path}: not a readable JSON file ({err})") from None
        kind = next(
            (k for k, keys in EVAL_KINDS.items() if isinstance(data, dict) and keys <= set(data)),
            None,
        )
        if kind is None:
            raise ValueError(
                f"--eval {path}: not the --json output of `brainmoe evaluate reconstruction` "
                "or `brainmoe evaluate moabb`"
            )
        out.append({"kind": kind, "file": Path(path).name, **data})
    return out


def summarise_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """Datasets, subjects, windows, hours and channel counts of the windows a corpus holds."""
    window_s = manifest["window_s"]
    per: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"recordings": 0, "subjects": set(), "windows": 0, "channels": set()}
    )
    for rec in manifest["recordings"]:
        if rec["status"] != "ok" or not rec["windows"]:
            continue
        prov = rec["provenance"]
        row = per[prov["dataset"]]
        row["recordings"] += 1
        row["subjects"].add(str(prov.get("subject")))
        row["windows"] += rec["windows"]
        row["channels"].add(rec["n_channels"])
    datasets = {
        name: {
            "recordings": row["recordings"],
            "subjects": len(row["subjects"]),
            "windows": row["windows"],
            "hours": round(row["windows"] * window_s / 3600, 3),
            "channels": sorted(row["channels"]),
        }
        for name, row in sorted(per.items())
    }
    pre = manifest.get("config", {}).get("preprocess", {})
    return {
        "datasets": datasets,
        "recordings": sum(d["recordings"] for d in datasets.values()),
        "subjects": sum(d["subjects"] for d in datasets.values()),
        "windows": sum(d["windows"] for d in datasets.values()),
        "hours": round(sum(d["windows"] for d in datasets.values()) * window_s / 3600, 3),
        "window_s": window_s,
        "sfreq": pre.get("sfreq"),
        "band_hz": [pre.get("l_freq"), pre.get("h_freq")],
    }


def training_data(lineage: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per shard folder of the run: its summary, or why there is none (unreadable now, or
    changed since training)."""
    from shards import storage
    from shards.manifest import MANIFEST

    out = {}
    for folder, digest in lineage.get("shard_manifests", {}).items():
        path = storage.join(folder, MANIFEST)
        try:
            blob = storage.read_bytes(path)
        except Exception as err:  # a local path, or an object store that may be out of reach
            out[folder] = {"note": f"manifest not readable at export ({type(err).__name__})"}
            continue
        if hashlib.sha256(blob).hexdigest() != digest:
            out[folder] = {"note": "manifest changed since training (sha256 differs)"}
            continue
        out[folder] = summarise_manifest(json.loads(blob))
    return out


def _merge(corpora: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One summary over the run's corpora (a subject is counted once per corpus)."""
    parts = [c for c in corpora.values() if "datasets" in c]
    datasets: dict[str, dict[str, Any]] = {}
    for part in parts:
        for name, row in part["datasets"].items():
            acc = datasets.setdefault(
                name, {"recordings": 0, "subjects": 0, "windows": 0, "hours": 0.0, "channels": []}
            )
            for key in ("recordings", "subjects", "windows"):
                acc[key] += row[key]
            acc["hours"] = round(acc["hours"] + row["hours"], 3)
            acc["channels"] = sorted(set(acc["channels"]) | set(row["channels"]))
    total = {k: sum(p[k] for p in parts) for k in ("recordings", "subjects", "windows")}
    return {**total, "hours": round(sum(p["hours"] for p in parts), 3), "datasets": datasets}


def _channels(counts: list[int]) -> str:
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def _eval_results(evals: list[dict[str, Any]]) -> list[Any]:
    from huggingface_hub import EvalResult

    results = []
    for ev in evals:
        if ev["kind"] == "moabb":
            results.append(
                EvalResult(
                    task_type="eeg-classification",
                    task_name=f"MOABB {ev.get('paradigm')} ({ev.get('evaluation')})",
                    dataset_type="moabb",
                    dataset_name=str(ev["dataset"]),
                    metric_type=str(ev["metric"]),
                    metric_name=f"{ev['metric']} (linear probe on frozen features)",
                    metric_value=float(ev["pipelines"]["brainmoe"]["score"]),
                )
            )
        else:
            for mode in ("random", "time_block"):
                results.append(
                    EvalResult(
                        task_type="eeg-reconstruction",
                        task_name=f"hidden-patch reconstruction ({mode} masking)",
                        dataset_type="eeg",
                        dataset_name=str(ev.get("source", "held-out EEG")),
                        metric_type="r_squared",
                        metric_name=f"R^2 ({mode})",
                        metric_value=float(ev[mode]["model"]),
                    )
                )
    return results


def _eval_text(ev: dict[str, Any]) -> list[str]:
    if ev["kind"] == "moabb":
        lines = [
            f"### MOABB {ev.get('evaluation')}: {ev['dataset']}, {ev.get('paradigm')}",
            "",
            f"Subjects {ev.get('subjects')}, metric `{ev['metric']}`, layer {ev.get('layer')}, "
            f"{ev.get('pooling')} pooling; `brainmoe-random` is the same architecture with "
            f"random weights (seeds {ev.get('random_seeds')}).",
            "",
            "| pipeline | score | std |",
            "|---|---:|---:|",
        ]
        for name, row in ev["pipelines"].items():
            lines.append(f"| {name} | {row['score']:.3f} | {row['std']:.3f} |")
        d = ev["difference"]
        lines += [
            "",
            f"brainmoe - random per fold: {d['mean']:+.3f} +- {d['std']:.3f} "
            f"({d['n_positive']}/{d['n_folds']} folds above).",
        ]
        return lines
    lines = [
        f"### Reconstruction of hidden patches ({ev['windows']} windows of {ev.get('source')})",
        "",
        "R^2 | mean correlation of the hidden samples, against classical interpolation.",
        "",
        "| masking | method | R^2 | r |",
        "|---|---|---:|---:|",
    ]
    for mode in ("random", "time_block"):
        res = ev[mode]
        for method, r in res["r"].items():
            lines.append(f"| {mode} | {method} | {res[method]:.3f} | {r:.3f} |")
    for mode, res in ev.get("spectrum", {}).items():
        lines.append(f"| {mode} | log spectrum: model | {res['model']:.3f} | |")
        lines.append(f"| {mode} | log spectrum: channel mean | {res['channel_mean']:.3f} | |")
    return lines


def training_data_lines(
    corpora: dict[str, dict[str, Any]], data: dict[str, Any], scope: str = ""
) -> list[str]:
    """The card's training-data section: totals, a row per dataset, a line per corpus folder
    (``scope`` is said after the totals, e.g. that a held-out split came later)."""
    lines = [
        f"{data['hours']:.2f} hours of EEG windows from {data['subjects']} subjects "
        f"({data['recordings']} recordings){scope}:",
        "",
        "| dataset | subjects | recordings | windows | hours | channels |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for ds, row in data["datasets"].items():
        lines.append(
            f"| {ds} | {row['subjects']} | {row['recordings']} | {row['windows']} | "
            f"{row['hours']:.2f} | {_channels(row['channels'])} |"
        )
    lines.append("")
    for corpus, summary in corpora.items():
        detail = summary.get("note") or (
            f"{summary['window_s']:g} s windows at {summary['sfreq']} Hz, band "
            f"{summary['band_hz'][0]}-{summary['band_hz'][1]} Hz"
        )
        if summary.get("unchecked"):
            detail += " (not checked against the run: it recorded no sha256)"
        lines.append(f"- `{corpus}`: {detail}")
    return lines


def build_model_card(
    folder: str | Path,
    evals: Sequence[dict[str, Any]] = (),
    license: str | None = None,
    repo_id: str | None = None,
) -> Any:
    """The card of an encoder folder (config.json, optional lineage.json) as a ModelCard."""
    import yaml
    from huggingface_hub import ModelCard, ModelCardData

    from pretrain.artifacts import read_json
    from pretrain.encoder import count_parameters
    from pretrain.encoder_config import EncoderConfig

    folder = Path(folder)
    meta = read_json(folder / "config.json", "export the folder again (brainmoe export)")
    config = EncoderConfig.from_dict(meta["config"])
    params = count_parameters(config)
    lineage = read_json(folder / "lineage.json") if (folder / "lineage.json").exists() else {}
    corpora = training_data(lineage)
    data = _merge(corpora)
    arch = {key: getattr(config, key) for key in ARCHITECTURE}
    arch["patch_len"] = config.patch_len
    name = repo_id or folder.name
    evals = list(evals)

    card_data = ModelCardData(
        license=license or "other",
        library_name="brainmoe",
        pipeline_tag="feature-extraction",
        tags=TAGS,
        datasets=sorted(data["datasets"]) or None,
        model_name=name,
        eval_results=_eval_results(evals) or None,
        brainmoe={
            "parameters": params,
            "architecture": arch,
            "training_data": data,
            "step": lineage.get("step"),
        },
    )
    moe = (
        f"{config.n_experts} routed experts (top-{config.top_k}) + {config.n_shared_experts} "
        f"shared per layer, expert width {config.ffn_hidden}"
        if config.is_moe
        else f"dense SwiGLU MLP of width {config.ffn_hidden}"
    )
    lines = [
        f"# {name}",
        "",
        "A montage-agnostic EEG encoder (brainmoe): each channel's "
        f"{config.patch_seconds:g} s patch ({config.patch_len} samples at {config.sfreq:g} Hz) is "
        f"one token of a {config.depth}-layer transformer (width {config.dim}, {config.heads} "
        f"heads) with {moe}. Any channel count and sampling rate is accepted; channels are "
        "known by their 10-05 name and position. Pretrained by masked-signal modelling.",
        "",
        f"**Parameters**: {params['total']:,} in all, {params['active']:,} active per token.",
        "",
        "## Usage",
        "",
        "```python",
        "from pretrain.encoder import Encoder  # the brainmoe package",
        "",
        f'encoder = Encoder.from_pretrained("{repo_id or "<org>/<name>"}").eval()',
        "# eeg [B, C, T] in microvolts; names as in the recording, rate in Hz",
        'out = encoder({"eeg": eeg, "ch_names": [ch_names] * len(eeg), "sfreq": [250.0]})',
        "features = Encoder.pool(out)  # [B, D]: mean over valid tokens",
        "```",
        "",
        "`config.json` records the sha256 of `model.safetensors`; `from_pretrained` refuses "
        "weights that do not match it.",
        "",
        "## Architecture",
        "",
        "| field | value |",
        "|---|---|",
        *[f"| {key} | {value} |" for key, value in arch.items()],
        "",
        "## Training data",
        "",
    ]
    if not corpora:
        lines.append("Not recorded (the folder has no lineage.json with shard manifests).")
    else:
        lines += training_data_lines(corpora, data)
    lines += ["", "## Evaluation", ""]
    if not evals:
        lines.append("None given (`brainmoe export --eval results.json`).")
    for ev in evals:
        lines += [*_eval_text(ev), ""]
    config_dict = {k: v for k, v in lineage.get("config", {}).items() if k not in PRIVATE_CONFIG}
    lines += ["", "## Training config", ""]
    if config_dict:
        run = {k: lineage.get(k) for k in ("step", "world_size", "launcher", "git_commit")}
        lines += [
            ", ".join(f"{k}: {v}" for k, v in run.items() if v is not None) + ".",
            "",
            "```yaml",
            yaml.safe_dump(config_dict, sort_keys=False).rstrip(),
            "```",
        ]
    else:
        lines.append("Not recorded (no lineage.json).")
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def write_model_card(folder: str | Path, **kwargs: Any) -> Path:
    """``folder/README.md``; see :func:`build_model_card` for the arguments."""
    path = Path(folder) / "README.md"
    build_model_card(folder, **kwargs).save(path)
    return path
