"""Decoder paths that carry *visible raw patches* to the prediction of hidden ones.

Shape legend: B batch, C channels, P patches per channel, L samples per patch, d decoder
width, H mixing heads, k key width.

Why: squeezing every waveform through the token width and back loses the detail that a
hidden patch's neighbours already show. Volume conduction makes a channel close to a
weighted sum of its neighbours at the same instant (spherical splines rely on exactly that),
and slow rhythms carry a channel's waveform a little way across a gap in time. So the
decoder predicts a hidden patch as its own output plus

- ``SpatialMix``: attention over the *visible* channels of the same time patch, whose values
  are their raw (normalised) samples: a learned, context-dependent interpolation, with an
  ALiBi-style distance bias so it starts out as a smooth nearest-channels average;
- ``TimeMix``: learned linear maps (a Wiener-style interpolator) of the same channel's
  previous and next patches, where visible -- the only help when every channel is hidden.

Both are gated per token by the decoder, which knows what is hidden around it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.encoder import HEAD_RADIUS_M


def _inverse_softplus(x: Tensor) -> Tensor:
    return torch.log(torch.expm1(x))


class SpatialMix(nn.Module):
    def __init__(self, dim: int, heads: int, key_dim: int = 16):
        super().__init__()
        self.heads, self.key_dim = heads, key_dim
        self.q = nn.Linear(dim, heads * key_dim)
        self.k = nn.Linear(dim, heads * key_dim)
        self.gate = nn.Linear(dim, heads)
        # distance slopes per head radius: from broad (0.5) to near-nearest-neighbour (16)
        slopes = torch.logspace(math.log10(0.5), math.log10(16.0), heads)
        self.slope = nn.Parameter(_inverse_softplus(slopes))
        for lin in (self.q, self.k):
            nn.init.trunc_normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, 1.0 / heads)  # start: the mean of the heads' mixes

    def forward(
        self, h: Tensor, raw: Tensor, visible: Tensor, pos: Tensor, known: Tensor
    ) -> Tensor:
        """`h [B, C, P, d]`, `raw [B, C, P, L]`, `visible [B, C, P]`, `pos [B, C, 3]`,
        `known [B, C]` -> `[B, C, P, L]` float32 (0 where no channel is visible)."""
        b, c, p, _ = h.shape
        hh, kd = self.heads, self.key_dim
        q = self.q(h).float().view(b, c, p, hh, kd).permute(0, 2, 3, 1, 4)  # [B, P, H, C, k]
        k = self.k(h).float().view(b, c, p, hh, kd).permute(0, 2, 3, 1, 4)
        logits = q @ k.transpose(-1, -2) / math.sqrt(kd)  # [B, P, H, C, C']
        both = known[:, :, None] & known[:, None, :]
        dist = torch.cdist(pos.float(), pos.float()) / HEAD_RADIUS_M * both  # [B, C, C']
        slopes = F.softplus(self.slope.float())
        logits = logits - slopes[None, None, :, None, None] * dist[:, None, None]
        eye = torch.eye(c, dtype=torch.bool, device=h.device)
        key_ok = visible.permute(0, 2, 1)[:, :, None, None, :] & ~eye  # [B, P, 1, C, C']
        has_key = key_ok.any(-1, keepdim=True)
        logits = logits.masked_fill(~key_ok, float("-inf"))
        logits = torch.where(has_key, logits, torch.zeros_like(logits))
        weights = torch.softmax(logits, -1) * has_key  # [B, P, H, C, C']
        values = raw.float().permute(0, 2, 1, 3)[:, :, None]  # [B, P, 1, C', L]
        mix = weights @ values  # [B, P, H, C, L]
        gate = self.gate(h).float().permute(0, 2, 3, 1)[..., None]  # [B, P, H, C, 1]
        return (gate * mix).sum(2).permute(0, 2, 1, 3)  # [B, C, P, L]


class TimeMix(nn.Module):
    def __init__(self, dim: int, patch_len: int):
        super().__init__()
        self.prev = nn.Linear(patch_len, patch_len, bias=False)
        self.next = nn.Linear(patch_len, patch_len, bias=False)
        self.gate = nn.Linear(dim, 2)
        for lin in (self.prev, self.next):
            nn.init.zeros_(lin.weight)  # start at "no help": the gradient finds the filter
        nn.init.zeros_(self.gate.weight)
        nn.init.ones_(self.gate.bias)

    def forward(self, h: Tensor, raw: Tensor, visible: Tensor) -> Tensor:
        """`h [B, C, P, d]`, `raw [B, C, P, L]`, `visible [B, C, P]` -> `[B, C, P, L]`."""
        x = raw * visible[..., None].to(raw.dtype)
        before = F.pad(x, (0, 0, 1, 0))[:, :, :-1]  # at p: patch p - 1 (0 before the start)
        after = F.pad(x, (0, 0, 0, 1))[:, :, 1:]  # at p: patch p + 1
        w = self.prev.weight.dtype
        gate = self.gate(h).float()  # [B, C, P, 2]
        out = gate[..., :1] * self.prev(before.to(w)).float()
        return out + gate[..., 1:] * self.next(after.to(w)).float()
