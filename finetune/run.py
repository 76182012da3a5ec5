"""Finetune the generation heads on the pretrained encoder under DeepSpeed.

    deepspeed --num_gpus 8 finetune/run.py --config configs/finetune/sd15-llama.yaml \\
        data.shards=[/shared/things-eeg2] encoder.model=models:/brainmoe@current
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 finetune/run.py --config configs/finetune/tiny.yaml

Or `brainmoe finetune --num-gpus N ...`, which checks everything, prepares the run folder
(split, stimuli, encoder: finetune/prepared.py) and computes the CLIP embeddings (a Ray job)
before launching; started by hand, rank 0 prepares the run folder while the others wait.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `deepspeed finetune/run.py`


def main(argv: list[str] | None = None) -> int:
    from finetune.config import FinetuneConfig
    from finetune.prepare import validate_finetune
    from finetune.trainer import FinetuneTrainer
    from pretrain.worker import run_main

    return run_main(argv, __doc__, FinetuneConfig, validate_finetune, FinetuneTrainer)


if __name__ == "__main__":
    sys.exit(main())
