"""Split-window contrast (pretrain/contrast.py): each half is encoded alone, and the loss is
the in-batch InfoNCE of the two halves' projections."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.contrast import SplitContrast, doubled, split_views
from pretrain.encoder import Encoder
from pretrain.encoder_config import get_config
from pretrain.msm import MaskedSignalModel, MSMConfig
from tests.test_encoder_contract import make_batch


def test_views_are_disjoint_halves_of_the_valid_patches():
    valid = torch.ones(3, 5, 4, dtype=torch.bool)
    valid[1, 2] = False  # a dead channel
    valid[2, :, 3] = False  # a padded last patch
    views = split_views(valid, 0.5, torch.Generator().manual_seed(0))  # [6, C, P]
    first, second = views[:3], views[3:]
    assert not first[..., 2:].any() and not second[..., :2].any()
    assert not (views & ~torch.cat([valid, valid])).any()
    # about half of each half is kept
    assert 0.3 < first[..., :2].float().mean() < 0.7
    with pytest.raises(ValueError, match="at least 2 patches"):
        split_views(valid[..., :1], 0.5)


def test_each_half_is_encoded_without_the_other():
    """What one view's encoding reads cannot depend on the other half's values: the loss
    would otherwise be solved by attention across the split, not by what lasts."""
    torch.manual_seed(0)
    enc = Encoder(get_config("tiny", input_norm="window", spatial_bias=True)).eval()
    head = SplitContrast(enc.config.dim, 16, 0.1, keep=1.0).eval()
    names = ["Fp1", "Fp2", "C3", "C4", "Cz", "O1", "O2", "Pz"]
    eeg = torch.randn(4, len(names), 800) * 20  # 4 patches of 1 s at 200 Hz
    inp = enc.prepare({"eeg": eeg, "ch_names": [names] * 4})
    keep = split_views(inp.valid, 1.0)

    def first_half_tokens(x):
        return enc.encode(doubled(x), keep=keep).tokens[:4]

    changed = enc.prepare({"eeg": eeg.clone(), "ch_names": [names] * 4})
    changed.patches[:, :, 2:] = changed.patches[:, :, 2:] * 40 + 5.0
    torch.testing.assert_close(first_half_tokens(changed), first_half_tokens(inp))

    # the loss is the symmetric InfoNCE of the views' projections, over the batch or,
    # with groups, over each anchor's own group (windows 0, 1 | 2 | 3: only 0 and 1 scored)
    z, _ = head.embed(enc, inp, keep)
    logits = z[:4] @ z[4:].T / 0.1
    target = torch.arange(4)
    expect = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    loss, top1, _ = head(enc, inp)
    torch.testing.assert_close(loss, expect)
    pair = logits[:2, :2]
    expect = 0.5 * (F.cross_entropy(pair, target[:2]) + F.cross_entropy(pair.T, target[:2]))
    loss, top1, _ = head(enc, inp, groups=torch.tensor([7, 7, 1, 2]))
    torch.testing.assert_close(loss, expect)
    assert float(top1) == float((pair.argmax(1) == target[:2]).float().mean())
    loss, _, _ = head(enc, inp, groups=torch.tensor([0, 1, 2, 3]))  # nobody has a negative
    assert float(loss) == 0.0


@pytest.mark.parametrize("encoder_input", ["visible", "all"])
def test_contrast_joins_the_loss_at_its_weight_and_trains_the_encoder(encoder_input):
    torch.manual_seed(0)
    cfg = get_config("tiny", input_norm="window")
    args = dict(encoder=cfg, encoder_input=encoder_input, center_patches=True)
    assert MaskedSignalModel(MSMConfig(**args)).contrast is None  # off by default
    model = MaskedSignalModel(MSMConfig(**args, contrast_weight=0.5))
    batch = make_batch([19, 32, 19, 32], [4.0, 4.0, 4.0, 4.0], seed=3)
    out = model(batch, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["mse"], out["mse_signal"] + 0.5 * out["contrast"])
    assert float(out["contrast"].detach()) > 0
    out["contrast"].backward()
    assert model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None or not p.grad.any() for p in model.decoder.parameters())
    for bad in (
        dict(contrast_weight=-1.0),
        dict(contrast_temperature=0.0),
        dict(contrast_keep=0.0),
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            MSMConfig(**args, **bad)


def test_a_few_steps_teach_the_halves_to_find_each_other():
    """Windows whose halves share a persistent trait (one channel's 10-Hz rhythm at a
    per-window amplitude) under independent noise: a few dozen steps of the contrast alone
    lift the top-1 pairing to twice chance (1/8) or more."""
    torch.manual_seed(0)
    enc = Encoder(get_config("tiny", input_norm="window"))
    head = SplitContrast(enc.config.dim, 16, 0.1, keep=0.75)
    opt = torch.optim.AdamW([*enc.parameters(), *head.parameters()], lr=2e-3)
    names = ["Fp1", "Fp2", "C3", "C4", "Cz", "O1", "O2", "Pz"]
    t = torch.arange(800) / 200.0
    gen = torch.Generator().manual_seed(1)

    def batch():
        eeg = torch.randn(8, len(names), 800, generator=gen) * 5
        amp = torch.rand(8, 1, generator=gen) * 30
        eeg[:, 2] += amp * torch.sin(2 * torch.pi * 10 * t)
        return enc.prepare({"eeg": eeg, "ch_names": [names] * 8})

    def score(n=20):
        with torch.no_grad():
            return sum(float(head(enc, batch(), gen)[1]) for _ in range(n)) / n

    before = score()
    for _ in range(60):
        loss, _, _ = head(enc, batch(), gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = score()
    assert after > max(0.25, before + 0.1), f"top-1 before {before:.3f}, after {after:.3f}"


def test_subject_negatives_come_from_each_samples_provenance():
    """``contrast_negatives=subject``: the groups are the samples' subjects; a batch without
    meta is refused with what to do."""
    torch.manual_seed(0)
    cfg = get_config("tiny", input_norm="window")
    args = dict(encoder=cfg, encoder_input="visible", contrast_weight=1.0)
    model = MaskedSignalModel(MSMConfig(**args, contrast_negatives="subject"))
    batch = make_batch([19, 19, 19, 19], [4.0] * 4, seed=2)
    batch["meta"] = [{"provenance": {"dataset": "d", "subject": s}} for s in ("1", "1", "2", "3")]
    out = model(batch, generator=torch.Generator().manual_seed(0))
    # only the two windows of subject 1 are scored: the loss is theirs alone
    inp = model.encoder.prepare(batch)
    loss, top1, _ = model.contrast(
        model.encoder, inp, torch.Generator().manual_seed(5), torch.tensor([1, 1, 2, 3])
    )
    assert float(loss) > 0 and float(top1) in (0.0, 0.5, 1.0)
    assert float(out["contrast"]) > 0
    del batch["meta"]
    with pytest.raises(ValueError, match="meta"):
        model(batch, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="contrast_negatives"):
        MSMConfig(**args, contrast_negatives="recording")
