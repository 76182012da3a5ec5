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

from pretrain.encoder_blocks import HEAD_RADIUS_M


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
        gate = self.gate(h).float().permute(0, 2, 3, 1)[..., None]  # [B, P, H, C, 1]
        # the gated heads are one linear map of the values: sum them before the matmul, which
        # then runs once instead of once per head
        weights = (gate * weights).sum(2)  # [B, P, C, C']
        values = raw.float().permute(0, 2, 1, 3)  # [B, P, C', L]
        return (weights @ values).permute(0, 2, 1, 3)  # [B, C, P, L]


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


def legendre_series(cosang: Tensor, stiffness: int = 4, n_terms: int = 50) -> Tensor:
    """Perrin et al.'s spherical-spline kernel g(cos angle), as MNE's ``_calc_g``:
    sum_n (2n + 1) / (n^m (n + 1)^m 4 pi) P_n(x), by the Legendre recurrence."""
    x = cosang.clamp(-1.0, 1.0)
    p_prev, p_cur = torch.ones_like(x), x
    out = torch.zeros_like(x)
    for n in range(1, n_terms + 1):
        out = out + (2 * n + 1) / (n**stiffness * (n + 1) ** stiffness * 4 * math.pi) * p_cur
        p_prev, p_cur = p_cur, ((2 * n + 1) * x * p_cur - n * p_prev) / (n + 1)
    return out


G_TABLE_INTERVALS = 4096
_G_TABLES: dict[tuple, Tensor] = {}


def _g_table(stiffness: int, n_terms: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    key = (stiffness, n_terms, device, dtype)
    table = _G_TABLES.get(key)
    if table is None:
        grid = torch.linspace(-1.0, 1.0, G_TABLE_INTERVALS + 1, dtype=torch.float64)
        table = legendre_series(grid.to(device), stiffness, n_terms).to(dtype)
        _G_TABLES[key] = table
    return table


def legendre_g(cosang: Tensor, stiffness: int = 4, n_terms: int = 50) -> Tensor:
    """:func:`legendre_series`, read from a table of 4097 cosines by linear interpolation.

    Why: the series is 250 elementwise passes over the `[B, C, C]` cosines of every batch --
    at 128 channels a sixth of a pretraining step -- for a kernel that depends on nothing but
    the cosine. The table is computed once per device and dtype, in float64; interpolated,
    it is within 1e-10 of the series (|g| <= 0.016; tests/test_reconstruction.py).
    """
    if torch.compiler.is_compiling():  # inductor fuses the series into one kernel
        return legendre_series(cosang, stiffness, n_terms)
    table = _g_table(stiffness, n_terms, cosang.device, cosang.dtype)
    u = (cosang.clamp(-1.0, 1.0) + 1.0) * (G_TABLE_INTERVALS / 2)
    i = u.floor().clamp(max=G_TABLE_INTERVALS - 1)
    frac = u - i
    i = i.long()
    return table[i] * (1 - frac) + table[i + 1] * frac


def sphere_directions(pos: Tensor, known: Tensor) -> Tensor:
    """Electrode positions `[B, C, 3]` -> unit vectors from a least-squares sphere fitted to
    each sample's known electrodes (as MNE centres a montage before interpolating)."""
    p = pos.double()
    w = known.double()[..., None]  # [B, C, 1]
    # |p - o|^2 = r^2  <=>  2 p.o + (r^2 - |o|^2) = |p|^2: linear in (o, k)
    a = torch.cat([2 * p, torch.ones_like(p[..., :1])], -1) * w  # [B, C, 4]
    rhs = (p * p).sum(-1, keepdim=True) * w  # [B, C, 1]
    ata = a.transpose(1, 2) @ a + 1e-9 * torch.eye(4, dtype=p.dtype, device=p.device)
    sol = torch.linalg.solve(ata, a.transpose(1, 2) @ rhs)  # [B, 4, 1]
    centred = p - sol[:, None, :3, 0]
    return centred / centred.norm(dim=-1, keepdim=True).clamp_min(1e-9)


class SplinePath(nn.Module):
    """Spherical-spline interpolation of every patch from the visible channels of the same
    time patch (MNE's equations, batched in torch), gated per token by the decoder: the
    classical answer as a starting point, which the rest of the decoder learns to correct."""

    def __init__(self, dim: int, alpha: float = 1e-5):
        super().__init__()
        self.alpha = alpha
        self.gate = nn.Linear(dim, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.ones_(self.gate.bias)

    @torch.no_grad()
    def interpolate(self, raw: Tensor, visible: Tensor, pos: Tensor, known: Tensor) -> Tensor:
        """`raw [B, C, P, L]`, `visible [B, C, P]` -> spline estimate of every channel
        `[B, C, P, L]` float32 (0 where a patch has fewer than 3 visible channels)."""
        b, c, p, length = raw.shape
        u = sphere_directions(pos, known)  # [B, C, 3]
        g = legendre_g(u @ u.transpose(1, 2))  # [B, C, C]
        vis = (visible & known[:, :, None]).permute(0, 2, 1).double()  # [B, P, C]
        enough = vis.sum(-1) >= 3  # [B, P]
        vis = vis * enough[..., None]
        eye = torch.eye(c, dtype=g.dtype, device=g.device)
        pair = vis[..., :, None] * vis[..., None, :]  # [B, P, C, C]
        lhs = torch.zeros(b, p, c + 1, c + 1, dtype=g.dtype, device=g.device)
        lhs[..., :c, :c] = (g[:, None] + self.alpha * eye) * pair + eye * (1 - vis[..., None])
        lhs[..., :c, c] = vis
        lhs[..., c, :c] = vis
        lhs[..., c, c] = 1.0 - enough.double()
        rhs = torch.zeros(b, p, c + 1, length, dtype=g.dtype, device=g.device)
        rhs[..., :c, :] = raw.permute(0, 2, 1, 3).double() * vis[..., None]
        sol = torch.linalg.solve(lhs, rhs)  # [B, P, C + 1, L]
        est = g[:, None] @ sol[..., :c, :] + sol[..., c:, :]  # [B, P, C, L]
        est = est * (enough[..., None, None] & known[:, None, :, None])
        return est.permute(0, 2, 1, 3).float()

    def forward(self, h: Tensor, raw: Tensor, visible: Tensor, pos: Tensor, known: Tensor):
        est = self.interpolate(raw.float(), visible, pos, known)
        return self.gate(h).float() * est
