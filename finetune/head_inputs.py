"""What the heads read of the encoder: its tokens as they are, or one token per 10-20 site.

``tokens`` hands every head the encoder's C x P tokens (channel-major, padded per montage) and
leaves where on the scalp to the heads' learned queries. On the demo corpus that did not work:
the retrieval head on frozen tokens did not fit even its own training windows (24-way top-1
0.045, chance 0.042; bench/RESULTS.md, Demo, 2026-12-06), while the same tokens averaged per
10-20 site -- the probe's ``regions`` pooling -- and read by logistic regression named the
class of held-out stimuli at 0.565 (chance 0.25).

``regions`` hands the heads R + 1 = 20 tokens instead: for each 10-20 site the mean of the
time-pooled tokens of the channels nearest to it (the probe's assignment,
`pretrain.features.region_tokens`), then the mean of every channel; a site no channel is near
is marked invalid. Twenty tokens whatever the montage: a 19-channel cap and a 64-channel one
give the heads the same places, and the heads' cost no longer grows with channels x patches.
"""

from __future__ import annotations

from torch import Tensor

from pretrain.encoder import EncoderOutput
from pretrain.features import region_index, region_tokens

HEAD_INPUTS = ("tokens", "regions")


def head_inputs(enc: EncoderOutput, mode: str) -> tuple[Tensor, Tensor]:
    """The encoder's output -> (tokens `[B, N, D]`, valid `[B, N]`) for the heads."""
    if mode == "tokens":
        return enc.tokens, enc.valid
    if mode != "regions":
        raise ValueError(f"encoder.heads_read must be one of {HEAD_INPUTS}, got {mode!r}")
    if enc.ch_pos is None or enc.pos_known is None:
        raise ValueError("heads_read=regions needs channel positions in the encoder output")
    grid = enc.grid()  # [B, C, P, D]
    valid = enc.valid.view(grid.shape[:3])  # [B, C, P]
    return region_tokens(grid, valid, region_index(enc.ch_pos, enc.pos_known))
