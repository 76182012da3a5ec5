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


@dataclass
class PretrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    msm: dict[str, Any] = field(default_factory=dict)  # MSMConfig fields to change
    optim: OptimConfig = field(default_factory=OptimConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)

    @property
    def run_path(self) -> Path:
        return Path(self.train.run_dir)

    @property
    def ckpt_path(self) -> Path:
        """Where DeepSpeed checkpoints go (one `step*` folder each, plus `latest`)."""
        return self.run_path / "checkpoints"
