"""The DeepSpeed JSON, generated from the run config -- never kept as a hand-made twin."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    # torch's AdamW; False uses DeepSpeed's fused Adam (CUDA only)
    torch_adam: bool = True
    # torch's AdamW as one fused kernel (CPU and CUDA) instead of foreach: on 2 CPU cores the
    # optimizer step of the 4M-parameter MoE falls from 8.1 to 3.1 ms (bench/RESULTS.md)
    fused: bool = True


@dataclass
class DistConfig:
    zero_stage: int = 2
    precision: str = "bf16"  # bf16 | fp32
    micro_batch: int = 8  # samples per rank per micro step
    grad_accum: int = 1
    global_batch: int | None = None  # if set: must equal micro_batch x grad_accum x ranks
    activation_checkpointing: bool = False
    # ZeRO-3: gather a full fp16/bf16 copy at save time (what export/from_pretrained reads)
    gather_16bit_weights_on_model_save: bool = True

    def validate(self, world_size: int | None = None) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"dist.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"dist.precision must be bf16 or fp32, got {self.precision!r}")
        if self.micro_batch < 1 or self.grad_accum < 1:
            raise ValueError(
                f"dist.micro_batch ({self.micro_batch}) and dist.grad_accum ({self.grad_accum}) "
                "must be at least 1"
            )
        if world_size is not None and world_size < 1:
            raise ValueError(f"world size must be >= 1, got {world_size}")


def deepspeed_config(dist: DistConfig, optim: OptimConfig, total_steps: int) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": dist.zero_stage}
    if dist.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = dist.gather_16bit_weights_on_model_save
    if dist.zero_stage >= 1:
        zero["overlap_comm"] = False
    return {
        "train_micro_batch_size_per_gpu": dist.micro_batch,
        "gradient_accumulation_steps": dist.grad_accum,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dist.precision == "bf16"},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": list(optim.betas),
                "weight_decay": optim.weight_decay,
                "torch_adam": optim.torch_adam,
                **({"fused": optim.fused} if optim.torch_adam else {}),
            },
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": max(total_steps, optim.warmup_steps + 1),
                "warmup_num_steps": optim.warmup_steps,
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": optim.min_lr_ratio,
                "warmup_type": "linear",
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
