"""What `deepspeed <layer>/run.py --config ... key=value ...` runs on every rank.

The config is loaded and checked again here (cheap), because `deepspeed` can be started
without `brainmoe`; user errors exit 2 with one line from rank 0 (every rank finds the same
error, and one copy of it is the message), a diverged run exits 3.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from pretrain.trainer import NonFiniteLossError, Trainer, log


def run_main(
    argv: list[str] | None,
    description: str,
    config_cls: type,
    validate: Callable[[Any, int | None], None],
    trainer_cls: type[Trainer],
) -> int:
    """Load the run config, run the checks that need no world, train."""
    import argparse

    from pretrain.config import load_run_config
    from pretrain.tracking import check_tracking_store

    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML run config (configs/<layer>/*.yaml)")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    first = os.environ.get("RANK", "0") == "0"  # the one rank that reports user errors
    try:
        cfg = load_run_config(config_cls, args.config, args.overrides)
        validate(cfg, None)  # cheap checks before DeepSpeed starts
        if first:  # only rank 0 talks to MLflow (and `brainmoe` checked it already)
            check_tracking_store(cfg.tracking)
        return run_worker(trainer_cls, cfg)
    except ValueError as err:  # also what the ranks find while preparing: before training
        if first:
            print(f"error: {err}", file=sys.stderr)
        return 2


def train(trainer_cls: type[Trainer], cfg: Any, checkpoints: Any = None) -> dict[str, Any]:
    """The training loop as one call, what every launcher runs on each rank: the DeepSpeed
    launcher's ranks (run_worker) and each Ray Train worker (cluster/ray_train.py), which
    passes the checkpoint store that reports to Ray."""
    return trainer_cls(cfg, checkpoints=checkpoints).train()


def run_worker(trainer_cls: type[Trainer], cfg: Any) -> int:
    """Entry for every rank of a DeepSpeed launch: train, and turn a diverged run into exit
    status 3."""
    try:
        train(trainer_cls, cfg)
    except NonFiniteLossError as err:
        log(f"error: {err}")
        return 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
