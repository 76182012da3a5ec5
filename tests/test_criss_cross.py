"""The decoder's criss-cross attention reads a token's channel row and time column only, keeps
padding out, and leaves a checkpoint's shapes as full attention's."""

from __future__ import annotations

import pytest
import torch

from pretrain.criss_cross import CrissCross, PackedCrissCross
from pretrain.encoder_blocks import Attention
from pretrain.encoder_config import get_config
from pretrain.msm import MaskedSignalModel, MSMConfig
from tests.test_encoder_contract import make_batch, take
from tests.test_reconstruction import RECIPE_DECODER

C, P, D, H = 6, 5, 32, 4


def attend(attn: Attention, x: torch.Tensor, valid: torch.Tensor, bias=None) -> torch.Tensor:
    with torch.no_grad():
        return attn(x, CrissCross(valid, H, bias))


def test_a_token_reads_its_channel_and_its_patch_only():
    torch.manual_seed(0)
    attn = Attention(D, H, qk_norm=True, dropout=0.0, out_std=0.02).eval()
    x = torch.randn(1, C * P, D)
    valid = torch.ones(1, C, P, dtype=torch.bool)
    base = attend(attn, x, valid)
    c, p = 2, 3
    token = c * P + p  # channel-major

    def moved(c2: int, p2: int) -> float:
        y = x.clone()
        y[0, c2 * P + p2] += 5.0
        return float((attend(attn, y, valid)[0, token] - base[0, token]).abs().max())

    assert moved(4, 1) == 0.0, "another channel at another patch must not reach the token"
    assert moved(4, p) > 1e-4, "a channel at the same patch must (spatial heads)"
    assert moved(c, 0) > 1e-4, "the same channel at another patch must (temporal heads)"


def test_padded_keys_are_not_read():
    torch.manual_seed(1)
    attn = Attention(D, H, qk_norm=True, dropout=0.0, out_std=0.02).eval()
    x = torch.randn(2, C * P, D)
    valid = torch.ones(2, C, P, dtype=torch.bool)
    valid[0, 4:] = False  # sample 0: two padded channels
    valid[1, :, 3:] = False  # sample 1: two padded patches
    bias = -torch.rand(2, H, C, C)
    base = attend(attn, x, valid, bias)
    y = x.clone().view(2, C, P, D)
    y[0, 4:] = 100 * torch.randn(2, P, D)
    y[1, :, 3:] = 100 * torch.randn(C, 2, D)
    out = attend(attn, y.view(2, C * P, D), valid, bias)
    keep = valid.view(2, C * P)
    torch.testing.assert_close(out[keep], base[keep], atol=1e-6, rtol=1e-5)
    assert torch.isfinite(out).all(), "rows of padding stay finite"


def test_packed_heads_equal_the_padded_ones_on_every_valid_token():
    """Windows of different montages, one with a flagged channel in the middle (a hole, not a
    tail) and one shorter: packed, each reads the same keys with the same distance bias as
    padded, and no padding is computed."""
    torch.manual_seed(2)
    attn = Attention(D, H, qk_norm=True, dropout=0.0, out_std=0.02).eval()
    valid = torch.ones(3, C, P, dtype=torch.bool)
    valid[0, 4:] = False  # 4 channels
    valid[1, 2] = False  # a bad channel inside the montage
    valid[2, :, 3:] = False  # 3 patches
    bias = -torch.rand(3, H, C, C)
    x = torch.randn(3, C * P, D)
    packed = PackedCrissCross(valid, H, bias)
    flat = valid.view(3, C * P)
    assert packed.pack(x).shape[0] == int(flat.sum()), "only valid tokens are packed"
    with torch.no_grad():
        padded = attn(x, CrissCross(valid, H, bias))
        out = packed.unpack(attn(packed.pack(x), packed))
    torch.testing.assert_close(out[flat], padded[flat], atol=1e-6, rtol=1e-5)
    assert not PackedCrissCross.fits(torch.tensor([[[True, False], [False, True]]]))


def model(attention: str, packing: bool = True) -> MaskedSignalModel:
    cfg = get_config(
        "tiny", spatial_bias=True, input_norm="window", learn_spatial_slopes=False, packing=packing
    )
    torch.manual_seed(0)
    return MaskedSignalModel(
        MSMConfig(encoder=cfg, **RECIPE_DECODER, decoder_attention=attention)
    ).eval()


def test_mixed_montage_batch_gives_each_window_its_own_prediction():
    """The recipe's decoder with criss-cross heads: a window's predictions in a padded mixed
    batch are those of the window alone (padding reaches neither attention axis)."""
    net = model("criss_cross")
    channels, seconds = [19, 32, 64], [4.0, 3.0, 4.0]
    batch = make_batch(channels, seconds, seed=2)
    inp = net.encoder.prepare(batch)
    mask = inp.valid & net.make_mask(inp.valid, torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = net(batch, mask=mask)["pred"]
        for i, (c, s) in enumerate(zip(channels, seconds, strict=True)):
            p = int(s)
            alone = net(take(batch, i, c, round(s * 200)), mask=mask[i : i + 1, :c, :p])["pred"]
            torch.testing.assert_close(full[i, :c, :p], alone[0], atol=2e-5, rtol=1e-4)


def test_packed_and_padded_decoders_agree_on_a_mixed_batch():
    packed, padded = model("criss_cross"), model("criss_cross", packing=False)
    padded.load_state_dict(packed.state_dict())
    batch = make_batch([19, 32, 64], [4.0, 4.0, 4.0], seed=4)
    inp = packed.encoder.prepare(batch)
    mask = inp.valid & packed.make_mask(inp.valid, torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = packed(batch, mask=mask)["pred"], padded(batch, mask=mask)["pred"]
    keep = inp.valid
    torch.testing.assert_close(a[keep], b[keep], atol=2e-5, rtol=1e-4)


def test_checkpoint_shapes_do_not_depend_on_the_attention():
    full, cross = model("full"), model("criss_cross")
    assert {k: v.shape for k, v in full.state_dict().items()} == {
        k: v.shape for k, v in cross.state_dict().items()
    }
    cross.train()
    out = cross(
        make_batch([32, 32], [4.0, 4.0], seed=3), generator=torch.Generator().manual_seed(0)
    )
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert cross.decoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"decoder_attention": "axial"}, "decoder_attention must be one of"),
        ({"decoder_attention": "criss_cross", "decoder_heads": 1}, "decoder_heads >= 2"),
    ],
)
def test_bad_decoder_attention_is_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        MSMConfig(encoder=get_config("tiny"), **overrides)
