"""EEG windows joined to what the person saw: the finetuning batches.

The shards hold EEG and a stimulus id per window; everything about the stimulus (CLIP
embeddings, VAE latents, captions) was computed once, keyed by that id (finetune/clip_cache.py,
`latent_cache`). Joining happens on whole batches in the training process, after the reader,
as a few tensor lookups: the reader stays the pretraining one (same sharding, shuffling,
resume), and no image is decoded or encoded during training.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from finetune.stimuli import StimulusSet
from shards import storage


def pick_caption(captions: list[str], key: str) -> str:
    """One caption per window, fixed by its key: deterministic across ranks, runs and resume,
    and different windows of one image still see its different captions."""
    if not captions:
        return ""
    index = int(hashlib.sha1(key.encode()).hexdigest(), 16) % len(captions)
    return captions[index]


class Pairing:
    """Adds the stimulus side to a reader batch (see finetune/heads/__init__.py for the fields).

    ``clip``: a ClipCache (image/text embeddings by id); ``fields``: what the heads
    precomputed per stimulus (``head.stimulus_tensors``), {batch field: {id: tensor}}, e.g.
    the image head's {"latents": {id: [4, h, w]}}."""

    def __init__(
        self, stimuli: StimulusSet, clip: Any, fields: dict[str, dict[str, Tensor]] | None = None
    ):
        self.stimuli, self.clip, self.fields = stimuli, clip, dict(fields or {})

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        ids = [str(s) for s in batch["stimulus_id"]]
        missing = [i for i in ids if i not in self.stimuli]
        if missing:
            raise ValueError(f"windows refer to stimuli not in the stimulus set: {missing[:5]}")
        out = dict(batch)
        out["clip_image"] = self.clip.image(ids)  # [B, Dc]
        out["clip_text"] = self.clip.text(ids)  # [B, Dc]
        out["captions"] = [
            pick_caption(self.stimuli[i].captions, str(k))
            for i, k in zip(ids, batch["key"], strict=True)
        ]
        out["concept"] = [self.stimuli[i].concept for i in ids]
        for name, table in self.fields.items():
            out[name] = torch.stack([table[i] for i in ids])  # e.g. latents [B, 4, h, w]
        return out


def load_pixels(path: str | Path, size: int) -> Tensor:
    """An image file or URL -> `[3, size, size]` in [-1, 1] (what the VAE encodes)."""
    import numpy as np
    from PIL import Image

    with storage.open_read(path) as fh, Image.open(fh) as img:
        img = img.convert("RGB").resize((size, size), Image.BICUBIC)
        array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@torch.no_grad()
def latent_cache(
    stimuli: StimulusSet, encode, size: int, folder: str | Path, key: str, batch_size: int = 16
) -> dict[str, Tensor]:
    """VAE latents of every stimulus image, computed once into ``folder/latents-<key>.pt``
    (key names the VAE and image size) and reused by later runs and every rank."""
    path = storage.join(folder, f"latents-{key}.pt")  # beside the shards: a folder or s3://
    if storage.exists(path):
        cached = torch.load(io.BytesIO(storage.read_bytes(path)), weights_only=True)
        if set(cached) >= set(stimuli.ids):
            return cached
    ids = [i for i in stimuli.ids if stimuli[i].image is not None]
    out: dict[str, Tensor] = {}
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        pixels = torch.stack([load_pixels(stimuli[i].image, size) for i in chunk])
        latents = encode(pixels).float().cpu()  # [b, 4, h, w]
        out.update(zip(chunk, latents, strict=True))
    storage.makedirs(folder)
    # every rank that found no cache computes the same latents: each writes its own temp file
    # (a shared name let one rank's rename pull the file from under the other's) and the
    # atomic rename (one PUT in object storage) makes the last writer's identical copy the cache
    buf = io.BytesIO()
    torch.save(out, buf)
    storage.write_bytes(path, buf.getvalue())
    return out
