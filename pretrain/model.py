"""From the run config to the model, and the config checks that must pass before any rank
starts: the glue between `PretrainConfig` and the plain-PyTorch model code."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pretrain.encoder import CONFIGS, EncoderConfig, get_config
from pretrain.msm import MaskedSignalModel, MSMConfig
from shards.manifest import load_manifest


def encoder_config(cfg) -> EncoderConfig:
    if cfg.model.name not in CONFIGS:
        raise ValueError(
            f"model.name={cfg.model.name!r} is not a named encoder config; "
            f"choose one of {', '.join(CONFIGS)} (python -m pretrain.encoder lists them)"
        )
    known = {f.name for f in dataclasses.fields(EncoderConfig)}
    unknown = sorted(set(cfg.model.overrides) - known)
    if unknown:
        raise ValueError(
            f"model.overrides has unknown encoder fields {unknown}; known: {sorted(known)}"
        )
    overrides = dict(cfg.model.overrides)
    if cfg.dist.activation_checkpointing:
        overrides["activation_checkpointing"] = True
    try:
        return get_config(cfg.model.name, **overrides)
    except (TypeError, ValueError) as err:
        raise ValueError(f"model config {cfg.model.name} with {overrides}: {err}") from None


def msm_config(cfg) -> MSMConfig:
    try:
        return MSMConfig.from_dict({**cfg.msm, "encoder": encoder_config(cfg)})
    except (TypeError, ValueError) as err:
        raise ValueError(f"msm config {dict(cfg.msm)}: {err}") from None


def build_model(cfg) -> MaskedSignalModel:
    return MaskedSignalModel(msm_config(cfg))


def validate_config(cfg, world_size: int | None) -> None:
    """Every mistake a user can make in the config, found before DeepSpeed spawns anything."""
    cfg.dist.validate(world_size)
    cfg.data.reader.validate()
    train = cfg.train
    for name in ("steps", "log_every", "ckpt_every", "keep_checkpoints", "max_nan_streak"):
        if getattr(train, name) < 1:
            raise ValueError(f"train.{name} must be >= 1, got {getattr(train, name)}")
    if cfg.optim.warmup_steps >= train.steps:
        raise ValueError(
            f"optim.warmup_steps ({cfg.optim.warmup_steps}) must be below train.steps ({train.steps})"
        )
    if cfg.data.reader.batch_size != cfg.dist.micro_batch:
        raise ValueError(
            f"data.reader.batch_size ({cfg.data.reader.batch_size}) differs from dist.micro_batch "
            f"({cfg.dist.micro_batch}): the micro-batch is the reader's batch per rank; set both equal"
        )
    if cfg.dist.global_batch is not None and world_size is not None:
        expected = cfg.dist.micro_batch * cfg.dist.grad_accum * world_size
        if cfg.dist.global_batch != expected:
            raise ValueError(
                f"dist.global_batch={cfg.dist.global_batch} but micro_batch x grad_accum x world size "
                f"= {cfg.dist.micro_batch} x {cfg.dist.grad_accum} x {world_size} = {expected}"
            )
    if not train.resume and cfg.ckpt_path.is_dir() and any(cfg.ckpt_path.glob("step*")):
        raise ValueError(
            f"{cfg.train.run_dir} already holds checkpoints: pass train.resume=true to continue "
            "that run, or choose a new train.run_dir"
        )
    if cfg.register.name and not cfg.tracking.enabled:
        raise ValueError(
            f"register.name={cfg.register.name!r} needs MLflow: set tracking.enabled=true "
            "(or register later with brainmoe register)"
        )
    msm = msm_config(cfg)
    if not cfg.data.shards:
        raise ValueError(
            "data.shards is empty: give the build folder(s), e.g. data.shards=[corpus/]"
        )
    for folder in cfg.data.shards:
        if not Path(folder).is_dir():
            raise ValueError(f"data.shards: {folder} is not a folder")
        manifest = load_manifest(folder)
        window_s = manifest["window_s"]
        if msm.encoder.patch_seconds > window_s:
            raise ValueError(
                f"patch length {msm.encoder.patch_seconds} s is longer than the {window_s} s windows "
                f"of {folder}; lower model.overrides.patch_seconds or rebuild with longer windows"
            )
        if manifest["totals"]["samples"] == 0:
            raise ValueError(f"{folder} holds no samples")
