"""The retrieval head learns a separable EEG->CLIP pairing; its temperature and files behave."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from finetune.heads.retrieval import RetrievalHead, RetrievalHeadConfig, clip_loss

D, DC, STIMULI = 16, 32, 16


def _synthetic(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """16 stimuli: EEG tokens [B, C=3, P=2, D] scattered around a per-stimulus prototype."""
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(STIMULI, 1, 1, D, generator=gen)
    tokens = prototypes + 0.3 * torch.randn(STIMULI, 3, 2, D, generator=gen)
    valid = torch.ones(STIMULI, 3, 2, dtype=torch.bool)
    valid[:, 2, 1] = False  # a padded patch
    tokens[:, 2, 1] = 1e3  # whose values must not matter
    clip = F.normalize(torch.randn(STIMULI, DC, generator=gen), dim=-1)
    text = F.normalize(clip + 0.5 * torch.randn(STIMULI, DC, generator=gen), dim=-1)
    batch = {"clip_image": clip, "clip_text": text, "stimulus_id": [f"s{i}" for i in range(16)]}
    return tokens, valid, batch


def test_loss_falls_and_top1_rises_on_a_separable_set():
    torch.manual_seed(0)
    tokens, valid, batch = _synthetic()
    head = RetrievalHead(
        RetrievalHeadConfig(hidden=64, text_weight=0.5), encoder_dim=D, clip_dim=DC
    )
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2)
    first = head(tokens, valid, batch)
    for _ in range(40):
        out = head(tokens, valid, batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    last = head(tokens, valid, batch)
    assert last["loss"] < 0.1 * first["loss"], f"loss {first['loss']:.3f} -> {last['loss']:.3f}"
    assert first["batch_top1"] <= 0.5 and last["batch_top1"] == 1.0, (
        f"batch top1 {first['batch_top1']:.2f} -> {last['batch_top1']:.2f}"
    )
    assert "retrieval_text_loss" in last
    emb = head.embed(tokens, valid)
    assert emb.shape == (STIMULI, DC)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(STIMULI))


def test_repeated_stimuli_are_positives_of_each_other():
    a = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0]]), dim=-1)
    b = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)  # rows 0, 1 same
    scale = torch.tensor(100.0)
    same = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    _, top1_ids = clip_loss(a, b, scale, same)
    _, top1_diag = clip_loss(a, b, scale)
    # Row 1 ties between the two copies of its image and argmax picks copy 0: a hit by
    # stimulus, a miss by row index.
    assert top1_ids == 1.0, top1_ids
    assert top1_diag == pytest.approx(2 / 3), top1_diag


def test_logit_scale_is_clamped_at_100_and_can_be_frozen():
    head = RetrievalHead(RetrievalHeadConfig(hidden=8), encoder_dim=D, clip_dim=DC)
    assert head.logit_scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        head.log_scale.fill_(math.log(1000.0))
    tokens, valid, batch = _synthetic()
    assert head(tokens, valid, batch)["logit_scale"].item() == pytest.approx(100.0)
    frozen = RetrievalHead(
        RetrievalHeadConfig(hidden=8, learn_temperature=False), encoder_dim=D, clip_dim=DC
    )
    assert not any("log_scale" in n for n, _ in frozen.named_parameters())


def test_save_load_gives_identical_embeddings(tmp_path):
    torch.manual_seed(0)
    tokens, valid, batch = _synthetic()
    head = RetrievalHead(RetrievalHeadConfig(hidden=16), encoder_dim=D, clip_dim=DC)
    with torch.no_grad():
        head.log_scale.fill_(3.0)
    head.save_adapter(tmp_path / "adapter")
    torch.manual_seed(1)
    other = RetrievalHead(RetrievalHeadConfig(hidden=16), encoder_dim=D, clip_dim=DC)
    assert not torch.equal(other.embed(tokens, valid), head.embed(tokens, valid))
    other.load_adapter(tmp_path / "adapter")
    torch.testing.assert_close(
        other.embed(tokens, valid), head.embed(tokens, valid), rtol=0, atol=0
    )
    assert other.logit_scale().item() == pytest.approx(math.exp(3.0))
    assert set(head.trainable_state_dict()) == set(head.state_dict())
    assert head.base_models() == {}
    wrong = RetrievalHead(RetrievalHeadConfig(hidden=16), encoder_dim=D, clip_dim=DC * 2)
    with pytest.raises(ValueError, match="clip_dim"):
        wrong.load_adapter(tmp_path / "adapter")


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="CLIP width"):
        RetrievalHead(RetrievalHeadConfig(), encoder_dim=D)
    head = RetrievalHead(RetrievalHeadConfig(clip_dim=DC, hidden=8), encoder_dim=D)
    tokens, valid, batch = _synthetic()
    with pytest.raises(ValueError, match="clip_image"):
        head(tokens, valid, {"clip_image": batch["clip_image"][:, :8]})
    with pytest.raises(ValueError, match="clip_image"):
        head(tokens, valid, {})
