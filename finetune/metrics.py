"""Evaluation metrics for the heads, each meant to be read next to a shuffled-pairs control.

EEG decoding numbers are easy to inflate (a leaky split, a retrieval set where one class
dominates), so every retrieval metric has a control computed the same way on randomly
re-paired data: a result means something only by its margin over the control. Captions use
torchmetrics' BLEU and ROUGE-L rather than hand-written n-gram counts.

Captions need two more controls, because a language model can score BLEU without reading the
EEG at all ("Are EEG-to-Text models working?", Jo et al. 2024): the same head fed noise of
the EEG's power (:func:`matched_power_noise`), and the most frequent training caption
written for every window (:func:`most_frequent`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.text import bleu_score, rouge_score


def _paired(a: Tensor, b: Tensor, names: tuple[str, str]) -> tuple[Tensor, Tensor]:
    a = torch.as_tensor(a).detach().float().cpu()
    b = torch.as_tensor(b).detach().float().cpu()
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must both be [B, Dc] with the same shape, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    return F.normalize(a, dim=-1), F.normalize(b, dim=-1)


def topk_retrieval(
    eeg_emb: Tensor,
    stim_emb: Tensor,
    k: Sequence[int] = (1, 5),
    n_way: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """n-way top-k accuracy of finding each EEG window's own stimulus by cosine similarity.

    Row i of ``eeg_emb [B, Dc]`` is paired with row i of ``stim_emb [B, Dc]``. Each EEG is
    ranked against its own stimulus and ``n_way - 1`` others drawn at random (all B when
    ``n_way`` is None). Ties count against the EEG, so constant embeddings score chance, not 1.
    Rows should be distinct stimuli (average repeated trials first). Returns {"top1": ...}.
    """
    eeg, stim = _paired(eeg_emb, stim_emb, ("eeg_emb", "stim_emb"))
    b = len(eeg)
    n = b if n_way is None else n_way
    if not 2 <= n <= b:
        raise ValueError(f"n_way must be between 2 and the number of pairs {b}, got {n}")
    if any(kk < 1 for kk in k):
        raise ValueError(f"k must be positive, got {tuple(k)}")
    sim = eeg @ stim.T  # [B, B]
    true = sim.diagonal()  # [B]
    if n == b:
        others = torch.ones(b, b, dtype=torch.bool).fill_diagonal_(False)
    else:
        gen = torch.Generator().manual_seed(seed)
        # n-1 distinct random others per row: argsort of random keys, self pushed last.
        keys = torch.rand(b, b, generator=gen).fill_diagonal_(2.0)
        chosen = keys.argsort(1)[:, : n - 1]  # [B, n-1]
        others = torch.zeros(b, b, dtype=torch.bool).scatter_(1, chosen, True)
    beaten_by = ((sim >= true[:, None]) & others).sum(1)  # [B] others at least as similar
    return {f"top{kk}": float((beaten_by < kk).float().mean()) for kk in k}


def shuffled_control(
    eeg_emb: Tensor,
    stim_emb: Tensor,
    k: Sequence[int] = (1, 5),
    n_way: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """:func:`topk_retrieval` after randomly re-pairing EEG and stimuli: chance is ~k/n."""
    perm = torch.randperm(len(stim_emb), generator=torch.Generator().manual_seed(seed + 1))
    return topk_retrieval(eeg_emb, torch.as_tensor(stim_emb)[perm], k, n_way, seed)


def zero_shot_classify(eeg_emb: Tensor, concept_emb: Tensor, true_concept_idx: Tensor) -> float:
    """Accuracy of labelling each EEG [B, Dc] with its nearest concept embedding [C, Dc]."""
    eeg = F.normalize(torch.as_tensor(eeg_emb).detach().float().cpu(), dim=-1)
    concepts = F.normalize(torch.as_tensor(concept_emb).detach().float().cpu(), dim=-1)
    truth = torch.as_tensor(true_concept_idx).long().cpu()
    if eeg.shape[-1] != concepts.shape[-1] or truth.shape != (len(eeg),):
        raise ValueError(
            f"expected eeg_emb [B, Dc], concept_emb [C, Dc], true_concept_idx [B]; got "
            f"{tuple(eeg.shape)}, {tuple(concepts.shape)}, {tuple(truth.shape)}"
        )
    return float(((eeg @ concepts.T).argmax(1) == truth).float().mean())


def caption_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU-1 and BLEU-4, and ROUGE-L F1 (best reference per caption, averaged)."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(
            f"need one reference list per prediction, got {len(predictions)} predictions and "
            f"{len(references)} reference lists"
        )
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if any(not r for r in refs):
        raise ValueError("every prediction needs at least one reference caption")
    rouge = rouge_score(predictions, refs, rouge_keys="rougeL", accumulate="best")
    return {
        "bleu1": float(bleu_score(predictions, refs, n_gram=1)),
        "bleu4": float(bleu_score(predictions, refs, n_gram=4)),
        "rougeL": float(rouge["rougeL_fmeasure"]),
    }


def matched_power_noise(
    eeg: Tensor, channel_mask: Tensor, time_mask: Tensor, generator: torch.Generator
) -> Tensor:
    """Gaussian white noise in place of EEG ``[B, C, T]``, each real channel of each window
    scaled to exactly that channel's power (mean square over its real samples).

    The encoder then sees signals of the right amplitude on the right montage and nothing
    else, so whatever the heads still get right comes from the prior, not from the EEG.
    Padded channels and samples stay zero.
    """
    x = torch.as_tensor(eeg).float()
    keep = channel_mask.bool()[:, :, None] & time_mask.bool()[:, None, :]  # [B, C, T]
    if x.ndim != 3 or keep.shape != x.shape:
        raise ValueError(
            f"expected eeg [B, C, T] with channel_mask [B, C] and time_mask [B, T], got "
            f"{tuple(x.shape)}, {tuple(channel_mask.shape)}, {tuple(time_mask.shape)}"
        )
    x = x * keep
    n = keep.sum(-1, keepdim=True).clamp(min=1)  # [B, C, 1] real samples per channel
    noise = torch.randn(x.shape, generator=generator) * keep
    power = x.pow(2).sum(-1, keepdim=True) / n  # [B, C, 1]
    noise_power = noise.pow(2).sum(-1, keepdim=True) / n
    return noise * (power / noise_power.clamp(min=1e-12)).sqrt()


def most_frequent(captions: Sequence[str]) -> str:
    """The caption written most often (ties: the alphabetically first, so runs agree)."""
    if not captions:
        raise ValueError("need at least one caption to find the most frequent one")
    counts = Counter(captions)
    return min(counts, key=lambda c: (-counts[c], c))


def clip_similarity(image_emb_generated: Tensor, image_emb_stimulus: Tensor) -> float:
    """Mean cosine between each generated image's CLIP embedding and its stimulus'."""
    gen, stim = _paired(image_emb_generated, image_emb_stimulus, ("generated", "stimulus"))
    return float((gen * stim).sum(-1).mean())


def n_way_semantic_accuracy(
    generated_images: Any,
    stimulus_labels: Sequence[int] | Tensor,
    classifier: Callable[[Any], Tensor],
    n_way: int = 50,
    trials: int = 50,
    seed: int = 0,
) -> float:
    """DreamDiffusion's n-way top-1: does a pretrained classifier see the right class?

    ``classifier(generated_images) -> [B, classes]`` probabilities (e.g. an ImageNet ViT).
    For each image and trial, the true class and ``n_way - 1`` random other classes are kept,
    and the trial counts if the true class has the highest probability among them; chance is
    1 / n_way.
    """
    probs = torch.as_tensor(classifier(generated_images)).detach().float().cpu()
    labels = torch.as_tensor(stimulus_labels).long().cpu()
    if probs.ndim != 2 or len(probs) != len(labels):
        raise ValueError(
            f"classifier must return [B, classes] for {len(labels)} images, "
            f"got {tuple(probs.shape)}"
        )
    b, classes = probs.shape
    if not 2 <= n_way <= classes:
        raise ValueError(f"n_way must be between 2 and the {classes} classes, got {n_way}")
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    gen = torch.Generator().manual_seed(seed)
    true_p = probs.gather(1, labels[:, None])  # [B, 1]
    correct = 0.0
    for _ in range(trials):
        keys = torch.rand(b, classes, generator=gen)
        keys.scatter_(1, labels[:, None], 2.0)  # never draw the true class as a distractor
        distractors = keys.argsort(1)[:, : n_way - 1]  # [B, n_way - 1]
        correct += float((probs.gather(1, distractors) < true_p).all(1).float().mean())
    return correct / trials


def report(metrics: dict[str, float], control: dict[str, float]) -> dict[str, dict[str, float]]:
    """{metric: {"value", "control", "margin"}}: each result beside its shuffled control."""
    rows = {}
    for name, value in metrics.items():
        ctrl = control.get(name)
        rows[name] = {
            "value": float(value),
            "control": float("nan") if ctrl is None else float(ctrl),
            "margin": float("nan") if ctrl is None else float(value) - float(ctrl),
        }
    return rows


def format_report(rows: dict[str, dict[str, float]]) -> str:
    """A plain-text table of :func:`report`'s rows for logs and the README."""
    lines = [f"{'metric':<16} {'value':>8} {'control':>8} {'margin':>8}"]
    for name, row in rows.items():
        lines.append(f"{name:<16} {row['value']:8.4f} {row['control']:8.4f} {row['margin']:+8.4f}")
    return "\n".join(lines)
