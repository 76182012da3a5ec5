"""The pretraining run config: each part is the dataclass beside the code it configures.

configs/pretrain/<name>.yaml + key=value overrides -> PretrainConfig -> resolved YAML in
the run folder, flattened into MLflow params, and the generated DeepSpeed JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from cluster.ray_train import RayConfig
from pretrain import checkpoint
from pretrain.ds_config import DistConfig, OptimConfig
from pretrain.tracking import TrackingConfig
from shards import storage
from shards.manifest import load_manifest
from shards.reader import ReaderConfig

T = TypeVar("T")


def load_run_config(cls: type[T], path: str | Path | None, overrides: list[str]) -> T:
    """`shards.config.load_config`, with a broken YAML file a ValueError naming file:line.

    (yaml's own error is a multi-line traceback; OmegaConf passes it through unwrapped.)"""
    import yaml

    from shards.config import load_config

    try:
        return load_config(cls, path, overrides)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = " ".join(
            str(x) for x in (getattr(err, "context", None), getattr(err, "problem", None)) if x
        )
        raise ValueError(f"{where}: YAML syntax error: {what or err}") from None
    except TypeError as err:  # OmegaConf's answer to e.g. a YAML list at the top level
        if path is None:
            raise
        raise ValueError(
            f"{path}: {err}: a run config maps section names (data, optim, train, ...) to "
            "their settings"
        ) from None


@dataclass(frozen=True)
class Range:
    """Allowed values of a number: low/high bounds, each inclusive unless open."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{self.low}, {self.high}{right}"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
COUNT = Range(1)  # steps, batch sizes, ranks: whole numbers >= 1
FRACTION = Range(0, 1, low_open=True, high_open=True)  # mask ratios, test fractions
PROBABILITY = Range(0, 1, high_open=True)  # betas, dropout
UNIT = Range(0, 1)

# Every numeric setting the shared run parts have (None, where allowed, is not checked).
RUN_RANGES: dict[str, Range] = {
    "optim.lr": POSITIVE,
    "optim.min_lr_ratio": UNIT,
    "optim.warmup_steps": NON_NEGATIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.betas.0": PROBABILITY,
    "optim.betas.1": PROBABILITY,
    "optim.grad_clip": NON_NEGATIVE,
    "dist.micro_batch": COUNT,
    "dist.grad_accum": COUNT,
    "dist.global_batch": COUNT,
    "train.steps": COUNT,
    "train.seed": Range(0, 2**32 - 1),  # what numpy's seed accepts
    "train.log_every": COUNT,
    "train.ckpt_every": COUNT,
    "train.keep_checkpoints": COUNT,
    "train.max_nan_streak": COUNT,
    "data.reader.batch_size": COUNT,
    "data.reader.num_workers": NON_NEGATIVE,
    "data.reader.shuffle_buffer": NON_NEGATIVE,
    "data.reader.shuffle_initial": NON_NEGATIVE,
    "data.reader.samples_per_epoch": COUNT,
    "data.reader.prefetch_factor": COUNT,
    "ray.num_workers": COUNT,
    "ray.max_failures": Range(-1),  # -1: restart without limit
}


def _lookup(cfg: Any, key: str) -> tuple[bool, Any]:
    """(found, value) of a dotted key; a dict (msm, overrides) may simply not set it."""
    value = cfg
    for part in key.split("."):
        if isinstance(value, dict):
            if part not in value:
                return False, None
            value = value[part]
        elif isinstance(value, list | tuple):
            if int(part) >= len(value):
                return False, None
            value = value[int(part)]
        else:
            assert hasattr(value, part), f"range table names {key}, which the config lacks"
            value = getattr(value, part)
    return True, value


def check_ranges(cfg: Any, ranges: dict[str, Range]) -> None:
    """ValueError naming the first setting outside its range (NaN is outside every range)."""
    for key, allowed in ranges.items():
        found, value = _lookup(cfg, key)
        if not found or value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{key} must be a number {allowed}, got {value!r}")
        if math.isnan(value) or value not in allowed:
            raise ValueError(f"{key} must be {allowed}, got {value}")


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
    # torch.compile the model's forward in place (state-dict keys unchanged): 1.9x on the
    # 32-channel recipe step on CPU (bench/RESULTS.md "Pretraining"), after a first step
    # that compiles for a minute or more; off by default for that wait
    compile: bool = False


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
    # numbers of the parts particular to pretraining (msm: only the keys the config sets;
    # MSMConfig checks the rest, model.overrides are checked by EncoderConfig)
    ranges: ClassVar[dict[str, Range]] = {
        "msm.mask_ratio": FRACTION,
        "msm.block_ratio": FRACTION,
        "msm.block_random_ratio": PROBABILITY,
        "msm.block_patches": COUNT,
        "msm.decoder_dim": NON_NEGATIVE,
        "msm.decoder_depth": NON_NEGATIVE,
        "msm.decoder_heads": COUNT,
        "msm.spectrum_weight": NON_NEGATIVE,
        "msm.spectrum_bands": NON_NEGATIVE,
        "msm.visible_weight": NON_NEGATIVE,
        "msm.mix_heads": NON_NEGATIVE,
    }

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    msm: dict[str, Any] = field(default_factory=dict)  # MSMConfig fields to change
    optim: OptimConfig = field(default_factory=OptimConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    ray: RayConfig = field(default_factory=RayConfig)  # --launcher ray only


def validate_run(cfg, world_size: int | None) -> None:
    """The checks every training run shares (pretraining and finetuning configs have the same
    data.reader/dist/optim/train/tracking/register parts), before any process spawns."""
    check_ranges(cfg, {**RUN_RANGES, **getattr(type(cfg), "ranges", {})})
    cfg.dist.validate(world_size)
    cfg.data.reader.validate()
    train = cfg.train
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
    if train.resume:  # sizes only, here; rank 0 hashes the files before loading
        tag, skipped = checkpoint.choose(cfg.ckpt_path, hashes=False)
        if tag is None and skipped:
            raise checkpoint.no_intact_error(cfg.ckpt_path, skipped)
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
        if not storage.isdir(folder):  # a local folder or a URL such as s3://bucket/corpus
            raise ValueError(f"data.shards: {folder} is not a folder")
        if load_manifest(folder)["totals"]["samples"] == 0:
            raise ValueError(f"{folder} holds no samples")
