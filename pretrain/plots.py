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
    """Target vs prediction of masked patches for the first sample, a few channels: the
    samples (left) and, with a spectral target, the log amplitude spectrum of the first
    masked patch of each channel (right) -- the part of a hidden patch that is predictable."""
    plt = _plt()
    mask = out["mask"][0].cpu().numpy()  # [C, P] True = masked
    has_signal = "mse_signal" in out or "pred_spectrum" not in out
    spectrum = "pred_spectrum" in out
    names = batch["ch_names"][0]
    rows = min(n_channels, mask.shape[0])
    cols = int(has_signal) + int(spectrum)
    widths = [3, 1][:cols] if cols == 2 else [1]
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(4 + 9 * has_signal + 3 * spectrum, 1.8 * rows),
        squeeze=False,
        gridspec_kw={"width_ratios": widths},
    )
    for c in range(rows):
        label = names[c] if c < len(names) else str(c)
        if has_signal:
            ax = axes[c, 0]
            target = out["target"][0, c].float().cpu().numpy()  # [P, L]
            pred = out["pred"][0, c].float().cpu().numpy()
            length = target.shape[-1]
            guess = np.where(np.repeat(mask[c], length), pred.reshape(-1), np.nan)
            ax.plot(target.reshape(-1), color="k", lw=0.8, label="target")
            ax.plot(guess, color="tab:red", lw=0.8, label="reconstruction (masked patches)")
            for p in np.flatnonzero(mask[c]):
                ax.axvspan(p * length, (p + 1) * length, color="tab:red", alpha=0.07)
            ax.set_ylabel(label, fontsize=8)
        if spectrum:
            ax = axes[c, cols - 1]
            hidden = np.flatnonzero(mask[c])
            if hidden.size:
                p = int(hidden[0])
                ax.plot(out["target_spectrum"][0, c, p].float().cpu().numpy(), color="k", lw=0.8)
                ax.plot(
                    out["pred_spectrum"][0, c, p].float().cpu().numpy(), color="tab:red", lw=0.8
                )
                ax.set_title(f"{label}, patch {p}: log amplitude", fontsize=7)
            else:
                ax.set_title(f"{label}: no masked patch", fontsize=7)
            ax.tick_params(labelsize=7)
            if c == rows - 1:
                ax.set_xlabel("frequency bin (or band)", fontsize=7)
    if has_signal:
        axes[0, 0].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
