"""The pretraining run config: each part is the dataclass beside the code it configures.

configs/pretrain/<name>.yaml + key=value overrides -> PretrainConfig -> resolved YAML in
the run folder, flattened into MLflow params, and the generated DeepSpeed JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pretrain.ds_config import DistConfig, OptimConfig
from pretrain.tracking import TrackingConfig
from shards.manifest import load_manifest
from shards.reader import ReaderConfig


def _pretrain_reader() -> ReaderConfig:
    # resampled: every rank yields the same number of batches (no DDP hang at epoch end)
    return ReaderConfig(
        batch_size=8, num_workers=1, resampled=True, shuffle_buffer=128, shuffle_initial=32
    )


@dataclass
class DataConfig:
    shards: list[str] = field(default_factory=list)  # build folders of `brainmoe shards build`
    reader: ReaderConfig = field(default_factory=_pretrain_reader)


@dataclass
class ModelConfig:
    name: str = "tiny"  # a named encoder config (python -m pretrain.encoder lists them)
    overrides: dict[str, Any] = field(default_factory=dict)  # EncoderConfig fields to change


@dataclass
class TrainConfig:
    run_dir: str = "runs/pretrain"
    steps: int = 300  # optimizer steps
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    resume: bool = False  # continue from the newest checkpoint in run_dir/checkpoints
    max_nan_streak: int = 5  # this many non-finite losses in a row stop the run
    plots: bool = True


@dataclass
class RegisterConfig:
    name: str | None = None  # register the exported encoder under this name at the end
    alias: str = "current"  # ("latest" is reserved by MLflow)


class RunPaths:
    """Where a run config's run keeps its files (every run config has `train.run_dir`)."""

    train: TrainConfig

    @property
    def run_path(self) -> Path:
        return Path(self.train.run_dir)

    @property
    def ckpt_path(self) -> Path:
        """Where DeepSpeed checkpoints go (one `step*` folder each, plus `latest`)."""
        return self.run_path / "checkpoints"


@dataclass
class PretrainConfig(RunPaths):
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    msm: dict[str, Any] = field(default_factory=dict)  # MSMConfig fields to change
    optim: OptimConfig = field(default_factory=OptimConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)


def validate_run(cfg, world_size: int | None) -> None:
    """The checks every training run shares (pretraining and finetuning configs have the same
    data.reader/dist/optim/train/tracking/register parts), before any process spawns."""
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
    if not cfg.data.shards:
        raise ValueError(
            "data.shards is empty: give the build folder(s), e.g. data.shards=[corpus/]"
        )
    for folder in cfg.data.shards:
        if not Path(folder).is_dir():
            raise ValueError(f"data.shards: {folder} is not a folder")
        if load_manifest(folder)["totals"]["samples"] == 0:
            raise ValueError(f"{folder} holds no samples")
