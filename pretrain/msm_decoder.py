"""The pretraining decoder: encoder tokens (hidden ones as a mask token) -> every patch.

Shape legend: B batch, C channels, P patches per channel, N = C*P tokens, Nt packed tokens,
D encoder width, d decoder width.

Narrow and shallow (MAE's asymmetric design): it is discarded after pretraining. It shares
the encoder's blocks, distance-biased attention and packing, so a mixed-montage batch costs
what its valid tokens cost here too.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn

from pretrain.criss_cross import CrissCross, PackedCrissCross
from pretrain.encoder_blocks import Block, distance_bias, spatial_slopes
from pretrain.moe import SwiGLU
from pretrain.packing import gathered_bias, make_packing


class Decoder(nn.Module):
    """Encoder tokens `[B, N, D]` -> predictions of every patch `[B, N, out_dim]` (dense,
    narrow)."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        heads: int,
        patch_len: int,
        spatial: bool = False,
        learn_slopes: bool = True,
        packing: bool = False,
        attention: str = "full",
    ):
        super().__init__()
        self.packing = packing  # as the encoder's: run valid tokens only (pretrain/packing.py)
        # "criss_cross": half the heads across channels, half across time (pretrain/criss_cross.py)
        self.criss_cross = attention == "criss_cross"
        self.heads = heads
        out_std = 0.02 / math.sqrt(2 * max(depth, 1))
        self.spatial_slope = spatial_slopes(heads, spatial, learn_slopes, self)  # as the encoder's
        self.proj = nn.Linear(in_dim, dim)
        self.blocks = nn.ModuleList(
            Block(dim, heads, SwiGLU(dim, 2 * dim, out_std), True, 0.0, out_std)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, patch_len)
        for lin in (self.proj, self.head):
            nn.init.trunc_normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def forward(
        self,
        tokens: Tensor,
        valid: Tensor,
        pos: Tensor | None = None,
        known: Tensor | None = None,
        return_hidden: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """`tokens [B, N, in_dim]` in channel-major order (N = C x P), `valid [B, N]`
        (channel positions `pos [B, C, 3]`, `known [B, C]` for the spatial bias) ->
        `[B, N, out]` (and the hidden states `[B, N, d]`)."""
        x = self.proj(tokens)
        packing, block_valid = None, valid
        if self.criss_cross:
            assert pos is not None, "criss-cross attention needs the channel positions"
            grid_valid = valid.view(valid.shape[0], pos.shape[1], -1)  # [B, C, P]
            bias = None
            if self.spatial_slope is not None:
                bias = distance_bias(self.spatial_slope, pos, known)  # [B, h, C, C]
            if (
                self.packing
                and not x.is_meta
                and not bool(valid.all())
                and PackedCrissCross.fits(grid_valid)
            ):  # a mixed-montage batch: each window's own grid, no padding computed
                packing = PackedCrissCross(grid_valid, self.heads, bias)
                x, attn_mask, block_valid = packing.pack(x), packing, None  # x [Nt, d]
            else:
                attn_mask = CrissCross(grid_valid, self.heads, bias)
        elif self.packing and not x.is_meta and not bool(valid.all()):
            # a mixed-montage batch is padded to its widest montage (up to half the decoder's
            # tokens): run the valid tokens only, as the encoder does
            bias = None
            if self.spatial_slope is not None and pos is not None:
                p = valid.shape[1] // pos.shape[1]
                tok_pos = pos.repeat_interleave(p, 1)  # [B, N, 3] channel-major, as the tokens
                tok_known = known.repeat_interleave(p, 1)  # [B, N]
                slope = functools.partial(distance_bias, self.spatial_slope)
                bias = gathered_bias(slope, tok_pos, tok_known, x.dtype)
            packing = make_packing(valid, bias)
            x, attn_mask, block_valid = packing.pack(x), packing, None  # x [Nt, d]
        else:
            keys = valid | ~valid.any(1, keepdim=True)
            attn_mask = keys[:, None, None, :]  # [B, 1, 1, N]
            if self.spatial_slope is not None and pos is not None:
                b, n = valid.shape
                c = pos.shape[1]
                # per channel pair, then repeated over the P x P patch pairs: the distance of
                # every token pair from a C x C table (a 128-channel window's N x N cdist and its
                # scaling were two thirds of the decoder's forward)
                bias = distance_bias(self.spatial_slope, pos, known)  # [B, h, C, C]
                h, p = bias.shape[1], n // c
                bias = bias[:, :, :, None, :, None].expand(b, h, c, p, c, p).reshape(b, h, n, n)
                if torch.compiler.is_compiling() or not bool(keys.all()):  # no host sync compiled
                    bias = bias.masked_fill(~attn_mask, float("-inf"))
                attn_mask = bias.to(x.dtype)
        for block in self.blocks:
            x = block(x, attn_mask, block_valid)[0]
        hidden = self.norm(x)
        if packing is not None:
            hidden = packing.unpack(hidden)  # [B, N, d], zeros where padding (never scored)
        out = self.head(hidden)
        return (out, hidden) if return_hidden else out
