"""Packed batches compute only valid tokens and give what padded batches give.

A mixed-montage batch (19/32/64 channels) and an MAE batch (each sample keeps its own
visible tokens) run packed (pretrain/packing.py); the padded path is the reference.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pretrain.encoder import Encoder
from pretrain.encoder_config import get_config
from pretrain.masking import make_mask
from tests.test_encoder_contract import make_batch


def twins(**overrides) -> tuple[Encoder, Encoder]:
    """The same weights, packed and padded."""
    cfg = get_config("tiny", spatial_bias=True, input_norm="window", **overrides)
    torch.manual_seed(0)
    packed = Encoder(cfg)
    padded = Encoder(dataclasses.replace(cfg, packing=False))
    padded.load_state_dict(packed.state_dict())
    return packed, padded


@pytest.mark.parametrize("mae", [False, True], ids=["all-tokens", "visible-only"])
def test_packed_and_padded_batches_give_the_same_outputs(mae):
    packed, padded = twins()
    batch = make_batch([19, 32, 64, 19], [4.0, 4.0, 3.0, 4.0], seed=3)
    inp = packed.prepare(batch)
    keep = None
    if mae:
        g = torch.Generator().manual_seed(0)
        keep = inp.valid & ~make_mask(inp.valid, 0.6, "random", generator=g)
    with torch.no_grad():
        a = packed.eval().encode(inp, keep=keep)
        b = padded.eval().encode(inp, keep=keep)
    assert torch.equal(a.valid, b.valid)
    torch.testing.assert_close(a.tokens[a.valid], b.tokens[b.valid], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(Encoder.pool(a), Encoder.pool(b), atol=2e-5, rtol=1e-4)
    assert not a.tokens[~a.valid].any(), "packed padding slots must stay zero"
    torch.testing.assert_close(a.expert_counts, b.expert_counts, atol=0, rtol=0)


def test_packed_gradients_equal_padded_ones():
    packed, padded = twins()
    batch = make_batch([19, 32, 64], [4.0, 4.0, 4.0], seed=4)
    grads = []
    for model in (packed, padded):
        model.train().zero_grad()
        out = model(batch)
        (Encoder.pool(out).pow(2).sum() + out.aux_loss).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_packed_decoder_gives_the_padded_predictions_and_loss():
    """The recipe's decoder (spatial bias, raw paths, token head) on a mixed-montage batch:
    packed, its blocks run on valid tokens only; predictions of valid patches, the loss and
    the gradients match the padded decoder's."""
    from pretrain.msm import MaskedSignalModel, MSMConfig
    from tests.test_reconstruction import RECIPE_DECODER

    cfg = get_config("tiny", spatial_bias=True, input_norm="window", learn_spatial_slopes=False)
    args = dict(**RECIPE_DECODER, mask_mode="mixed")
    torch.manual_seed(0)
    packed = MaskedSignalModel(MSMConfig(encoder=cfg, **args))
    padded = MaskedSignalModel(MSMConfig(encoder=dataclasses.replace(cfg, packing=False), **args))
    padded.load_state_dict(packed.state_dict())
    assert packed.decoder.packing and not padded.decoder.packing
    batch = make_batch([19, 32, 64], [4.0, 4.0, 4.0], seed=5)
    outs, grads = [], []
    for model in (packed, padded):
        out = model(batch, generator=torch.Generator().manual_seed(1))
        out["loss"].backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    a, b = outs
    valid = a["valid"]
    assert not bool(valid.all()), "the batch must hold padding for this test to mean anything"
    torch.testing.assert_close(a["pred"][valid], b["pred"][valid], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(a["loss"], b["loss"], atol=2e-6, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("packing", [True, False])
def test_hidden_patches_do_not_reach_the_encoder(packing):
    """MAE: the values of hidden patches (and their share of the input scale) change nothing."""
    encoder = twins()[0 if packing else 1].eval()
    batch = make_batch([32, 19], [4.0, 4.0], seed=5)
    inp = encoder.prepare(batch)
    g = torch.Generator().manual_seed(1)
    hidden = make_mask(inp.valid, 0.6, "random", generator=g) & inp.valid
    keep = inp.valid & ~hidden
    changed = dataclasses.replace(inp, patches=inp.patches.clone())
    changed.patches[hidden] = 50 * torch.randn(int(hidden.sum()), inp.patches.shape[-1])
    with torch.no_grad():
        a, b = encoder.encode(inp, keep=keep), encoder.encode(changed, keep=keep)
    assert torch.equal(a.index, b.index)
    torch.testing.assert_close(a.scale, b.scale, atol=0, rtol=0)
    torch.testing.assert_close(a.tokens, b.tokens, atol=0, rtol=0)


def test_compiled_model_gives_the_eager_loss_and_keeps_its_keys():
    """`train.compile=true` compiles the MSM model in place: same loss, same state-dict keys."""
    from pretrain.msm import MaskedSignalModel, MSMConfig

    cfg = get_config("tiny", spatial_bias=True, input_norm="window", learn_spatial_slopes=False)
    torch.manual_seed(0)
    model = MaskedSignalModel(MSMConfig(encoder=cfg, encoder_input="visible", mix_heads=2))
    batch = make_batch([19, 32], [4.0, 4.0], seed=6)
    keys = list(model.state_dict())
    eager = model(batch, generator=torch.Generator().manual_seed(0))["loss"]
    model.compile(dynamic=True)
    compiled = model(batch, generator=torch.Generator().manual_seed(0))["loss"]
    compiled.backward()
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-4)
