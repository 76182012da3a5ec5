"""Which shards a run reads: build folders, shard paths, URLs or brace patterns -> one list.

Resolved once, in the launching process, so a bad input fails there with a ValueError
naming it rather than as an empty epoch (or a hang) on some rank later. The order is sorted
by name, never by JSON key or directory listing order, so the reader's seeded shuffle of it
is the same on every machine. Sample counts come from sizes.json (the build's, or open_clip's
convention of one beside loose shards): the reader sizes epochs from them and uses them to
catch shards that end early.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds

from shards import storage
from shards.manifest import SIZES, read_json

Source = str | os.PathLike | Sequence[str | os.PathLike]


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
