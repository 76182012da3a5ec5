"""Pretrain the EEG MoE encoder by masked signal modelling under DeepSpeed.

    deepspeed --num_gpus 8 pretrain/run.py --config configs/pretrain/base.yaml \\
        data.shards=[/shared/corpus] dist.zero_stage=3 train.steps=100000
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 pretrain/run.py --config configs/pretrain/tiny.yaml

Or `brainmoe pretrain --num-gpus N ...`, which checks the config before launching.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `deepspeed pretrain/run.py`

from pretrain.config import PretrainConfig  # noqa: E402
from shards.config import load_config  # noqa: E402


def parse(argv: list[str] | None = None) -> tuple[PretrainConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML run config (configs/pretrain/*.yaml)")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    return load_config(PretrainConfig, args.config, args.overrides), args


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, _ = parse(argv)
        from pretrain.model import validate_config

        validate_config(cfg, world_size=None)  # cheap checks before DeepSpeed starts
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from pretrain.msm_trainer import main_worker

    return main_worker(cfg)


if __name__ == "__main__":
    sys.exit(main())
