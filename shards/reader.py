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
* Damaged data is skipped, not fatal: an unreadable shard (missing, truncated, garbage)
  ends that shard with a `ShardReadWarning` naming it, and a shard that ends early without
  any error (tar cannot tell a cut at a member boundary from the end) is caught by comparing
  its sample count with sizes.json. A sample that fails to decode is skipped the same way.
  One bad file in a 10,000-shard corpus must not stop a multi-node run.
* Object stores. A build folder may be a URL (s3://bucket/corpus, see storage.py); each
  shard is then opened with fsspec and streamed through webdataset's tar iterator block by
  block, never downloaded whole, so a worker holds one read block, not one shard.

Samples and batches (one type from here to the heads): shards/sample.py.

Shape legend: B batch, C channels, T samples.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from shards import storage
from shards.manifest import SIZES, read_json
from shards.sample import collate_eeg, decode_sample

Source = str | os.PathLike | Sequence[str | os.PathLike]


class ShardReadWarning(UserWarning):
    """A shard or sample was skipped; its own category so runs can escalate it to an error."""


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
# Which shards


@dataclass(frozen=True)
class ShardSet:
    """Shard URLs in reading order, with their sample counts where a sizes.json knows them."""

    urls: list[str]
    sizes: dict[str, int | None] = field(default_factory=dict)

    @property
    def num_samples(self) -> int | None:
        counts = [self.sizes.get(u) for u in self.urls]
        return None if any(c is None for c in counts) else sum(counts)


def _is_url(text: str) -> bool:
    return "://" in text or text.startswith("pipe:")


def _build_dir_shards(path: storage.Target) -> dict[str, int]:
    sizes_path = storage.join(path, SIZES)
    present = storage.list_sizes(path)  # one listing, not a request per shard
    if SIZES not in present:
        raise ValueError(
            f"{path} has no {SIZES}: is it a finished `brainmoe shards build` output? "
            "(pass shard paths explicitly to read shards without one)"
        )
    try:
        sizes = read_json(sizes_path)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{sizes_path} is unreadable: {err}") from None
    if not isinstance(sizes, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and v >= 0 for k, v in sizes.items()
    ):
        raise ValueError(f"{sizes_path} must map shard file names to sample counts")
    if not sizes:
        raise ValueError(f"{path} holds no shards ({SIZES} is empty)")
    missing = sorted(name for name in sizes if name not in present)
    if missing:
        raise ValueError(
            f"{path}: {len(missing)} shard(s) listed in {SIZES} are missing, e.g. {missing[0]} "
            "(an incomplete copy?)"
        )
    # Sorted names, so the order (and hence the shuffle) does not depend on JSON key order.
    return {str(storage.join(path, name)): sizes[name] for name in sorted(sizes)}


def _sizes_beside(shard: str) -> int | None:
    """open_clip's convention: a shard's count may come from a sizes.json in its folder."""
    if storage.is_uri(shard):
        folder, name = shard.rsplit("/", 1)
    else:
        folder, name = Path(shard).parent, Path(shard).name
    sizes_path = storage.join(folder, SIZES)
    if not storage.isfile(sizes_path):
        return None
    try:
        value = read_json(sizes_path).get(name)
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def list_shards(source: Source) -> ShardSet:
    """Resolve build dirs, shard paths, URLs or brace patterns into one ordered shard list.

    Bad inputs raise ValueError here, in the launching process, rather than surfacing as an
    empty epoch (or a hang) on some rank later.
    """
    items = [source] if isinstance(source, str | os.PathLike) else list(source)
    if not items:
        raise ValueError("no shards given: pass a build dir, shard paths or URLs")
    sizes: dict[str, int | None] = {}
    for item in items:
        text = os.fspath(item)
        if storage.is_uri(text) and "{" not in text and not text.endswith(".tar"):
            if not storage.isdir(text):
                raise ValueError(f"{text} does not exist (expected a build folder URL)")
            found: dict[str, int | None] = dict(_build_dir_shards(text.rstrip("/")))
        elif not _is_url(text) and Path(text).is_dir():
            found = dict(_build_dir_shards(Path(text)))
        else:
            found = {}
            for url in wds.shardlists.expand_urls(text):
                if storage.is_uri(url):
                    if not storage.isfile(url):
                        raise ValueError(f"{url} does not exist (expected a .tar shard)")
                    found[url] = _sizes_beside(url)
                elif _is_url(url):
                    found[url] = None
                elif not Path(url).is_file():
                    raise ValueError(f"{url} does not exist (expected a build dir or a .tar shard)")
                else:
                    found[url] = _sizes_beside(url)
        for url, count in found.items():
            if url in sizes:
                raise ValueError(f"shard {url} is listed twice")
            sizes[url] = count
    return ShardSet(urls=list(sizes), sizes=sizes)


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
# Pipeline stages (module-level and picklable, so spawn-started workers can rebuild them)


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


class ReadShards(wds.PipelineStage):
    """Tar members -> raw samples, one shard at a time, so a damaged shard is attributed
    by name and skipped without losing the shards after it (webdataset's handlers only see
    the exception, whose arguments name the shard inconsistently).

    Many failures in a row mean the corpus, not a shard, is broken (a lost mount): that
    raises, since in resampled mode it would otherwise spin forever, stalling every rank.
    """

    def __init__(self, sizes: dict[str, int | None], max_failures_in_a_row: int = 100):
        self.sizes, self.max_failures = sizes, max_failures_in_a_row

    def run(self, src: Iterable[dict]) -> Iterator[dict]:
        failures = 0  # shards in a row that gave no sample although they should have
        for shard in src:
            if failures >= self.max_failures:
                raise RuntimeError(
                    f"{failures} shards in a row could not be read (see the warnings): "
                    "is the corpus still there?"
                )
            url = shard["url"]
            expected = self.sizes.get(url)
            count = 0
            try:
                # fsspec streams URLs (s3://...); pipe: and paths keep webdataset's opener
                stream = storage.open_read(url) if storage.is_uri(url) else wds.gopen(url)
            except Exception as err:
                _warn(f"skipping shard {url}: cannot open it: {_describe(err)}")
                failures += 1
                continue
            try:
                files = tar_file_expander([{"url": url, "stream": stream}], eof_value=None)
                for sample in group_by_keys(files):
                    count += 1
                    yield sample
            except Exception as err:
                _warn(f"skipping the rest of shard {url} after {count} sample(s): {_describe(err)}")
            else:
                if expected is not None and count != expected:
                    _warn(
                        f"shard {url} held {count} sample(s) but {SIZES} says {expected}: "
                        "truncated, or a stale sizes.json?"
                    )
            finally:
                stream.close()
            failures = 0 if count or expected == 0 else failures + 1


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


def _warn(message: str) -> None:
    warnings.warn(message, ShardReadWarning, stacklevel=2)


def _describe(err: Exception) -> str:
    # webdataset appends the stream and URL to exception args; the first one is the message.
    return f"{type(err).__name__}: {err.args[0] if err.args else ''}"


class DecodeSamples(wds.PipelineStage):
    """Raw samples -> arrays; a sample that fails to decode (or holds NaN/inf) is skipped
    with a warning. Many in a row mean the corpus is broken, not a sample: that raises,
    since in resampled mode a corpus without one good sample would otherwise spin forever."""

    def __init__(self, max_failures_in_a_row: int = 1000):
        self.max_failures = max_failures_in_a_row

    def run(self, src: Iterable[dict]) -> Iterator[dict]:
        failures = 0
        for raw in src:
            try:
                sample = decode_sample(raw)
            except Exception as err:
                _warn(
                    f"skipping sample {raw.get('__key__')} of shard {raw.get('__url__')}: "
                    f"{_describe(err)}"
                )
                failures += 1
                if failures >= self.max_failures:
                    raise RuntimeError(
                        f"{failures} samples in a row could not be used (last: "
                        f"{_describe(err)}): the corpus is broken; check it with "
                        "`brainmoe shards verify` and rebuild it"
                    ) from err
                continue
            failures = 0
            yield sample


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
