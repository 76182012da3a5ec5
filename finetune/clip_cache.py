"""CLIP embeddings of the stimuli, computed once by a Ray job and kept beside the shards.

The heads train against CLIP image/text embeddings of what the subject saw; computing them
on every epoch (or in every trainer rank) would cost more than the heads themselves. So this
job embeds each stimulus once, in parallel Ray actors that load the model once each, and
writes::

    <out_dir>/clip/<model key>/
        image.safetensors      "embeddings" [S, Dc] float32, rows L2-normalised, S in ids order
        text.safetensors       "embeddings" [S, Dc]: mean of a stimulus' caption embeddings,
                               normalised again
        concepts.safetensors   "embeddings" [K, Dc]: concept_prompt(concept) per concept, for
                               zero-shot classification by concept name
        stimuli.json           the StimulusSet embedded (images, concepts, captions)
        index.json             ids (row order), concepts, model, pretrained, fingerprint

``out_dir`` may be a folder or an ``s3://`` URL (shards/storage.py): the cache then sits
beside shards in object storage, where every node of a cluster reads it.

index.json is written last and its fingerprint covers the model files, the image bytes, the
captions and the concepts, so a re-run with the same inputs returns at once without starting
Ray, and any change recomputes everything.

CLI: ``brainmoe embed-stimuli --shards DIR [--image-root ...]`` (finetune/embed_stimuli.py);
inside ``ray job submit`` (RAY_ADDRESS set) it joins that cluster, else it
starts a private local one on 127.0.0.1 without dashboard and stops it when done.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from tqdm import tqdm

from finetune.stimuli import StimulusSet, concept_prompt
from shards import storage

CACHE_DIR = "clip"
_VERSION = 1  # bump when what is written for the same inputs changes
_KEY = "embeddings"
_FILES = ("image.safetensors", "text.safetensors", "concepts.safetensors", "stimuli.json")


@dataclass
class ClipConfig:
    model: str = "ViT-B-32"  # open_clip architecture, "local-dir:<folder>", "hf-hub:<repo>"
    # or a folder holding open_clip_config.json + weights
    pretrained: str | None = "laion2b_s34b_b79k"  # tag or checkpoint file; ignored for folders
    batch_size: int = 64  # images or captions per forward pass
    device: str = "cpu"  # where each actor runs the model ("cuda" asks Ray for a GPU each)
    chunk_size: int = 256  # stimuli per Ray work item (the unit of progress and of retry)

    def resolved(self) -> tuple[str, str | None]:
        """(model name, pretrained) as open_clip takes them; ValueError if they cannot load."""
        import open_clip

        if self.batch_size < 1 or self.chunk_size < 1:
            raise ValueError(
                f"batch_size={self.batch_size} and chunk_size={self.chunk_size} must be >= 1"
            )
        model = self.model
        if not model.startswith(("local-dir:", "hf-hub:")) and Path(model).expanduser().is_dir():
            model = "local-dir:" + str(Path(model).expanduser().resolve())
        if model.startswith("local-dir:"):
            folder = Path(model.removeprefix("local-dir:")).expanduser().resolve()
            if not (folder / "open_clip_config.json").is_file():
                raise ValueError(
                    f"model folder {str(folder)!r} has no open_clip_config.json; give a folder "
                    "written like a released open_clip model (see finetune/tiny/clip.py)"
                )
            return "local-dir:" + str(folder), None
        if model.startswith("hf-hub:"):
            return model, None
        if model not in open_clip.list_models():
            raise ValueError(
                f"model {model!r} is not an open_clip architecture, nor a folder; choose one "
                f"of open_clip.list_models() (e.g. ViT-B-32, ViT-L-14) or a local-dir: folder"
            )
        pretrained = self.pretrained or None
        if pretrained and not Path(pretrained).expanduser().is_file():
            tags = open_clip.list_pretrained_tags_by_model(model)
            if pretrained not in tags:
                raise ValueError(
                    f"pretrained={pretrained!r} is neither a file nor a tag of {model}; "
                    f"its tags: {', '.join(tags) or 'none'}"
                )
        elif pretrained:
            pretrained = str(Path(pretrained).expanduser().resolve())
        return model, pretrained


# ------------------------------------------------------------------------------ identity


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _file_digest(path: str | Path) -> str:
    with storage.open_read(path) as fp:
        return hashlib.file_digest(fp, "blake2b").hexdigest()


def model_key(model: str, pretrained: str | None) -> str:
    """A folder name for (model, pretrained): readable, and distinct for distinct paths."""
    if model.startswith("local-dir:"):
        folder = Path(model.removeprefix("local-dir:"))
        readable = f"local-{folder.name}"
    else:
        tag = pretrained or "random"
        readable = f"{model.removeprefix('hf-hub:')}-{Path(tag).stem if os.sep in tag else tag}"
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", readable).strip("_")[:80]
    return f"{readable}-{_digest(model, pretrained)[:8]}"


def _model_identity(model: str, pretrained: str | None) -> list:
    """What changes when the weights behind the same name change (local files: size, mtime)."""
    files: list[Path] = []
    if model.startswith("local-dir:"):
        folder = Path(model.removeprefix("local-dir:"))
        files = sorted(p for p in folder.iterdir() if p.is_file())
    elif pretrained and Path(pretrained).is_file():
        files = [Path(pretrained)]
    return [model, pretrained, [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]]


def fingerprint(stimuli: StimulusSet, model: str, pretrained: str | None) -> str:
    """Changes iff the embeddings would: model files, image bytes, captions, concepts."""
    rows = []
    for sid in stimuli:
        s = stimuli[sid]
        if s.image is None or not storage.isfile(s.image):
            raise ValueError(
                f"stimulus {sid!r} has no image file ({s.image}); CLIP image embeddings need one"
            )
        rows.append((sid, _file_digest(s.image), s.concept, s.captions))
    prompts = [concept_prompt(c) for c in stimuli.concepts()]
    return _digest(_VERSION, _model_identity(model, pretrained), rows, prompts)


# ------------------------------------------------------------------------------ the work


class Embedder:
    """Holds one loaded model; a Ray actor wraps it so each worker loads the model once."""

    def __init__(self, model: str, pretrained: str | None, device: str, batch_size: int):
        import open_clip

        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            model, pretrained=pretrained, device=device
        )
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model)
        self.device = torch.device(device)
        self.batch_size = batch_size

    def images(self, paths: Sequence[str]) -> np.ndarray:
        """[S, Dc] normalised image embeddings of image files."""
        from PIL import Image

        pictures = []
        for p in paths:
            with storage.open_read(p) as fh, Image.open(fh) as im:
                pictures.append(im.convert("RGB"))
        return self.pictures(pictures)

    @torch.no_grad()
    def pictures(self, pictures: Sequence) -> np.ndarray:
        """[S, Dc] normalised image embeddings of PIL images (e.g. generated ones)."""
        out = []
        for start in range(0, len(pictures), self.batch_size):
            batch = [
                self.preprocess(im.convert("RGB"))
                for im in pictures[start : start + self.batch_size]
            ]
            x = torch.stack(batch).to(self.device)  # [B, 3, H, W]
            out.append(torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1))
        return torch.cat(out).cpu().numpy()

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), Dc] normalised text embeddings."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[start : start + self.batch_size])).to(self.device)
            out.append(
                torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)
            )
        return torch.cat(out).cpu().numpy()

    def chunk(self, n: int, paths: Sequence[str], captions: Sequence[Sequence[str]]) -> tuple:
        """(n, image [S, Dc], mean-caption text [S, Dc]) for chunk n of the stimuli."""
        flat = [c for cs in captions for c in cs]
        per_caption = self.texts(flat)  # [sum of captions, Dc]
        bounds = np.cumsum([0] + [len(cs) for cs in captions])
        text = np.stack(
            [per_caption[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        )
        text /= np.linalg.norm(text, axis=-1, keepdims=True)
        return n, self.images(paths), text.astype(np.float32)


def _connect_ray(workers: int) -> bool:
    """Join RAY_ADDRESS's cluster or start a private local one; True if this call connected."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)  # inside `ray job submit`, or a cluster the user named
    else:
        from cluster.local_ray import init_local_ray

        init_local_ray(num_cpus=workers)  # every Ray server on 127.0.0.1 only
    return True


def _embed_with_ray(
    stimuli: StimulusSet, model: str, pretrained: str | None, cfg: ClipConfig, workers: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image [S, Dc], text [S, Dc], concepts [K, Dc]) with `workers` actors over chunks."""
    import ray
    from ray.util import ActorPool

    ids = stimuli.ids
    size = max(1, min(cfg.chunk_size, math.ceil(len(ids) / workers)))
    chunks = [ids[i : i + size] for i in range(0, len(ids), size)]
    work = [
        (n, [str(stimuli[i].image) for i in chunk], [stimuli[i].captions for i in chunk])
        for n, chunk in enumerate(chunks)
    ]
    prompts = [concept_prompt(c) for c in stimuli.concepts()]
    started = _connect_ray(workers)
    try:
        gpus = 1 if cfg.device.startswith("cuda") else 0
        remote = ray.remote(num_cpus=1, num_gpus=gpus, max_restarts=1, max_task_retries=2)
        actors = [
            remote(Embedder).remote(model, pretrained, cfg.device, cfg.batch_size)
            for _ in range(min(workers, len(chunks)))
        ]
        concepts_ref = actors[0].texts.remote(prompts)  # queued first on actor 0
        results: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        with tqdm(total=len(chunks), unit="chunk", desc="CLIP embeddings", file=sys.stderr) as bar:
            pool = ActorPool(actors)
            for n, image, text in pool.map_unordered(lambda a, w: a.chunk.remote(*w), work):
                results[n] = (image, text)
                bar.update()
        concepts = ray.get(concepts_ref)
    finally:
        if started:
            ray.shutdown()
    image = np.concatenate([results[n][0] for n in range(len(chunks))])
    text = np.concatenate([results[n][1] for n in range(len(chunks))])
    return image, text, concepts


def _save(path: str | Path, array: np.ndarray) -> None:
    tensor = torch.tensor(np.asarray(array, dtype=np.float32))
    storage.write_bytes(path, save_tensors({_KEY: tensor}))


def cache_folder(out_dir: str | Path, cfg: ClipConfig) -> str | Path:
    """Where embed_stimuli(..., cfg, out_dir) writes: what ClipCache.load takes."""
    return storage.join(out_dir, CACHE_DIR, model_key(*cfg.resolved()))


def embed_stimuli(
    stimuli: StimulusSet, cfg: ClipConfig, out_dir: str | Path, workers: int = 1
) -> str | Path:
    """Embed `stimuli` with cfg's CLIP into ``out_dir/clip/<model key>/``; returns that folder.

    A no-op when the folder already holds embeddings of the same inputs (see fingerprint).
    """
    if workers < 1:
        raise ValueError(f"workers={workers} must be at least 1")
    if len(stimuli) == 0:
        raise ValueError("no stimuli to embed")
    model, pretrained = cfg.resolved()
    folder = cache_folder(out_dir, cfg)
    fp = fingerprint(stimuli, model, pretrained)
    index_path = storage.join(folder, "index.json")
    present = storage.list_sizes(folder)
    if all(f in present for f in ("index.json", *_FILES)):
        try:
            if storage.read_json(index_path).get("fingerprint") == fp:
                return folder
        except json.JSONDecodeError:
            pass  # a damaged index: recompute
    image, text, concepts = _embed_with_ray(stimuli, model, pretrained, cfg, workers)
    assert image.shape == text.shape and image.shape[0] == len(stimuli), (image.shape, text.shape)
    storage.makedirs(folder)
    storage.remove(index_path)  # until the new index lands, the folder reads as stale
    _save(storage.join(folder, "image.safetensors"), image)
    _save(storage.join(folder, "text.safetensors"), text)
    _save(storage.join(folder, "concepts.safetensors"), concepts)
    stimuli.save(storage.join(folder, "stimuli.json"))
    index = {
        "ids": stimuli.ids,
        "stimulus_concepts": [stimuli[i].concept for i in stimuli],
        "concepts": stimuli.concepts(),
        "concept_prompts": [concept_prompt(c) for c in stimuli.concepts()],
        "model": model,
        "pretrained": pretrained,
        "dim": int(image.shape[1]),
        "config": asdict(cfg),
        "fingerprint": fp,
    }
    storage.write_text(index_path, json.dumps(index, indent=1) + "\n")  # atomic, and last
    return folder


# ------------------------------------------------------------------------------ reading


class ClipCache:
    """The embeddings of one cache folder, looked up by stimulus id."""

    def __init__(self, folder: str | Path, index: dict, image, text, concepts):
        self.folder = folder
        self.index = index
        self._row = {sid: n for n, sid in enumerate(index["ids"])}
        self._image, self._text, self._concepts = image, text, concepts  # [S, Dc], [S, Dc], [K, Dc]

    @classmethod
    def load(cls, folder: str | Path) -> ClipCache:
        folder = folder if storage.is_uri(folder) else Path(folder)
        index_path = storage.join(folder, "index.json")
        if not storage.isfile(index_path):
            raise ValueError(
                f"{folder} holds no CLIP cache (no index.json); run `brainmoe finetune "
                "embed-stimuli` first, and pass the clip/<model key> folder it prints"
            )
        index = storage.read_json(index_path)
        tensors = [
            load_tensors(storage.read_bytes(storage.join(folder, f)))[_KEY] for f in _FILES[:3]
        ]
        return cls(folder, index, *tensors)

    @property
    def ids(self) -> list[str]:
        return list(self.index["ids"])

    @property
    def dim(self) -> int:
        return int(self._image.shape[1])

    @property
    def concepts(self) -> tuple[list[str], torch.Tensor]:
        """(concept names, [K, Dc] embeddings of their prompts), for zero-shot classification."""
        return list(self.index["concepts"]), self._concepts

    def concept_of(self, ids: Sequence[str]) -> list[str]:
        return [self.index["stimulus_concepts"][n] for n in self._rows(ids)]

    def _rows(self, ids: Sequence[str]) -> list[int]:
        missing = [i for i in ids if i not in self._row]
        if missing:
            raise ValueError(
                f"{len(missing)} stimulus id(s) are not in the CLIP cache {self.folder}: "
                f"{missing[:10]}; re-run embed-stimuli on the shards that hold them"
            )
        return [self._row[i] for i in ids]

    def image(self, ids: Sequence[str]) -> torch.Tensor:
        """[B, Dc] normalised image embeddings of `ids`."""
        return self._image[self._rows(ids)]

    def text(self, ids: Sequence[str]) -> torch.Tensor:
        """[B, Dc] normalised caption embeddings of `ids`."""
        return self._text[self._rows(ids)]


# ------------------------------------------------------------------------------ CLI


def stimulus_ids_from_shards(shards: str | Path) -> list[str]:
    """The distinct stimulus ids of every window in the shards (their JSON members only)."""
    from finetune.splits import index_shards

    ids = {row.stimulus_id for row in index_shards(str(shards))}
    if not ids:
        raise ValueError(
            f"the shards in {shards} carry no stimulus_id; embed-stimuli needs shards of a "
            "stimulus dataset (synthetic, things-eeg2, imagenet-eeg)"
        )
    return sorted(ids)
