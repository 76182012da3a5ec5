"""The Ray Train launcher: `brainmoe pretrain|finetune --launcher ray --num-workers N`.

The same training loop (pretrain/trainer.py) runs in each of Ray Train's `TorchTrainer`
workers, after the same checks `brainmoe` makes before a DeepSpeed launch. Ray sets up the
process group (gloo on CPU) and DeepSpeed adopts it, as Ray's DeepSpeed guide does.

Why checkpoints go through Ray rather than straight into `train.run_dir`: on a cluster the
workers of one run do not share a disk, and a worker group Ray restarts after a failure may
land on other nodes. So every rank saves its own ZeRO shard into a folder on its node and
hands it to `ray.train.report`, which merges the ranks' files into one checkpoint under
`RunConfig(storage_path)/<run name>/<tag>` (a folder every node sees, or `s3://...`). The
completion marker (pretrain/checkpoint.py) still lists every rank's files: the ranks send
their files' sizes and hashes to rank 0 before it writes the marker. A restarted group
(`FailureConfig(max_failures=ray.max_failures)`) downloads the newest reported checkpoint
onto each worker and resumes from it exactly as `train.resume=true` does under the DeepSpeed
launcher (model, optimizer, scheduler, data position, RNG); submitting the same run again
(same `train.run_dir`, or `ray.name`) with `train.resume=true` does the same.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pretrain.scratch import pid_prefix, sweep_dead

PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
ATTEMPTS = "attempts.jsonl"  # in the Ray run folder: one line per worker-group start
WORKERS = "workers"  # in the Ray run folder: rank<r>.json, where each rank runs now
RANK_PREFIX = "brainmoe-ray-rank"  # node-local folder of one rank: <prefix><r>-pid<pid>-<random>


@dataclass
class RayConfig:
    """How `--launcher ray` runs the workers (ignored by the DeepSpeed launcher)."""

    num_workers: int = 2
    use_gpu: bool = False
    # where Ray keeps the run's checkpoints: a folder every node sees, or s3://...;
    # None: <train.run_dir>/ray (enough on one machine)
    storage_path: str | None = None
    name: str | None = None  # the Ray Train run's name; None: the name of train.run_dir
    max_failures: int = 0  # worker-group restarts from the newest checkpoint (-1: no limit)
    placement_strategy: str = "PACK"  # STRICT_SPREAD: one worker per node
    resources_per_worker: dict[str, float] = field(default_factory=dict)  # {CPU: 1, ...}

    def validate(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"ray.num_workers must be at least 1, got {self.num_workers}")
        if self.max_failures < -1:
            raise ValueError(
                f"ray.max_failures must be -1 (no limit) or >= 0, got {self.max_failures}"
            )
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(
                f"ray.placement_strategy must be one of {', '.join(PLACEMENT_STRATEGIES)}, "
                f"got {self.placement_strategy!r}"
            )
        for key, value in self.resources_per_worker.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(
                    f"ray.resources_per_worker.{key} must be a number >= 0, got {value!r}"
                )
        if self.name is not None and ("/" in self.name or not self.name.strip()):
            raise ValueError(f"ray.name must be a plain folder name, got {self.name!r}")


def is_uri(path: str) -> bool:
    return "://" in path


def storage_path(cfg: Any) -> str:
    """Absolute local folder or URI: Ray resolves a relative one against each process's own
    working directory, which differs between the job driver and the workers."""
    path = cfg.ray.storage_path or str(Path(cfg.train.run_dir) / "ray")
    return path if is_uri(path) else str(Path(path).resolve())


def storage_filesystem(path: str) -> tuple[Any, str]:
    """(pyarrow filesystem or None, path within it) for `RunConfig(storage_path=...)`.

    Ray's own pyarrow S3 client would resolve the endpoint, keys and region its own way, so a
    bucket the shards reach (MinIO, Ceph, moto: AWS_ENDPOINT_URL, ~/.aws) could be one Ray
    cannot. A URL is therefore handed to Ray as the very fsspec filesystem shards/storage.py
    reads the shards through, wrapped for pyarrow; it pickles, so every worker gets it."""
    if not is_uri(path):
        return None, path
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from shards import storage

    fs, inner = storage.filesystem(path)
    return PyFileSystem(FSSpecHandler(fs)), inner


def run_name(cfg: Any) -> str:
    return cfg.ray.name or Path(cfg.train.run_dir).resolve().name


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The Ray flags as `key=value` overrides, so the config the workers load says the same."""
    extra = []
    if getattr(args, "num_workers", None) is not None:
        extra.append(f"ray.num_workers={args.num_workers}")
    if getattr(args, "use_gpu", None):
        extra.append("ray.use_gpu=true")
    return extra


def world_size(args: argparse.Namespace, cfg: Any, deepspeed_world: int) -> int:
    """The world the config is checked against: Ray's workers, or the DeepSpeed ranks."""
    if args.launcher != "ray":
        return deepspeed_world
    cfg.ray.validate()
    check_storage(cfg)
    return cfg.ray.num_workers


def check_storage(cfg: Any) -> None:
    """A Ray run folder that already holds checkpoints (local or in a bucket) is resumed by Ray
    whatever the config says, so a fresh run there is refused, as the DeepSpeed launcher
    refuses one."""
    from shards import storage

    run = storage.join(storage_path(cfg), run_name(cfg))
    if cfg.train.resume:
        return
    try:
        names = storage.list_names(run)
    except ValueError:
        raise
    except Exception as err:  # botocore/fsspec: no credentials, no such endpoint, ...
        raise ValueError(
            f"cannot look into {run} ({type(err).__name__}: {err}): the driver must reach "
            "ray.storage_path; for s3:// set AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or ~/.aws), or fix ray.storage_path"
        ) from err
    if any(name.startswith("step") for name in names):
        raise ValueError(
            f"{run} already holds checkpoints of a Ray run: pass train.resume=true to continue "
            "it, or choose a new train.run_dir (or ray.name)"
        )


def submission_id() -> str | None:
    """The id `ray job submit` printed (raysubmit_...), read in the job's driver."""
    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
        found = job.get("metadata", {}).get("job_submission_id")
    except (ValueError, AttributeError):
        found = None
    if found:
        return found
    import ray

    return ray.get_runtime_context().get_job_id() if ray.is_initialized() else None


def connect(address: str | None, num_cpus: int) -> None:
    import ray

    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):  # a cluster, or inside `ray job submit`
        ray.init(address=address, log_to_driver=True)
    else:
        from cluster.local_ray import init_local_ray

        init_local_ray(num_cpus=num_cpus, log_to_driver=True)


# ---- in the driver ------------------------------------------------------------------------
def launch_ray(
    layer: str, cfg: Any, args: argparse.Namespace, prepared: dict[str, Any] | None = None
) -> int:
    """Run `layer`'s training loop on Ray Train workers; exit status as the DeepSpeed path's
    (0 done, 3 diverged, 1 failed after max_failures restarts). ``prepared``: what the
    driver prepared once for every worker (finetuning: finetune/prepared.py's record), handed
    to the trainer as it is -- the workers' nodes may not share the run folder."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from shards.config import to_dict

    r = cfg.ray
    cpus = int(r.resources_per_worker.get("CPU", 1))
    connect(getattr(args, "ray_address", None), max(os.cpu_count() or 1, r.num_workers * cpus))
    storage, name = storage_path(cfg), run_name(cfg)
    filesystem, fs_path = storage_filesystem(storage)
    env = {} if r.use_gpu else {"DS_ACCELERATOR": "cpu"}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "layer": layer,
            "config": to_dict(cfg),
            "job_id": submission_id(),
            "storage": storage,
            "name": name,
            "env": env,
            "prepared": prepared,
        },
        scaling_config=ScalingConfig(
            num_workers=r.num_workers,
            use_gpu=r.use_gpu,
            resources_per_worker=dict(r.resources_per_worker) or None,
            placement_strategy=r.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=fs_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=r.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        ),
    )
    print(
        f"ray train: {r.num_workers} workers ({r.placement_strategy}), run {name} in {storage}",
        flush=True,
    )
    try:
        result = trainer.fit()
    except Exception as err:  # TrainingFailedError: the restarts are used up
        print(f"error: ray train run {name} failed: {err}", file=sys.stderr, flush=True)
        return 1
    metrics = result.metrics or {}
    if metrics.get("status") == "diverged":
        print(f"error: {metrics.get('error')}", file=sys.stderr, flush=True)
        return 3
    where = result.checkpoint.path if result.checkpoint else "none"
    print(f"ray train: {name} finished at step {metrics.get('step')}; checkpoint {where}")
    return 0


# ---- in every worker ----------------------------------------------------------------------
def _layer(layer: str):
    """(config class, trainer class) of a layer, imported in the worker."""
    if layer == "pretrain":
        from pretrain.config import PretrainConfig
        from pretrain.msm_trainer import MSMTrainer

        return PretrainConfig, MSMTrainer
    if layer == "finetune":
        from finetune.config import FinetuneConfig
        from finetune.trainer import FinetuneTrainer

        return FinetuneConfig, FinetuneTrainer
    raise ValueError(f"unknown layer {layer!r}")


def train_loop(config: dict[str, Any]) -> None:
    """What each Ray Train worker runs: the layer's Trainer with Ray's checkpoint store."""
    for key, value in config["env"].items():  # before DeepSpeed picks its accelerator
        os.environ.setdefault(key, value)
    import ray.train

    from pretrain.trainer import NonFiniteLossError, log
    from pretrain.worker import train
    from shards.config import load_config

    config_cls, trainer_cls = _layer(config["layer"])
    if config.get("prepared") is not None:
        trainer_cls = functools.partial(trainer_cls, prepared=config["prepared"])
    cfg = load_config(config_cls, None, (), **config["config"])
    store = RayCheckpoints(config["storage"], config["name"], config["job_id"])
    try:
        train(trainer_cls, cfg, store)
    except NonFiniteLossError as err:  # every rank finds it at the same step
        log(f"error: {err}")
        ray.train.report({"status": "diverged", "error": str(err)})
    finally:
        store.close()


def sweep_dead_rank_folders(tmp: Path) -> list[Path]:
    """Remove the node-local folders of ranks whose process is gone; return them. Each holds
    a full copy of the newest checkpoint, and a killed worker never reaches `close`
    (pretrain/scratch.py)."""
    return sweep_dead(tmp, RANK_PREFIX)


class RayCheckpoints:
    """The Trainer's checkpoint store under Ray Train (see the module docstring).

    Rank-local: each rank's folder holds only its own files until Ray merges them."""

    rank_local = True

    def __init__(self, storage: str, name: str, job_id: str | None):
        self.storage, self.name, self.job_id = storage, name, job_id
        self.restored_from: str | None = None
        self.root: Path | None = None

    @property
    def restored(self) -> bool:
        return self.restored_from is not None

    def _run_folder(self) -> Path | None:
        return None if is_uri(self.storage) else Path(self.storage) / self.name

    def setup(self, trainer) -> Path:
        """A fresh node-local folder; the newest reported checkpoint, if any, copied into it."""
        import ray.train

        self.rank = trainer.rank
        sweep_dead_rank_folders(Path(tempfile.gettempdir()))
        self.root = Path(tempfile.mkdtemp(prefix=pid_prefix(f"{RANK_PREFIX}{trainer.rank}")))
        ckpt_dir = self.root / "checkpoints"
        ckpt_dir.mkdir()
        reported = ray.train.get_checkpoint()
        if reported is not None:
            tag = Path(reported.path).name
            reported.to_directory(str(ckpt_dir / tag))
            (ckpt_dir / "latest").write_text(tag)
            self.restored_from = reported.path
        run = self._run_folder()
        if trainer.rank == 0 and run is not None:
            run.mkdir(parents=True, exist_ok=True)
            with open(run / ATTEMPTS, "a") as fh:
                record = {
                    "time": time.time(),
                    "pid": os.getpid(),
                    "world_size": trainer.world,
                    "resumed_from": self.restored_from,
                    "job_id": self.job_id,
                }
                fh.write(json.dumps(record) + "\n")
        if self.restored_from:
            from pretrain.trainer import log

            log(f"ray train: restarting from the reported checkpoint {self.restored_from}")
        return ckpt_dir

    def publish(self, trainer, folder: Path, metrics: dict[str, Any]) -> None:
        """Every rank: hand its part of the checkpoint to Ray (a barrier across the ranks)."""
        import ray
        import ray.train
        from ray.train import Checkpoint

        ray.train.report(
            {k: v for k, v in metrics.items() if isinstance(v, int | float | str)},
            checkpoint=Checkpoint.from_directory(str(folder)),
            checkpoint_dir_name=folder.name,
            delete_local_checkpoint_after_upload=True,
        )
        run = self._run_folder()
        if run is not None:  # where each rank runs, for whoever needs to find (or kill) it
            (run / WORKERS).mkdir(parents=True, exist_ok=True)
            info = {
                "pid": os.getpid(),
                "step": trainer.state.step,
                "host": os.uname().nodename,
                "node_id": ray.get_runtime_context().get_node_id(),
            }
            (run / WORKERS / f"rank{trainer.rank}.json").write_text(json.dumps(info))

    def complete_dir(self, trainer) -> Path:
        """Rank 0, for export at the end: the newest reported checkpoint, whole, on this node."""
        import ray.train

        if trainer.rank != 0:
            return trainer.ckpt_dir
        reported = ray.train.get_checkpoint()
        if reported is None:
            return trainer.ckpt_dir
        assert self.root is not None
        final = self.root / "final"
        tag = Path(reported.path).name
        reported.to_directory(str(final / tag))
        (final / "latest").write_text(tag)
        return final

    def lineage(self) -> dict[str, Any]:
        return {
            "launcher": "ray",
            "ray_job_id": self.job_id,
            "ray_run": self.name,
            "ray_storage": self.storage,
            "ray_restored_from": self.restored_from,
        }

    def close(self) -> None:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
