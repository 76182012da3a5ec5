"""Packed sequences: a batch's valid tokens in one sequence, so padding costs no compute.

Shape legend: B batch, N tokens per sample (padded), Nt valid tokens of the whole batch,
L one sample's valid-token count, h heads, D width.

Why: mixed-montage batches (19, 32 and 64 channels together) and MAE batches (each sample
keeps its own visible tokens) arrive padded to the largest sample. Every pointwise layer
(norms, QKV and output projections, the FFN or MoE -- most of the FLOPs) then runs on
padding. Packed, they run on the `Nt` real tokens only; attention, the one layer that needs
sample boundaries, runs per group of samples with equal length L (one batched
scaled-dot-product call per distinct L: block-diagonal attention without a dense
`Nt x Nt` mask, and without FlexAttention, which CPU builds do not all compile). The packed
and padded paths give the same outputs on valid tokens (tests/test_packing.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Group:
    """Samples of one valid length L: their rows in the batch and their packed tokens."""

    rows: Tensor  # [b_L] long, sample indices
    index: Tensor  # [b_L, L] long, positions in the packed sequence
    attn_mask: Tensor | None = None  # [b_L, h, L, L] additive bias (spatial), or None


@dataclass
class Packing:
    """Where every valid token of a `[B, N]` batch sits in the packed `[Nt]` sequence."""

    flat: Tensor  # [Nt] long: index into the flattened `[B * N]` batch, sample-major
    groups: list[Group]
    batch: int  # B
    length: int  # N

    @property
    def tokens(self) -> int:
        return int(self.flat.numel())

    def pack(self, x: Tensor) -> Tensor:
        """`[B, N, ...]` -> `[Nt, ...]`."""
        return x.reshape(self.batch * self.length, *x.shape[2:])[self.flat]

    def unpack(self, x: Tensor, fill: float = 0.0) -> Tensor:
        """`[Nt, ...]` -> `[B, N, ...]`, ``fill`` where a sample had no token."""
        out = x.new_full((self.batch * self.length, *x.shape[1:]), fill)
        out[self.flat] = x
        return out.view(self.batch, self.length, *x.shape[1:])


def make_packing(valid: Tensor, bias: Callable[[Tensor, Tensor], Tensor] | None = None) -> Packing:
    """Valid `[B, N]` bool -> :class:`Packing`. ``bias(rows [b_L], index_in_batch [b_L, L])``
    gives a group's additive attention bias `[b_L, h, L, L]` (e.g. electrode distance);
    it is built once per forward and shared by every block."""
    b, n = valid.shape
    flat = valid.reshape(-1).nonzero().squeeze(1)  # [Nt], sample-major
    lengths = valid.sum(1)  # [B]
    offsets = torch.cumsum(lengths, 0) - lengths  # [B] start of each sample in the packed seq
    order = torch.arange(n, device=valid.device)
    groups = []
    for length in torch.unique(lengths).tolist():
        if length == 0:
            continue
        rows = (lengths == length).nonzero().squeeze(1)  # [b_L]
        index = offsets[rows, None] + order[None, :length]  # [b_L, L]
        group = Group(rows, index)
        if bias is not None:
            in_batch = flat[index] - rows[:, None] * n  # [b_L, L] token index within its sample
            group.attn_mask = bias(rows, in_batch)
        groups.append(group)
    return Packing(flat, groups, b, n)


def gathered_bias(
    bias: Callable[[Tensor, Tensor], Tensor], tok_pos: Tensor, tok_known: Tensor, dtype
) -> Callable[[Tensor, Tensor], Tensor]:
    """A pairwise bias over token positions (``bias(pos [b, L, 3], known [b, L])`` -> `[b, h,
    L, L]`, e.g. electrode distance) as :func:`make_packing` asks for it: per group of rows,
    from the `[B, N, 3]` / `[B, N]` token positions of the padded batch."""

    def group_bias(rows: Tensor, idx: Tensor) -> Tensor:  # [b_L, L] -> [b_L, h, L, L]
        pos = tok_pos[rows].gather(1, idx[..., None].expand(*idx.shape, 3))
        return bias(pos, tok_known[rows].gather(1, idx)).to(dtype)

    return group_bias


def packed_attention(q: Tensor, k: Tensor, v: Tensor, packing: Packing, dropout: float) -> Tensor:
    """q, k, v `[Nt, h, D/h]` -> `[Nt, h, D/h]`: each sample attends to its own tokens only."""
    out = torch.empty_like(q)
    for g in packing.groups:
        qg, kg, vg = (t[g.index].transpose(1, 2) for t in (q, k, v))  # [b_L, h, L, D/h]
        y = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.attn_mask, dropout_p=dropout)
        out[g.index.reshape(-1)] = y.transpose(1, 2).reshape(-1, *q.shape[1:]).to(out.dtype)
    return out
