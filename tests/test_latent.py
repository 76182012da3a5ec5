"""Masked latent prediction (pretrain/latent.py): the target is the encoder's own whole-window
token, under stop-gradient, scored at hidden patches only, and its pass feeds no MoE load."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.encoder_config import get_config
from pretrain.latent import LatentTarget
from pretrain.moe import MoE
from pretrain.msm import MaskedSignalModel, MSMConfig

NAMES = ["Fp1", "Fp2", "C3", "C4", "Cz", "O1", "O2", "Pz"]


def model(**kw) -> MaskedSignalModel:
    torch.manual_seed(0)
    enc = get_config("tiny", input_norm="window", spatial_bias=True)
    cfg = MSMConfig(encoder=enc, encoder_input="visible", latent_weight=1.0, **kw)
    return MaskedSignalModel(cfg)


def batch():
    eeg = torch.randn(3, len(NAMES), 800, generator=torch.Generator().manual_seed(1)) * 20
    return {"eeg": eeg, "ch_names": [NAMES] * 3}


def test_latent_target_is_the_whole_window_token_at_hidden_patches():
    m = model()
    gen = torch.Generator().manual_seed(0)
    out = m(batch(), generator=gen)
    assert out["mse_latent"] > 0
    # recomputed by hand: the encoder on every patch, layer-normed, vs the predictor at hidden
    inp = m.encoder.prepare(batch())
    mask = out["mask"]
    m.encoder.eval()
    with torch.no_grad():
        target = F.layer_norm(m.encoder.encode(inp).tokens, (m.config.encoder.dim,))
    m.encoder.train()
    _, _, _, _, hidden = m.decode(inp, mask)
    per_token = (m.latent.predictor(hidden) - target).pow(2).mean(-1).view(mask.shape)
    torch.testing.assert_close(out["mse_latent"], per_token[mask].mean())
    # stop-gradient: the target carries no graph, so the encoder learns only as the student
    assert not LatentTarget.targets(m.encoder, inp).requires_grad
    torch.testing.assert_close(
        out["mse"], out["mse_signal"] + out["mse_latent"], msg="latent_weight 1 adds it once"
    )


def test_the_target_pass_feeds_no_router_statistics():
    """The router balances what the student sees: the whole-window pass runs in eval mode."""
    m = model()
    moes = [b.ffn for b in m.encoder.blocks if isinstance(b.ffn, MoE)]
    assert moes, "tiny is a MoE encoder"
    for layer in moes:
        layer.reset_counts()
    out = m(batch(), generator=torch.Generator().manual_seed(0))
    seen = int((out["valid"] & ~out["mask"]).sum())
    for layer in moes:
        assert int(layer.counts.sum()) == seen * layer.top_k
    assert m.encoder.training


def test_latent_weight_must_not_be_negative():
    with pytest.raises(ValueError, match="latent_weight must be >= 0"):
        MSMConfig(encoder="tiny", latent_weight=-1.0)
