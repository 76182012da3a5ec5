"""Pictures of a pretraining run, logged as MLflow artifacts: people look before they read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(history: list[dict[str, float]], png: str | Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    steps = [h["step"] for h in history]
    for ax, key in zip(axes, ("loss", "grad_norm", "expert_load_max_min"), strict=True):
        values = [h.get(key, np.nan) for h in history]
        ax.plot(steps, values, lw=1.2)
        ax.set_title(key)
        ax.set_xlabel("step")
        if key == "loss" and values and min(values) > 0:
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def plot_expert_load(load: np.ndarray, png: str | Path) -> None:
    """Fraction of routed tokens per expert and layer `[L, E]`; uniform = 1/E everywhere."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1 + 0.5 * load.shape[1], 1 + 0.4 * load.shape[0]))
    im = ax.imshow(load, cmap="viridis", vmin=0, aspect="auto")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(f"token share per expert (uniform = {1 / load.shape[1]:.3f})", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def plot_reconstructions(
    batch: dict[str, Any], out: dict[str, Any], png: str | Path, n_channels: int = 4
) -> None:
    """Target vs prediction of masked patches for the first sample, a few channels."""
    plt = _plt()
    target = out["target"][0].float().cpu().numpy()  # [C, P, L]
    pred = out["pred"][0].float().cpu().numpy()  # [C, P, L]
    mask = out["mask"][0].cpu().numpy()  # [C, P] True = masked
    names = batch["ch_names"][0]
    rows = min(n_channels, target.shape[0])
    fig, axes = plt.subplots(rows, 1, figsize=(12, 1.8 * rows), squeeze=False)
    for c in range(rows):
        ax = axes[c, 0]
        truth = target[c].reshape(-1)
        guess = np.where(np.repeat(mask[c], target.shape[-1]), pred[c].reshape(-1), np.nan)
        ax.plot(truth, color="k", lw=0.8, label="target")
        ax.plot(guess, color="tab:red", lw=0.8, label="reconstruction (masked patches)")
        for p in np.flatnonzero(mask[c]):
            ax.axvspan(
                p * target.shape[-1], (p + 1) * target.shape[-1], color="tab:red", alpha=0.07
            )
        ax.set_ylabel(names[c] if c < len(names) else str(c), fontsize=8)
    axes[0, 0].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
