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
checkpoint's shapes do not depend on the choice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class CrissCross:
    """The masks of one padded batch, built once and shared by the decoder's layers.

    ``valid [B, C, P]`` marks real patches; ``channel_bias [B, g, C, C]`` (optional) is the
    electrode-distance bias of the spatial heads. A key that is padding is never attended;
    a row with no valid key at all (a padded channel, a padded patch) attends to every key,
    so it stays finite (its output is never scored)."""

    def __init__(self, valid: Tensor, heads: int, channel_bias: Tensor | None = None):
        b, c, p = valid.shape
        assert heads >= 2, heads
        self.shape, self.heads, self.spatial = (b, c, p), heads, heads // 2
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
        g, dh = self.spatial, q.shape[-1]
        rest = self.heads - g

        def spatial(x: Tensor) -> Tensor:  # [B, N, g, dh] -> [B*P, g, C, dh]
            return x.reshape(b, c, p, g, dh).permute(0, 2, 3, 1, 4).reshape(b * p, g, c, dh)

        def temporal(x: Tensor) -> Tensor:  # [B, N, h-g, dh] -> [B*C, h-g, P, dh]
            return x.reshape(b, c, p, rest, dh).permute(0, 1, 3, 2, 4).reshape(b * c, rest, p, dh)

        qs, ks, vs = (spatial(x[:, :, :g]) for x in (q, k, v))
        ys = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=self.channel_mask.to(q.dtype), dropout_p=dropout
        )  # [B*P, g, C, dh]
        qt, kt, vt = (temporal(x[:, :, g:]) for x in (q, k, v))
        yt = F.scaled_dot_product_attention(
            qt, kt, vt, attn_mask=self.time_mask, dropout_p=dropout
        )  # [B*C, h-g, P, dh]
        ys = ys.reshape(b, p, g, c, dh).permute(0, 3, 1, 2, 4)  # [B, C, P, g, dh]
        yt = yt.reshape(b, c, rest, p, dh).permute(0, 1, 3, 2, 4)  # [B, C, P, h-g, dh]
        return torch.cat([ys, yt], dim=3).reshape(b, c * p, self.heads, dh)
