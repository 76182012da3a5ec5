"""Finetune the generation heads on the pretrained encoder under DeepSpeed.

    deepspeed --num_gpus 8 finetune/run.py --config configs/finetune/sd15-llama.yaml \\
        data.shards=[/shared/things-eeg2] encoder.model=models:/brainmoe@current
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 finetune/run.py --config configs/finetune/tiny.yaml

Or `brainmoe finetune --num-gpus N ...`, which checks everything and computes the CLIP
embeddings (a Ray job) before launching.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `deepspeed finetune/run.py`

from finetune.config import FinetuneConfig  # noqa: E402
from shards.config import load_config  # noqa: E402


def parse(argv: list[str] | None = None) -> tuple[FinetuneConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML run config (configs/finetune/*.yaml)")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    return load_config(FinetuneConfig, args.config, args.overrides), args


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, _ = parse(argv)
        from finetune.prepare import validate_finetune

        validate_finetune(cfg, world_size=None)  # cheap checks before DeepSpeed starts
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from finetune.trainer import main_worker

    try:
        return main_worker(cfg)
    except ValueError as err:  # found while preparing on the ranks: stop before training
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
