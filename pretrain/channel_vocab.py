"""Channel names -> embedding ids, and the template positions behind them.

The vocabulary (sorted 10-05 names, id 0 = unknown) is saved with the weights, so a newer MNE
cannot renumber a checkpoint; names are canonicalised as the data plane does.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

UNKNOWN_CHANNEL = "<unk>"


class ChannelVocab:
    """Channel name -> embedding id; id 0 is every name outside the vocabulary."""

    def __init__(self, names: Sequence[str]):
        names = tuple(names)
        if not names or names[0] != UNKNOWN_CHANNEL or len(set(names)) != len(names):
            raise ValueError(f"a vocabulary starts with {UNKNOWN_CHANNEL!r} and has no repeats")
        self.names = names
        self._index = {name: i for i, name in enumerate(names) if i > 0}
        self._cache: dict[str, int] = {}
        self._table: tuple[Tensor, Tensor] | None = None

    @classmethod
    @functools.cache
    def standard(cls) -> ChannelVocab:
        """Sorted 10-05 names of ``shards.channels.standard_positions()``: deterministic."""
        from shards.channels import standard_positions

        return cls((UNKNOWN_CHANNEL, *sorted(standard_positions())))

    def __len__(self) -> int:
        return len(self.names)

    def id(self, name: str) -> int:
        """Names are canonicalised as the data plane does ("FP1", "EEG Fp1-REF" -> Fp1, old
        "T3" -> T7), so a raw spelling reaches the embedding the shards trained."""
        hit = self._cache.get(name)
        if hit is None:
            from shards.channels import canonical_name

            canon, known = canonical_name(name)
            hit = self._index.get(canon) if known else None
            if hit is None:
                hit = self._index.get(name, 0)
            self._cache[name] = hit
        return hit

    def ids(self, ch_names: Sequence[Sequence[str]], n_channels: int | None = None) -> Tensor:
        """`ch_names` (B lists) -> LongTensor `[B, C]`; missing trailing names get id 0."""
        width = max((len(row) for row in ch_names), default=0)
        width = width if n_channels is None else n_channels
        out = torch.zeros(len(ch_names), width, dtype=torch.long)
        for b, row in enumerate(ch_names):
            row = list(row)[:width]
            out[b, : len(row)] = torch.tensor([self.id(n) for n in row], dtype=torch.long)
        return out

    def positions(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Template 10-05 positions of ids `[...]` -> (xyz `[..., 3]` m, known `[...]`)."""
        if self._table is None:
            from shards.channels import standard_positions

            std = standard_positions()
            xyz = torch.zeros(len(self.names), 3)
            known = torch.zeros(len(self.names), dtype=torch.bool)
            for i, name in enumerate(self.names):
                if i > 0 and name in std:
                    xyz[i] = torch.as_tensor(std[name], dtype=torch.float32)
                    known[i] = True
            self._table = (xyz, known)
        xyz, known = self._table
        ids = ids.cpu()
        return xyz[ids], known[ids]


def channel_ids(
    ch_names: Sequence[Sequence[str]],
    n_channels: int | None = None,
    vocab: ChannelVocab | None = None,
) -> Tensor:
    """``batch["ch_names"]`` -> LongTensor `[B, C]` of vocabulary ids (0 = unknown/padding)."""
    return (vocab or ChannelVocab.standard()).ids(ch_names, n_channels)
