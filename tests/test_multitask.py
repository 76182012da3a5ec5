"""Each weighting mode combines losses as its docstring says, and the gate cannot starve a task."""

from __future__ import annotations

import math

import pytest
import torch

from finetune.multitask import TaskWeighting, TaskWeightingConfig

TASKS = ["retrieval", "text", "image"]
LOSSES = (0.1, 1.0, 2.0)  # unequal: retrieval is "easy"


def _losses(values=LOSSES) -> dict[str, torch.Tensor]:
    return {
        name: torch.tensor(v, requires_grad=True) for name, v in zip(TASKS, values, strict=True)
    }


def _train(weighting: TaskWeighting, steps: int, lr: float, d: int = 8) -> dict[str, float]:
    opt = torch.optim.Adam(weighting.parameters(), lr=lr)
    pooled = torch.randn(16, d, generator=torch.Generator().manual_seed(0))  # [B, D]
    for _ in range(steps):
        total, _ = weighting(_losses(), pooled)
        opt.zero_grad()
        total.backward()
        opt.step()
    return weighting(_losses(), pooled)[1]


def test_fixed_weights_default_to_one():
    weighting = TaskWeighting(TaskWeightingConfig(mode="fixed", weights={"text": 2.0}), TASKS, 8)
    losses = _losses()
    total, stats = weighting(losses)
    assert total.item() == pytest.approx(0.1 + 2 * 1.0 + 2.0)
    assert stats == {"weight/retrieval": 1.0, "weight/text": 2.0, "weight/image": 1.0}
    total.backward()
    assert losses["text"].grad.item() == pytest.approx(2.0)
    partial, _ = weighting({"image": torch.tensor(3.0)})  # a step without captions/images
    assert partial.item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="not among"):
        TaskWeighting(TaskWeightingConfig(mode="fixed", weights={"audio": 1.0}), TASKS, 8)
    with pytest.raises(ValueError, match="not among"):
        weighting({"audio": torch.tensor(1.0)})


def test_uncertainty_is_kendall_and_learns_inverse_loss_weights():
    weighting = TaskWeighting(TaskWeightingConfig(mode="uncertainty"), TASKS, 8)
    with torch.no_grad():
        weighting.log_var.copy_(torch.tensor([0.5, -1.0, 0.0]))
    total, stats = weighting(_losses())
    expected = sum(math.exp(-s) * v + s for s, v in zip((0.5, -1.0, 0.0), LOSSES, strict=True))
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert stats["weight/text"] == pytest.approx(math.exp(1.0), rel=1e-5)
    # exp(-s) L + s is minimal at s = log L: the learned weight of each task becomes 1 / L.
    stats = _train(TaskWeighting(TaskWeightingConfig(mode="uncertainty"), TASKS, 8), 400, 0.05)
    for name, v in zip(TASKS, LOSSES, strict=True):
        assert stats[f"weight/{name}"] == pytest.approx(1 / v, rel=0.05), (name, stats)


def test_gate_weights_sum_to_t_and_keep_the_floor_on_unequal_losses():
    config = TaskWeightingConfig(mode="gate", gate_floor=0.2, gate_kl=0.01)
    weighting = TaskWeighting(config, TASKS, 8)
    total, stats = weighting(_losses(), torch.randn(4, 8))
    assert all(stats[f"weight/{n}"] == pytest.approx(1.0) for n in TASKS)  # starts uniform
    assert total.item() == pytest.approx(sum(LOSSES), rel=1e-5)
    with pytest.raises(ValueError, match="pooled"):
        weighting(_losses(), None)
    stats = _train(weighting, 300, 0.1)
    weights = [stats[f"weight/{n}"] for n in TASKS]
    assert sum(weights) == pytest.approx(3.0, rel=1e-5), weights
    # Left alone the gate would put everything on the easy task; the floor keeps the others.
    assert weights[0] > 2.0, f"gate should favour the easy task, got {weights}"
    assert min(weights) >= 0.2 - 1e-6, f"weights {weights} fell below the floor 0.2"


def test_gate_kl_penalty_gives_a_softmax_of_negative_losses():
    """With the KL term the optimum is p ~ exp(-T (1 - floor) L / gate_kl), not a one-hot."""
    config = TaskWeightingConfig(mode="gate", gate_floor=0.2, gate_kl=2.0)
    stats = _train(TaskWeighting(config, TASKS, 8), 300, 0.1)
    t, floor = 3, 0.2
    logits = torch.tensor([-t * (1 - floor) * v / config.gate_kl for v in LOSSES])
    expected = t * (floor / t + (1 - floor) * logits.softmax(0))
    got = torch.tensor([stats[f"weight/{n}"] for n in TASKS])
    assert torch.allclose(got, expected, atol=0.03), f"got {got.tolist()}, optimum {expected}"
