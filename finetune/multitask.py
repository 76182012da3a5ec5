"""How the heads' losses become one: a learned task gate, uncertainty weighting, or fixed.

Modes:

- ``"fixed"``: ``total = sum_t w_t * L_t`` with the configured weights (1.0 when not given).
- ``"uncertainty"`` (Kendall, Gal & Cipolla 2018): one learned log-variance ``s_t`` per task,
  ``total = sum_t exp(-s_t) * L_t + s_t``. A noisy task (large loss) gets a large ``s_t`` and
  so a small weight; the ``+ s_t`` term stops ``s_t`` from growing without bound.
- ``"gate"``: a linear gate over the pooled EEG representation [B, D] gives per-sample task
  weights [B, T] (softmax); they are averaged over the batch and multiplied by T, so uniform
  weights are all 1 and the weights always sum to T.

Why the gate needs a guard, and which one: trained on ``sum_t w_t * L_t`` alone, the gate's
optimum is all the weight on whichever task has the smallest loss (the easiest one), and the
other heads stop learning. Two guards are used together:

1. a **floor**: ``w_t = T * (floor / T + (1 - floor) * softmax_t)``, so every task keeps at
   least ``floor`` (in units of the uniform weight 1) whatever the gate does; this is a hard
   guarantee that no head is starved, and costs nothing to compute;
2. a **KL-to-uniform penalty** ``gate_kl * KL(mean softmax || uniform)``: with it the gate's
   optimum is a softmax of the negative losses (temperature ``gate_kl / (T * (1 - floor))``)
   instead of a one-hot, so the gate still prefers tasks it can fit but moves smoothly and
   keeps a gradient instead of sitting pinned at the floor.

The gate reads the pooled representation *detached*: it may decide how much each task counts
for an input, but its loss must not reshape the encoder's features to favour an easy task.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

MODES = ("gate", "uncertainty", "fixed")


@dataclass
class TaskWeightingConfig:
    """How per-task losses are combined (see the module docstring for each mode)."""

    mode: str = "uncertainty"  # gate | uncertainty | fixed
    weights: dict[str, float] = field(default_factory=dict)  # fixed mode; missing tasks: 1.0
    gate_floor: float = 0.2  # gate: least weight of any task, uniform = 1 (0 <= floor < 1)
    gate_kl: float = 0.1  # gate: strength of the KL(mean gate || uniform) penalty


class TaskWeighting(nn.Module):
    """Combines ``{"text": L, "image": L, ...}`` into one loss, with weights worth logging."""

    def __init__(self, config: TaskWeightingConfig, tasks: list[str], encoder_dim: int):
        super().__init__()
        if config.mode not in MODES:
            raise ValueError(f"task weighting mode must be one of {MODES}, got {config.mode!r}")
        if not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks must be a non-empty list of distinct names, got {tasks}")
        unknown = sorted(set(config.weights) - set(tasks))
        if unknown:
            raise ValueError(f"weights name tasks {unknown} that are not among {tasks}")
        if not 0.0 <= config.gate_floor < 1.0:
            raise ValueError(f"gate_floor must be in [0, 1), got {config.gate_floor}")
        if config.gate_kl < 0:
            raise ValueError(f"gate_kl must be >= 0, got {config.gate_kl}")
        self.config = config
        self.tasks = list(tasks)
        t = len(tasks)
        if config.mode == "gate":
            self.gate = nn.Linear(encoder_dim, t)
            nn.init.zeros_(self.gate.weight)  # start uniform
            nn.init.zeros_(self.gate.bias)
        elif config.mode == "uncertainty":
            self.log_var = nn.Parameter(torch.zeros(t))  # s_t
        fixed = [float(config.weights.get(name, 1.0)) for name in tasks]
        self.register_buffer("fixed", torch.tensor(fixed), persistent=False)

    def gate_weights(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        """pooled [B, D] -> (task weights [T] summing to T, KL(mean gate || uniform))."""
        t = len(self.tasks)
        probs = self.gate(pooled.detach().float()).softmax(-1).mean(0)  # [T]
        kl = (probs * (probs.clamp_min(1e-12) * t).log()).sum()
        floor = self.config.gate_floor
        return t * (floor / t + (1.0 - floor) * probs), kl

    def forward(
        self, losses: dict[str, Tensor], pooled: Tensor | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """(total loss, {"weight/<task>": float, ...}); tasks absent from ``losses`` add 0."""
        unknown = sorted(set(losses) - set(self.tasks))
        if unknown:
            raise ValueError(f"losses for tasks {unknown} that are not among {self.tasks}")
        if not losses:
            raise ValueError("no task losses to combine")
        present = [i for i, name in enumerate(self.tasks) if name in losses]
        stacked = torch.stack([losses[self.tasks[i]].float() for i in present])  # [T']
        idx = torch.tensor(present, device=stacked.device)
        stats: dict[str, float] = {}
        mode = self.config.mode
        if mode == "fixed":
            weights = self.fixed.to(stacked.device)
            total = (weights[idx] * stacked).sum()
        elif mode == "uncertainty":
            s = self.log_var[idx]
            total = (torch.exp(-s) * stacked + s).sum()
            weights = torch.exp(-self.log_var.detach())
        else:
            if pooled is None:
                raise ValueError("the gate needs the pooled EEG representation [B, D]")
            weights, kl = self.gate_weights(pooled)
            total = (weights[idx] * stacked).sum() + self.config.gate_kl * kl
            stats["gate/kl"] = float(kl.detach())
        for i, name in enumerate(self.tasks):
            stats[f"weight/{name}"] = float(weights[i].detach())
        return total, stats
