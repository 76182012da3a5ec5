"""A channel-mixing masked autoencoder, as DreamDiffusion's `MAEforEEG` builds it: the reference
the speed targets of bench/pretrain.py are measured against (written here, not imported).

Shape legend: B batch, C channels (always 128: every montage is zero-padded to it), T
samples, P = T / patch tokens, D width.

One token holds *every* channel over a few samples (a Conv1d of kernel = stride = patch over
the 128-channel input), 75% of the tokens are dropped before the encoder (MAE), a narrow
decoder re-inserts mask tokens and predicts each token's `128 x patch` values, and the loss is
the MSE on the hidden tokens. Its tokens carry 128 x 4 = 512 values against brainmoe's 200
(one channel x 1 s at 200 Hz), so per value it is the cheaper design; it cannot represent a
montage other than the padded 128 channels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pretrain.encoder_blocks import sinusoid

PAD_CHANNELS = 128


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ChannelMixMAE(nn.Module):
    def __init__(
        self,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_hidden: int = 1024,
        patch: int = 4,
        decoder_dim: int = 64,
        decoder_depth: int = 2,
        mask_ratio: float = 0.75,
    ):
        super().__init__()
        self.patch, self.mask_ratio = patch, mask_ratio
        self.embed = nn.Conv1d(PAD_CHANNELS, dim, kernel_size=patch, stride=patch)
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp_hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.dec_in = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(decoder_dim))
        self.dec_blocks = nn.ModuleList(
            _Block(decoder_dim, 4, 4 * decoder_dim) for _ in range(decoder_depth)
        )
        self.dec_norm = nn.LayerNorm(decoder_dim)
        self.head = nn.Linear(decoder_dim, PAD_CHANNELS * patch)

    def encoder_parameters(self) -> int:
        enc = [self.embed, *self.blocks, self.norm]
        return sum(p.numel() for m in enc for p in m.parameters())

    def forward(self, eeg: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """`eeg [B, C <= 128, T]` -> the masked MSE (a scalar to backpropagate)."""
        b, c, t = eeg.shape
        x = nn.functional.pad(eeg, (0, 0, 0, PAD_CHANNELS - c))  # [B, 128, T]: the padding
        p = t // self.patch
        x = x[..., : p * self.patch]
        target = x.view(b, PAD_CHANNELS, p, self.patch).permute(0, 2, 1, 3).reshape(b, p, -1)
        tokens = self.embed(x).transpose(1, 2)  # [B, P, D]
        tokens = tokens + sinusoid(p, tokens.shape[-1], x.device).to(tokens.dtype)
        n_keep = max(1, round(p * (1 - self.mask_ratio)))
        noise = torch.rand(b, p, generator=generator).to(x.device)
        order = noise.argsort(1)
        keep, hidden = order[:, :n_keep], order[:, n_keep:]  # [B, Pk], [B, P - Pk]
        h = tokens.gather(1, keep[..., None].expand(-1, -1, tokens.shape[-1]))
        for block in self.blocks:
            h = block(h)
        h = self.dec_in(self.norm(h))  # [B, Pk, Dd]
        full = self.mask_token.to(h.dtype).expand(b, p, -1).clone()
        full = full.scatter(1, keep[..., None].expand(-1, -1, h.shape[-1]), h)
        full = full + sinusoid(p, full.shape[-1], x.device).to(full.dtype)
        for block in self.dec_blocks:
            full = block(full)
        pred = self.head(self.dec_norm(full))  # [B, P, 128 * patch]
        idx = hidden[..., None].expand(-1, -1, pred.shape[-1])
        return (pred.gather(1, idx).float() - target.gather(1, idx).float()).pow(2).mean()


def matched(encoder_params: int, **kw) -> ChannelMixMAE:
    """The reference with its MLP width chosen so its encoder has ``encoder_params``."""
    dim, depth = kw.get("dim", 128), kw.get("depth", 4)
    fixed = ChannelMixMAE(mlp_hidden=1, **kw).encoder_parameters() - depth * (2 * dim + 1)
    hidden = max(8, round((encoder_params - fixed) / (depth * (2 * dim + 1))))
    return ChannelMixMAE(mlp_hidden=hidden, **kw)
