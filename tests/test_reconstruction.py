"""`brainmoe evaluate reconstruction`: its baselines are the classical methods, and a short
pretraining on real EEG beats them on a subject it never saw."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.encoder import Encoder
from pretrain.encoder_config import get_config
from pretrain.reconstruction import linear_gap, neighbour_predict, spline_predict
from tests.conftest import PHYSIONET, REPO, _need

EDF = "MNE-eegbci-data/files/eegmmidb/1.0.0"


def test_spline_baseline_is_mnes_interpolate_bads(physionet):
    """The spline baseline gives what `raw.interpolate_bads` gives for the same channels."""
    import mne
    from mne.bem import _fit_sphere

    from shards.channels import canonicalize

    raw = mne.io.read_raw_edf(physionet / EDF / "S001/S001R04.edf", preload=True, verbose="error")
    raw.pick("eeg").crop(10, 11)
    channels = canonicalize(raw.ch_names, None)
    raw.rename_channels(dict(zip(raw.ch_names, channels.names, strict=True)))
    pos = channels.positions.astype(np.float64)
    raw.set_montage(mne.channels.make_dig_montage(dict(zip(channels.names, pos, strict=True))))
    hidden = np.zeros(len(pos), dtype=bool)
    hidden[np.random.default_rng(0).choice(len(pos), 25, replace=False)] = True
    origin = _fit_sphere(pos)[1]
    x = raw.get_data() * 1e6  # [C, L] uV

    ours = spline_predict(x, ~hidden, hidden, pos - origin)
    raw.info["bads"] = [n for n, h in zip(raw.ch_names, hidden, strict=True) if h]
    theirs = raw.copy().interpolate_bads(origin=origin, verbose="error").get_data()[hidden] * 1e6
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    # and it is a sensible interpolation: far better than the nearest channel alone
    err = lambda p: ((p - x[hidden]) ** 2).sum() / (x[hidden] ** 2).sum()  # noqa: E731
    assert err(ours) < err(neighbour_predict(x, ~hidden, hidden, pos))


def test_decoder_spline_path_is_mnes_spline_batched():
    """The model's SplinePath computes MNE's interpolation for every patch at once."""
    from pretrain.mixing import SplinePath
    from pretrain.reconstruction import _sphere_origin
    from shards.channels import standard_positions

    std = standard_positions()
    names = ["Fp1", "Fp2", "F7", "F3", "Fz", "F4", "F8", "T7", "C3", "Cz", "C4", "T8", "P7"]
    names += ["P3", "Pz", "P4", "P8", "O1", "O2", "FC1", "FC2", "CP1", "CP2", "Oz"]
    pos = np.stack([std[n] for n in names]).astype(np.float64)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((len(names), 3, 40))  # [C, P, L]
    visible = rng.random((len(names), 3)) > 0.5
    est = (
        SplinePath(8)
        .interpolate(
            torch.tensor(x)[None],
            torch.tensor(visible)[None],
            torch.tensor(pos, dtype=torch.float32)[None],
            torch.ones(1, len(names), dtype=torch.bool),
        )[0]
        .numpy()
    )
    centred = pos - _sphere_origin(pos)
    for t in range(3):
        ref = spline_predict(x[:, t], visible[:, t], ~visible[:, t], centred)
        np.testing.assert_allclose(est[~visible[:, t], t], ref, atol=1e-5)


def test_tabulated_spline_kernel_equals_the_legendre_series():
    from pretrain.mixing import legendre_g, legendre_series

    cos = torch.cat([torch.linspace(-1, 1, 1001, dtype=torch.float64), torch.rand(5000) * 2 - 1])
    exact = legendre_series(cos)
    assert float(exact.abs().max()) > 0.01  # the kernel's scale, not a vanishing function
    torch.testing.assert_close(legendre_g(cos), exact, atol=1e-10, rtol=0)
    torch.testing.assert_close(legendre_g(cos.float()), exact.float(), atol=1e-7, rtol=0)


def test_linear_gap_joins_the_edges():
    before, after = np.array([0.0, 1.0]), np.array([4.0, 0.0])
    gap = linear_gap(before, after, 3)
    np.testing.assert_allclose(gap, [1.75, 2.5, 3.25])
    np.testing.assert_allclose(linear_gap(before, None, 3), [1.0, 1.0, 1.0])
    assert not linear_gap(None, None, 4).any()


@pytest.mark.parametrize("channel_bands", [False, True])
def test_encoder_that_sees_only_visible_patches_ignores_hidden_values(channel_bands):
    """MAE input, window normalisation and the channels' band power from visible patches:
    hidden values cannot leak."""
    torch.manual_seed(0)
    cfg = get_config("tiny", input_norm="window", spatial_bias=True, channel_bands=channel_bands)
    enc = Encoder(cfg).eval()
    names = ["Fp1", "Fp2", "C3", "C4", "Cz", "O1", "O2", "Pz"]
    eeg = torch.randn(2, len(names), 800) * 20
    batch = {"eeg": eeg, "ch_names": [names, names]}
    inp = enc.prepare(batch)
    keep = torch.rand(inp.valid.shape, generator=torch.Generator().manual_seed(1)) > 0.6
    out = enc.encode(inp, keep=keep)
    noisy = enc.prepare({"eeg": eeg.clone(), "ch_names": [names, names]})
    hidden = ~keep
    noisy.patches[hidden] = noisy.patches[hidden] * 50 + 3.0
    out2 = enc.encode(noisy, keep=keep)
    torch.testing.assert_close(out.tokens, out2.tokens)
    torch.testing.assert_close(out.scale, out2.scale)
    if channel_bands:  # and the band power does reach the tokens
        louder = enc.prepare({"eeg": eeg.clone(), "ch_names": [names, names]})
        louder.patches[:, 2] = louder.patches[:, 2] * 3.0  # C3 louder in every patch
        assert not torch.allclose(enc.encode(louder, keep=keep).tokens, out.tokens)
    assert out.index.shape == out.valid.shape and int(out.valid.sum()) == int(keep.sum())


# the recipe's objective around a tiny encoder: MAE input, raw-sample paths, token-only head
RECIPE_DECODER = dict(
    encoder_input="visible",
    center_patches=True,
    mix_heads=2,
    time_mix=True,
    spline_path=True,
    token_weight=1.0,
)


def test_token_loss_reaches_the_encoder_but_not_the_raw_paths():
    """``msm.token_weight``: the token-only reconstruction is added at its weight, and its
    gradient trains the encoder (it cannot lean on the raw-sample mixing paths)."""
    from pretrain.msm import MaskedSignalModel, MSMConfig
    from tests.test_encoder_contract import make_batch

    cfg = get_config("tiny", spatial_bias=True, input_norm="window", learn_spatial_slopes=False)
    torch.manual_seed(0)
    args = dict(encoder=cfg, encoder_input="visible", center_patches=True, mix_heads=2)
    model = MaskedSignalModel(MSMConfig(**args, time_mix=True, token_weight=0.5))
    assert MaskedSignalModel(MSMConfig(**args)).token_head is None  # off by default
    out = model(
        make_batch([19, 32], [4.0, 4.0], seed=6), generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(out["mse"], out["mse_signal"] + 0.5 * out["mse_tokens"])
    out["mse_tokens"].backward()
    mixing = [*model.spatial_mix.parameters(), *model.time_mix.parameters()]
    assert all(p.grad is None or not p.grad.any() for p in mixing)
    assert model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="token_weight"):
        MSMConfig(**args, token_weight=-1.0)


def test_detached_raw_paths_train_only_themselves():
    """``msm.mix_detached``: the scored (mixed) prediction is unchanged, but its loss trains
    only the raw paths and the decoder's output head; the encoder and the decoder blocks learn
    from the token-only loss alone."""
    from pretrain.msm import MaskedSignalModel, MSMConfig
    from tests.test_encoder_contract import make_batch

    cfg = get_config("tiny", spatial_bias=True, input_norm="window", learn_spatial_slopes=False)
    args = dict(encoder=cfg, **RECIPE_DECODER)
    torch.manual_seed(0)
    attached = MaskedSignalModel(MSMConfig(**args))
    detached = MaskedSignalModel(MSMConfig(**args, mix_detached=True))
    detached.load_state_dict(attached.state_dict())
    batch = make_batch([19, 32], [4.0, 4.0], seed=6)
    ref = attached(batch, generator=torch.Generator().manual_seed(0))
    out = detached(batch, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["pred"], ref["pred"])
    torch.testing.assert_close(out["mse"], ref["mse"])

    out["mse_signal"].backward()
    upstream = [*detached.encoder.parameters(), *detached.decoder.blocks.parameters()]
    assert all(p.grad is None or not p.grad.any() for p in upstream)
    trained = [
        detached.time_mix.prev.weight,
        detached.decoder.head.weight,
        detached.spline_path.gate.weight,
    ]
    assert all(p.grad is not None and p.grad.any() for p in trained)
    ref["mse_signal"].backward()  # attached: the same loss reaches the encoder
    assert attached.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    detached.zero_grad(set_to_none=True)
    out = detached(batch, generator=torch.Generator().manual_seed(0))
    out["mse_tokens"].backward()
    assert detached.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="mix_detached"):
        MSMConfig(**{**args, "token_weight": 0.0}, mix_detached=True)


def _encoded_grid(model, batch, out) -> tuple:
    """Re-encode what the model's forward saw (its mask) and scatter the encoded tokens back
    to the token grid -> (encoder output, tokens `[B, C*P, D]` float32, visible `[B, C, P]`)."""
    inp = model.encoder.prepare(batch)
    visible = out["valid"] & ~out["mask"]
    if model.config.encoder_input == "visible":
        enc = model.encoder.encode(inp, keep=visible)
    else:
        enc = model.encoder.encode(inp, token_mask=out["mask"], mask_token=model.mask_token)
    b, c, p = visible.shape
    d = enc.tokens.shape[-1]
    tokens = torch.zeros(b, c * p, d)
    index = enc.index if enc.index is not None else torch.arange(c * p).expand(b, -1)
    tokens = tokens.scatter(1, index[..., None].expand(-1, -1, d), enc.tokens.float())
    return enc, tokens, visible


@pytest.mark.parametrize("encoder_input", ["visible", "all"])
def test_own_spectrum_loss_scores_the_visible_tokens_against_their_own_patches(encoder_input):
    """``msm.own_spectrum_weight``: a linear read-out of each encoded visible token is scored
    against its own patch's log band amplitude; hidden and invalid patches are not scored."""
    from pretrain.msm import MaskedSignalModel, MSMConfig
    from pretrain.spectral import log_spectrum
    from tests.test_encoder_contract import make_batch

    cfg = get_config("tiny", input_norm="window")
    torch.manual_seed(0)
    args = dict(encoder=cfg, encoder_input=encoder_input, own_spectrum_bands=8)
    model = MaskedSignalModel(MSMConfig(**args, own_spectrum_weight=0.5))
    assert MaskedSignalModel(MSMConfig(encoder=cfg)).own_spectrum_head is None  # off by default
    batch = make_batch([19, 32], [4.0, 4.0], seed=6)
    out = model(batch, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["mse"], out["mse_signal"] + 0.5 * out["mse_own_spectrum"])

    # the same figure by hand, from every token of a full (unmasked) encoding
    enc, tokens, visible = _encoded_grid(model, batch, out)
    b, c, p = visible.shape
    pred = model.own_spectrum_head(tokens).view(b, c, p, 8)
    err = (pred - log_spectrum(enc.patches, 8)).pow(2).mean(-1)
    expect = (err * visible).sum() / visible.sum()
    torch.testing.assert_close(out["mse_own_spectrum"], expect, rtol=1e-4, atol=1e-5)
    out["mse_own_spectrum"].backward()
    assert model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="own_spectrum_weight"):
        MSMConfig(**args, own_spectrum_weight=-1.0)


@pytest.mark.parametrize("encoder_input", ["visible", "all"])
def test_band_target_reads_each_channels_window_band_power_from_its_tokens(encoder_input):
    """``msm.band_target_weight``: a linear read-out of each channel's mean encoded (visible)
    token is scored against the channel's classic-band log amplitude over the *whole* window,
    hidden patches included, standardised per band over the batch; channels with no encoded
    token are not scored."""
    from pretrain.aux_objectives import standardise_bands
    from pretrain.msm import MaskedSignalModel, MSMConfig
    from pretrain.spectral import channel_band_power
    from tests.test_encoder_contract import make_batch

    cfg = get_config("tiny", input_norm="window")
    torch.manual_seed(0)
    args = dict(encoder=cfg, encoder_input=encoder_input)
    model = MaskedSignalModel(MSMConfig(**args, band_target_weight=0.5))
    assert MaskedSignalModel(MSMConfig(encoder=cfg)).band_head is None  # off by default
    batch = make_batch([19, 32], [4.0, 4.0], seed=6)
    out = model(batch, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["mse"], out["mse_signal"] + 0.5 * out["mse_bands"])

    # the same figure by hand: the encoded tokens back on their grid, each channel's visible
    # ones averaged
    enc, tokens, visible = _encoded_grid(model, batch, out)
    b, c, p = visible.shape
    w = visible[..., None].float()  # [B, C, P, 1]
    per_channel = (tokens.view(b, c, p, -1) * w).sum(2) / w.sum(2).clamp_min(1)
    target = channel_band_power(enc.patches, out["valid"], cfg.patch_seconds)  # every patch
    scored = visible.any(2)
    assert not scored.all() and scored.any()  # the 19-channel window's padding is not scored
    mean, var = target[scored].mean(0), target[scored].var(0, unbiased=False)
    z = (target - mean) / (var + 1e-6).sqrt()
    torch.testing.assert_close(standardise_bands(target, scored)[scored], z[scored])
    err = (model.band_head(per_channel) - z).pow(2).mean(-1)
    expect = (err * scored).sum() / scored.sum()
    torch.testing.assert_close(out["mse_bands"], expect, rtol=1e-4, atol=1e-5)
    # hidden patches enter the target: it changes when only a hidden patch changes
    hidden = (out["mask"] & out["valid"]).nonzero()[0].tolist()
    moved = enc.patches.clone()
    moved[tuple(hidden)] *= 3.0
    assert not torch.allclose(channel_band_power(moved, out["valid"], 1.0), target)
    out["mse_bands"].backward()
    assert model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="band_target_weight"):
        MSMConfig(**args, band_target_weight=-1.0)


def _build(folder: Path, out: Path, pattern: str) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "cluster.cli",
        "shards",
        "build",
        "--source",
        f"files:{folder}?dataset=eegmmidb&pattern={pattern}",
        "--out",
        str(out),
        "--workers",
        "0",
        "preprocess.h_freq=45",
    ]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
    return out


@pytest.mark.slow
@pytest.mark.shared_data
def test_short_pretraining_beats_classical_baselines_on_an_unseen_subject(tmp_path):
    """The recipe's model, briefly trained on S001-S002, reconstructs S003's hidden patches
    better than copying the nearest channel (random masking) and better than linear
    interpolation and zero (whole time patches hidden on every channel)."""
    root = _need(PHYSIONET) / EDF
    train = [_build(root / f"S00{s}", tmp_path / f"S00{s}", "*.edf") for s in (1, 2)]
    held_out = _build(root / "S003", tmp_path / "S003", "*R0[4-6].edf")
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "cluster.cli",
        "pretrain",
        "--num-gpus",
        "2",
        "--config",
        "configs/pretrain/eegmmidb-cpu.yaml",
        f"data.shards=[{','.join(map(str, train))}]",
        f"train.run_dir={run_dir}",
        "train.steps=80",
        "train.log_every=20",
        "train.ckpt_every=80",
        "train.plots=false",
        "optim.warmup_steps=10",
    ]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = tmp_path / "eval.json"
    cmd = [
        sys.executable,
        "-m",
        "cluster.cli",
        "evaluate",
        "reconstruction",
        "--run",
        str(run_dir),
        "--source",
        str(held_out),
        "--max-windows",
        "64",
        "--json",
        str(report),
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(report.read_text())
    rnd, blk = result["random"], result["time_block"]
    figures = f"random {rnd}\ntime_block {blk}"
    assert set(rnd) >= {"model", "spline", "neighbour", "zero", "r"}, figures
    assert set(blk) >= {"model", "linear", "zero", "r"}, figures
    assert result["windows"] == 64, figures
    assert rnd["model"] > rnd["neighbour"], figures
    assert blk["model"] > blk["linear"] and blk["model"] > blk["zero"], figures
    assert Path(result["plot"]).exists()


def test_channel_band_power_reads_each_band_from_seen_patches_only():
    """A 10 Hz sine at one channel lands in the alpha band; unseen patches change nothing."""
    from pretrain.spectral import EEG_BANDS_HZ, channel_band_power

    t = torch.arange(200) / 200.0
    patches = torch.zeros(1, 2, 3, 200)
    patches[0, 0] = torch.sin(2 * math.pi * 10.0 * t)
    seen = torch.ones(1, 2, 3, dtype=torch.bool)
    seen[0, 1] = False  # channel 1: nothing seen -> zeros
    bands = channel_band_power(patches, seen, 1.0)
    assert bands.shape == (1, 2, len(EEG_BANDS_HZ))
    assert int(bands[0, 0].argmax()) == 2  # 8-13 Hz
    assert not bands[0, 1].any()
    patches[0, 0, 1] = 50.0 * torch.randn(200)  # a loud patch, hidden
    seen[0, 0, 1] = False
    torch.testing.assert_close(channel_band_power(patches, seen, 1.0)[0, 0], bands[0, 0])


def test_subject_adversary_trains_its_classifier_and_reverses_the_encoders_gradient():
    """``msm.subject_adversary``: the subject cross-entropy joins the loss; its gradient
    reaches the classifier as is and the encoder reversed (scaled), as DANN's does."""
    from pretrain.aux_objectives import GradReverse, subject_bucket, subject_loss
    from pretrain.msm import MaskedSignalModel, MSMConfig
    from tests.test_encoder_contract import make_batch

    x = torch.randn(3, 4, requires_grad=True)
    GradReverse.apply(x, 0.5).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3, 4), -0.5))
    meta = [{"provenance": {"dataset": "d", "subject": s}} for s in ("1", "2")]
    assert subject_bucket(meta[0], 8) == subject_bucket(dict(meta[0]), 8)

    cfg = get_config("tiny", input_norm="window")
    args = dict(encoder=cfg, encoder_input="visible")
    assert MaskedSignalModel(MSMConfig(**args)).subject_head is None  # off by default
    batch = make_batch([19, 32], [4.0, 4.0], seed=6)
    batch["meta"] = meta
    grads = {}
    for scale in (0.5, 1.0):
        torch.manual_seed(0)
        model = MaskedSignalModel(MSMConfig(**args, subject_adversary=scale))
        out = model(batch, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(out["loss"], out["mse"] + out["aux_loss"] + out["subject_ce"])
        enc = model.encoder.encode(model.encoder.prepare(batch))
        ce = subject_loss(model.subject_head, scale, model.config.subject_buckets, enc, meta)
        ce.backward()
        grads[scale] = model.encoder.blocks[-1].attn.qkv.weight.grad.clone()
        assert model.subject_head[0].weight.grad.abs().sum() > 0
    # the encoder's gradient scales with the reversal (and flips sign: -scale x dCE/dtokens)
    torch.testing.assert_close(grads[1.0], 2.0 * grads[0.5], rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="subject_adversary"):
        MSMConfig(**args, subject_adversary=-1.0)
