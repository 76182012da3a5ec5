"""The training loop under DeepSpeed: the one place distributed training code lives.

torchtitan-style: entry points are thin, models are plain PyTorch, and everything about
engines, ranks, checkpoints and logging is here, shared by pretraining (`MSMTrainer`) and
finetuning: a subclass only says which model to build, how a micro-batch becomes a loss dict,
and what to do at the end. Exact resume is a first-class feature: a checkpoint holds model,
optimizer, scheduler, the TrainState (step, data position, NaN counters) and every rank's
RNG state (pretrain/checkpoint.py: a completion marker, integrity checks, weights-only
loading), and in-model randomness draws from a generator seeded by (seed, step, micro-step,
rank) -- so a resumed run reproduces the uninterrupted loss curve.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pretrain import checkpoint
from pretrain.cpu_comm import release_allreduce_segment
from pretrain.ds_config import deepspeed_config
from pretrain.tracking import Tracker, git_commit, tracking_uri
from shards.config import flatten, to_dict, to_yaml
from shards.reader import ReaderConfig, make_loader


class NonFiniteLossError(RuntimeError):
    """Raised when too many losses in a row were NaN/Inf: the run is diverging."""


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # data epoch of the reader
    batch_in_epoch: int = 0  # micro-batches consumed in that epoch (per rank)
    nan_skipped: int = 0
    nan_streak: int = 0
    mlflow_run_id: str | None = None


class SharedCheckpoints:
    """Where the DeepSpeed launcher's checkpoints live: `run_dir/checkpoints`, which every rank
    sees (one node, or a shared folder), so each save is complete where it lands. The Ray
    launcher passes its own store (cluster/ray_train.py) with the same four methods."""

    rank_local = False  # every rank writes into, and rank 0 hashes, the same folder
    restored = False  # a restart with a checkpoint to resume from, whatever train.resume says

    def setup(self, trainer: Trainer) -> Path:
        return trainer.cfg.ckpt_path

    def publish(self, trainer: Trainer, folder: Path, metrics: dict[str, Any]) -> None:
        """Every rank, after a checkpoint is complete."""

    def complete_dir(self, trainer: Trainer) -> Path:
        """A checkpoints folder holding every rank's files of the newest save (for export)."""
        return trainer.ckpt_dir

    def lineage(self) -> dict[str, Any]:
        return {"launcher": "deepspeed"}


def log(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)


def warn(msg: str) -> None:
    """A problem the run works around: once (rank 0), on stderr."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"warning: {msg}", file=sys.stderr, flush=True)


class Trainer:
    """The loop; subclasses fill in the hooks below the loop (build_model ... finish).

    ``cfg`` has the parts every run config shares: data (shards, reader), optim, dist, train,
    tracking, register, and ``run_path`` / ``ckpt_path``."""

    # ---- hooks --------------------------------------------------------------------------
    def validate(self, world: int) -> None:
        """Raise ValueError for a config that cannot run with `world` ranks."""
        raise NotImplementedError

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def make_loader(self, reader: ReaderConfig):
        return make_loader(self.cfg.data.shards, reader, rank=self.rank, world_size=self.world)

    def forward(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        """One micro-batch -> dict with ``loss`` (backpropagated), ``metrics`` (named scalars
        averaged over a log window, e.g. ``loss``, ``aux_loss``) and ``tokens`` (valid tokens,
        for tokens/s)."""
        raise NotImplementedError

    def after_step(self) -> torch.Tensor | None:
        """After each optimizer step (every rank). Returns expert load `[L, E]` summed over
        ranks for the log, or None."""
        return None

    def checkpoint_extras(self, folder: Path) -> None:
        """Rank 0 writes what a checkpoint folder needs besides DeepSpeed's files."""

    def finish(self, tracker: Tracker) -> dict[str, Any]:
        """After the last step: plots, exports, registration (every rank enters)."""
        return {"step": self.state.step, "run_dir": str(self.run_dir)}

    def register_output(self, register: Callable[..., dict[str, Any]], folder: Path) -> dict:
        """`register(folder, name, alias, uri, experiment=)` as configured, in this run's store."""
        info = register(
            folder,
            self.cfg.register.name,
            self.cfg.register.alias,
            self.tracking_uri,
            experiment=self.cfg.tracking.experiment,
        )
        log(f"registered {info['name']} version {info['version']} as @{info['alias']}")
        return info

    # ---- set-up -------------------------------------------------------------------------
    def __init__(self, cfg: Any, checkpoints: SharedCheckpoints | None = None):
        import deepspeed

        self.cfg = cfg
        backend = "gloo" if deepspeed.get_accelerator().device_name() == "cpu" else None
        # under Ray Train the process group exists already: DeepSpeed adopts it
        deepspeed.init_distributed(dist_backend=backend)
        if backend == "gloo":
            release_allreduce_segment()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.checkpoints = checkpoints or SharedCheckpoints()
        self.validate(self.world)
        self.run_dir = cfg.run_path
        self.ckpt_dir = self.checkpoints.setup(self)
        self.tracking_uri = (
            tracking_uri(cfg.tracking, self.run_dir) if cfg.tracking.enabled else None
        )
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        dist.barrier()

        random.seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        torch.manual_seed(cfg.train.seed)
        self.model = self.build_model()
        if cfg.train.compile:  # in place: checkpoints and exports keep their keys
            self.model.compile(dynamic=True)
        self.ds_config = deepspeed_config(cfg.dist, cfg.optim, cfg.train.steps)
        if self.rank == 0:
            (self.run_dir / "deepspeed.json").write_text(json.dumps(self.ds_config, indent=1))
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.model, model_parameters=params, config=self.ds_config
        )
        self.device = self.engine.device
        self.dtype = torch.bfloat16 if cfg.dist.precision == "bf16" else torch.float32

        reader = ReaderConfig(**{**asdict(cfg.data.reader), "batch_size": cfg.dist.micro_batch})
        self.loader = self.make_loader(reader)
        self.state = TrainState()
        self.history: list[dict[str, float]] = []

    # ---- data ---------------------------------------------------------------------------
    def _batches(self):
        """Micro-batches forever, keeping the data position in the TrainState."""
        skip = self.state.batch_in_epoch
        while True:
            self.loader.set_epoch(self.state.epoch)
            for index, batch in enumerate(self.loader):
                if index < skip:
                    continue  # fast-forward to where the checkpoint left off
                self.state.batch_in_epoch = index + 1
                yield batch
            skip = 0
            self.state.epoch += 1
            self.state.batch_in_epoch = 0

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {
            k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v)
            for k, v in batch.items()
        }

    def _mask_generator(self, micro: int) -> torch.Generator:
        gen = torch.Generator(device="cpu")
        seed = (
            (self.cfg.train.seed * 1_000_003 + self.state.step) * 1009 + micro
        ) * 257 + self.rank
        gen.manual_seed(seed % 2**63)
        return gen

    # ---- checkpoints (what makes them trustworthy: pretrain/checkpoint.py) ---------------
    def save(self) -> None:
        tag = checkpoint.tag_for(self.state.step)
        folder = self.ckpt_dir / tag
        if self.rank == 0 and folder.is_dir():
            checkpoint.begin_save(folder)  # being rewritten: incomplete until the new marker
        dist.barrier()
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag)
        checkpoint.write_rng_state(checkpoint.rng_file(folder, self.rank))
        if self.rank == 0:
            self.checkpoint_extras(folder)
            (folder / "lineage.json").write_text(json.dumps(self.lineage(), indent=1))
            checkpoint.write_train_state(folder, asdict(self.state))
            metrics = self.run_dir / "metrics.jsonl"
            if metrics.exists():  # the curve so far travels with the checkpoint
                shutil.copy(metrics, folder / "metrics.jsonl")
        files = None
        if self.checkpoints.rank_local:  # rank 0 cannot see the others' files: they send them
            own = checkpoint.file_entries(folder)
            every: list[Any] = [None] * self.world
            dist.all_gather_object(every, own)
            files = checkpoint.merge_entries(every)
        dist.barrier()  # every rank's files are on disk: only now may the marker say so
        if self.rank == 0:
            checkpoint.write_marker(folder, self.state.step, files)
            checkpoint.prune(self.ckpt_dir, self.cfg.train.keep_checkpoints)
        dist.barrier()
        log(f"checkpoint {folder}")
        last = self.history[-1] if self.history and self.rank == 0 else {}
        self.checkpoints.publish(self, folder, {**last, "step": self.state.step})

    def resume(self) -> bool:
        tag = checkpoint.agree_on_tag(self.ckpt_dir, self.rank, warn)
        if tag is None:
            log(f"resume=true but no checkpoint in {self.ckpt_dir}: starting fresh")
            return False
        folder = self.ckpt_dir / tag
        with checkpoint.weights_only_loads():
            path, _ = self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {folder}")
        self.state = TrainState(**checkpoint.read_train_state(folder))
        checkpoint.read_rng_state(checkpoint.rng_file(folder, self.rank))
        metrics = self.run_dir / "metrics.jsonl"
        if not metrics.exists():  # rank 0 restarted on another node: the checkpoint's copy
            metrics = folder / "metrics.jsonl"
        if metrics.exists():
            self.history = [
                json.loads(line)
                for line in metrics.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= self.state.step
            ]
            if self.rank == 0:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / "metrics.jsonl").write_text(
                    "".join(json.dumps(h) + "\n" for h in self.history)
                )
        log(
            f"resumed at step {self.state.step} (epoch {self.state.epoch}, "
            f"batch {self.state.batch_in_epoch})"
        )
        return True

    def lineage(self) -> dict[str, Any]:
        import hashlib

        from shards import storage

        manifests = {}
        for folder in self.cfg.data.shards:  # a local folder or an s3:// URL
            path = storage.join(folder, "manifest.json")
            if storage.exists(path):
                manifests[str(folder)] = hashlib.sha256(storage.read_bytes(path)).hexdigest()
        config = to_dict(self.cfg)
        return {
            "shard_manifests": manifests,
            "config": config,
            "config_sha256": hashlib.sha256(
                json.dumps(config, sort_keys=True).encode()
            ).hexdigest(),
            "git_commit": git_commit(),
            "step": self.state.step,
            "mlflow_run_id": self.state.mlflow_run_id,
            "tracking_uri": self.tracking_uri,
            "world_size": self.world,
            **self.checkpoints.lineage(),
        }

    # ---- the loop -----------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.train.resume or self.checkpoints.restored:
            self.resume()
        tracker = Tracker(
            cfg.tracking, self.run_dir, active=self.rank == 0, run_id=self.state.mlflow_run_id
        )
        self.state.mlflow_run_id = tracker.run_id
        tracker.log_params(flatten(to_dict(cfg)))
        launcher = self.checkpoints.lineage()
        tracker.set_tags(
            {
                "git_commit": git_commit(),
                "world_size": str(self.world),
                **{k: str(v) for k, v in launcher.items() if k in ("launcher", "ray_job_id")},
            }
        )
        tracker.log_dict(self.ds_config, "deepspeed.json")

        batches = self._batches()
        window: dict[str, float] = {}  # sums over the log window's micro-batches
        counts = {"n": 0, "tokens": 0, "samples": 0}
        window_load = None  # routed tokens per layer and expert over the log window
        started = time.perf_counter()
        accum = cfg.dist.grad_accum
        micro = 0
        try:
            while self.state.step < cfg.train.steps:
                batch = self._to_device(next(batches))
                out = self.forward(batch, self._mask_generator(micro))
                loss = out["loss"]
                finite = torch.tensor([float(torch.isfinite(loss).item())])
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
                if finite.item() < 1:
                    self.state.nan_skipped += 1
                    self.state.nan_streak += 1
                    log(
                        f"step {self.state.step}: non-finite loss on some rank, batch skipped "
                        f"({self.state.nan_streak} in a row, {self.state.nan_skipped} in all)"
                    )
                    if self.state.nan_streak >= cfg.train.max_nan_streak:
                        raise NonFiniteLossError(
                            f"{self.state.nan_streak} non-finite losses in a row at step "
                            f"{self.state.step}: the run diverged. Lower optim.lr, check the "
                            "data (brainmoe shards inspect) or resume from an earlier checkpoint."
                        )
                    continue
                self.state.nan_streak = 0
                self.engine.backward(loss)
                self.engine.step()
                for name, value in out["metrics"].items():
                    window[name] = window.get(name, 0.0) + float(value)
                counts["n"] += 1
                counts["tokens"] += int(out.get("tokens", 0))
                counts["samples"] += int(batch["eeg"].shape[0])
                micro += 1
                if micro < accum:
                    continue
                micro = 0
                self.state.step += 1
                load = self.after_step()
                if load is not None:
                    window_load = load if window_load is None else window_load + load
                if self.state.step % cfg.train.log_every == 0 or self.state.step == cfg.train.steps:
                    self._log(window, counts, window_load, started, tracker)
                    window, window_load = {}, None
                    counts = dict.fromkeys(counts, 0)
                    started = time.perf_counter()
                if (
                    self.state.step % cfg.train.ckpt_every == 0
                    or self.state.step == cfg.train.steps
                ):
                    self.save()
        except BaseException:
            tracker.finish("FAILED")
            raise
        self.ckpt_dir = self.checkpoints.complete_dir(self)  # what export reads
        result = self.finish(tracker)
        dist.barrier()
        tracker.finish()
        return result

    def _log(
        self,
        window: dict[str, float],
        counts: dict[str, int],
        load: torch.Tensor | None,
        started: float,
        tracker: Tracker,
    ) -> None:
        names = sorted(window)
        stats = torch.tensor(
            [window[k] for k in names] + [counts["n"], counts["tokens"], counts["samples"]],
            dtype=torch.float64,
        )
        dist.all_reduce(stats)
        *sums, n, tokens, samples = stats.tolist()
        elapsed = max(time.perf_counter() - started, 1e-9)
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        metrics = {name: total / max(n, 1) for name, total in zip(names, sums, strict=True)}
        metrics.update(
            grad_norm=grad_norm,
            lr=float(self.engine.get_lr()[0]),
            samples_per_s=samples / elapsed,
            tokens_per_s=tokens / elapsed,
            nan_skipped=self.state.nan_skipped,
        )
        if load is not None and load.numel() and load.shape[-1] > 1:
            per_layer = load / load.sum(dim=-1, keepdim=True).clamp_min(1)  # [L, E]
            ratio = load.max(dim=-1).values / load.min(dim=-1).values.clamp_min(1)  # [L]
            metrics["expert_load_max_min"] = float(ratio.max())
            metrics["experts_unused"] = int((load == 0).sum())
            for layer, r in enumerate(ratio.tolist()):
                metrics[f"expert_load_max_min/layer{layer}"] = r
            self.last_load = per_layer
        if self.rank == 0:
            record = {"step": self.state.step, **metrics}
            self.history.append(record)
            with open(self.run_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
            tracker.log_metrics(metrics, self.state.step)
            losses = "  ".join(
                f"{k} {metrics[k]:.4f}" for k in names if k == "loss" or k.endswith("_loss")
            )
            extra = (
                f" expert max/min {metrics['expert_load_max_min']:.2f}"
                if "expert_load_max_min" in metrics
                else ""
            )
            log(
                f"step {self.state.step:6d}  {losses}  grad {grad_norm:.3f}  "
                f"lr {metrics['lr']:.2e}  {metrics['samples_per_s']:.1f} samples/s  "
                f"{metrics['tokens_per_s']:.0f} tokens/s{extra}"
            )
