"""Deterministic, atomic WebDataset shard writing for one work unit.

Each unit writes its own shards, named `<unit id>-NNNNN.tar`, so workers never coordinate
and a unit's output depends on nothing but its inputs and the config: that is what makes
builds byte-reproducible and resumable unit by unit. Tar headers carry fixed metadata
(mtime 0, fixed owner), and a shard only appears under its final name once complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from shards import storage

PARTIAL = ".partial"


@dataclass(frozen=True)
class ShardRecord:
    name: str
    samples: int
    bytes: int
    sha256: str


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def encode_sample(key: str, eeg: np.ndarray, meta: dict[str, Any]) -> dict[str, Any]:
    """The on-disk sample: float16 `[C, T]` as .npy, metadata as canonical JSON."""
    assert "." not in key and "/" not in key, key
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(eeg, dtype=np.float16), allow_pickle=False)
    blob = json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return {"__key__": key, "eeg.npy": buf.getvalue(), "json": blob.encode("utf-8")}


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + PARTIAL)
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def unit_shard_pattern(unit_id: str) -> re.Pattern:
    return re.compile(rf"^{re.escape(unit_id)}-\d{{5}}\.tar({re.escape(PARTIAL)})?$")


def shard_unit(name: str) -> str | None:
    """The unit id of a finished shard's file name `<unit id>-NNNNN.tar`, else None."""
    match = re.match(r"^(.+)-\d{5}\.tar$", name)
    return match[1] if match else None


def remove_unit_shards(out_dir: storage.Target, unit_id: str) -> None:
    """Delete whatever an earlier, interrupted attempt at this unit left behind (in a local
    folder or an object store)."""
    pattern = unit_shard_pattern(unit_id)
    if storage.is_uri(out_dir):
        for name in storage.list_sizes(out_dir):
            if pattern.match(name):
                storage.remove(storage.join(out_dir, name))
        return
    for path in Path(out_dir).iterdir():
        if pattern.match(path.name):
            path.unlink()


def remove_partials(*folders: Path) -> None:
    """Delete the temporary files an interrupted build left; only safe under the build lock,
    when no other build can be writing them."""
    for folder in folders:
        if folder.is_dir():
            for path in folder.glob(f"*{PARTIAL}"):
                path.unlink(missing_ok=True)


class UnitShardWriter:
    """Rotates `<unit id>-NNNNN.tar` at `maxcount` samples or `maxsize` bytes."""

    def __init__(self, out_dir: Path, unit_id: str, maxcount: int, maxsize: int):
        self.out_dir, self.unit_id = out_dir, unit_id
        self.maxcount, self.maxsize = maxcount, maxsize
        self.records: list[ShardRecord] = []
        self._tar: wds.TarWriter | None = None
        self._fh = None
        self._count = self._size = 0

    def _path(self, index: int) -> Path:
        return self.out_dir / f"{self.unit_id}-{index:05d}.tar"

    def _open(self) -> None:
        path = self._path(len(self.records))
        self._fh = open(path.with_name(path.name + PARTIAL), "wb")  # noqa: SIM115 (closed in _finish)
        self._tar = wds.TarWriter(
            self._fh, encoder=False, mtime=0.0, user="brainmoe", group="brainmoe", mode=0o444
        )
        self._count = self._size = 0

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        path = self._path(len(self.records))
        partial = path.with_name(path.name + PARTIAL)
        os.replace(partial, path)
        self.records.append(
            ShardRecord(path.name, self._count, path.stat().st_size, sha256_file(path))
        )
        self._tar = self._fh = None

    def write(self, sample: dict[str, Any]) -> None:
        if self._tar is not None and (self._count >= self.maxcount or self._size >= self.maxsize):
            self._finish()
        if self._tar is None:
            self._open()
        self._size += self._tar.write(sample)
        self._count += 1

    def close(self) -> list[dict[str, Any]]:
        self._finish()
        return [asdict(r) for r in self.records]

    def abort(self) -> None:
        if self._tar is not None:
            self._fh.close()
            self._tar = self._fh = None
        remove_unit_shards(self.out_dir, self.unit_id)
