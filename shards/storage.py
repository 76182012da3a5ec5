"""Local folders and object-store URLs (s3://bucket/corpus) behind one small set of calls.

A corpus may live on a shared disk or in S3-compatible storage; build, verify and the reader
should not each learn fsspec. Everything that touches a build folder goes through here:
local paths keep their old, atomic-rename code path (a killed build must never leave a
half-written file under a final name), URLs go through fsspec. Object stores give the
same guarantee for free: a PUT is all-or-nothing, so an object is never seen half-written.

Credentials, endpoint and region are not handled here: s3fs hands them to botocore, which
reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL(_S3), AWS_DEFAULT_REGION
(and ~/.aws/*) itself, so a MinIO or Ceph endpoint needs nothing but those variables.

Listings are never served from fsspec's cache: other processes (Ray tasks, other ranks)
write into the same folder, and a stale listing would call a finished unit missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import IO, Any

Target = str | os.PathLike

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Reads stream in blocks of this size: enough to keep a tar stream busy, small enough that
# a DataLoader worker per rank holding one open shard costs little memory.
READ_BLOCK = 8 << 20


def is_uri(target: Target) -> bool:
    """`scheme://...` (s3://, gs://, file://); plain paths and webdataset's `pipe:` are not."""
    return isinstance(target, str) and _SCHEME.match(target) is not None


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it); ValueError naming the fix when it cannot be had."""
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec is a main dependency
        raise ValueError(f"{url}: reading URLs needs fsspec: pip install fsspec") from None
    scheme = _SCHEME.match(url).group(1).lower()
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as err:
        package = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}.get(scheme)
        hint = f"pip install {package}" if package else str(err)
        raise ValueError(f"{url}: {scheme}:// URLs need an extra package: {hint}") from None
    except ValueError as err:
        if "Protocol not known" not in str(err):
            raise
        raise ValueError(
            f"{url}: unsupported URL scheme {scheme}://; use a local folder or s3://bucket/path"
        ) from None


def join(base: Target, *names: str) -> Target:
    """`base/name`: a Path for local folders, a string for URLs (no os.sep, no normalising)."""
    if is_uri(base):
        return "/".join([base.rstrip("/"), *names])
    return Path(base).joinpath(*names)


def exists(target: Target) -> bool:
    if not is_uri(target):
        return Path(target).exists()
    fs, path = filesystem(target)
    fs.invalidate_cache()
    return fs.exists(path)


def isfile(target: Target) -> bool:
    if not is_uri(target):
        return Path(target).is_file()
    fs, path = filesystem(target)
    fs.invalidate_cache()
    return fs.isfile(path)


def isdir(target: Target) -> bool:
    """A local folder, or a URL prefix that holds at least one object."""
    if not is_uri(target):
        return Path(target).is_dir()
    fs, path = filesystem(target)
    fs.invalidate_cache()
    return fs.isdir(path)


def list_sizes(folder: Target) -> dict[str, int]:
    """{name: bytes} of the files directly in `folder` (not below); {} if there is none."""
    if not is_uri(folder):
        folder = Path(folder)
        if not folder.is_dir():
            return {}
        return {e.name: e.stat().st_size for e in os.scandir(folder) if e.is_file()}
    fs, path = filesystem(folder)
    fs.invalidate_cache()
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    return {
        e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
        for e in entries
        if e.get("type") == "file"
    }


def list_names(folder: Target) -> list[str]:
    """Names of the files and folders directly in `folder`; [] if there is none."""
    if not is_uri(folder):
        folder = Path(folder)
        return sorted(e.name for e in os.scandir(folder)) if folder.is_dir() else []
    fs, path = filesystem(folder)
    fs.invalidate_cache()
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)


def open_read(target: Target) -> IO[bytes]:
    """A binary stream; URLs are read block by block as the caller goes, never fetched whole."""
    if not is_uri(target):
        return open(target, "rb")  # noqa: SIM115 (the caller closes it)
    fs, path = filesystem(target)
    return fs.open(path, "rb", block_size=READ_BLOCK)


def read_bytes(target: Target) -> bytes:
    if not is_uri(target):
        return Path(target).read_bytes()
    fs, path = filesystem(target)
    return fs.cat_file(path)


def read_json(target: Target) -> Any:
    return json.loads(read_bytes(target))


def write_text(target: Target, text: str) -> None:
    """Atomic: a reader sees the old content or the new, never a mix (rename / one PUT)."""
    if not is_uri(target):
        from shards.writer import atomic_write_text

        atomic_write_text(Path(target), text)
        return
    fs, path = filesystem(target)
    fs.pipe_file(path, text.encode("utf-8"))


def write_bytes(target: Target, data: bytes) -> None:
    """Atomic, as write_text; concurrent writers of one local file each use their own temp
    file, so one's rename never pulls the file from under another (ranks writing a cache)."""
    if not is_uri(target):
        path = Path(target)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return
    fs, path = filesystem(target)
    fs.pipe_file(path, data)


def makedirs(folder: Target) -> None:
    """A local folder and its parents; nothing for URLs (object stores have no folders)."""
    if not is_uri(folder):
        Path(folder).mkdir(parents=True, exist_ok=True)


def put(local: Target, target: Target) -> None:
    """Upload one finished local file to `target` (a local copy when `target` is a path)."""
    if not is_uri(target):
        import shutil

        shutil.copyfile(local, target)
        return
    fs, path = filesystem(target)
    fs.put_file(os.fspath(local), path)


def remove(target: Target) -> None:
    """Delete one file; gone already is fine."""
    if not is_uri(target):
        Path(target).unlink(missing_ok=True)
        return
    fs, path = filesystem(target)
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)


def sha256(target: Target, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open_read(target) as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
