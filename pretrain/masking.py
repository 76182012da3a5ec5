"""Which patches pretraining hides: at random, whole time blocks on every channel, or a mix.

Shape legend: B batch, C channels, P patches per channel, M items per row.

Random masks alone can be solved by spatial interpolation (neighbouring channels correlate
0.92 on EEGMMIDB); time blocks leave no spatial help and force temporal prediction. Masks
come from an optional ``torch.Generator``: the same seed gives the same masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from pretrain.msm_config import MASK_MODES


def _n_to_mask(n: Tensor, ratio: float) -> Tensor:
    """How many of `n [B]` items to hide: round(ratio * n), at least 1 and at most n - 1
    (something to predict, something to predict from); 0 when n < 2."""
    k = torch.round(n.float() * ratio).long()
    k = torch.minimum(torch.clamp(k, min=1), n - 1)
    return torch.where(n >= 2, k, torch.zeros_like(k))


def _rand(shape: Sequence[int], generator: torch.Generator | None, device) -> Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.rand(tuple(shape), generator=generator, device=gen_device).to(device)


def _choose(ok: Tensor, ratio: float, generator: torch.Generator | None) -> Tensor:
    """Hide a random ``ratio`` of the True entries of each row of `ok [B, M]` -> `[B, M]`."""
    noise = _rand(ok.shape, generator, ok.device).masked_fill(~ok, 2.0)  # invalid sort last
    rank = noise.argsort(1).argsort(1)  # rank of each entry within its row
    return (rank < _n_to_mask(ok.sum(1), ratio)[:, None]) & ok


def random_mask(valid: Tensor, ratio: float, generator: torch.Generator | None = None) -> Tensor:
    """Hide ``ratio`` of each sample's valid patches, uniformly: `valid [B, C, P]` -> same."""
    b = valid.shape[0]
    return _choose(valid.reshape(b, -1), ratio, generator).view(valid.shape)


def time_block_mask(
    valid: Tensor, ratio: float, block: int = 1, generator: torch.Generator | None = None
) -> Tensor:
    """Hide all channels over ``ratio`` of the time blocks (``block`` patches each, with a
    random phase per sample): `valid [B, C, P]` -> same."""
    b, _, p = valid.shape
    dev = valid.device
    time_ok = valid.any(1)  # [B, P]
    offset = (_rand((b,), generator, dev) * block).long().clamp_max(block - 1)  # [B]
    block_id = (torch.arange(p, device=dev)[None] + offset[:, None]) // block  # [B, P]
    n_blocks = (p + block - 1) // block + 1
    block_ok = torch.zeros(b, n_blocks, dtype=torch.long, device=dev)
    block_ok = block_ok.scatter_add(1, block_id, time_ok.long()) > 0  # [B, n_blocks]
    hidden = _choose(block_ok, ratio, generator).gather(1, block_id)  # [B, P]
    return hidden[:, None, :] & valid


def make_mask(
    valid: Tensor,
    ratio: float,
    mode: str = "random",
    block: int = 1,
    generator: torch.Generator | None = None,
    block_ratio: float | None = None,
    block_random_ratio: float = 0.0,
) -> Tensor:
    """`valid [B, C, P]` -> mask `[B, C, P]` (True = hidden; always a subset of valid).
    ``block_ratio`` (default ``ratio``) is the fraction of time blocks hidden; a time-block
    sample also hides ``block_random_ratio`` of its other valid patches at random."""
    block_ratio = ratio if block_ratio is None else block_ratio

    def blocks() -> Tensor:
        blk = time_block_mask(valid, block_ratio, block, generator)
        if block_random_ratio > 0:
            blk = blk | random_mask(valid & ~blk, block_random_ratio, generator)
        return blk

    if mode == "random":
        return random_mask(valid, ratio, generator)
    if mode == "time_block":
        return blocks()
    if mode == "mixed":
        rnd = random_mask(valid, ratio, generator)
        blk = blocks()
        coin = _rand((valid.shape[0],), generator, valid.device) < 0.5
        return torch.where(coin[:, None, None], rnd, blk)
    raise ValueError(f"mask mode must be one of {MASK_MODES}, got {mode!r}")
