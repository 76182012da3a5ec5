"""Split-window contrast: the two time halves of a window must find each other in the batch.

Shape legend: B batch, C channels, P patches per channel, D encoder width, Z projection width.

Why: masked reconstruction is solved mostly by interpolation (the decoder's raw paths), and
neither it nor a band-power target made frozen features read the simulator's classes or
motor imagery better than a random-init twin's (bench/RESULTS.md, "Demo", "MOABB"). What
the two halves of one trial share, and other trials lack, is what persists across the trial:
a class's band-power change at its site, the stimulus instance, the subject's state;
ongoing background and sensor noise are independent between the halves, so they cannot
match them. This is relative positioning (Banville et al. 2021) at the scale of one window:
each half is encoded alone (its own attention, its own input scale) from a random half of
its patches, its mean token projected, and InfoNCE over the batch's windows pulls the pair
together.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.encoder import Encoder, EncoderInput


def split_views(valid: Tensor, keep: float, generator: torch.Generator | None = None) -> Tensor:
    """`valid [B, C, P]` -> which tokens each view encodes `[2B, C, P]`: rows 0..B-1 the first
    half of the patches, rows B..2B-1 the second, each a random ``keep`` fraction of its
    valid tokens."""
    b, c, p = valid.shape
    if p < 2:
        raise ValueError(
            f"contrast needs windows of at least 2 patches to split in time, got {p}; "
            "lengthen the windows or set msm.contrast_weight=0"
        )
    first = torch.arange(p, device=valid.device) < p // 2  # [P]
    gen_device = generator.device if generator is not None else valid.device
    draw = torch.rand((2, b, c, p), generator=generator, device=gen_device).to(valid.device)
    halves = torch.stack([first, ~first])[:, None, None, :]  # [2, 1, 1, P]
    return (valid[None] & halves & (draw < keep)).reshape(2 * b, c, p)


def doubled(inp: EncoderInput) -> EncoderInput:
    """The batch twice over `[2B, ...]`: one copy per view, which ``keep`` then tells apart."""
    return EncoderInput(
        **{f.name: torch.cat([getattr(inp, f.name)] * 2) for f in dataclasses.fields(inp)}
    )


class SplitContrast(nn.Module):
    """Projection head + loss; the encoder is passed in (it belongs to the model)."""

    def __init__(self, dim: int, proj_dim: int, temperature: float, keep: float):
        super().__init__()
        self.temperature, self.keep = temperature, keep
        self.proj = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, proj_dim))

    def embed(self, encoder: Encoder, inp: EncoderInput, keep: Tensor) -> tuple[Tensor, Tensor]:
        """Encode each view of `keep [2B, C, P]` on its own -> (unit projections `[2B, Z]`,
        MoE aux loss `[]`)."""
        enc = encoder.encode(doubled(inp), keep=keep)
        pooled = Encoder.pool(enc).float()  # [2B, D]
        # standardised over the batch's views: mean tokens share a large common part (cosine
        # ~0.998 between windows), which would leave the projection nearly constant
        pooled = (pooled - pooled.mean(0)) / (pooled.std(0) + 1e-4)
        z = F.normalize(self.proj(pooled.to(enc.tokens.dtype)).float(), dim=-1)
        return z, enc.aux_loss

    def forward(
        self,
        encoder: Encoder,
        inp: EncoderInput,
        generator: torch.Generator | None = None,
        groups: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """-> (InfoNCE loss `[]`, top-1 of each half finding its partner `[]`, MoE aux loss
        `[]`); windows with an empty half are left out (loss 0 if none is left).

        ``groups [B]`` (e.g. the subject): negatives come only from the anchor's own group,
        so what tells groups apart (montage, gain, the subject's alpha) cannot solve the
        task; anchors alone in their group are left out."""
        b = inp.patches.shape[0]
        keep = split_views(inp.valid, self.keep, generator)  # [2B, C, P]
        z, aux = self.embed(encoder, inp, keep)
        ok = keep.flatten(1).any(1).view(2, b).all(0)  # [B]
        za, zb = z[:b][ok], z[b:][ok]
        logits = za @ zb.T / self.temperature  # [n, n]
        n = logits.shape[0]
        if groups is not None:
            g = groups.to(logits.device)[ok]
            same = g[:, None] == g[None, :]  # [n, n]
            logits = logits.masked_fill(~same, float("-inf"))
            scored = same.sum(1) > 1  # [n] anchors with at least one negative
        else:
            scored = torch.full((n,), n > 1, dtype=torch.bool, device=logits.device)
        if not bool(scored.any()):
            zero = z.sum() * 0.0
            return zero, zero.detach(), aux
        target = torch.arange(n, device=logits.device)
        ce = F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(
            logits.T, target, reduction="none"
        )  # [n]; the mask is symmetric, so both directions score the same anchors
        loss = 0.5 * ce[scored].mean()
        top1 = (logits.argmax(1) == target)[scored].float().mean()
        return loss, top1.detach(), aux
