"""Held-out scores of a finetuned model, each beside its shuffled-pairs control.

Why a control for every number: with few classes, a model can score far above the
textbook chance level by predicting the class prior, or captions can score BLEU by sharing
a template; the same metric on randomly re-paired EEG/stimuli measures exactly that floor.

Retrieval is scored per stimulus (EEG embeddings of a stimulus's repetitions averaged
first, as ATM and THINGS-EEG2 papers do), n-way over every held-out stimulus. Captions are
BLEU-1/4 and ROUGE-L against the stimulus's reference captions.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from finetune import metrics
from finetune.splits import KeySelect
from shards.reader import ReaderConfig, make_loader


@torch.no_grad()
def encode_test(model, cfg, split, pairing, device, dtype, limit: int):
    """-> list of (batch, tokens, valid) over up to `limit` held-out windows."""
    loader = make_loader(
        cfg.data.shards,
        ReaderConfig(batch_size=16, num_workers=0, shuffle=False),
        rank=0,
        world_size=1,
        select=KeySelect(split.test_keys),
    )
    seen, out = 0, []
    for batch in loader:
        batch = pairing(batch)
        moved = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        if dtype != torch.float32:
            moved["eeg"] = moved["eeg"].to(dtype)
        enc = model.encoder(moved)
        out.append((batch, enc.tokens, enc.valid))
        seen += len(batch["key"])
        if seen >= limit:
            break
    return out


@torch.no_grad()
def evaluate(model, cfg, prep, pairing, device, dtype) -> dict[str, Any]:
    encoded = encode_test(model, cfg, prep.split, pairing, device, dtype, cfg.train.eval_windows)
    scores: dict[str, Any] = {"windows": sum(len(b["key"]) for b, _, _ in encoded)}
    if "retrieval" in model.heads:
        scores["retrieval"] = _retrieval(model.heads["retrieval"], encoded, pairing)
    if "text" in model.heads:
        scores["text"] = _captions(model.heads["text"], encoded, prep.stimuli)
    if "image" in model.heads and cfg.train.eval_images > 0:
        scores["image"] = _images(model.heads["image"], encoded, pairing, cfg, device)
    return scores


def _retrieval(head, encoded, pairing) -> dict[str, Any]:
    per_stim: dict[str, list[torch.Tensor]] = defaultdict(list)
    concepts: list[str] = []
    window_emb = []
    for batch, tokens, valid in encoded:
        emb = head.embed(tokens, valid).float().cpu()  # [B, Dc]
        window_emb.append(emb)
        concepts += batch["concept"]
        for sid, e in zip(batch["stimulus_id"], emb, strict=True):
            per_stim[sid].append(e)
    ids = sorted(per_stim)
    eeg = torch.stack([torch.stack(per_stim[i]).mean(0) for i in ids])  # [S, Dc]
    stim = pairing.clip.image(ids)  # [S, Dc]
    k = tuple(kk for kk in (1, 5) if kk < len(ids))
    value = metrics.topk_retrieval(eeg, stim, k=k)
    control = metrics.shuffled_control(eeg, stim, k=k)
    # every held-out window against every held-out stimulus (no averaging): noisier per
    # window, but many more trials than stimuli, so a steadier estimate
    windows = torch.cat(window_emb)  # [W, Dc]
    window_ids = [sid for batch, _, _ in encoded for sid in batch["stimulus_id"]]
    row = {sid: n for n, sid in enumerate(ids)}
    own = torch.tensor([row[s] for s in window_ids])
    ranked = (windows @ stim.T).argmax(1)
    value["window_top1"] = float((ranked == own).float().mean())
    shuffled_own = own[torch.randperm(len(own), generator=torch.Generator().manual_seed(2))]
    control["window_top1"] = float((ranked == shuffled_own).float().mean())
    names, concept_emb = pairing.clip.concepts
    index = {n: j for j, n in enumerate(names)}
    truth = torch.tensor([index[c] for c in concepts])
    value["zero_shot"] = metrics.zero_shot_classify(windows, concept_emb, truth)
    shuffled = truth[torch.randperm(len(truth), generator=torch.Generator().manual_seed(1))]
    control["zero_shot"] = metrics.zero_shot_classify(windows, concept_emb, shuffled)
    return {
        "stimuli": len(ids),
        "chance_top1": 1.0 / len(ids),
        "report": metrics.report(value, control),
    }


def _images(head, encoded, pairing, cfg, device) -> dict[str, Any]:
    """Generated images in CLIP space: similarity to their own stimulus, and DreamDiffusion's
    n-way top-1 "semantic" accuracy with CLIP's zero-shot concept classifier standing in for
    the pluggable image classifier -- both beside shuffled pairs."""
    from finetune.clip_cache import Embedder

    limit = cfg.train.eval_images
    pictures, ids = [], []
    for batch, tokens, valid in encoded:
        n = min(limit - len(ids), len(batch["key"]))
        if n <= 0:
            break
        pictures += head.generate(tokens[:n], valid[:n], num_images=1, seed=0)
        ids += batch["stimulus_id"][:n]
    clip_cfg = cfg.data.clip
    model_name, pretrained = clip_cfg.resolved()
    embedder = Embedder(model_name, pretrained, str(device), clip_cfg.batch_size)
    generated = torch.from_numpy(embedder.pictures(pictures))  # [G, Dc]
    stimulus = pairing.clip.image(ids)  # [G, Dc]
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(3))
    names, concept_emb = pairing.clip.concepts
    index = {n: j for j, n in enumerate(names)}
    labels = torch.tensor([index[c] for c in pairing.clip.concept_of(ids)])

    def classifier(images: torch.Tensor) -> torch.Tensor:  # CLIP zero-shot: [G, concepts]
        return (100 * images @ concept_emb.T).softmax(-1)

    n_way = min(50, len(names))
    value = {"clip_similarity": metrics.clip_similarity(generated, stimulus)}
    control = {"clip_similarity": metrics.clip_similarity(generated, stimulus[perm])}
    if n_way >= 2:
        value["semantic_top1"] = metrics.n_way_semantic_accuracy(
            generated, labels, classifier, n_way=n_way
        )
        control["semantic_top1"] = metrics.n_way_semantic_accuracy(
            generated, labels[perm], classifier, n_way=n_way
        )
    return {"images": len(ids), "n_way": n_way, "report": metrics.report(value, control)}


def _captions(head, encoded, stimuli, limit: int = 32) -> dict[str, Any]:
    predictions, references = [], []
    for batch, tokens, valid in encoded:
        if len(predictions) >= limit:
            break
        predictions += head.generate(tokens, valid)
        references += [stimuli[s].captions for s in batch["stimulus_id"]]
    predictions, references = predictions[:limit], references[:limit]
    perm = torch.randperm(len(references), generator=torch.Generator().manual_seed(1)).tolist()
    value = metrics.caption_scores(predictions, references)
    control = metrics.caption_scores(predictions, [references[j] for j in perm])
    return {
        "examples": [
            {"predicted": p, "reference": r[0]}
            for p, r in zip(predictions[:5], references[:5], strict=True)
        ],
        "report": metrics.report(value, control),
    }
