"""From the run config to the model, and the config checks that must pass before any rank
starts: the glue between `PretrainConfig` and the plain-PyTorch model code."""

from __future__ import annotations

import dataclasses

from pretrain.config import validate_run
from pretrain.encoder_config import CONFIGS, EncoderConfig, get_config
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
    """Every mistake a user can make in the pretraining config, found before DeepSpeed spawns
    anything: the checks every run shares, then the encoder's against the shards."""
    validate_run(cfg, world_size)
    msm = msm_config(cfg)
    for folder in cfg.data.shards:
        manifest = load_manifest(folder)
        window_s = manifest["window_s"]
        if msm.encoder.patch_seconds > window_s:
            raise ValueError(
                f"patch length {msm.encoder.patch_seconds} s is longer than the {window_s} s windows "
                f"of {folder}; lower model.overrides.patch_seconds or rebuild with longer windows"
            )
