"""Checksums of saved model folders, verified at load.

Why: a safetensors file whose data bytes were flipped (a bad disk, a truncated copy, an
interrupted download) still loads -- only the header is parsed, the tensors are whatever
the bytes say -- and a damaged projector then writes different captions with exit code 0.
So every folder brainmoe saves (the exported encoder, each head's adapters, the multitask
gate) lists its weight files with their sha256 and size in the folder's metadata JSON, and
every loader checks them before reading a tensor. A mismatch, a missing file or a damaged
header is an `ArtifactError` (a ValueError: the CLI prints it as one line and exits 2) that
names the file and says what to do.

Folders written before checksums existed still load, with an `UnverifiedArtifactWarning`.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

CHECKSUMS_KEY = "checksums"  # key in a folder's metadata JSON
CHECKSUMS_FILE = "checksums.json"  # for folders that have no metadata JSON of their own
DEFAULT_REMEDY = "re-download it, or save / export the folder again"


class ArtifactError(ValueError):
    """A saved file is missing, damaged or not the one that was saved."""


class UnverifiedArtifactWarning(UserWarning):
    """A folder records no checksums (written before brainmoe verified its artifacts)."""


def file_digest(path: str | Path) -> dict[str, Any]:
    """``{"sha256": hex, "size": bytes}`` of one file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {"sha256": digest.hexdigest(), "size": Path(path).stat().st_size}


def checksums(folder: str | Path, files: list[str]) -> dict[str, dict[str, Any]]:
    """Digests of ``files`` (paths relative to ``folder``, "/"-separated), keyed by path."""
    folder = Path(folder)
    return {name: file_digest(folder / name) for name in files}


def read_json(path: str | Path, remedy: str = DEFAULT_REMEDY) -> dict[str, Any]:
    """A folder's metadata JSON; an unreadable one is an ArtifactError, not a JSONDecodeError."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{path} is missing or not valid JSON ({err}); {remedy}") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} does not hold a JSON object; {remedy}")
    return data


def write_checksums(
    folder: str | Path, files: list[str], meta_file: str | None = None
) -> dict[str, dict[str, Any]]:
    """Record the digests of ``files`` in ``folder/meta_file`` (under "checksums"), or in
    ``folder/checksums.json`` when the folder has no metadata JSON. Call it last, after
    every listed file is written."""
    folder = Path(folder)
    sums = checksums(folder, files)
    if meta_file is None:
        path, meta = folder / CHECKSUMS_FILE, {}
    else:
        path = folder / meta_file
        meta = json.loads(path.read_text())
    meta[CHECKSUMS_KEY] = sums
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return sums


def add_checksums(folder: str | Path, files: list[str], meta_file: str) -> bool:
    """Add the digests of ``files``, written after the folder was signed, to its metadata
    JSON; the recorded digests of the other files are kept, never recomputed (a file damaged
    in between is not re-signed as valid). A folder that records no checksums stays
    unverified: -> False."""
    path = Path(folder) / meta_file
    meta = json.loads(path.read_text())
    sums = meta.get(CHECKSUMS_KEY)
    if not isinstance(sums, dict) or not sums:
        return False
    sums.update(checksums(folder, files))
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return True


def verify_checksums(
    folder: str | Path, meta_file: str | None = None, remedy: str = DEFAULT_REMEDY
) -> bool:
    """Check every file listed in the folder's metadata against its recorded sha256 and size.

    Returns True when verified, False (with an UnverifiedArtifactWarning) for a folder that
    records no checksums; raises ArtifactError naming the first file that does not match.
    """
    folder = Path(folder)
    meta_path = folder / (meta_file or CHECKSUMS_FILE)
    if meta_file is None and not meta_path.is_file():
        sums = None
    else:
        sums = read_json(meta_path, remedy).get(CHECKSUMS_KEY)
    if sums is None:
        warnings.warn(
            f"{folder} records no checksums (saved before brainmoe verified its files): "
            f"loading it unverified; {remedy} to add them",
            UnverifiedArtifactWarning,
            stacklevel=2,
        )
        return False
    if not isinstance(sums, dict) or not sums:
        raise ArtifactError(f"{meta_path} has a malformed checksums list; {remedy}")
    for name, expected in sums.items():
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not isinstance(expected, dict):
            raise ArtifactError(f"{meta_path} has a malformed checksum entry {name!r}; {remedy}")
        if not path.is_file():
            raise ArtifactError(f"{path} is missing (listed in {meta_path}); {remedy}")
        size = path.stat().st_size
        if size != expected.get("size"):
            raise ArtifactError(
                f"{path} is {size} bytes, {expected.get('size')} were saved "
                f"(truncated or replaced); {remedy}"
            )
        if file_digest(path)["sha256"] != expected.get("sha256"):
            raise ArtifactError(
                f"{path} does not match the sha256 recorded in {meta_path} "
                f"(damaged or changed after saving); {remedy}"
            )
    return True


def load_safetensors(path: str | Path, device: str = "cpu", remedy: str = DEFAULT_REMEDY):
    """``safetensors.torch.load_file``, with a damaged file an ArtifactError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; {remedy}")
    try:
        return load_file(str(path), device=device)
    except SafetensorError as err:
        raise ArtifactError(
            f"{path} is not a readable safetensors file ({err}); {remedy}"
        ) from None
