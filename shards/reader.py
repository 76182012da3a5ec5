"""The training-side reader: WebDataset shards of EEG windows -> padded, masked batches.

One pipeline serves every rank and DataLoader worker of a run; see `build_pipeline` for the
stages. What it guarantees, and why:

* Exact partition (non-resampled mode). The shard list is shuffled from (seed, epoch) alone,
  so every rank computes the same order; only then is it split by node and by worker. Each
  shard is read by exactly one (rank, worker), so one epoch sees each sample exactly once.
  Ranks can end up with a few batches more or less than each other (shards differ in
  size), so DDP training over this mode must handle uneven ends (e.g. torch's `Join`);
  pretraining should rather use resampled mode.
* Resampled mode (infinite). Each (rank, worker) draws shards with replacement from its own
  deterministic stream (seed, epoch, rank, worker), and `make_loader` cuts the stream into
  nominal epochs with `with_epoch`, so every rank yields the same number of batches -- what
  DDP needs to not hang at the end of an epoch. This is the mode for pretraining.
* Determinism. Every random choice comes from `random.Random` seeded with a string of its
  parts (Python hashes str seeds with SHA-512, so no PYTHONHASHSEED or pid dependence):
  same seed and epoch => same order, on any machine.
* Epochs. The epoch lives in a `SharedEpoch` (a `multiprocessing.Value`, as in open_clip),
  which DataLoader workers inherit, so `loader.set_epoch(e)` before iterating reaches
  persistent workers too; non-persistent workers read it when they start.
* Damaged data is skipped, not fatal: an unreadable shard or a sample that fails to decode
  is skipped with a `ShardReadWarning`, so one bad file cannot stop a multi-node run; shard
  URLs on object stores are streamed, never downloaded whole. Both live in
  shards/sample_stream.py; which shards a source names is resolved in shards/shard_list.py.

Samples and batches (one type from here to the heads): shards/sample.py.

Shape legend: B batch, C channels, T samples.
"""

from __future__ import annotations

import math
import multiprocessing
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, get_worker_info

from shards.sample import collate_eeg
from shards.sample_stream import (
    DecodeSamples,
    ReadShards,
    ShardReadWarning,  # noqa: F401  (re-exported: callers escalate it)
)
from shards.shard_list import ShardSet, Source, list_shards


@dataclass
class ReaderConfig:
    batch_size: int = 32  # per rank
    num_workers: int = 2  # DataLoader workers per rank; 0 reads in the training process
    shuffle: bool = True  # False: sorted shard order, no sample buffer (evaluation)
    # Samples held per worker for shuffling; memory ~ buffer x C x T x 2 bytes (float16),
    # e.g. 256 x 64 ch x 800 samples = 26 MB.
    shuffle_buffer: int = 256
    shuffle_initial: int = 64  # samples buffered before the first one is yielded
    seed: int = 0
    resampled: bool = False  # draw shards with replacement, infinite; see the module docstring
    partial: bool = True  # keep each worker's last short batch (else dropped)
    # Nominal epoch size in samples; None: the total from sizes.json. Required in resampled
    # mode when the shards have no sizes.json.
    samples_per_epoch: int | None = None
    persistent_workers: bool = False
    pin_memory: bool = False
    prefetch_factor: int = 2  # batches per worker in flight (only with num_workers > 0)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.shuffle_buffer < 0 or self.shuffle_initial < 0:
            raise ValueError("shuffle_buffer and shuffle_initial must be >= 0")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1, got {self.samples_per_epoch}")
        if self.prefetch_factor < 1:
            raise ValueError(f"prefetch_factor must be >= 1, got {self.prefetch_factor}")


# ---------------------------------------------------------------------------------------
# Epochs and seeds


class SharedEpoch:
    """The epoch, visible to DataLoader workers that were started before it changed."""

    def __init__(self, epoch: int = 0):
        # No lock: one writer, and a lock would tie it to one start method (a fork-context
        # SemLock cannot be sent to spawn-started workers).
        self._value = multiprocessing.Value("i", epoch, lock=False)

    def set_value(self, epoch: int) -> None:
        self._value.value = epoch

    def get_value(self) -> int:
        return self._value.value


def _rng(*parts: Any) -> random.Random:
    # A str seed is hashed with SHA-512: stable across processes, unlike hash() of a tuple.
    return random.Random(":".join(str(p) for p in ("brainmoe.reader", *parts)))


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _dist_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Resolved in the launching process: DataLoader workers have no process group."""
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if rank is None:
        rank = torch.distributed.get_rank() if initialised else 0
    if world_size is None:
        world_size = torch.distributed.get_world_size() if initialised else 1
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
    return rank, world_size


# ---------------------------------------------------------------------------------------
# Pipeline stages that order and split the stream (module-level and picklable, so
# spawn-started workers can rebuild them); those that read bytes: sample_stream.py


class ShuffleShards(wds.PipelineStage):
    """Same permutation on every rank (seeded without the rank), so the node split after it
    still partitions the corpus -- open_clip's detshuffle2."""

    def __init__(self, seed: int, epoch: SharedEpoch):
        self.seed, self.epoch = seed, epoch

    def run(self, src: Iterable[dict]) -> Iterator[dict]:
        shards = list(src)
        _rng("shards", self.seed, self.epoch.get_value()).shuffle(shards)
        yield from shards


class SplitByNode(wds.PipelineStage):
    """Round-robin shards over ranks given explicitly (not read from the environment in the
    worker), which also lets one test process play several nodes."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def run(self, src: Iterable[dict]) -> Iterator[dict]:
        for index, shard in enumerate(src):
            if index % self.world_size == self.rank:
                yield shard


def split_by_worker(src: Iterable[dict]) -> Iterator[dict]:
    worker, num_workers = _worker()
    for index, shard in enumerate(src):
        if index % num_workers == worker:
            yield shard


class ResampleShards(torch.utils.data.IterableDataset):
    """Shards drawn with replacement, forever. Unlike wds.ResampledShards (which counts
    epochs per dataset copy, so non-persistent workers replay epoch 0), the stream is a pure
    function of (seed, epoch, rank, worker) with the epoch read from the SharedEpoch."""

    def __init__(self, urls: list[str], seed: int, rank: int, epoch: SharedEpoch):
        if not urls:
            raise ValueError("no shards to resample from")
        self.urls, self.seed, self.rank, self.epoch = list(urls), seed, rank, epoch

    def __iter__(self) -> Iterator[dict]:
        worker, _ = _worker()
        rng = _rng("resample", self.seed, self.epoch.get_value(), self.rank, worker)
        while True:
            yield {"url": self.urls[rng.randrange(len(self.urls))]}


class ShuffleSamples(wds.PipelineStage):
    """A sample buffer per worker; its stream differs per (rank, worker) -- identical
    streams would correlate what the ranks see -- and is reproducible from the seed."""

    def __init__(self, bufsize: int, initial: int, seed: int, rank: int, epoch: SharedEpoch):
        self.bufsize, self.initial = bufsize, initial
        self.seed, self.rank, self.epoch = seed, rank, epoch

    def run(self, src: Iterable[dict]) -> Iterator[dict]:
        worker, _ = _worker()
        rng = _rng("samples", self.seed, self.epoch.get_value(), self.rank, worker)
        return wds.shuffle(self.bufsize, self.initial, rng=rng)(iter(src))


# ---------------------------------------------------------------------------------------
# The pipeline and the loader


class EEGPipeline(wds.DataPipeline):
    """A DataPipeline that remembers its SharedEpoch, so callers can move it on."""

    shared_epoch: SharedEpoch
    shards: ShardSet

    def set_epoch(self, epoch: int) -> None:
        self.shared_epoch.set_value(epoch)


def build_pipeline(
    source: Source | ShardSet,
    cfg: ReaderConfig | None = None,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    epoch: SharedEpoch | int = 0,
    select: Callable[[dict[str, Any]], bool] | None = None,
) -> EEGPipeline:
    """The reader as a list of stages; yields collated batches (dicts, see collate_eeg).

    rank/world_size default to torch.distributed when initialised, else 0/1. Pass a
    SharedEpoch to drive the epoch from outside, or an int to start a new one here.
    ``select`` keeps only the decoded samples it returns True for (e.g. one split of a
    finetuning set); it runs in the DataLoader workers, so it must pickle.
    """
    cfg = cfg or ReaderConfig()
    cfg.validate()
    shards = source if isinstance(source, ShardSet) else list_shards(source)
    if not shards.urls:
        raise ValueError("no shards to read")
    rank, world_size = _dist_rank_world(rank, world_size)
    shared = epoch if isinstance(epoch, SharedEpoch) else SharedEpoch(epoch)
    shuffle_samples = cfg.shuffle and cfg.shuffle_buffer > 1

    if cfg.resampled:
        # Every (rank, worker) samples the whole list: no split, no exhaustion.
        shard_stages = [ResampleShards(shards.urls, cfg.seed, rank, shared)]
    else:
        if len(shards.urls) < world_size:
            raise ValueError(
                f"{len(shards.urls)} shard(s) for {world_size} ranks: some rank would get no "
                "data (and stall the others); use resampled=True or write more shards"
            )
        shard_stages = [
            wds.SimpleShardList(shards.urls),  # sorted order, no seed
            ShuffleShards(cfg.seed, shared) if cfg.shuffle else None,  # same on every rank
            SplitByNode(rank, world_size),
            split_by_worker,
        ]
    stages = [
        *shard_stages,
        ReadShards(shards.sizes),  # -> raw samples {__key__, eeg.npy, json}; bad shards skipped
        ShuffleSamples(cfg.shuffle_buffer, cfg.shuffle_initial, cfg.seed, rank, shared)
        if shuffle_samples
        else None,
        DecodeSamples(),  # -> arrays; bad samples skipped
        wds.select(select) if select is not None else None,
        wds.batched(cfg.batch_size, collation_fn=collate_eeg, partial=cfg.partial),
    ]
    pipeline = EEGPipeline(*stages)
    pipeline.shared_epoch = shared
    pipeline.shards = shards
    return pipeline


def epoch_batches(num_samples: int, batch_size: int, world_size: int, num_workers: int) -> int:
    """Nominal batches per rank per epoch, a multiple of the worker count (open_clip's rule):
    with_epoch counts per worker, so each worker gets the same share."""
    workers = max(1, num_workers)
    per_rank = math.ceil(num_samples / (batch_size * world_size))
    return math.ceil(per_rank / workers) * workers


class EEGLoader(DataLoader):
    """A DataLoader over an EEGPipeline (batching happens in the workers: batch_size=None),
    carrying what a training loop needs: set_epoch, num_batches, num_samples."""

    def __init__(
        self, pipeline: EEGPipeline, num_batches: int | None, batch_size: int, **kwargs: Any
    ):
        super().__init__(pipeline, batch_size=None, **kwargs)
        self.pipeline = pipeline
        # Per rank and epoch; exact in resampled mode, nominal otherwise.
        self.num_batches = num_batches
        self.num_samples = None if num_batches is None else num_batches * batch_size

    def set_epoch(self, epoch: int) -> None:
        """Call before iterating: workers read the epoch when an epoch's iteration starts."""
        self.pipeline.set_epoch(epoch)

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("epoch length unknown: no sizes.json and no samples_per_epoch")
        return self.num_batches


def _as_is(batch: Any) -> Any:
    # Not the default (default_convert), which would walk every batch's metadata again.
    return batch


def make_loader(
    source: Source | ShardSet,
    cfg: ReaderConfig | None = None,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    epoch: int = 0,
    select: Callable[[dict[str, Any]], bool] | None = None,
) -> EEGLoader:
    """The reader for one rank, ready for a training loop.

    Resampled mode is cut into epochs of `epoch_batches(...)` batches per rank (with_epoch),
    identical on every rank; otherwise an epoch is one exact pass and `num_batches` is only
    the nominal count (ranks may differ by a few batches).
    """
    cfg = cfg or ReaderConfig()
    cfg.validate()
    rank, world_size = _dist_rank_world(rank, world_size)
    pipeline = build_pipeline(
        source, cfg, rank=rank, world_size=world_size, epoch=epoch, select=select
    )
    total = cfg.samples_per_epoch or pipeline.shards.num_samples
    num_batches = None
    if total is not None:
        num_batches = epoch_batches(total, cfg.batch_size, world_size, cfg.num_workers)
    if cfg.resampled:
        if num_batches is None:
            raise ValueError(
                "resampled mode needs an epoch size: the shards have no sizes.json, "
                "so set ReaderConfig.samples_per_epoch"
            )
        pipeline = pipeline.with_epoch(nbatches=num_batches // max(1, cfg.num_workers))
    workers = cfg.num_workers
    kwargs: dict[str, Any] = {
        "num_workers": workers,
        "pin_memory": cfg.pin_memory,
        "collate_fn": _as_is,  # batches are collated in the pipeline already
    }
    if workers > 0:
        kwargs.update(
            persistent_workers=cfg.persistent_workers, prefetch_factor=cfg.prefetch_factor
        )
    elif cfg.persistent_workers:
        raise ValueError("persistent_workers needs num_workers > 0")
    return EEGLoader(pipeline, num_batches, cfg.batch_size, **kwargs)
