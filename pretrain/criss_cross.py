"""Criss-cross attention for the pretraining decoder: half the heads across channels, half
across time.

Shape legend: B batch, C channels, P patches per channel, N = C*P tokens (channel-major),
h heads, g spatial heads (h // 2), dh head width.

Why: the decoder sees every patch, hidden ones included, so full attention costs N^2 per
window -- at 128 channels x 4 patches a decoder layer's attention was 38 ms of a 240 ms step
(fp32, 2 cores), and it grows with the square of channels x seconds. CBraMod's criss-cross
attention keeps the two axes EEG is organised by: a spatial head reads the other channels
of the same patch (with the electrode-distance bias), a temporal head the other patches of
the same channel, for N*(C + P) pairs instead of N^2 (8 ms at 128 x 4). Two decoder layers
reach every token (channel, then time). The parameters are the full attention's, so a
checkpoint's shapes do not depend on the choice. With packing on (the encoder's setting), a
batch of mixed montages runs its valid tokens only (:class:`PackedCrissCross`), as the full
decoder does; :class:`CrissCross` is the padded form (one montage, or packing off).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pretrain.packing import Packing


class CrissCross:
    """The masks of one padded batch, built once and shared by the decoder's layers.

    ``valid [B, C, P]`` marks real patches; ``channel_bias [B, g, C, C]`` (optional) is the
    electrode-distance bias of the spatial heads. A key that is padding is never attended;
    a row with no valid key at all (a padded channel, a padded patch) attends to every key,
    so it stays finite (its output is never scored)."""

    def __init__(self, valid: Tensor, heads: int, channel_bias: Tensor | None = None):
        b, c, p = valid.shape
        assert heads >= 2, heads
        self.shape, self.spatial = (b, c, p), heads // 2
        g = self.spatial
        keys_c = valid.transpose(1, 2)  # [B, P, C]: channels present at each patch
        keys_c = keys_c | ~keys_c.any(-1, keepdim=True)
        mask = torch.where(keys_c, 0.0, float("-inf"))[:, :, None, None, :]  # [B, P, 1, 1, C]
        if channel_bias is not None:
            mask = mask + channel_bias[:, None, :g].float()  # [B, P, g, C, C]
        self.channel_mask = mask.expand(b, p, g, c, c).reshape(b * p, g, c, c)
        keys_t = valid | ~valid.any(-1, keepdim=True)  # [B, C, P]
        self.time_mask = keys_t.reshape(b * c, 1, 1, p)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, dropout: float) -> Tensor:
        """`q, k, v [B, N, h, dh]` -> `[B, N, h, dh]`."""
        b, c, p = self.shape
        grid = [x.reshape(b, c, p, *x.shape[2:]) for x in (q, k, v)]  # [B, C, P, h, dh]
        y = _criss_cross(*grid, self.spatial, self.channel_mask, self.time_mask, dropout)
        return y.reshape(b, c * p, *q.shape[2:])


class PackedCrissCross:
    """The same heads over a packed batch (valid tokens only, pretrain/packing.py): no padding
    is computed, in attention or anywhere else in the decoder's blocks.

    A window's valid tokens are its present channels x its whole patches, so in the packed
    sequence (sample-major, channel-major) they form one `[C_i, P_i]` grid; windows of equal
    grid shape are attended together, with no mask but the electrode-distance bias gathered
    to their channels. ``valid [B, C, P]`` must be such a product (:meth:`fits`)."""

    def __init__(self, valid: Tensor, heads: int, channel_bias: Tensor | None = None):
        b, c, p = valid.shape
        assert heads >= 2 and self.fits(valid), heads
        self.spatial = g = heads // 2
        # where each valid token sits when packed; the heads group windows by grid shape below
        self.packing = Packing(valid.reshape(-1).nonzero().squeeze(1), [], b, c * p)
        chans, patches = valid.any(2), valid.any(1)  # [B, C], [B, P]
        n_c, n_p = chans.sum(1), patches.sum(1)  # [B]
        lengths = n_c * n_p
        offsets = torch.cumsum(lengths, 0) - lengths  # [B] start of each window when packed
        self.groups: list[tuple[Tensor, int, int, Tensor | None]] = []
        for gc, gp in sorted(set(zip(n_c.tolist(), n_p.tolist(), strict=True))):
            if gc * gp == 0:
                continue
            rows = ((n_c == gc) & (n_p == gp)).nonzero().squeeze(1)  # [b_g]
            index = offsets[rows, None] + torch.arange(gc * gp, device=valid.device)
            mask = None
            if channel_bias is not None:
                ch = chans[rows].nonzero()[:, 1].view(len(rows), gc)  # [b_g, C_g] present
                bias = channel_bias[rows, :g].float()  # [b_g, g, C, C]
                bias = bias.gather(2, ch[:, None, :, None].expand(-1, g, -1, c))
                bias = bias.gather(3, ch[:, None, None, :].expand(-1, g, gc, -1))
                mask = bias[:, None].expand(-1, gp, -1, -1, -1).reshape(-1, g, gc, gc)
            self.groups.append((index.reshape(-1), gc, gp, mask))

    @staticmethod
    def fits(valid: Tensor) -> bool:
        """Whether every window's valid tokens are its present channels x its valid patches."""
        return bool(torch.equal(valid, valid.any(2, keepdim=True) & valid.any(1, keepdim=True)))

    def pack(self, x: Tensor) -> Tensor:
        return self.packing.pack(x)  # [B, N, D] -> [Nt, D]

    def unpack(self, x: Tensor) -> Tensor:
        return self.packing.unpack(x)  # [Nt, D] -> [B, N, D], zeros where padding

    def attend(self, q: Tensor, k: Tensor, v: Tensor, dropout: float) -> Tensor:
        """`q, k, v [Nt, h, dh]` -> `[Nt, h, dh]`."""
        out = torch.empty_like(q)
        for index, c, p, mask in self.groups:
            grid = [x[index].view(-1, c, p, *x.shape[1:]) for x in (q, k, v)]  # [b_g, C, P, h, dh]
            y = _criss_cross(*grid, self.spatial, mask, None, dropout)
            out[index] = y.reshape(-1, *q.shape[1:]).to(out.dtype)
        return out


def _criss_cross(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: int,
    channel_mask: Tensor | None,
    time_mask: Tensor | None,
    dropout: float,
) -> Tensor:
    """`q, k, v [B, C, P, h, dh]` -> `[B, C, P, h, dh]`: heads [:g] across the channels of each
    patch (``channel_mask [B*P, g, C, C]``), the rest across the patches of each channel
    (``time_mask [B*C, 1, 1, P]``)."""
    b, c, p, h, dh = q.shape
    rest = h - g

    def spatial(x: Tensor) -> Tensor:  # [B, C, P, g, dh] -> [B*P, g, C, dh]
        return x.permute(0, 2, 3, 1, 4).reshape(b * p, g, c, dh)

    def temporal(x: Tensor) -> Tensor:  # [B, C, P, h-g, dh] -> [B*C, h-g, P, dh]
        return x.permute(0, 1, 3, 2, 4).reshape(b * c, rest, p, dh)

    qs, ks, vs = (spatial(x[..., :g, :]) for x in (q, k, v))
    mask = None if channel_mask is None else channel_mask.to(q.dtype)
    ys = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, dropout_p=dropout)
    qt, kt, vt = (temporal(x[..., g:, :]) for x in (q, k, v))
    yt = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=time_mask, dropout_p=dropout)
    ys = ys.reshape(b, p, g, c, dh).permute(0, 3, 1, 2, 4)  # [B, C, P, g, dh]
    yt = yt.reshape(b, c, rest, p, dh).permute(0, 1, 3, 2, 4)  # [B, C, P, h-g, dh]
    return torch.cat([ys, yt], dim=3)
