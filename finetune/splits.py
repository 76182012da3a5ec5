"""Leak-free train/test splits of a paired EEG set, made once and saved with the run.

Why by stimulus and not by window: every image is shown many times (repetitions, subjects),
so a random split of windows puts the same image on both sides and retrieval "generalises"
by recognising it. ``by=stimulus`` holds whole images out (their concepts may still be seen
in training, with other images: THINGS-EEG2's and ImageNet-EEG's usual protocol);
``by=concept`` holds whole concepts out (zero-shot: no test concept is seen at all).
``test_subjects`` also keeps those people entirely out of training.

The split is computed from the shards' per-window metadata alone (a scan of the small JSON
members, not the EEG), and is a pure function of the index and the config, so every rank of
a run computes the same one; the run saves it as split.json.
"""

from __future__ import annotations

import json
import random
import tarfile
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from shards import storage
from shards.shard_list import list_shards

SPLIT_BY = ("stimulus", "concept")


@dataclass
class SplitConfig:
    by: str = "stimulus"  # "stimulus" (held-out images) | "concept" (held-out concepts)
    test_fraction: float = 0.25  # of the stimuli (or concepts) of each concept (or overall)
    test_subjects: list[str] = field(default_factory=list)  # also held out as people
    seed: int = 0

    def validate(self) -> None:
        if self.by not in SPLIT_BY:
            raise ValueError(f"split.by must be one of {SPLIT_BY}, got {self.by!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"split.test_fraction must be in (0, 1), got {self.test_fraction}")


@dataclass(frozen=True)
class IndexRow:
    key: str
    stimulus_id: str
    concept: str
    subject: str


def index_shards(folders: list[str] | str) -> list[IndexRow]:
    """Every window of the shards that has a stimulus, from the JSON members only (local or
    s3:// shards alike: a seekable stream, so the EEG members are skipped, not parsed)."""
    shards = list_shards(folders)
    rows = []
    for url in tqdm(shards.urls, desc="indexing shards", unit="shard", leave=False):
        with storage.open_read(url) as fh, tarfile.open(fileobj=fh) as tar:
            for member in tar:
                if not member.name.endswith(".json"):
                    continue
                meta = json.load(tar.extractfile(member))
                if not meta.get("stimulus_id"):
                    continue
                key = member.name[: -len(".json")]
                provenance = meta.get("provenance") or {}
                rows.append(
                    IndexRow(
                        key=key,
                        stimulus_id=str(meta["stimulus_id"]),
                        concept=str(meta.get("label") or meta["stimulus_id"]),
                        subject=str(provenance.get("subject", "")),
                    )
                )
    return rows


@dataclass
class Split:
    config: SplitConfig
    train_keys: list[str]
    test_keys: list[str]
    train_stimuli: list[str]
    test_stimuli: list[str]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Split:
        data = json.loads(Path(path).read_text())
        return cls(config=SplitConfig(**data.pop("config")), **data)

    def summary(self) -> str:
        return (
            f"split by {self.config.by}: train {len(self.train_keys)} windows of "
            f"{len(self.train_stimuli)} stimuli, test {len(self.test_keys)} windows of "
            f"{len(self.test_stimuli)} stimuli"
        )


def make_split(rows: list[IndexRow], cfg: SplitConfig) -> Split:
    """Deterministic in (rows, cfg). Raises ValueError when a side would be empty."""
    cfg.validate()
    if not rows:
        raise ValueError(
            "no windows with a stimulus id in the shards: finetuning needs paired data "
            "(THINGS-EEG2, ImageNet-EEG or the synthetic source)"
        )
    rng = random.Random(f"split:{cfg.seed}")
    stimuli_of: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        stimuli_of[row.concept].add(row.stimulus_id)
    concepts = sorted(stimuli_of)
    test_stimuli: set[str] = set()
    if cfg.by == "concept":
        n = max(1, round(cfg.test_fraction * len(concepts)))
        if n >= len(concepts):
            raise ValueError(
                f"split.by=concept with {len(concepts)} concept(s) leaves none for training; "
                "use split.by=stimulus or a smaller split.test_fraction"
            )
        for concept in rng.sample(concepts, n):
            test_stimuli |= stimuli_of[concept]
    else:
        for concept in concepts:
            ids = sorted(stimuli_of[concept])
            n = round(cfg.test_fraction * len(ids))
            if len(ids) >= 2:
                n = min(max(n, 1), len(ids) - 1)  # every concept on both sides
            test_stimuli |= set(rng.sample(ids, n))
    if not test_stimuli:
        raise ValueError(
            "the split holds out no stimulus (every concept has a single image); "
            "use split.by=concept"
        )
    held_people = set(cfg.test_subjects)
    unknown = held_people - {row.subject for row in rows}
    if unknown:
        raise ValueError(f"split.test_subjects {sorted(unknown)} are not in the shards")
    train_keys, test_keys = [], []
    for row in rows:
        if row.stimulus_id in test_stimuli:
            if not held_people or row.subject in held_people:
                test_keys.append(row.key)
        elif row.subject not in held_people:
            train_keys.append(row.key)
    if not train_keys or not test_keys:
        raise ValueError(
            f"the split leaves {len(train_keys)} training and {len(test_keys)} test windows; "
            "check split.test_subjects and split.test_fraction"
        )
    all_stimuli = {row.stimulus_id for row in rows}
    return Split(
        config=cfg,
        train_keys=sorted(train_keys),
        test_keys=sorted(test_keys),
        train_stimuli=sorted(all_stimuli - test_stimuli),
        test_stimuli=sorted(test_stimuli),
    )


class KeySelect:
    """Reader filter (``make_loader(select=...)``): keep windows of one side of a split.
    A class, not a lambda, so DataLoader workers can unpickle it."""

    def __init__(self, keys: list[str]):
        self.keys = frozenset(keys)

    def __call__(self, sample: dict) -> bool:
        return sample["key"] in self.keys
