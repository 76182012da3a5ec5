"""Learned queries attending to EEG tokens: how every head reads a variable montage.

Pooling all tokens into one mean first throws away which channel and patch carried what --
and EEG meaning is largely *where* (left vs right motor cortex, occipital vs frontal) -- while
a flattening linear map (DreamDiffusion's) fixes the token count, which varies here with the
montage and window and arrives padded. A Perceiver-style resampler does neither: S learned
queries cross-attend to the valid tokens and return S vectors, whatever N is.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ResamplerBlock(nn.Module):
    """Pre-norm cross-attention from the queries to the EEG tokens, then an MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, queries: Tensor, memory: Tensor, pad: Tensor) -> Tensor:
        # queries [B, S, Do], memory [B, N, Do] (already normed), pad [B, N] True = ignore
        q = self.norm_q(queries)
        queries = (
            queries + self.attn(q, memory, memory, key_padding_mask=pad, need_weights=False)[0]
        )
        return queries + self.mlp(self.norm_mlp(queries))


class TokenResampler(nn.Module):
    """EEG tokens `[B, N, D]` (or `[B, C, P, D]`) + valid `[B, N]` -> `[B, S, Do]`."""

    def __init__(self, encoder_dim: int, out_dim: int, n_queries: int, depth: int, heads: int):
        super().__init__()
        if out_dim % heads:
            raise ValueError(f"{heads} attention heads must divide the output width {out_dim}")
        self.inp = nn.Sequential(nn.LayerNorm(encoder_dim), nn.Linear(encoder_dim, out_dim))
        self.mem_norm = nn.LayerNorm(out_dim)
        self.queries = nn.Parameter(torch.randn(n_queries, out_dim) * 0.02)
        self.blocks = nn.ModuleList(ResamplerBlock(out_dim, heads) for _ in range(depth))
        self.out_norm = nn.LayerNorm(out_dim)

    def forward(self, tokens: Tensor, valid: Tensor | None) -> Tensor:
        b = tokens.shape[0]
        tokens = tokens.reshape(b, -1, tokens.shape[-1])  # [B, N, D]
        if valid is None:
            valid = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        valid = valid.reshape(b, -1)
        # a row with no valid token would softmax over nothing (NaN): let it read everything
        keep = valid | ~valid.any(1, keepdim=True)
        memory = self.mem_norm(self.inp(tokens))  # [B, N, Do]
        x = self.queries.unsqueeze(0).expand(b, -1, -1)  # [B, S, Do]
        for block in self.blocks:
            x = block(x, memory, ~keep)
        return self.out_norm(x)
