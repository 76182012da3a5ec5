"""Everything a finetuning run checks and precomputes before any rank trains.

Runs once, in the launching process (`brainmoe finetune`, so a mistake costs seconds, not a
DeepSpeed launch), which writes the result into the run folder for the ranks to read
(finetune/prepared.py); the ranks repeat only the cheap config checks. In order:
the run config; the paired windows in the shards and the leak-free split; the stimulus set
(synthetic stimuli rendered, real images found, captions attached -- a missing image stops
here); the encoder (resolved, fingerprinted); the heads' base models (found, and compatible
with a starting adapter); the CLIP embeddings of the stimuli (the Ray job, once).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.config import ENCODER_TRAINING, TASKS, FinetuneConfig
from finetune.head_inputs import HEAD_INPUTS
from finetune.heads.registry import head_spec
from finetune.splits import Split, index_shards, make_split
from finetune.stimuli import StimulusSet, load_captions, stimuli_for
from pretrain.config import validate_run
from pretrain.tracking import resolve_model
from shards import storage


@dataclass
class Prepared:
    split: Split
    stimuli: StimulusSet
    encoder_dir: Path
    encoder_fingerprint: str
    encoder_uri: str


def data_root(cfg: FinetuneConfig) -> storage.Target:
    """Stimulus renders, CLIP embeddings and VAE latents live beside the (first) shards."""
    root = cfg.data.shards[0]
    return root if storage.is_uri(root) else Path(root)  # Path() would mangle s3://


def clip_folder(cfg: FinetuneConfig) -> Path:
    from finetune.clip_cache import CACHE_DIR, model_key

    model, pretrained = cfg.data.clip.resolved()
    return storage.join(data_root(cfg), CACHE_DIR, model_key(model, pretrained))


def ensure_clip(cfg: FinetuneConfig, stimuli: StimulusSet, workers: int = 1) -> Path:
    """The Ray job embedding the stimuli, unless its cache is already up to date."""
    from finetune.clip_cache import embed_stimuli

    return embed_stimuli(stimuli, cfg.data.clip, data_root(cfg), workers=workers)


def validate_finetune(cfg: FinetuneConfig, world_size: int | None) -> None:
    validate_run(cfg, world_size)
    unknown = sorted(set(cfg.tasks) - set(TASKS))
    if unknown or not cfg.tasks:
        raise ValueError(f"tasks must be a non-empty subset of {list(TASKS)}, got {cfg.tasks}")
    if cfg.encoder.train not in ENCODER_TRAINING:
        raise ValueError(
            f"encoder.train must be one of {ENCODER_TRAINING}, got {cfg.encoder.train!r}"
        )
    if cfg.encoder.heads_read not in HEAD_INPUTS:
        raise ValueError(
            f"encoder.heads_read must be one of {HEAD_INPUTS}, got {cfg.encoder.heads_read!r}"
        )
    if not cfg.encoder.model:
        raise ValueError(
            "encoder.model is empty: give an exported encoder folder or models:/<name>@<alias> "
            "(brainmoe pretrain ... register.name=<name>)"
        )
    if cfg.dist.zero_stage == 3:
        raise ValueError(
            "dist.zero_stage=3 is not supported for finetuning yet (adapters are saved from "
            "unpartitioned parameters); use dist.zero_stage=2: the frozen bases are not "
            "optimizer state, so ZeRO-2 already shards all that trains"
        )
    cfg.data.split.validate()


def resolve_encoder(cfg: FinetuneConfig, dst: Path) -> Path:
    uri = cfg.tracking.tracking_uri  # the store the encoder was registered in
    if cfg.encoder.model.startswith("models:/") and uri is None:
        raise ValueError(
            f"encoder.model={cfg.encoder.model} is a registry URI: set tracking.tracking_uri "
            "to the store it was registered in (e.g. sqlite:///runs/pretrain/mlflow.db)"
        )
    folder = resolve_model(cfg.encoder.model, uri, dst)
    if not (folder / "model.safetensors").is_file():
        raise ValueError(
            f"encoder.model={cfg.encoder.model} resolved to {folder}, which holds no "
            "model.safetensors (an exported encoder: brainmoe export)"
        )
    return folder


def build_stimuli(cfg: FinetuneConfig, ids: list[str]) -> StimulusSet:
    stim = cfg.data.stimuli
    captions = load_captions(stim.captions) if stim.captions else None
    return stimuli_for(
        ids,
        image_root=stim.image_root,
        captions=captions,
        render_dir=storage.join(data_root(cfg), "stimuli", "synthetic"),
    )


def prepare(cfg: FinetuneConfig, world_size: int | None, workdir: Path) -> Prepared:
    """Raises ValueError for anything that would stop the run later."""
    from finetune.model import encoder_fingerprint

    validate_finetune(cfg, world_size)
    rows = index_shards(cfg.data.shards)
    split = make_split(rows, cfg.data.split)
    stimuli = build_stimuli(cfg, sorted({row.stimulus_id for row in rows}))
    encoder_dir = resolve_encoder(cfg, workdir / "encoder")
    fingerprint = encoder_fingerprint(encoder_dir)
    if cfg.init_adapters:
        check_adapter(cfg, cfg.init_adapters, fingerprint, workdir / "init")
    return Prepared(split, stimuli, encoder_dir, fingerprint, cfg.encoder.model)


def check_adapter(cfg: FinetuneConfig, uri: str, fingerprint: str, dst: Path) -> Path:
    """An adapter trained on another encoder would run and produce nonsense: refuse it."""
    folder = resolve_model(uri, cfg.tracking.tracking_uri, dst)
    meta_path = folder / "finetune.json"
    if not meta_path.is_file():
        raise ValueError(
            f"init_adapters={uri}: {folder} is not a finetune output (no finetune.json)"
        )
    meta: dict[str, Any] = json.loads(meta_path.read_text())
    if meta.get("encoder_fingerprint") != fingerprint:
        raise ValueError(
            f"init_adapters={uri} was trained on encoder {meta.get('encoder_uri')} "
            f"(fingerprint {meta.get('encoder_fingerprint')}), but encoder.model="
            f"{cfg.encoder.model} has fingerprint {fingerprint}: adapters only fit the encoder "
            "version they were trained with; finetune from scratch or use that encoder"
        )
    check_base_widths(cfg, folder)
    return folder


def check_base_widths(cfg: FinetuneConfig, folder: Path) -> None:
    """A saved head only fits a base model of the width it was trained against: each head
    compares its adapter's recorded widths with its configured base's config files (no
    weights loaded)."""
    for task in cfg.tasks:
        if not (folder / task).is_dir():
            continue  # refused when the adapters load: the run's model has that head
        spec = head_spec(task)
        try:
            spec.head_class.check_saved(getattr(cfg, task), folder / task)
        except ValueError as err:
            raise ValueError(f"init_adapters: {err}") from None
