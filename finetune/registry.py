"""Register a finetune output (adapters + projectors, megabytes) as one MLflow model version,
tagged with the encoder version and the base models it belongs to -- so `brainmoe generate
--model models:/<name>@<alias>` can rebuild exactly what was trained, and nobody attaches
it to another encoder.

The version is an MLflow pyfunc model (finetune/pyfunc.py) holding the folder unchanged, so
`mlflow models serve` can serve it; with the run's CLIP cache beside it, when that is still
on this machine, so that the served model can rank the stimuli."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pretrain.artifacts import read_json, verify_checksums
from pretrain.tracking import lineage_tags, model_version_info, register_folder


def encoder_version_tag(encoder_uri: str, tracking_uri: str | None) -> str:
    """`models:/name@alias` -> `name/version` (an alias moves; the version it meant does not)."""
    if not encoder_uri.startswith("models:/") or not tracking_uri:
        return encoder_uri
    info = model_version_info(encoder_uri, tracking_uri)
    return f"{info['name']}/{info['version']}"


def register_adapters(
    folder: str | Path,
    name: str,
    alias: str | None,
    tracking_uri: str,
    experiment: str = "brainmoe",
    gallery: str | Path | None = None,
) -> dict[str, Any]:
    """``gallery``: a CLIP cache folder the served model ranks (default: the run's own, if
    it is still where the run wrote it)."""
    from finetune.pyfunc import log_heads

    folder = Path(folder)
    meta_path = folder / "finetune.json"
    if not meta_path.is_file():
        raise ValueError(f"{folder} is not a finetune output (no finetune.json)")
    meta = read_json(meta_path)
    # a damaged file must not become a model version everyone downloads
    verify_checksums(folder, "finetune.json", "save the finetune output again (or finetune again)")
    lineage = meta.get("lineage", {})
    tags = {
        "kind": "brainmoe-heads",
        "tasks": ",".join(meta["tasks"]),
        "encoder_uri": meta["encoder_uri"],
        "encoder_version": encoder_version_tag(meta["encoder_uri"], tracking_uri),
        "encoder_fingerprint": meta["encoder_fingerprint"],
        **lineage_tags(lineage),
    }
    tags.update({f"base.{k}": v for k, v in meta.get("base_models", {}).items()})
    gallery = gallery if gallery is not None else run_gallery(meta)
    return register_folder(
        folder,
        name,
        alias,
        tags,
        tracking_uri,
        experiment,
        run_id=lineage.get("mlflow_run_id"),
        log_model=lambda f: log_heads(f, gallery),
    )


def run_gallery(meta: dict[str, Any]) -> Path | None:
    """The CLIP cache the run trained against (beside its first shards folder), if it is on
    this machine and of the CLIP model the run used; else None."""
    import json

    from finetune.clip_cache import CACHE_DIR, model_key

    shards = meta.get("config", {}).get("data", {}).get("shards") or []
    clip = meta.get("clip") or {}
    if not shards or "://" in str(shards[0]) or not clip.get("model"):
        return None
    folder = Path(shards[0]) / CACHE_DIR / model_key(clip["model"], clip.get("pretrained"))
    try:
        index = json.loads((folder / "index.json").read_text())
    except (OSError, ValueError):
        return None
    same = (index.get("model"), index.get("pretrained")) == (clip["model"], clip.get("pretrained"))
    return folder if same else None
