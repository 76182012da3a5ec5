"""A finetuning run's preparation, done once before any rank starts and read by every rank.

What `prepare()` computes -- the leak-free split (every shard opened), the stimulus set
(synthetic stimuli rendered, images found), the encoder resolved (downloaded from the
registry) and fingerprinted -- is written by the launching process (`brainmoe finetune`)
into ``<train.run_dir>/prepared/``: ``prepared.json`` (the split, the stimuli, the encoder's
reference and fingerprint, and what determined them) and ``encoder/`` (a registry encoder's
download). The ranks read that record instead of opening every shard again: under the
DeepSpeed launcher rank 0 reads it and broadcasts it, under Ray Train the driver hands it to
the workers (their nodes may not share the run folder). A rank that cannot see the encoder
folder resolves the encoder reference again and checks the fingerprint.

Resuming (`train.resume=true`) reuses the record -- a resumed run trains on the split it
started with -- and refuses to start when what determined it changed: the shards (their
manifests), `data.split`, `data.stimuli` (and the captions file), `encoder.model`. A fresh
run prepares again. `deepspeed finetune/run.py` started by hand, with no record in the run
folder, has rank 0 prepare it while the other ranks wait.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from finetune.config import FinetuneConfig
from finetune.prepare import Prepared, prepare, resolve_encoder, validate_finetune
from finetune.splits import Split, SplitConfig
from finetune.stimuli import Stimulus, StimulusSet

PREPARED_DIR = "prepared"
RECORD = "prepared.json"
FORMAT = 1


def prepared_dir(cfg: FinetuneConfig) -> Path:
    return cfg.run_path / PREPARED_DIR


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def determined_by(cfg: FinetuneConfig) -> dict[str, Any]:
    """The config (and the files) a preparation depends on: a resumed run must match it."""
    from shards import storage

    manifests = {}
    for folder in cfg.data.shards:
        path = storage.join(folder, "manifest.json")
        manifests[str(folder)] = _sha256(storage.read_bytes(path)) if storage.exists(path) else None
    captions = cfg.data.stimuli.captions
    captions_sha = (
        _sha256(storage.read_bytes(captions)) if captions and storage.exists(captions) else None
    )
    determined = {
        "data.shards": [str(s) for s in cfg.data.shards],
        "shard manifests": manifests,
        "data.split": asdict(cfg.data.split),
        "data.stimuli": asdict(cfg.data.stimuli),
        "captions file": captions_sha,
        "encoder.model": cfg.encoder.model,
    }
    return json.loads(json.dumps(determined))  # as the record holds it (tuples are lists)


def changes(cfg: FinetuneConfig, record: dict[str, Any]) -> list[str]:
    """What differs between the record's preparation and this config's, in words."""
    if record.get("format") != FORMAT:
        return [f"the record's format {record.get('format')!r} (this brainmoe writes {FORMAT})"]
    now, then = determined_by(cfg), record["determined_by"]
    return [
        f"{key} was {then.get(key)!r}, now {value!r}"
        for key, value in now.items()
        if then.get(key) != value
    ]


def to_record(cfg: FinetuneConfig, prep: Prepared) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "determined_by": determined_by(cfg),
        "encoder": {
            "uri": prep.encoder_uri,
            "fingerprint": prep.encoder_fingerprint,
            "folder": str(Path(prep.encoder_dir).resolve()),
        },
        "split": asdict(prep.split),
        "stimuli": prep.stimuli.to_json(),
    }


def read_record(cfg: FinetuneConfig) -> dict[str, Any] | None:
    path = prepared_dir(cfg) / RECORD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a damaged record is prepared again (a resume refuses below)


def prepare_run(
    cfg: FinetuneConfig, world_size: int | None, reuse_matching: bool = False
) -> dict[str, Any]:
    """The run folder's preparation record, made once (see the module docstring).

    ``reuse_matching``: keep a record that matches this config even for a fresh run (a rank
    after its launcher prepared); the launcher itself prepares a fresh run again.
    """
    validate_finetune(cfg, world_size)  # first: a refused fresh run keeps an earlier record
    existing = read_record(cfg)
    if cfg.train.resume and existing is None and (prepared_dir(cfg) / RECORD).is_file():
        raise ValueError(
            f"{prepared_dir(cfg) / RECORD} is damaged: a resumed run needs the split it "
            "started with; start a new train.run_dir"
        )
    if existing is not None:
        changed = changes(cfg, existing)
        if changed and cfg.train.resume:
            raise ValueError(
                f"train.resume=true, but {cfg.train.run_dir} was prepared for another split or "
                f"encoder: {'; '.join(changed)}. A resumed run must train on what it started "
                "with: undo the change, or start a new train.run_dir"
            )
        if not changed and (reuse_matching or cfg.train.resume):
            return existing
    folder = prepared_dir(cfg)
    run_existed = cfg.run_path.exists()
    shutil.rmtree(folder, ignore_errors=True)  # a fresh run: nothing of an earlier one stays
    folder.mkdir(parents=True)
    try:
        prep = prepare(cfg, world_size, folder)
    except BaseException:  # a refused run leaves no run folder behind
        shutil.rmtree(folder, ignore_errors=True)
        if not run_existed:
            shutil.rmtree(cfg.run_path, ignore_errors=True)
        raise
    shutil.rmtree(folder / "init", ignore_errors=True)  # only checked here; the ranks load it
    record = to_record(cfg, prep)
    tmp = folder / f"{RECORD}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(folder / RECORD)  # atomic: a reader sees no record or a whole one
    return record


def load_prepared(cfg: FinetuneConfig, record: dict[str, Any], workdir: Path) -> Prepared:
    """A record -> what the trainer uses, without opening a shard. ``workdir`` takes the
    encoder if its prepared folder is not visible here (another node)."""
    from finetune.model import encoder_fingerprint

    changed = changes(cfg, record)
    if changed:
        raise ValueError(
            f"the run was prepared for another config ({'; '.join(changed)}); launch it with "
            "brainmoe finetune, which prepares the run folder"
        )
    enc = record["encoder"]
    folder = Path(enc["folder"])
    if not (folder / "model.safetensors").is_file():
        if "://" not in enc["uri"] and not enc["uri"].startswith(("models:/", "runs:/")):
            raise ValueError(
                f"the encoder folder {folder} (encoder.model={enc['uri']}) is not visible here"
            )
        folder = resolve_encoder(cfg, workdir / "encoder")
    found = encoder_fingerprint(folder)
    if found != enc["fingerprint"]:
        raise ValueError(
            f"encoder.model={enc['uri']} now resolves to weights with fingerprint {found}, but "
            f"the run was prepared with {enc['fingerprint']} (the alias moved?); register the "
            "encoder version the run started with under that alias, or start a new run"
        )
    split_data = dict(record["split"])
    split = Split(config=SplitConfig(**split_data.pop("config")), **split_data)
    stimuli = StimulusSet(
        Stimulus(e["id"], e["image"], e["concept"], e["captions"])
        for e in record["stimuli"]["stimuli"]
    )
    return Prepared(split, stimuli, folder, enc["fingerprint"], enc["uri"])
