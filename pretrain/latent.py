"""Masked latent prediction: the decoder also predicts what the encoder makes of each hidden
patch when it sees the whole window (data2vec, EEG2Rep), not only the patch's samples.

Shape legend: B batch, C channels, P patches per channel, N = C*P tokens, D encoder width,
d decoder width.

Why: sample reconstruction is solved mostly by interpolating the background from visible
neighbours (spatially redundant on EEGMMIDB), and the features it leaves read out no better
than a random-init twin's across subjects (bench/RESULTS.md, "MOABB"). A target in the
encoder's own space asks the visible context for the hidden patch's *representation* --
whatever the encoder abstracts from it -- which in vision and speech gives features that a
linear read-out uses better than pixel targets do (data2vec, I-JEPA; EEG2Rep for EEG).

The target is the encoder's final tokens on the whole window (every valid patch visible),
each layer-normed without affine parameters (data2vec), under stop-gradient: the online
encoder is its own teacher (data2vec's EMA at rate 0). A predictor plus a stop-gradient keep
such a target from collapsing as long as another loss keeps the features informative
(SimSiam); here the sample reconstruction does. An EMA teacher would need an fp32 copy of the
encoder beside a bf16 engine, since 0.999-rate updates vanish in bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LatentTarget(nn.Module):
    """Decoder hidden state at hidden patches -> the whole-window encoder token there."""

    def __init__(self, decoder_dim: int, dim: int):
        super().__init__()
        self.predictor = nn.Linear(decoder_dim, dim)

    @staticmethod
    @torch.no_grad()
    def targets(encoder: nn.Module, inp) -> Tensor:
        """The encoder on every valid patch -> per-token layer-normed tokens `[B, N, D]`.

        Run in eval mode, so this pass feeds no MoE load statistics: the router balances
        what the student sees."""
        was_training = encoder.training
        encoder.eval()
        try:
            tokens = encoder.encode(inp).tokens  # [B, N, D]
        finally:
            encoder.train(was_training)
        return F.layer_norm(tokens.float(), tokens.shape[-1:])

    def forward(self, encoder: nn.Module, inp, hidden: Tensor, mask: Tensor) -> Tensor:
        """Mean squared error over hidden valid patches: `hidden [B, N, d]` (the decoder's,
        channel-major like the tokens), `mask [B, C, P]` True = hidden -> scalar."""
        target = self.targets(encoder, inp)  # [B, N, D]
        pred = self.predictor(hidden).float()  # [B, N, D]
        per_token = (pred - target).pow(2).mean(-1)  # [B, N]
        hidden_patches = mask.reshape(per_token.shape).to(per_token.dtype)
        return (per_token * hidden_patches).sum() / hidden_patches.sum().clamp_min(1)
