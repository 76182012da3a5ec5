"""Learned queries attending to EEG tokens: how every head reads a variable montage.

Pooling all tokens into one mean first throws away which channel and patch carried what --
and EEG meaning is largely *where* (left vs right motor cortex, occipital vs frontal) -- while
a flattening linear map (DreamDiffusion's) fixes the token count, which varies here with the
montage and window and arrives padded. A Perceiver-style resampler does neither: S learned
queries cross-attend to the valid tokens and return S vectors, whatever N is.

One module for every head (the image head's UNet context, the retrieval head's attention
pooling, the text head's LM prefix): they differ only in width, query count, depth and
whether the pooled tokens join the queries (``pooled=True``, see below).

``pooled=True`` adds the mean of the valid tokens, standardised per feature over the batch
(BatchNorm), to every query before the blocks and to every output after them. Pooled encoder
tokens are nearly the same vector for every window (pairwise cosine 0.998 on the synthetic
corpus, the window-specific part ~4% of the norm); a per-sample LayerNorm keeps that common
part, while standardising over the batch leaves what differs between windows -- without it
the text head's prefix hardly changes with the EEG and greedy decoding writes one caption
for every held-out window (finetune/heads/text.py gives the measurements).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pretrain.encoder import Encoder


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


def attention_heads(dim: int) -> int:
    """The most attention heads (of 8, 4, 2, 1) that divide ``dim``."""
    return next(h for h in (8, 4, 2, 1) if dim % h == 0)


def flat_tokens(tokens: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """tokens [B, N, D] or [B, C, P, D] + valid (or None: all valid) -> [B, N, D], [B, N]."""
    b = tokens.shape[0]
    tokens = tokens.reshape(b, -1, tokens.shape[-1])
    if valid is None:
        valid = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    return tokens, valid.reshape(b, -1).bool()


class TokenResampler(nn.Module):
    """EEG tokens `[B, N, D]` (or `[B, C, P, D]`) + valid `[B, N]` -> `[B, S, Do]`."""

    def __init__(
        self,
        encoder_dim: int,
        out_dim: int,
        n_queries: int,
        depth: int,
        heads: int | None = None,
        pooled: bool = False,
    ):
        super().__init__()
        heads = heads or attention_heads(out_dim)
        if out_dim % heads:
            raise ValueError(f"{heads} attention heads must divide the output width {out_dim}")
        if n_queries < 1 or depth < 1:
            raise ValueError(f"need n_queries >= 1 and depth >= 1, got {n_queries}, {depth}")
        self.inp = nn.Sequential(nn.LayerNorm(encoder_dim), nn.Linear(encoder_dim, out_dim))
        self.mem_norm = nn.LayerNorm(out_dim)
        self.queries = nn.Parameter(torch.randn(n_queries, out_dim) * 0.02)
        self.blocks = nn.ModuleList(ResamplerBlock(out_dim, heads) for _ in range(depth))
        self.out_norm = nn.LayerNorm(out_dim)
        self.pooled = None
        if pooled:  # BatchNorm: what differs between windows (module docstring)
            self.pooled = nn.Sequential(
                nn.BatchNorm1d(encoder_dim), nn.Linear(encoder_dim, out_dim)
            )

    def forward(self, tokens: Tensor, valid: Tensor | None) -> Tensor:
        tokens, valid = flat_tokens(tokens, valid)  # [B, N, D], [B, N]
        b = tokens.shape[0]
        # a row with no valid token would softmax over nothing (NaN): let it read everything
        keep = valid | ~valid.any(1, keepdim=True)
        memory = self.mem_norm(self.inp(tokens))  # [B, N, Do]
        x = self.queries.unsqueeze(0).expand(b, -1, -1)  # [B, S, Do]
        pooled = None
        if self.pooled is not None:
            pooled = self.pooled(Encoder.pool(tokens, valid)).unsqueeze(1)  # [B, 1, Do]
            x = x + pooled
        for block in self.blocks:
            x = block(x, memory, ~keep)
        x = self.out_norm(x)
        return x if pooled is None else x + pooled
