"""Held-out scores of a finetuned model, each beside its controls.

Why a control for every number: with few classes, a model can score far above the
textbook chance level by predicting the class prior, or captions can score BLEU by sharing
a template; the same metric on randomly re-paired EEG/stimuli measures exactly that floor.

Retrieval is scored per stimulus (EEG embeddings of a stimulus's repetitions averaged
first, as ATM and THINGS-EEG2 papers do), n-way over every held-out stimulus. Captions are
BLEU-1/4 and ROUGE-L against the stimulus's reference captions, written free-running (the
head sees the EEG prefix and the prompt, never a reference token), beside three controls:
shuffled pairs, the same head fed matched-power noise instead of EEG, and the most frequent
training caption written for every window -- a caption model that beats none of them has not
read the EEG ("Are EEG-to-Text models working?", Jo et al. 2024).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from finetune import metrics
from finetune.pairs import pick_caption
from finetune.splits import KeySelect, index_shards
from shards.reader import ReaderConfig, make_loader

CAPTION_WINDOWS = 64  # held-out windows captioned (and captioned again from noise)
NOISE_SEED = 4


@torch.no_grad()
def encode_test(model, cfg, split, pairing, device, dtype, limit: int, noise_seed=None):
    """-> list of (batch, tokens, valid) over up to `limit` held-out windows, in shard order.

    With `noise_seed`, each window's EEG is replaced by white noise of its own per-channel
    power before encoding (the noise control); the batch returned holds that noise.
    """
    gen = torch.Generator().manual_seed(noise_seed) if noise_seed is not None else None
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
        if gen is not None:
            noise = metrics.matched_power_noise(
                batch["eeg"], batch["channel_mask"], batch["time_mask"], gen
            )
            batch = dict(batch, eeg=noise)
        moved = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        if dtype != torch.float32:
            moved["eeg"] = moved["eeg"].to(dtype)
        _, tokens, valid = model.read(moved)
        out.append((batch, tokens, valid))
        seen += len(batch["key"])
        if seen >= limit:
            break
    return out


@dataclass
class EvalContext:
    """What a head's scorer (finetune/heads/registry.py: ``HeadSpec.scores``) may read: the
    held-out windows encoded once, and how to encode them again (the noise control)."""

    model: Any
    cfg: Any
    prep: Any  # finetune.prepare.Prepared: the split and the stimuli
    pairing: Any
    device: torch.device
    dtype: torch.dtype
    encoded: list  # (batch, tokens, valid) over up to train.eval_windows held-out windows

    def encode(self, limit: int, noise_seed: int | None = None) -> list:
        return encode_test(
            self.model,
            self.cfg,
            self.prep.split,
            self.pairing,
            self.device,
            self.dtype,
            limit,
            noise_seed,
        )


@torch.no_grad()
def evaluate(model, cfg, prep, pairing, device, dtype) -> dict[str, Any]:
    """Every head's held-out scores, in the order of the run's tasks."""
    from finetune.heads.registry import head_spec

    context = EvalContext(model, cfg, prep, pairing, device, dtype, [])
    context.encoded = context.encode(cfg.train.eval_windows)
    scores: dict[str, Any] = {"windows": sum(len(b["key"]) for b, _, _ in context.encoded)}
    for name, head in model.heads.items():
        result = head_spec(name).score(head, context)
        if result is not None:
            scores[name] = result
    return scores


def retrieval_scores(head, context: EvalContext) -> dict[str, Any]:
    return _retrieval(head, context.encoded, context.pairing)


def text_scores(head, context: EvalContext) -> dict[str, Any]:
    noise = context.encode(CAPTION_WINDOWS, NOISE_SEED)
    prep = context.prep
    prior = metrics.most_frequent(
        training_captions(context.cfg.data.shards, prep.split, prep.stimuli)
    )
    return captions(head, context.encoded, noise, prep.stimuli, prior)


def image_scores(head, context: EvalContext) -> dict[str, Any] | None:
    if context.cfg.train.eval_images <= 0:
        return None  # generating images is the slow part: train.eval_images=0 skips it
    return _images(head, context.encoded, context.pairing, context.cfg, context.device)


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
        "chance_zero_shot": 1.0 / len(names),
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


def training_captions(shards: list[str], split, stimuli) -> list[str]:
    """The caption each training window was taught, picked by its key as the trainer's
    Pairing picks it: the prior control writes the most frequent of these."""
    train = set(split.train_keys)
    rows = index_shards(shards)
    return [pick_caption(stimuli[r.stimulus_id].captions, r.key) for r in rows if r.key in train]


def write_captions(head, encoded, limit: int) -> tuple[list[str], list[str], list[str]]:
    """Free-running greedy captions of the first `limit` windows -> (captions, keys, ids).

    The head gets only the EEG prefix and the prompt, never a reference token, and may write
    up to the caption length it was trained on (the display default, `max_new_tokens`, can be
    shorter and would cut long references, lowering BLEU for no fault of the model).
    """
    written, keys, ids = [], [], []
    for batch, tokens, valid in encoded:
        if len(written) >= limit:
            break
        written += head.generate(tokens, valid, max_new_tokens=head.config.max_caption_tokens)
        keys += batch["key"]
        ids += batch["stimulus_id"]
    return written[:limit], keys[:limit], ids[:limit]


def captions(
    head, encoded, noise_encoded, stimuli, prior: str, limit: int = CAPTION_WINDOWS
) -> dict[str, Any]:
    """Caption scores beside the shuffled, noise and prior controls, and how many distinct
    captions the held-out windows got (one for every window = the EEG was not read)."""
    predicted, keys, ids = write_captions(head, encoded, limit)
    from_noise, noise_keys, _ = write_captions(head, noise_encoded, limit)
    if noise_keys != keys:
        raise RuntimeError("the noise pass did not visit the same held-out windows in order")
    references = [stimuli[s].captions for s in ids]
    concepts = [stimuli[s].concept for s in ids]
    perm = torch.randperm(len(references), generator=torch.Generator().manual_seed(1)).tolist()
    value = metrics.caption_scores(predicted, references)
    shuffled = metrics.caption_scores(predicted, [references[j] for j in perm])
    controls = {
        "shuffled": shuffled,
        "noise": metrics.caption_scores(from_noise, references),
        "prior": metrics.caption_scores([prior] * len(references), references),
    }
    by_concept = defaultdict(list)
    for concept, caption in zip(concepts, predicted, strict=True):
        by_concept[concept].append(caption)
    return {
        "windows": len(predicted),
        "decoding": f"free-running greedy, up to {head.config.max_caption_tokens} tokens",
        "concepts": len(by_concept),
        "distinct_captions": len(set(predicted)),
        "distinct_noise_captions": len(set(from_noise)),
        "prior_caption": prior,
        "most_frequent_by_concept": {
            c: metrics.most_frequent(written) for c, written in sorted(by_concept.items())
        },
        "examples": [
            {"predicted": p, "from_noise": n, "reference": r[0]}
            for p, n, r in zip(predicted[:5], from_noise[:5], references[:5], strict=True)
        ],
        "report": metrics.report(value, shuffled),
        "controls": controls,
    }
