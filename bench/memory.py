"""Per-GPU memory of each pretraining size under ZeRO-2 and ZeRO-3: DeepSpeed's own estimators.

    python bench/memory.py

Why: whether `large` fits a cluster's GPUs is decided before anyone books them. The models
are built on the meta device (no memory, no weights), their parameter counts are handed to
`estimate_zero2_model_states_mem_needs` / `estimate_zero3_model_states_mem_needs`, and the
figures (model states only: parameters, gradients, Adam moments; activations come on top and
shrink with `dist.activation_checkpointing`) go to the "Memory estimates" section of
bench/RESULTS.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs  # noqa: E402
from deepspeed.runtime.zero.stage_1_and_2 import (  # noqa: E402
    estimate_zero2_model_states_mem_needs,
)

from bench.results import write_section  # noqa: E402
from pretrain.encoder_config import get_config
from pretrain.msm import MaskedSignalModel, MSMConfig  # noqa: E402

SIZES = ("small", "base", "large")
LAYOUTS = ((8, 1), (8, 4))  # (GPUs per node, nodes)
GIB = 2**30


def counts(name: str) -> tuple[int, int]:
    """(total parameters, largest single module's own parameters) of the MSM model."""
    with torch.device("meta"):
        model = MaskedSignalModel(MSMConfig(encoder=get_config(name)))
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def main() -> None:
    lines = [
        "Model-state memory per GPU (bf16 parameters, fp32 master copy, gradients and Adam "
        "moments; activations not included) from DeepSpeed's estimators, for the masked-signal "
        "model of each size (encoder + decoder), no offload and with optimizer offload to CPU.",
        "",
        "| size | params | GPUs | ZeRO-2 GiB/GPU | ZeRO-2 + CPU offload | ZeRO-3 GiB/GPU "
        "| ZeRO-3 + CPU offload (params too) |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for name in SIZES:
        total, largest = counts(name)
        for per_node, nodes in LAYOUTS:
            z2 = estimate_zero2_model_states_mem_needs(total, per_node, nodes, cpu_offload=False)
            z2o = estimate_zero2_model_states_mem_needs(total, per_node, nodes, cpu_offload=True)
            z3 = estimate_zero3_model_states_mem_needs(
                total, largest, per_node, nodes, cpu_offload=False
            )
            z3o = estimate_zero3_model_states_mem_needs(
                total, largest, per_node, nodes, cpu_offload=True, cpu_offload_params=True
            )
            lines.append(
                f"| {name} | {total / 1e6:.1f}M | {nodes} x {per_node} | {z2[1] / GIB:.2f} "
                f"| {z2o[1] / GIB:.2f} (CPU {z2o[0] / GIB:.0f}) | {z3[1] / GIB:.2f} "
                f"| {z3o[1] / GIB:.2f} (CPU {z3o[0] / GIB:.0f}) |"
            )
    body = "\n".join(lines)
    write_section("Memory estimates", body)
    print(body)


if __name__ == "__main__":
    main()
