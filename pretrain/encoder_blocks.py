"""The encoder's building blocks, shared with the pretraining decoder (pretrain/msm_decoder.py).

Shape legend: B batch, C channels, M electrodes, P patches per channel, N tokens, Nt packed
tokens, D width, h heads.

- Attention may be biased by electrode distance (ALiBi over the scalp: a per-head slope
  times the 3D distance between two tokens' channels), so a token reads its neighbours first,
  as volume conduction makes them the most informative (0.92 nearest-neighbour correlation on
  EEGMMIDB).
- A block runs padded (`[B, N, D]` with a key mask or an additive bias) or packed (`[Nt, D]`,
  only valid tokens, pretrain/packing.py): the second costs what the valid tokens cost.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.criss_cross import CrissCross, PackedCrissCross
from pretrain.encoder_config import EncoderConfig
from pretrain.moe import MoE, SwiGLU
from pretrain.packing import Packing, packed_attention

HEAD_RADIUS_M = 0.1  # positions are divided by this before the Fourier features


def spatial_slopes(heads: int, enabled: bool, learned: bool, owner: nn.Module) -> Tensor | None:
    """softplus^-1 of per-head slopes from 0.25 to 4 per head radius (local .. global heads),
    as a parameter of ``owner`` or a buffer (same state-dict key either way)."""
    if not enabled:
        return None
    slopes = torch.logspace(math.log10(0.25), math.log10(4.0), heads)
    raw = torch.log(torch.expm1(slopes))
    if learned:
        return nn.Parameter(raw)
    owner.register_buffer("spatial_slope", raw)
    return owner.spatial_slope


def distance_bias(raw_slopes: Tensor, pos: Tensor, known: Tensor) -> Tensor:
    """Positions `[B, M, 3]` (m) and `known [B, M]` -> attention-logit bias `[B, h, M, M]`:
    -softplus(raw_slopes)_h x distance in head radii; 0 for a pair with an unknown position.
    The encoder's and the decoder's spatial bias (over tokens or over channels)."""
    dist = torch.cdist(pos.float(), pos.float()) / HEAD_RADIUS_M  # [B, M, M]
    dist = dist * (known[:, :, None] & known[:, None, :])
    slopes = F.softplus(raw_slopes.float())  # [h]
    return -slopes[None, :, None, None] * dist[:, None]


def sinusoid(n: int, dim: int, device: torch.device | str | None = None) -> Tensor:
    """sin/cos features of positions 0..n-1 -> `[n, dim]` (transformer style)."""
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=device) / max(half, 1))
    angle = torch.arange(n, device=device, dtype=torch.float32)[:, None] * freq[None]
    out = torch.cat([angle.sin(), angle.cos()], dim=-1)
    return F.pad(out, (0, dim - 2 * half))


class PositionEmbedding(nn.Module):
    """Electrode xyz -> `[.., D]`, exactly 0 where the position is unknown."""

    def __init__(self, dim: int, n_freqs: int):
        super().__init__()
        self.n_freqs = n_freqs
        self.mlp = nn.Sequential(nn.Linear(3 + 6 * n_freqs, dim), nn.GELU(), nn.Linear(dim, dim))
        # Start as small as the name embedding, so neither drowns the signal at init.
        nn.init.trunc_normal_(self.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, pos: Tensor, known: Tensor) -> Tensor:
        u = pos.float() / HEAD_RADIUS_M  # [B, C, 3], about [-1, 1]
        # 0.5..8 cycles per head radius: from hemisphere down to ~1 cm, the 10-05 spacing.
        freqs = torch.logspace(math.log10(0.5), math.log10(8.0), self.n_freqs, device=u.device)
        angle = (u[..., None] * (2 * math.pi) * freqs).flatten(-2)  # [B, C, 3F]
        feats = torch.cat([u, angle.sin(), angle.cos()], dim=-1)
        out = self.mlp(feats.to(self.mlp[0].weight.dtype))
        return out * known[..., None].to(out.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool, dropout: float, out_std: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.q_norm = nn.LayerNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim) if qk_norm else nn.Identity()
        nn.init.trunc_normal_(self.qkv.weight, std=0.02)
        nn.init.trunc_normal_(self.out.weight, std=out_std)

    def forward(
        self, x: Tensor, attn_mask: Tensor | Packing | CrissCross | PackedCrissCross
    ) -> Tensor:
        """`x [B, N, D]`, `attn_mask [B, 1, 1, N]` (True = key may be attended) -> `[B, N, D]`;
        or packed: `x [Nt, D]` with its :class:`Packing` (or the decoder's
        :class:`PackedCrissCross`) -> `[Nt, D]`; or `x [B, N, D]` with a :class:`CrissCross`
        (the decoder's channel/time heads, padded) -> `[B, N, D]`."""
        if isinstance(attn_mask, (Packing, PackedCrissCross)):
            nt, d = x.shape
            q, k, v = self.qkv(x).view(nt, 3, self.heads, d // self.heads).unbind(1)
            q, k = self.q_norm(q), self.k_norm(k)  # [Nt, h, D/h]
            dropout = self.dropout if self.training else 0.0
            if isinstance(attn_mask, PackedCrissCross):
                y = attn_mask.attend(q, k, v, dropout)
            else:
                y = packed_attention(q, k, v, attn_mask, dropout)
            return self.out(y.reshape(nt, d))
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)  # [B, N, h, D/h]
        if isinstance(attn_mask, CrissCross):
            y = attn_mask.attend(q, k, v, self.dropout if self.training else 0.0)
            return self.out(y.reshape(b, n, d))
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
        )  # [B, h, N, D/h]
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block; the FFN is a :class:`MoE` or a dense :class:`SwiGLU`."""

    def __init__(
        self, dim: int, heads: int, ffn: nn.Module, qk_norm: bool, dropout: float, out_std: float
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, qk_norm, dropout, out_std)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = ffn
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | Packing | CrissCross | PackedCrissCross,
        valid: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """-> (x `[B, N, D]` or packed `[Nt, D]`, aux loss `[]`, expert counts `[E]` or `[0]`);
        ``valid`` is None when x is packed (every token real)."""
        x = x + self.drop(self.attn(self.norm1(x), attn_mask))
        h = self.norm2(x)
        if isinstance(self.ffn, MoE):
            y, aux, counts = self.ffn(h, valid)
        else:
            y = self.ffn(h)
            aux = x.new_zeros((), dtype=torch.float32)
            counts = torch.zeros(0, dtype=torch.int64, device=x.device)
        return x + self.drop(y), aux, counts


def make_ffn(config: EncoderConfig, dim: int, hidden: int, out_std: float) -> nn.Module:
    if not config.is_moe:
        ffn = SwiGLU(dim, hidden, out_std)
    else:
        ffn = MoE(
            dim,
            hidden,
            config.n_experts,
            config.top_k,
            n_shared=config.n_shared_experts,
            gate=config.gate,
            bias_update_rate=config.router_bias_rate,
            aux_loss_coef=config.aux_loss_coef,
            backend=config.expert_backend,
            out_std=out_std,
        )
    return ffn
