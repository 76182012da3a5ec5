"""Contract tests for every named encoder config (braindecode style), and the MSM model.

Every config is checked at full size on the meta device (shapes for every channel count and
input rate, parameter counts) and with real weights at reduced depth where the full model is
too big for a CPU test (forward/backward, padding, unknown channels, save/load): a block is
the same at depth 1 and at depth 24.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import pytest
import torch

from pretrain.channel_vocab import UNKNOWN_CHANNEL, ChannelVocab, channel_ids
from pretrain.encoder import Encoder, build_on_meta, count_parameters
from pretrain.encoder_config import CONFIGS, EncoderConfig, dense_variant, get_config, list_configs
from pretrain.encoder_input import resample
from pretrain.masking import make_mask, time_block_mask
from pretrain.msm import MaskedSignalModel, MSMConfig

NAMES = list_configs()
MOE_NAMES = [n for n in NAMES if not n.endswith("-dense")]
REDUCED = {"base", "large", "base-dense", "large-dense"}  # real weights at depth 1
SMALL = ["tiny", "tiny-dense", "small", "small-dense"]  # real weights, full size

# 10-05 names in a common order; the first 19 are the 10-20 montage.
NAMES_1020 = [
    "Fp1",
    "Fp2",
    "F7",
    "F3",
    "Fz",
    "F4",
    "F8",
    "T7",
    "C3",
    "Cz",
    "C4",
    "T8",
    "P7",
    "P3",
    "Pz",
    "P4",
    "P8",
    "O1",
    "O2",
]


def montage(n: int) -> list[str]:
    rest = [name for name in ChannelVocab.standard().names[1:] if name not in NAMES_1020]
    rest = [name for name in rest if name not in ("LPA", "RPA", "Nz")]
    return (NAMES_1020 + rest)[:n]


def make_batch(
    n_channels: list[int], seconds: list[float], sfreq: float = 200.0, seed: int = 0
) -> dict:
    """A reader-style batch: zero-padded to the largest sample, masks, names, positions."""
    g = torch.Generator().manual_seed(seed)
    b, c = len(n_channels), max(n_channels)
    t = round(max(seconds) * sfreq)
    batch = {
        "eeg": torch.zeros(b, c, t),
        "channel_mask": torch.zeros(b, c, dtype=torch.bool),
        "time_mask": torch.zeros(b, t, dtype=torch.bool),
        "ch_pos": torch.zeros(b, c, 3),
        "pos_known": torch.zeros(b, c, dtype=torch.bool),
        "ch_names": [],
        "sfreq": torch.full((b,), sfreq),
    }
    std = ChannelVocab.standard()
    for i, (ci, si) in enumerate(zip(n_channels, seconds, strict=True)):
        ti = round(si * sfreq)
        batch["eeg"][i, :ci, :ti] = 30 * torch.randn(ci, ti, generator=g)
        batch["channel_mask"][i, :ci] = True
        batch["time_mask"][i, :ti] = True
        names = montage(ci)
        pos, known = std.positions(std.ids([names]))
        batch["ch_pos"][i, :ci], batch["pos_known"][i, :ci] = pos[0], known[0]
        batch["ch_names"].append(names)
    return batch


def take(batch: dict, i: int, c: int, t: int) -> dict:
    """Sample i alone, cropped to its real size (what a batch of one would hold)."""
    return {
        "eeg": batch["eeg"][i : i + 1, :c, :t].clone(),
        "channel_mask": batch["channel_mask"][i : i + 1, :c],
        "time_mask": batch["time_mask"][i : i + 1, :t],
        "ch_pos": batch["ch_pos"][i : i + 1, :c],
        "pos_known": batch["pos_known"][i : i + 1, :c],
        "ch_names": [batch["ch_names"][i][:c]],
        "sfreq": batch["sfreq"][i : i + 1],
    }


def real_config(name: str) -> EncoderConfig:
    cfg = get_config(name)
    return dataclasses.replace(cfg, depth=1) if name in REDUCED else cfg


@functools.cache
def real_model(name: str) -> Encoder:
    torch.manual_seed(0)
    return Encoder(real_config(name))


@functools.cache
def meta_model(name: str) -> Encoder:
    return build_on_meta(get_config(name))


def fresh(name: str) -> Encoder:
    """A private copy (the cached model must not be mutated by a test)."""
    model = Encoder(real_config(name))
    model.load_state_dict(real_model(name).state_dict())
    return model


# ---- registry and parameter counts -------------------------------------------------------


def test_registry_has_every_size_and_its_dense_sibling():
    for name in ("tiny", "small", "base", "large"):
        assert name in CONFIGS and f"{name}-dense" in CONFIGS
        assert CONFIGS[name].is_moe and not CONFIGS[f"{name}-dense"].is_moe
    assert get_config("tiny", depth=3).depth == 3 and CONFIGS["tiny"].depth == 2
    with pytest.raises(KeyError):
        get_config("huge")


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts_match_the_built_model(name):
    counts = count_parameters(name)
    assert counts == meta_model(name).num_parameters()
    assert 0 < counts["active"] <= counts["total"]
    if name in SMALL:  # the meta count is the real count
        assert counts == real_model(name).num_parameters()


def test_parameter_budgets():
    n = {name: count_parameters(name) for name in NAMES}
    assert n["large"]["total"] >= 1e9
    assert 10e6 <= n["small"]["total"] <= 30e6
    assert 70e6 <= n["base"]["total"] <= 130e6
    for name in MOE_NAMES:
        assert n[name]["active"] < n[name]["total"]
        dense = n[f"{name}-dense"]
        assert dense["active"] == dense["total"]
        assert abs(dense["active"] / n[name]["active"] - 1) < 0.3, (name, n[name], dense)
    sizes = [n[name]["total"] for name in ("tiny", "small", "base", "large")]
    assert sizes == sorted(sizes)


def test_dense_variant_keeps_active_ffn_width():
    cfg = get_config("small")
    dense = dense_variant(cfg)
    assert dense.n_experts == 0 and dense.ffn_hidden == 3 * cfg.ffn_hidden
    assert dense_variant(dense) == dense


def test_config_dict_round_trip_and_unknown_keys():
    cfg = get_config("base")
    assert EncoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown"):
        EncoderConfig.from_dict({**cfg.to_dict(), "n_expert": 4})
    with pytest.raises(ValueError):
        EncoderConfig(dim=65, heads=4)
    with pytest.raises(ValueError):
        EncoderConfig(n_experts=2, top_k=3)


# ---- shape contract: every config, full size, on meta ------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_shape_contract_full_size_on_meta(name):
    model = meta_model(name)
    d = model.config.dim
    # Every channel count at the model rate, and another rate: the full cross product runs
    # with real weights for the configs that fit (test_any_channel_count_and_rate).
    for c, sfreq in [(19, 200.0), (32, 200.0), (64, 200.0), (128, 200.0), (19, 250.0)]:
        t = round(4 * sfreq)  # 4 s windows -> 4 patches of 1 s at 200 Hz
        batch = {
            "eeg": torch.empty(2, c, t, device="meta"),
            "ch_names": [montage(c)] * 2,
            "sfreq": torch.tensor([sfreq, sfreq]),
        }
        out = model(batch)
        assert out.tokens.shape == (2, c * 4, d) and out.tokens.is_meta
        assert out.valid.shape == (2, c * 4)
        assert out.grid().shape == (2, c, 4, d)
        assert Encoder.pool(out).shape == (2, d)
    out.tokens.sum().backward()  # backward is shape-checked too
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)


# ---- real weights ------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward(name):
    model = fresh(name).train()
    batch = make_batch([19, 12], [4.0, 3.0])
    out = model(batch)
    d = model.config.dim
    assert out.tokens.shape == (2, 19 * 4, d) and out.valid.shape == (2, 19 * 4)
    assert out.valid.sum(1).tolist() == [19 * 4, 12 * 3]
    assert torch.isfinite(out.tokens).all() and out.aux_loss.shape == ()
    loss = out.tokens[out.valid].pow(2).mean() + out.aux_loss
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    if model.config.is_moe:
        assert model.blocks[0].ffn.router.weight.grad.abs().sum() > 0
        assert out.expert_counts.shape == (model.config.depth, model.config.n_experts)
    else:
        assert out.expert_counts.numel() == 0 and model.moe_layers() == []


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("n_channels", [19, 32, 64, 128])
@pytest.mark.parametrize("sfreq", [200.0, 250.0])
def test_any_channel_count_and_rate(name, n_channels, sfreq):
    model = real_model(name).eval()
    batch = make_batch([n_channels], [4.0], sfreq=sfreq, seed=n_channels)
    with torch.no_grad():
        out = model(batch)
    assert out.tokens.shape == (1, n_channels * 4, model.config.dim)
    assert bool(out.valid.all())
    assert torch.isfinite(out.tokens).all()


@pytest.mark.parametrize("name", NAMES)
def test_padding_is_honoured_and_never_leaks(name):
    model = real_model(name).eval()
    batch = make_batch([19, 12, 7], [4.0, 3.0, 2.5], seed=1)
    with torch.no_grad():
        out = model(batch)
        assert out.valid.view(3, 19, 4).sum((1, 2)).tolist() == [76, 36, 14]

        # Whatever sits in the padding (huge values, NaN) changes no valid output.
        noisy = dict(batch, eeg=batch["eeg"].clone())
        pad = ~(batch["channel_mask"][:, :, None] & batch["time_mask"][:, None, :])
        noisy["eeg"][pad] = 1e4 * torch.randn(int(pad.sum()))
        noisy["eeg"][1, 15, 10] = float("nan")
        out2 = model(noisy)
        assert torch.equal(out.tokens[out.valid], out2.tokens[out2.valid])

        # A sample padded inside a mixed batch reads the same as on its own.
        for i, (c, t) in enumerate([(19, 800), (12, 600), (7, 500)]):
            alone = model(take(batch, i, c, t))
            p = alone.n_patches
            grid = out.grid()[i, :c, :p]  # [c, p, D]
            torch.testing.assert_close(grid, alone.grid()[0], atol=2e-5, rtol=1e-4)
            pooled = Encoder.pool(alone)
            torch.testing.assert_close(Encoder.pool(out)[i], pooled[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_save_pretrained_round_trip(name, tmp_path):
    model = fresh(name).train()
    with torch.no_grad():  # non-trivial router state, as after training
        model(make_batch([8, 8], [4.0, 4.0], seed=2))
        model.update_router_bias()
        for layer in model.moe_layers():
            layer.router_bias.add_(0.1 * torch.randn(layer.n_experts))
    model.eval()
    batch = make_batch([19, 10], [4.0, 2.0], sfreq=250.0, seed=3)
    with torch.no_grad():
        expected = model(batch)

    model.save_pretrained(tmp_path / "enc")
    assert {f.name for f in (tmp_path / "enc").iterdir()} == {"model.safetensors", "config.json"}
    meta = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert meta["config"] == model.config.to_dict()
    assert meta["channel_vocab"][0] == UNKNOWN_CHANNEL

    loaded = Encoder.from_pretrained(tmp_path / "enc").eval()
    assert loaded.config == model.config
    assert loaded.vocab.names == model.vocab.names
    state, state2 = model.state_dict(), loaded.state_dict()
    assert state.keys() == state2.keys()
    assert all(torch.equal(state[k], state2[k]) for k in state)
    for a, b in zip(model.moe_layers(), loaded.moe_layers(), strict=True):
        assert torch.equal(a.router_bias, b.router_bias) and a.router_bias.abs().sum() > 0
        assert b.counts.device.type == "cpu"
    with torch.no_grad():
        got = loaded(batch)
    assert torch.equal(expected.tokens, got.tokens)
    assert torch.equal(expected.valid, got.valid)

    # Plain state-dict round trip into a fresh build.
    again = Encoder(model.config).eval()
    again.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(again(batch).tokens, expected.tokens)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_channel_names(name):
    model = real_model(name).eval()
    batch = make_batch([6], [4.0], seed=4)
    batch["ch_names"] = [["Foo1", "LeftThing", "xyz", "Cz", "E17", "Q9"]]
    batch["pos_known"][0, 1:4] = False  # two unknown names keep a position, one has none
    batch["ch_pos"][0, 1:4] = 0.0
    with torch.no_grad():
        out = model(batch)
        assert model.channel_ids(batch["ch_names"]).tolist()[0][:3] == [0, 0, 0]
        assert torch.isfinite(out.tokens).all() and bool(out.valid.all())
        # An unseen name at a known position differs from one with no position at all.
        emb = model.position_embed(batch["ch_pos"], batch["pos_known"])[0]
        assert emb[0].abs().sum() > 0 and emb[2].abs().sum() == 0

    # No names, no positions, bare tensor: the braindecode-style call.
    with torch.no_grad():
        bare = model(torch.randn(2, 5, 800) * 20)
    assert bare.tokens.shape == (2, 20, model.config.dim)


def test_channel_vocabulary():
    vocab = ChannelVocab.standard()
    assert vocab.names[0] == UNKNOWN_CHANNEL
    assert list(vocab.names[1:]) == sorted(vocab.names[1:])
    ids = channel_ids([["Fp1", "Cz", "FP1", "EEG Cz-REF", "T3", "Foo"], ["Oz"]], n_channels=7)
    assert ids.shape == (2, 7) and ids.dtype == torch.long
    fp1, cz, t7 = (vocab.names.index(n) for n in ("Fp1", "Cz", "T7"))
    assert ids[0].tolist() == [fp1, cz, fp1, cz, t7, 0, 0]
    assert ids[1, 1:].tolist() == [0] * 6
    pos, known = vocab.positions(ids)
    assert known[0, :5].all() and not known[0, 5:].any()
    torch.testing.assert_close(pos[0, 0], pos[0, 2])


def test_positions_from_names_when_missing():
    model = real_model("tiny").eval()
    batch = make_batch([19], [4.0], seed=5)
    without = {k: v for k, v in batch.items() if k not in ("ch_pos", "pos_known")}
    with torch.no_grad():
        torch.testing.assert_close(model(batch).tokens, model(without).tokens)


def test_resampling_matches_the_native_rate():
    seconds, f = 4.0, 7.3
    t200 = torch.arange(round(seconds * 200)) / 200
    t250 = torch.arange(round(seconds * 250)) / 250
    x200 = 30 * torch.sin(2 * math.pi * f * t200)
    x250 = 30 * torch.sin(2 * math.pi * f * t250)
    y, m = resample(x250.view(1, 1, -1), torch.ones(1, 1000, dtype=torch.bool), [250.0], 200.0)
    assert y.shape == (1, 1, 800) and bool(m.all())
    err = (y[0, 0, 5:-5] - x200[5:-5]).abs().max()
    assert err < 0.05 * 30, err
    # Padding stays padding: a half-valid input gives a mask that is valid only where the
    # kernel saw real samples.
    mask = torch.zeros(1, 1000, dtype=torch.bool)
    mask[:, :500] = True
    _, m = resample(x250.view(1, 1, -1), mask, [250.0], 200.0)
    assert 390 <= int(m.sum()) <= 400 and bool(m[0, :390].all()) and not m[0, 400:].any()


def test_mixed_rates_in_one_batch():
    model = real_model("tiny").eval()
    b200 = make_batch([19], [4.0], sfreq=200.0, seed=6)
    b250 = make_batch([10], [4.0], sfreq=250.0, seed=7)
    mixed = {
        "eeg": torch.zeros(2, 19, 1000),
        "channel_mask": torch.zeros(2, 19, dtype=torch.bool),
        "time_mask": torch.zeros(2, 1000, dtype=torch.bool),
        "ch_names": [b200["ch_names"][0], b250["ch_names"][0]],
        "sfreq": torch.tensor([200.0, 250.0]),
    }
    mixed["eeg"][0, :, :800] = b200["eeg"][0]
    mixed["eeg"][1, :10] = b250["eeg"][0]
    mixed["channel_mask"][0] = True
    mixed["channel_mask"][1, :10] = True
    mixed["time_mask"][0, :800] = True
    mixed["time_mask"][1] = True
    drop = ("ch_pos", "pos_known")
    with torch.no_grad():
        out = model(mixed)
        a = model({k: v for k, v in b200.items() if k not in drop})
        b = model({k: v for k, v in b250.items() if k not in drop})
    # The 200 Hz sample keeps its 1000-sample padding (5 patches, the last invalid); the
    # 250 Hz one becomes 800 samples at 200 Hz and is padded to match.
    assert out.n_patches == 5
    assert out.valid.view(2, 19, 5).sum((1, 2)).tolist() == [19 * 4, 10 * 4]
    torch.testing.assert_close(out.grid()[0, :, :4], a.grid()[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out.grid()[1, :10, :4], b.grid()[0], atol=2e-5, rtol=1e-4)


def test_pool_averages_valid_tokens_only():
    tokens = torch.randn(2, 6, 4)
    valid = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    pooled = Encoder.pool(tokens, valid)
    torch.testing.assert_close(pooled[0], tokens[0, :2].mean(0))
    torch.testing.assert_close(pooled[1], tokens[1].mean(0))
    torch.testing.assert_close(Encoder.pool(tokens.view(2, 2, 3, 4), valid.view(2, 2, 3)), pooled)


def test_activation_checkpointing_gives_the_same_gradients():
    batch = make_batch([19, 8], [4.0, 2.0], seed=8)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = Encoder(get_config("tiny", activation_checkpointing=ckpt)).train()
        out = model(batch)
        (out.tokens[out.valid].pow(2).mean() + out.aux_loss).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)


def test_bf16_forward():
    model = Encoder(get_config("tiny")).bfloat16().eval()
    with torch.no_grad():
        out = model(make_batch([19], [4.0], seed=9))
    assert out.tokens.dtype == torch.bfloat16 and torch.isfinite(out.tokens.float()).all()
    assert model.moe_layers()[0].router_bias.dtype == torch.float32


# ---- masked signal modelling -------------------------------------------------------------


def tiny_msm(**kw) -> MaskedSignalModel:
    torch.manual_seed(0)
    args = dict(encoder=get_config("tiny"), decoder_dim=32, decoder_depth=1)
    args.update(kw)
    return MaskedSignalModel(MSMConfig(**args))


@pytest.mark.parametrize("mode", ["random", "time_block", "mixed"])
def test_msm_forward(mode):
    model = tiny_msm(mask_mode=mode, mask_ratio=0.5).train()
    batch = make_batch([19, 12], [4.0, 3.0], seed=10)
    out = model(batch, generator=torch.Generator().manual_seed(0))
    b, c, p, length = 2, 19, 4, model.config.encoder.patch_len
    assert out["pred"].shape == out["target"].shape == (b, c, p, length)
    assert out["mask"].shape == out["valid"].shape == (b, c, p)
    assert not (out["mask"] & ~out["valid"]).any()
    frac = out["mask"].sum((1, 2)).float() / out["valid"].sum((1, 2)).float()
    assert ((frac > 0.3) & (frac < 0.7)).all(), frac
    per_patch = (out["pred"] - out["target"]).pow(2).mean(-1)
    manual = per_patch[out["mask"]].mean()
    torch.testing.assert_close(out["mse"], manual)
    torch.testing.assert_close(out["loss"], out["mse"] + out["aux_loss"])
    assert out["expert_counts"].shape == (2, 4) and out["expert_imbalance"].shape == (2,)
    n_valid = int(out["valid"].sum())
    assert out["expert_counts"].sum(1).tolist() == [2 * n_valid] * 2
    out["loss"].backward()
    assert model.mask_token.grad.abs().sum() > 0


def test_msm_loss_ignores_padding_and_unmasked_patches():
    model = tiny_msm().eval()
    batch = make_batch([19, 12], [4.0, 3.0], seed=11)
    mask = make_mask(model.encoder.prepare(batch).valid, 0.5, "random", 1, None)
    with torch.no_grad():
        ref = model(batch, mask=mask)
        noisy = dict(batch, eeg=batch["eeg"].clone())
        pad = ~(batch["channel_mask"][:, :, None] & batch["time_mask"][:, None, :])
        noisy["eeg"][pad] = 1e3
        assert torch.equal(model(noisy, mask=mask)["mse"], ref["mse"])
        # An all-False mask gives a zero (not NaN) loss.
        assert model(batch, mask=torch.zeros_like(mask))["mse"].item() == 0.0


def test_masking_is_reproducible_with_a_generator():
    valid = torch.ones(4, 19, 6, dtype=torch.bool)
    valid[1, 10:] = False
    valid[2, :, 4:] = False
    for mode in ("random", "time_block", "mixed"):
        a = make_mask(valid, 0.6, mode, 2, torch.Generator().manual_seed(1))
        b = make_mask(valid, 0.6, mode, 2, torch.Generator().manual_seed(1))
        c = make_mask(valid, 0.6, mode, 2, torch.Generator().manual_seed(2))
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert not (a & ~valid).any()
    model = tiny_msm()
    batch = make_batch([19], [4.0], seed=12)
    m1 = model(batch, generator=torch.Generator().manual_seed(5))["mask"]
    m2 = model(batch, generator=torch.Generator().manual_seed(5))["mask"]
    assert torch.equal(m1, m2)


def test_random_mask_ratio():
    valid = torch.ones(8, 32, 10, dtype=torch.bool)
    for ratio in (0.5, 0.6, 0.75):
        mask = make_mask(valid, ratio, "random", generator=torch.Generator().manual_seed(0))
        assert mask.sum((1, 2)).tolist() == [round(ratio * 320)] * 8


def test_time_block_mask_hides_every_channel_of_a_span():
    valid = torch.ones(6, 19, 12, dtype=torch.bool)
    valid[0, 15:] = False  # padded channels stay unmasked
    for block in (1, 3):
        mask = time_block_mask(valid, 0.5, block, torch.Generator().manual_seed(block))
        hidden_time = mask.any(1)  # [B, P]
        for b in range(6):
            rows = valid[b].any(1)
            assert (mask[b][rows] == hidden_time[b][None]).all()
        frac = hidden_time.float().mean(1)
        assert ((frac >= 0.25) & (frac <= 0.75)).all(), frac
        if block == 3:  # spans are contiguous runs of whole blocks (random phase)
            for b in range(6):
                runs = torch.diff(hidden_time[b].int(), prepend=torch.zeros(1, dtype=torch.int))
                starts = (runs == 1).nonzero().flatten().tolist()
                assert all(hidden_time[b, s : s + 1].all() for s in starts)
    assert not (mask & ~valid).any()


def test_time_block_samples_can_also_hide_random_patches():
    """``block_random_ratio``: the block stays hidden on every channel, and that fraction of
    each sample's other valid patches is hidden too (the encoder sees fewer tokens)."""
    valid = torch.ones(6, 19, 4, dtype=torch.bool)
    valid[0, 15:] = False
    gen = torch.Generator().manual_seed(0)
    only = make_mask(valid, 0.6, "time_block", 1, gen, 0.25)
    gen = torch.Generator().manual_seed(0)
    both = make_mask(valid, 0.6, "time_block", 1, gen, 0.25, 0.75)
    assert torch.equal(both & only, only)  # the same block, then more
    rest = (valid & ~only).sum((1, 2))  # [B]
    extra = (both & ~only).sum((1, 2))
    assert extra.tolist() == torch.round(rest * 0.75).long().tolist()
    assert not (both & ~valid).any()
    mixed = make_mask(valid, 0.8, "mixed", 1, torch.Generator().manual_seed(3), 0.25, 0.75)
    seen = (valid & ~mixed).sum((1, 2)).float() / valid.sum((1, 2))
    assert (seen <= 0.2 + 1e-6).all(), seen  # random samples 20%, block samples 75% x 25%


def test_norm_target():
    model = tiny_msm(norm_target=True)
    out = model(make_batch([4], [4.0], seed=13))
    target = out["target"][out["valid"]]
    torch.testing.assert_close(target.mean(-1), torch.zeros(target.shape[0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(
        target.std(-1, unbiased=False), torch.ones(target.shape[0]), atol=1e-3, rtol=0
    )


def test_msm_config_from_dict():
    cfg = MSMConfig.from_dict({"encoder": "tiny", "mask_ratio": 0.7, "mask_mode": "time_block"})
    assert cfg.encoder == get_config("tiny") and cfg.mask_ratio == 0.7
    again = MSMConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(ValueError):
        MSMConfig(encoder="tiny", mask_ratio=1.0)
    with pytest.raises(ValueError):
        MSMConfig(encoder="tiny", mask_mode="blocks")


def test_msm_training_lowers_the_loss_on_sinusoids():
    """A few hundred steps on synthetic sinusoids (random frequency and phase per sample)
    must clearly beat predicting zero: the pipeline can learn."""
    torch.manual_seed(0)
    enc = get_config("tiny", patch_seconds=0.25)  # 8 patches per channel in 2 s
    model = MaskedSignalModel(
        MSMConfig(encoder=enc, mask_ratio=0.5, decoder_dim=64, decoder_depth=1)
    )
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    t = torch.arange(400) / 200

    def batch(b=16, c=4):
        freq = 4 + 8 * torch.rand(b, 1, 1, generator=g)
        phase = 2 * math.pi * torch.rand(b, 1, 1, generator=g)
        amp = 30 + 40 * torch.rand(b, c, 1, generator=g)
        return {"eeg": amp * torch.sin(2 * math.pi * freq * t + phase)}

    losses = []
    for _ in range(250):
        out = model(batch(), generator=g)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        model.encoder.update_router_bias()
        losses.append(out["mse"].item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.3 * first, (first, last)


@pytest.mark.parametrize("target", ["spectrum", "both"])
def test_spectral_target(target):
    """The log amplitude spectrum of a hidden patch is predicted beside (or instead of) its
    samples; a sinusoid's spectrum peaks at its own bin."""
    model = tiny_msm(target=target, spectrum_weight=0.5).train()
    length, n_freqs = model.config.encoder.patch_len, model.config.n_freqs
    t = torch.arange(800) / 200
    eeg = 50 * torch.sin(2 * math.pi * 10 * t).expand(1, 3, 800).clone()  # 10 Hz, 50 uV
    out = model({"eeg": eeg}, generator=torch.Generator().manual_seed(0))
    assert out["pred_spectrum"].shape == out["target_spectrum"].shape == (1, 3, 4, n_freqs)
    peak = out["target_spectrum"][0, 0, 0].argmax().item()
    assert peak == 10, peak  # 1 s patches: bin k is k Hz
    mask = out["mask"]
    manual = (out["pred_spectrum"] - out["target_spectrum"]).pow(2).mean(-1)[mask].mean()
    torch.testing.assert_close(out["mse_spectrum"], manual)
    if target == "both":
        assert out["pred"].shape == (1, 3, 4, length)
        torch.testing.assert_close(out["mse"], out["mse_signal"] + 0.5 * out["mse_spectrum"])
    else:
        torch.testing.assert_close(out["mse"], out["mse_spectrum"])
    out["loss"].backward()
    with pytest.raises(ValueError, match="target must be one of"):
        MSMConfig(encoder="tiny", target="fft")


def test_spectral_patch_embedding():
    """An encoder that also embeds each patch's log band power: shapes, padding still never
    leaks (NaN in the padding included), and a bad band count is refused."""
    torch.manual_seed(0)
    model = Encoder(get_config("tiny", spectral_bands=8)).eval()
    batch = make_batch([19, 7], [4.0, 2.5], seed=2)
    noisy = dict(batch, eeg=batch["eeg"].clone())
    pad = ~(batch["channel_mask"][:, :, None] & batch["time_mask"][:, None, :])
    noisy["eeg"][pad] = float("nan")
    with torch.no_grad():
        out, out2 = model(batch), model(noisy)
    assert out.tokens.shape == (2, 19 * 4, 64)
    assert torch.equal(out.tokens[out.valid], out2.tokens[out2.valid])
    assert torch.isfinite(out2.tokens[out2.valid]).all()
    with pytest.raises(ValueError, match="spectral_bands must be in"):
        get_config("tiny", spectral_bands=500)


def test_band_spectrum_target_and_visible_weight():
    model = tiny_msm(target="spectrum", spectrum_bands=12, visible_weight=0.5).train()
    t = torch.arange(800) / 200
    eeg = 50 * torch.sin(2 * math.pi * 10 * t).expand(1, 3, 800).clone()
    out = model({"eeg": eeg}, generator=torch.Generator().manual_seed(0))
    assert out["target_spectrum"].shape == (1, 3, 4, 12)
    from pretrain.spectral import band_matrix

    peak_band = out["target_spectrum"][0, 0, 0].argmax().item()
    assert band_matrix(101, 12)[10, peak_band] > 0  # the band holding 10 Hz
    per_patch = (out["pred_spectrum"] - out["target_spectrum"]).pow(2).mean(-1)
    visible = out["valid"] & ~out["mask"]
    manual = per_patch[out["mask"]].mean() + 0.5 * per_patch[visible].mean()
    torch.testing.assert_close(out["mse_spectrum"], manual)
