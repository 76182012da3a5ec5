"""Step timing shared by the benchmarks: median-friendly per-step seconds on CPU or CUDA."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def timed_steps(step: Callable[[], object], steps: int, device: str) -> list[float]:
    """Seconds of each of `steps` calls of `step` (run the warm-up first). On CUDA the peak
    memory counter is reset before and every step is synchronised, so the times and
    `max_memory_allocated` are the steps' own. Per-step times, because the median resists
    the noise of a shared CPU."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times
