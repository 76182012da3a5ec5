"""The README.md model card of a finetune output (``run_dir/adapters``): Hub conventions, as
pretrain/model_card.py writes for an exported encoder (YAML metadata + text).

What a user of the heads needs before trusting them: what each head is (task, frozen base
model, LoRA rank and targets), which encoder it belongs to (URI and weights fingerprint: the
encoder is not in this folder), what it was trained on (the shard manifests the run read,
checked against the sha256 it recorded), how (the resolved config, without the tracking
server) and how it scored on the held-out split -- every figure beside its controls
(shuffled pairs; for captions also matched-power noise and the most frequent training
caption) and its chance level, and said plainly where the model does not beat them. The
figures are also in the YAML metadata (``brainmoe: evaluation``, and ``model-index``), so
``huggingface_hub.ModelCard.load(...).data`` reads them without parsing the text.

The card is written after the held-out evaluation, into a folder `save_adapters` already
signed: :func:`write_model_card` adds README.md to finetune.json's checksums (the digests of
the other files are kept as recorded, never recomputed), so `verify_checksums`, registering
and a Hub push or download carry it like any other file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.model_card_eval import TASK_TYPES, eval_results, eval_text, evaluation
from pretrain.model_card import (
    PRIVATE_CONFIG,
    _merge,
    summarise_manifest,
    training_data,
    training_data_lines,
)

CARD_FILE = "README.md"  # pretrain.hub.CARD_FILE: what a Hub push/download carries
TAGS = ["eeg", "bci", "brain-computer-interface", "neuroscience", "brain-decoding", "lora",
        "peft", "multi-task"]  # fmt: skip


def _base_models(meta: dict[str, Any]) -> list[str]:
    """The encoder and the frozen bases that are Hub repo ids (a local path or a registry
    URI is not valid ``base_model`` metadata; all of them are under ``brainmoe:``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from pretrain.hub import is_local

    out = []
    for name in [meta.get("encoder_uri"), *meta.get("base_models", {}).values()]:
        if not name or name in out or ":" in name or is_local(name):
            continue
        try:
            validate_repo_id(name)
        except HFValidationError:
            continue
        out.append(name)
    return out


def _heads(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    config = meta.get("config", {})
    heads = {}
    for task in meta.get("tasks", []):
        cfg = config.get(task, {})
        bases = {
            k.split(".", 1)[1]: v
            for k, v in meta.get("base_models", {}).items()
            if k.startswith(f"{task}.")
        }
        lora = None
        if "lora_rank" in cfg:
            lora = {k: cfg.get(f"lora_{k}") for k in ("rank", "alpha", "targets")}
        heads[task] = {"base_models": bases, "lora": lora}
    return heads


def _head_text(task: str, head: dict[str, Any], cfg: dict[str, Any], meta: dict[str, Any]) -> str:
    clip = meta.get("clip") or {}
    lora = head["lora"]
    tuned = (
        f"LoRA rank {lora['rank']} (alpha {lora['alpha']}) on `{', '.join(lora['targets'] or [])}`"
        if lora
        else ""
    )
    if task == "retrieval":
        return (
            f"**retrieval**: the encoder's tokens pooled ({cfg.get('pooling')}) and mapped by a "
            f"small MLP (hidden {cfg.get('hidden')}) into the CLIP space of "
            f"`{clip.get('model')}` (`{clip.get('pretrained')}`), trained contrastively "
            "against the seen images' precomputed CLIP embeddings; no frozen base model."
        )
    if task == "image":
        return (
            f"**image**: the frozen Stable Diffusion UNet and VAE of `{cfg.get('base')}`, "
            f"conditioned on the EEG through a resampler projector (depth "
            f"{cfg.get('projector_depth')}, {cfg.get('projector_heads')} heads) in place of the "
            f"text context (DreamDiffusion), {tuned}."
        )
    if task == "text":
        return (
            f"**text**: the frozen causal LM `{cfg.get('base')}` reads "
            f"{cfg.get('prefix_tokens')} EEG prefix embeddings before the prompt "
            f'"{cfg.get("prompt")}" and writes a caption, {tuned}.'
        )
    bases = ", ".join(f"{k} `{v}`" for k, v in head["base_models"].items()) or "none"
    return f"**{task}**: base models {bases}" + (f", {tuned}." if tuned else ".")


def _corpora(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The run's shard folders summarised: from the manifests it recorded (sha256-checked),
    else from ``data.shards`` as they are now, said to be unchecked."""
    lineage = meta.get("lineage") or {}
    if lineage.get("shard_manifests"):
        return training_data(lineage)
    from shards.manifest import load_manifest

    out = {}
    for folder in meta.get("config", {}).get("data", {}).get("shards") or []:
        try:
            summary = summarise_manifest(load_manifest(folder))
        except Exception as err:  # gone, or an object store out of reach
            out[folder] = {"note": f"manifest not readable ({type(err).__name__})"}
            continue
        out[folder] = {**summary, "unchecked": True}
    return out


def _encoder(meta: dict[str, Any]) -> dict[str, Any]:
    """The encoder the heads belong to, and how it was adapted."""
    from finetune.model import ENCODER_LORA_TARGETS

    setup = meta.get("encoder_train") or meta.get("config", {}).get("encoder", {})
    mode = setup.get("train")
    out = {"uri": meta.get("encoder_uri"), "fingerprint": meta.get("encoder_fingerprint")}
    out["train"] = mode
    if mode == "lora":
        out["lora"] = {
            "rank": setup.get("lora_rank"),
            "alpha": setup.get("lora_alpha"),
            "targets": list(ENCODER_LORA_TARGETS),
        }
    elif mode == "top":
        out["top_blocks"] = setup.get("top_blocks")
    return out


def _encoder_text(encoder: dict[str, Any]) -> list[str]:
    lines = [
        f"`{encoder['uri']}`, weights fingerprint `{encoder['fingerprint']}` (sha256 of its "
        "model.safetensors, first 16 hex digits): loading refuses an encoder whose weights "
        "differ. It is not part of this folder.",
        "",
    ]
    if encoder["train"] == "lora":
        lora = encoder["lora"]
        lines.append(
            f"Adapted with LoRA rank {lora['rank']} (alpha {lora['alpha']}) on its attention "
            f"projections (`{', '.join(lora['targets'])}`); the MoE experts and routers stay "
            "as pretrained."
        )
    elif encoder["train"] == "top":
        lines.append(f"Its last {encoder['top_blocks']} block(s) were trained.")
    else:
        lines.append(f"Encoder training: {encoder['train']}.")
    return lines


def _data_text(corpora: dict[str, dict[str, Any]], data: dict[str, Any]) -> list[str]:
    if not corpora:
        return ["Not recorded (finetune.json names no shard folders)."]
    return training_data_lines(corpora, data, ", before the held-out split")


def build_model_card(
    meta: dict[str, Any],
    scores: dict[str, Any] | None = None,
    license: str | None = None,
    repo_id: str | None = None,
) -> Any:
    """The card of a finetune output from its finetune.json (``meta``: what
    `FinetuneTrainer.meta` writes) and its eval.json (``scores``), as a ModelCard."""
    import yaml
    from huggingface_hub import ModelCard, ModelCardData

    config = meta.get("config", {})
    lineage = meta.get("lineage") or {}
    tasks = list(meta.get("tasks", []))
    heads = _heads(meta)
    encoder = _encoder(meta)
    corpora = _corpora(meta)
    data = _merge(corpora)
    evals = evaluation(scores)
    datasets = sorted(data["datasets"])
    run_dir = config.get("train", {}).get("run_dir")
    name = repo_id or (f"{Path(run_dir).name}-heads" if run_dir else "brainmoe-heads")
    split = config.get("data", {}).get("split", {})

    card_data = ModelCardData(
        license=license or "other",
        library_name="brainmoe",
        tags=[*TAGS, *tasks, *(TASK_TYPES[t] for t in tasks if t in TASK_TYPES)],
        base_model=_base_models(meta) or None,
        datasets=datasets or None,
        model_name=name,
        eval_results=eval_results(evals, "+".join(datasets) or "eeg") or None,
        brainmoe={
            "kind": "finetune-adapters",
            "tasks": tasks,
            "heads": heads,
            "base_models": dict(meta.get("base_models", {})),
            "encoder": encoder,
            "clip": meta.get("clip"),
            "training_data": data,
            "step": lineage.get("step"),
            "evaluation": evals or None,
        },
    )
    model_ref = repo_id or "<this folder, models:/<name>@<alias> or org/name>"
    lines = [
        f"# {name}",
        "",
        f"Task heads ({', '.join(tasks)}) finetuned on a brainmoe EEG encoder. This folder holds "
        "only what was trained -- adapters, projectors and the task weighting "
        "(`multitask.safetensors`, one folder per head), megabytes -- never the encoder or "
        "the frozen base models: they are loaded from where `finetune.json` names them, and "
        "`finetune.json` lists the sha256 of every file here (this card included).",
        "",
        "## Heads",
        "",
        *[f"- {_head_text(t, heads[t], config.get(t, {}), meta)}" for t in tasks],
        "",
        f"Task weighting: {config.get('weighting', {}).get('mode', 'not recorded')}.",
        "",
        "## Encoder",
        "",
        *_encoder_text(encoder),
        "",
        "## Usage",
        "",
        "```bash",
        f"brainmoe generate --model {model_ref} --eeg recording.vhdr --out generated/",
        "```",
        "",
        "## Training data",
        "",
    ]
    lines += _data_text(corpora, data)
    lines += ["", "## Evaluation", ""]
    if not evals:
        lines.append("None recorded (the card was written without the run's eval.json).")
    else:
        lines += eval_text(scores or {}, evals, split)
    public = {k: v for k, v in config.items() if k not in PRIVATE_CONFIG}
    lines += ["", "## Training config", ""]
    if public:
        run = {k: lineage.get(k) for k in ("step", "world_size", "launcher", "git_commit")}
        shown = ", ".join(f"{k}: {v}" for k, v in run.items() if v is not None)
        lines += [
            *([shown + ".", ""] if shown else []),
            "```yaml",
            yaml.safe_dump(public, sort_keys=False).rstrip(),
            "```",
        ]
    else:
        lines.append("Not recorded.")
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def write_model_card(
    folder: str | Path, scores: dict[str, Any] | None = None, **kwargs: Any
) -> Path:
    """``folder/README.md`` for a `save_adapters` folder, listed in its finetune.json
    checksums (the other files' digests kept as recorded). ``scores``: the run's eval.json;
    ``kwargs``: see :func:`build_model_card`."""
    from finetune.model import META_FILE, REMEDY
    from pretrain.artifacts import add_checksums, read_json

    folder = Path(folder)
    meta = read_json(folder / META_FILE, REMEDY)
    path = folder / CARD_FILE
    build_model_card(meta, scores, **kwargs).save(path)
    add_checksums(folder, [CARD_FILE], META_FILE)  # a folder saved unsigned stays so
    return path
