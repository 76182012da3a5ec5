"""Metrics on hand-made cases whose right answer is known exactly."""

from __future__ import annotations

import pytest
import torch

from finetune.metrics import (
    caption_scores,
    clip_similarity,
    format_report,
    n_way_semantic_accuracy,
    report,
    shuffled_control,
    topk_retrieval,
    zero_shot_classify,
)


def _orthonormal(b: int, d: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, b, generator=torch.Generator().manual_seed(0)))[0].T


def test_perfect_embeddings_retrieve_everything_and_the_control_is_chance():
    emb = _orthonormal(200, 256)  # [B, Dc] distinct unit vectors
    assert topk_retrieval(emb, emb * 3.0) == {"top1": 1.0, "top5": 1.0}  # scale-free (cosine)
    assert topk_retrieval(emb, emb, n_way=50) == {"top1": 1.0, "top5": 1.0}
    control = shuffled_control(emb, emb, n_way=50, seed=0)
    # Re-paired orthogonal vectors tie at 0 with every distractor: ties count against.
    assert control["top1"] <= 0.05, control
    rand = torch.randn(2000, 64, generator=torch.Generator().manual_seed(1))
    chance = shuffled_control(rand, rand, k=(1, 5), n_way=10, seed=3)
    assert abs(chance["top1"] - 0.1) < 0.03, f"shuffled top1 {chance['top1']:.3f}, chance 0.1"
    assert abs(chance["top5"] - 0.5) < 0.05, f"shuffled top5 {chance['top5']:.3f}, chance 0.5"


def test_topk_counts_ties_and_ranks_exactly():
    stim = torch.eye(3)
    eeg = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.9, 0.0], [1.0, 1.0, 1.0]])
    # Row 0 finds its own; row 1 is nearer stimulus 0 (rank 2); row 2 ties with all (rank 3).
    assert topk_retrieval(eeg, stim, k=(1, 2, 3)) == {
        "top1": pytest.approx(1 / 3),
        "top2": pytest.approx(2 / 3),
        "top3": pytest.approx(1.0),
    }
    assert topk_retrieval(torch.ones(4, 3), torch.ones(4, 3), k=(1,))["top1"] == 0.0
    with pytest.raises(ValueError, match="n_way"):
        topk_retrieval(stim, stim, n_way=4)


def test_zero_shot_and_clip_similarity():
    concepts = torch.eye(4)  # [C, Dc]
    eeg = torch.tensor([[0.9, 0.1, 0, 0], [0, 0, 1.0, 0.2], [0, 1.0, 0, 0]])
    assert zero_shot_classify(eeg, concepts, torch.tensor([0, 2, 3])) == pytest.approx(2 / 3)
    a = torch.randn(5, 8)
    assert clip_similarity(a, 2 * a) == pytest.approx(1.0)
    assert clip_similarity(a, -a) == pytest.approx(-1.0)
    assert clip_similarity(torch.eye(2), torch.eye(2).flip(0)) == pytest.approx(0.0)


def test_caption_scores():
    refs = [["a dog running on the beach", "a dog on sand"], ["a red apple on a table"]]
    same = caption_scores(["a dog running on the beach", "a red apple on a table"], refs)
    assert same == {
        "bleu1": pytest.approx(1.0),
        "bleu4": pytest.approx(1.0),
        "rougeL": pytest.approx(1.0),
    }
    wrong = caption_scores(["zebra zebra zebra", "blue sky over mountains"], refs)
    assert wrong["bleu1"] == 0.0 and wrong["bleu4"] == 0.0 and wrong["rougeL"] == 0.0
    # "a dog on sand" matches the second reference exactly: ROUGE-L takes the best reference.
    best = caption_scores(["a dog on sand"], [refs[0]])
    assert best["rougeL"] == pytest.approx(1.0) and best["bleu1"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="reference"):
        caption_scores(["a"], [])


def test_n_way_semantic_accuracy():
    labels = torch.tensor([3, 7, 1, 0])
    perfect = torch.nn.functional.one_hot(labels, 100).float()  # the classifier's probabilities

    def oracle(images):
        return perfect[: len(images)]

    images = torch.zeros(4, 3, 8, 8)
    assert n_way_semantic_accuracy(images, labels, oracle, n_way=50, trials=5) == 1.0
    # Always-class-0 classifier: right for the image of class 0 only; for the others the true
    # class ties with all distractors at 0 (a tie is a miss), so 1 of 4 images.
    always0 = torch.nn.functional.one_hot(torch.zeros(4, dtype=torch.long), 100).float()
    acc = n_way_semantic_accuracy(images, labels, lambda x: always0, n_way=50, trials=5)
    assert acc == pytest.approx(0.25)
    # A uniformly random classifier sits at chance 1/n_way.
    many = torch.randint(0, 100, (3000,), generator=torch.Generator().manual_seed(0))
    noise = torch.rand(3000, 100, generator=torch.Generator().manual_seed(1))
    acc = n_way_semantic_accuracy(None, many, lambda x: noise, n_way=10, trials=3, seed=2)
    assert abs(acc - 0.1) < 0.02, f"random classifier {acc:.3f}, chance 0.1"


def test_report_puts_each_metric_beside_its_control():
    rows = report({"top1": 0.4, "bleu4": 0.2}, {"top1": 0.1})
    assert rows["top1"] == {"value": 0.4, "control": 0.1, "margin": pytest.approx(0.3)}
    assert rows["bleu4"]["control"] != rows["bleu4"]["control"]  # NaN: no control given
    table = format_report(rows)
    assert "top1" in table and "+0.3000" in table
