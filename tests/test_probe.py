"""The probe's pooling: any montage maps onto the same 10-20 grid, left stays left."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pretrain.encoder import Encoder
from pretrain.encoder_config import get_config
from pretrain.probe import REGION_SITES, ProbeData, features, region_of, region_pool
from shards.channels import standard_positions


def test_channels_map_to_their_nearest_10_20_site():
    std = standard_positions()
    names = ["C3", "C4", "CP3", "FC4", "Oz", "O1"]
    pos = np.stack([std[n] for n in names] + [np.full(3, np.nan)])  # last: position unknown
    regions = [REGION_SITES[r] if r >= 0 else None for r in region_of(pos)]
    assert regions[:2] == ["C3", "C4"]
    assert regions[2] in ("C3", "P3") and regions[3] in ("C4", "F4")  # left stays left
    assert regions[5] == "O1" and regions[6] is None


def test_region_pool_ignores_channel_order_and_padding():
    torch.manual_seed(0)
    grid = torch.randn(4, 3, 8)  # [C, P, D]
    valid = torch.ones(4, 3, dtype=torch.bool)
    valid[3] = False  # a padded channel
    regions = np.array([8, 10, 8, 0])  # C3, C4, C3, Fp1 (padded)
    pooled = region_pool(grid, valid, regions).view(len(REGION_SITES) + 1, 8)
    torch.testing.assert_close(pooled[8], grid[[0, 2]].mean((0, 1)))
    torch.testing.assert_close(pooled[10], grid[1].mean(0))
    assert pooled[0].abs().sum() == 0  # the padded channel's site stays empty
    torch.testing.assert_close(pooled[-1], grid[:3].mean((0, 1)))
    perm = [2, 1, 0, 3]
    again = region_pool(grid[perm], valid[perm], regions[perm])
    torch.testing.assert_close(again, pooled.reshape(-1))


def test_features_for_both_poolings():
    std = standard_positions()
    rng = np.random.default_rng(0)
    montages = [["C3", "C4", "Cz"], ["Fp1", "C3", "C4", "O2", "Pz"]]
    data = ProbeData(
        eeg=[rng.normal(0, 20, (len(m), 800)).astype(np.float32) for m in montages],
        ch_names=montages,
        ch_pos=[np.stack([std[n] for n in m]) for m in montages],
        labels=np.array(["a", "b"]),
        groups=np.array(["1", "2"]),
    )
    encoder = Encoder(get_config("tiny"))
    assert features(encoder, data, pooling="mean").shape == (2, 64)
    assert features(encoder, data, pooling="regions").shape == (2, 20 * 64)
    with pytest.raises(ValueError, match="pooling must be one of"):
        features(encoder, data, pooling="max")


@pytest.mark.parametrize("pooling", ["mean", "regions", "moments"])
def test_a_middle_layer_reads_mixed_montages_as_each_window_alone(pooling):
    """Mixed montages make the encoder pack its tokens: a middle block's features must still
    come back per window, equal to that window encoded on its own (no padding)."""
    from pretrain.features import pooled_features

    std = standard_positions()
    rng = np.random.default_rng(1)
    montages = [["C3", "C4", "Cz"], ["Fp1", "C3", "C4", "O2", "Pz"]]
    eeg = [rng.normal(0, 20, (len(m), 800)).astype(np.float32) for m in montages]
    pos = [np.stack([std[n] for n in m]) for m in montages]
    torch.manual_seed(0)
    encoder = Encoder(get_config("tiny", depth=3))

    def pooled(idx, layer):
        return pooled_features(
            encoder,
            [eeg[i] for i in idx],
            [montages[i] for i in idx],
            [pos[i] for i in idx],
            200.0,
            pooling=pooling,
            layer=layer,
        )

    together = pooled([0, 1], 1)
    alone = np.concatenate([pooled([0], 1), pooled([1], 1)])
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-4)
    assert not np.allclose(together, pooled([0, 1], None), atol=1e-3)  # not the last block


def test_region_tokens_are_the_region_pool_per_site():
    """The torch site assignment (what finetune's heads_read=regions uses) is the probe's,
    and region_tokens are region_pool's features, one token per site."""
    from pretrain.features import region_index, region_of, region_tokens

    gen = torch.Generator().manual_seed(0)
    pos = torch.randn(2, 7, 3, generator=gen) * 0.08  # [B, C, 3] metres
    known = torch.ones(2, 7, dtype=torch.bool)
    known[1, 3] = False
    sites = region_index(pos, known)
    for b in range(2):
        expected = region_of(np.where(known[b, :, None].numpy(), pos[b].numpy(), np.nan))
        assert sites[b].tolist() == expected.tolist()
    grid = torch.randn(2, 7, 3, 4, generator=gen)  # [B, C, P, D]
    valid = torch.ones(2, 7, 3, dtype=torch.bool)
    tokens, has = region_tokens(grid, valid, sites)
    assert tokens.shape == (2, len(REGION_SITES) + 1, 4)
    flat = region_pool(grid[1], valid[1], sites[1].numpy())
    torch.testing.assert_close(tokens[1].reshape(-1), flat)
    assert has[1].tolist() == [bool((sites[1] == r).any()) for r in range(len(REGION_SITES))] + [
        True
    ]
