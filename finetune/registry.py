"""Register a finetune output (adapters + projectors, megabytes) as one MLflow model version,
tagged with the encoder version and the base models it belongs to -- so `brainmoe generate
--model models:/<name>@<alias>` can rebuild exactly what was trained, and nobody attaches
it to another encoder."""

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
) -> dict[str, Any]:
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
    return register_folder(
        folder, name, alias, tags, tracking_uri, experiment, run_id=lineage.get("mlflow_run_id")
    )
