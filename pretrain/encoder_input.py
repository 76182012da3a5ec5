"""What the encoder reads and returns, and the step that brings any input rate to its own.

Shape legend: B batch, C channels, T samples, P patches per channel, L samples per patch,
N = C*P tokens, Nk encoded tokens, D width, E experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def resample(
    eeg: Tensor, time_mask: Tensor, sfreq: Sequence[float], target: float
) -> tuple[Tensor, Tensor]:
    """Bring `eeg [B, C, T]` (per-sample rates `sfreq`, B floats) to `target` Hz.

    Antialiased linear interpolation (F.interpolate), one call per distinct rate. An output
    sample stays valid only if every input sample its kernel touches was valid (the
    interpolated mask is still 1), so padding cannot bleed into valid samples. Samples at
    different rates end up with different lengths: the shorter are padded (and masked).
    """
    b, c, t = eeg.shape
    rates = sorted(set(sfreq))
    if all(abs(fs - target) < 1e-6 for fs in rates):
        return eeg, time_mask
    parts = []
    for fs in rates:
        rows = torch.tensor([i for i, s in enumerate(sfreq) if s == fs], device=eeg.device)
        x, m = eeg[rows], time_mask[rows]
        if abs(fs - target) >= 1e-6:
            t_out = max(1, round(t * target / fs))
            kw = dict(size=(1, t_out), mode="bilinear", align_corners=False, antialias=fs > target)
            x = F.interpolate(x.reshape(-1, 1, 1, t), **kw).reshape(len(rows), c, t_out)
            m = F.interpolate(m[:, None, None, :].float(), **kw).reshape(len(rows), t_out)
            m = m > 1 - 1e-4
        parts.append((rows, x, m))
    if len(parts) == 1:
        return parts[0][1], parts[0][2]
    t_max = max(x.shape[-1] for _, x, _ in parts)
    out = eeg.new_zeros(b, c, t_max)
    mask = time_mask.new_zeros(b, t_max)
    for rows, x, m in parts:
        out[rows, :, : x.shape[-1]] = x
        mask[rows, : m.shape[-1]] = m
    return out, mask


@dataclass
class EncoderInput:
    """A batch after the input step: what the transformer and the MSM target both read."""

    patches: Tensor  # [B, C, P, L] float32, scaled by 1/input_scale_uv, 0 where invalid
    valid: Tensor  # [B, C, P] bool: real channel and every sample of the patch real
    ch_ids: Tensor  # [B, C] long, 0 = unknown
    ch_pos: Tensor  # [B, C, 3] float32 metres, 0 where unknown
    pos_known: Tensor  # [B, C] bool


@dataclass
class EncoderOutput:
    tokens: Tensor  # [B, C*P, D], channel-major (token c*P + p); [B, Nk, D] with `keep`
    valid: Tensor  # [B, C*P] bool; [B, Nk] with `keep`
    n_channels: int  # C
    n_patches: int  # P
    aux_loss: Tensor  # [] float32 (0 unless aux_loss_coef > 0)
    expert_counts: Tensor  # [L_moe, E] assignments per expert and MoE layer; [0, 0] if dense
    # [B, Nk] long: flat token index (c*P + p) of each kept token; None when all were encoded
    index: Tensor | None = None
    # [B] float32: what each window was divided by after input_scale_uv (1 with "fixed")
    scale: Tensor | None = None
    # [B, C, P, L] float32: the patches as the encoder read them (normalised, clipped)
    patches: Tensor | None = None
    ch_pos: Tensor | None = None  # [B, C, 3] metres as the encoder placed each channel
    pos_known: Tensor | None = None  # [B, C] bool

    def grid(self) -> Tensor:
        """Tokens as `[B, C, P, D]` (every token encoded: no `keep`)."""
        if self.index is not None:
            raise ValueError("grid() needs every token; this output holds only the kept ones")
        b, _, d = self.tokens.shape
        return self.tokens.view(b, self.n_channels, self.n_patches, d)
