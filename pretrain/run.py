"""Pretrain the EEG MoE encoder by masked signal modelling under DeepSpeed.

    deepspeed --num_gpus 8 pretrain/run.py --config configs/pretrain/base.yaml \\
        data.shards=[/shared/corpus] dist.zero_stage=3 train.steps=100000
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 pretrain/run.py --config configs/pretrain/tiny.yaml

Or `brainmoe pretrain --num-gpus N ...`, which checks the config before launching.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `deepspeed pretrain/run.py`


def main(argv: list[str] | None = None) -> int:
    from pretrain.config import PretrainConfig
    from pretrain.model import validate_config
    from pretrain.msm_trainer import MSMTrainer
    from pretrain.worker import run_main

    return run_main(argv, __doc__, PretrainConfig, validate_config, MSMTrainer)


if __name__ == "__main__":
    sys.exit(main())
