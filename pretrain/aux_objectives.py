"""Optional pretraining objectives beside reconstruction, read from the encoder's tokens.

Shape legend: B batch, C channels, P patches per channel, N = C*P tokens, Nk encoded
(kept) tokens, D encoder width, F bands.

Each asks the tokens for something that frozen-feature probes of motor imagery might need and
that sample reconstruction does not ask for: no subject identity (a DANN adversary), each
patch's own band power, each channel's band power over the window. None made the features
transfer better (bench/RESULTS.md, "MOABB", "Demo"); they stay off by default so those rows
can be re-run. The heads live on MaskedSignalModel (their checkpoint keys); the losses here.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.encoder import Encoder
from pretrain.spectral import channel_band_power, log_spectrum


class GradReverse(torch.autograd.Function):
    """Identity forward; the gradient times -scale backward (Ganin & Lempitsky's DANN)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return -ctx.scale * grad, None


def subject_bucket(meta: Mapping[str, Any], buckets: int) -> int:
    """A sample's subject (dataset + subject of its provenance) as a stable class index."""
    prov = (meta or {}).get("provenance") or {}
    name = f"{prov.get('dataset')}/{prov.get('subject')}"
    return zlib.crc32(name.encode()) % buckets


def standardise_bands(target: Tensor, scored: Tensor) -> Tensor:
    """`[B, C, F]` -> each band centred and scaled by its mean and std over the `scored
    [B, C]` channels. Band log amplitudes vary little around each band's mean (variance ~0.02
    on the simulator): unscaled, a head that predicts the mean alone already has a small loss,
    and the encoder is never asked for the differences between channels and windows."""
    w = scored[..., None].float()
    n = w.sum((0, 1)).clamp_min(1.0)  # [1] -> broadcast over F
    mean = (target * w).sum((0, 1)) / n  # [F]
    var = ((target - mean).pow(2) * w).sum((0, 1)) / n
    return (target - mean) / (var + 1e-6).sqrt()


def subject_head(dim: int, buckets: int) -> nn.Module:
    """The adversary's classifier: each window's mean token `[B, D]` -> subject logits."""
    return nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, buckets))


def subject_loss(
    head: nn.Module, scale: float, buckets: int, enc, meta: Sequence[Mapping[str, Any]]
) -> Tensor:
    """Cross-entropy of the subject classifier on each window's mean encoded token, read
    through a gradient reversal scaled by ``scale``: minimising it trains the classifier and
    pushes the encoder's tokens away from whatever tells subjects apart."""
    ids = [subject_bucket(m, buckets) for m in meta]
    target = torch.tensor(ids, device=enc.tokens.device)
    pooled = Encoder.pool(enc.tokens, enc.valid)  # [B, D]
    # standardised over the batch: pooled tokens share a large common part (cosine ~0.998
    # between windows, finetune/heads/resampler.py); what tells subjects apart is the rest
    pooled = (pooled - pooled.mean(0)) / (pooled.float().std(0) + 1e-4).to(pooled.dtype)
    reversed_ = GradReverse.apply(pooled, scale)
    return F.cross_entropy(head(reversed_).float(), target)


def own_spectrum_loss(head: nn.Module, bands: int, enc, visible: Tensor) -> Tensor:
    """MSE of the linear read-out ``head`` of each encoded visible token against its own
    patch's log amplitude in ``bands`` bands (`[B, C, P, F]`), over the visible valid patches
    (`visible [B, C, P]`)."""
    b = visible.shape[0]
    target = log_spectrum(enc.patches, bands)  # [B, C, P, F]
    target = target.reshape(b, -1, target.shape[-1])  # [B, N, F]
    seen = visible.reshape(b, -1)  # [B, N]
    if enc.index is not None:  # only the kept tokens were encoded: [B, Nk, ...]
        target = target.gather(1, enc.index[..., None].expand(-1, -1, target.shape[-1]))
        seen = seen.gather(1, enc.index) & enc.valid
    pred = head(enc.tokens).float()  # [B, N or Nk, F]
    per_token = (pred - target).pow(2).mean(-1)
    return (per_token * seen).sum() / seen.sum().clamp_min(1)


def band_target_loss(
    head: nn.Module, patch_seconds: float, enc, valid: Tensor, visible: Tensor
) -> Tensor:
    """MSE of the linear read-out ``head`` of each channel's mean encoded token against its
    window band power (all valid patches, standardised per band over the batch's scored
    channels: 1 - R^2, so a head that only learns each band's mean scores 1), over the
    channels with at least one encoded (visible) token. `valid`, `visible` `[B, C, P]`."""
    b, c, p = valid.shape
    target = channel_band_power(enc.patches, valid, patch_seconds)  # [B, C, F]
    tokens = enc.tokens.float()  # [B, N or Nk, D]
    d = tokens.shape[-1]
    if enc.index is not None:  # only the kept tokens were encoded: back onto the grid
        kept = tokens * enc.valid[..., None]
        tokens = tokens.new_zeros(b, c * p, d).scatter(
            1, enc.index[..., None].expand(-1, -1, d), kept
        )
    w = visible[..., None].float()  # [B, C, P, 1]
    per_channel = (tokens.view(b, c, p, d) * w).sum(2) / w.sum(2).clamp_min(1.0)  # [B, C, D]
    pred = head(per_channel.to(enc.tokens.dtype)).float()  # [B, C, F]
    scored = visible.any(2)  # [B, C]
    target = standardise_bands(target, scored)
    err = (pred - target).pow(2).mean(-1)
    return (err * scored).sum() / scored.sum().clamp_min(1)
