"""Checkpoint folders a run can trust: complete, intact, and loaded without running code.

Complete: a run killed mid-save (or a full disk, or a node lost) leaves a `step*` folder with
truncated or missing files, and DeepSpeed's `latest` may already point at it. So every save
ends with `complete.json`, written by rank 0 only after a barrier (every rank's files are on
disk), listing each file of the folder with its size and sha256; it is written last and
atomically, so a folder without it is a save that did not finish.

Intact: `resume=true` takes the newest folder whose files match its marker, and warns about
each newer one it skips (what was wrong), which it moves aside as `<tag>.damaged` so that
neither DeepSpeed's `latest` nor the pruning of old checkpoints ever counts it again. When no
folder is intact the run stops with an error instead of silently starting from scratch: a
user who asked to resume expects the earlier training to count, and a fresh start would
overwrite the evidence.

Loaded without running code: what brainmoe writes itself (the TrainState, every rank's RNG
state) is JSON; DeepSpeed's own files are pickles, read under `weights_only_loads()`, which
makes every `torch.load` inside weights-only, with the few DeepSpeed types its files need
allow-listed. A pickle that names anything else (a function to call while unpickling) is
refused with `UnsafeCheckpointError` before any of it runs.

Checkpoints of earlier brainmoe versions (no marker, TrainState inside DeepSpeed's pickle,
RNG states as .pt) count as unfinished for resume; `brainmoe export` still reads them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

MARKER = "complete.json"
TRAIN_STATE = "train_state.json"
_TAG = re.compile(r"^step(\d+)$")

# What DeepSpeed pickles besides tensors and plain containers (found with
# torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO 0-3, bf16 and fp32 files).
DEEPSPEED_TYPES = (
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
)


class UnsafeCheckpointError(ValueError):
    """A checkpoint file would run code (or build a type brainmoe does not know) when loaded."""


class CheckpointError(ValueError):
    """resume=true found checkpoints, but none of them is intact."""


def tag_for(step: int) -> str:
    return f"step{step:07d}"


def step_of(tag: str) -> int:
    found = _TAG.match(tag)
    assert found, tag
    return int(found.group(1))


def step_tags(ckpt_dir: Path) -> list[str]:
    """The checkpoint folders in `ckpt_dir`, oldest first (by step, not by name)."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and _TAG.match(p.name)]
    return sorted(tags, key=step_of)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- the completion marker ------------------------------------------------------------------
def begin_save(folder: Path) -> None:
    """Rank 0, before anything of a save is written: a folder being (re)written is incomplete."""
    (folder / MARKER).unlink(missing_ok=True)


def file_entries(folder: Path) -> dict[str, dict[str, Any]]:
    """{name: {size, sha256}} of every file in a checkpoint folder but the marker."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name not in (MARKER, MARKER + ".tmp"):
            files[name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return files


def merge_entries(per_rank: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """One file list from each rank's (rank-local folders: Ray merges the files later, so two
    ranks writing one name differently would lose one of them silently)."""
    files: dict[str, dict[str, Any]] = {}
    for rank, entries in enumerate(per_rank):
        for name, meta in entries.items():
            if name in files and files[name] != meta:
                raise RuntimeError(f"checkpoint file {name} differs between ranks (rank {rank})")
            files[name] = meta
    return dict(sorted(files.items()))


def write_marker(folder: Path, step: int, files: dict[str, dict[str, Any]] | None = None) -> None:
    """Rank 0, after a barrier: every file of the checkpoint, with size and sha256 (``files``:
    the ranks' own lists, where their folders are rank-local)."""
    if files is None:
        files = file_entries(folder)
    tmp = folder / (MARKER + ".tmp")
    with open(tmp, "w") as fh:
        json.dump({"step": step, "files": files}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / MARKER)  # atomic: the marker is there whole or not at all


def problem(folder: Path, hashes: bool = True) -> str | None:
    """What is wrong with a checkpoint folder, or None if its files match its marker.

    ``hashes=False`` checks presence and sizes only (a stat per file: what the launcher can
    afford before DeepSpeed starts); the hashes read every byte."""
    marker = folder / MARKER
    if not marker.is_file():
        return f"no {MARKER}: the save did not finish"
    try:
        listed = json.loads(marker.read_text())["files"]
        sizes = {name: int(meta["size"]) for name, meta in listed.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MARKER} is unreadable"
    for name, size in sorted(sizes.items()):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, {MARKER} says {size}"
    if hashes:
        for name, meta in sorted(listed.items()):
            if _sha256(folder / name) != meta.get("sha256"):
                return f"{name} does not match its sha256 in {MARKER}"
    return None


def choose(ckpt_dir: Path, hashes: bool = True) -> tuple[str | None, list[tuple[str, str]]]:
    """(newest intact tag or None, [(newer tag, what is wrong with it), ...])."""
    skipped: list[tuple[str, str]] = []
    for tag in reversed(step_tags(ckpt_dir)):
        why = problem(ckpt_dir / tag, hashes=hashes)
        if why is None:
            return tag, skipped
        skipped.append((tag, why))
    return None, skipped


def no_intact_error(ckpt_dir: Path, skipped: list[tuple[str, str]]) -> CheckpointError:
    found = "; ".join(f"{tag}: {why}" for tag, why in skipped)
    return CheckpointError(
        f"train.resume=true but no checkpoint in {ckpt_dir} is intact ({found}); remove "
        f"{ckpt_dir} to start from scratch, or choose a new train.run_dir"
    )


def agree_on_tag(ckpt_dir: Path, rank: int, warn: Callable[[str], None]) -> str | None:
    """Every rank: the tag to resume from (None: no checkpoint at all). Rank 0 checks, hashing
    each file once, and tells the others, so all ranks load the same checkpoint."""
    import torch.distributed as dist

    choice: list[Any] = [choose(ckpt_dir) if rank == 0 else None]
    dist.broadcast_object_list(choice, src=0)
    tag, skipped = choice[0]
    for bad, why in skipped:
        warn(f"checkpoint {ckpt_dir / bad} is damaged ({why}): skipping it")
    if tag is None:
        if skipped:
            raise no_intact_error(ckpt_dir, skipped)
        return None
    if skipped and rank == 0:
        moved = set_aside(ckpt_dir, [bad for bad, _ in skipped])
        (ckpt_dir / "latest").write_text(tag)  # DeepSpeed's pointer, for export and the next run
        warn(
            f"resuming from {tag}, the newest intact checkpoint (step {step_of(tag)}); the "
            f"damaged ones are kept as {', '.join(p.name for p in moved)}"
        )
    dist.barrier()
    return tag


def set_aside(ckpt_dir: Path, tags: list[str]) -> list[Path]:
    """Rank 0: move damaged folders out of the `step*` namespace (kept, for a look later)."""
    moved = []
    for tag in tags:
        target = ckpt_dir / f"{tag}.damaged"
        n = 1
        while target.exists():
            n += 1
            target = ckpt_dir / f"{tag}.damaged{n}"
        (ckpt_dir / tag).rename(target)
        moved.append(target)
    return moved


def prune(ckpt_dir: Path, keep: int) -> None:
    """Rank 0: delete the checkpoints older than the newest `keep` complete ones."""
    tags = step_tags(ckpt_dir)
    complete = [t for t in tags if (ckpt_dir / t / MARKER).is_file()]
    if len(complete) <= keep:
        return
    oldest_kept = tags.index(complete[-keep])
    for old in tags[:oldest_kept]:
        shutil.rmtree(ckpt_dir / old, ignore_errors=True)


# ---- what brainmoe writes itself: JSON, never a pickle -------------------------------------
def write_train_state(folder: Path, state: dict[str, Any]) -> None:
    (folder / TRAIN_STATE).write_text(json.dumps(state, indent=1))


def read_train_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / TRAIN_STATE).read_text())


def rng_file(folder: Path, rank: int) -> Path:
    return folder / f"rng_rank{rank}.json"


def write_rng_state(path: Path) -> None:
    """Python's, NumPy's and torch's global RNG states as JSON (lists of integers)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    path.write_text(json.dumps(state))


def read_rng_state(path: Path) -> None:
    state = json.loads(path.read_text())
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


# ---- DeepSpeed's pickles: weights only ------------------------------------------------------
def _allowed_globals() -> list[Any]:
    import importlib

    allowed = []
    for module, name in DEEPSPEED_TYPES:
        with contextlib.suppress(ImportError, AttributeError):  # another DeepSpeed version
            allowed.append(getattr(importlib.import_module(module), name))
    return allowed


def _refusal(path: Any, err: Exception) -> UnsafeCheckpointError:
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    what = f"names {found.group(1)}, which" if found else "holds something that"
    return UnsafeCheckpointError(
        f"refused to load {path}: the pickle {what} is not a tensor, a plain container or one "
        "of the DeepSpeed types brainmoe allows (loading it could run code); only load "
        "checkpoints this project's training wrote"
    )


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Inside, every `torch.load` -- DeepSpeed's checkpoint engine and zero_to_fp32 call it
    with weights_only=False -- is weights-only, with DEEPSPEED_TYPES allowed.

    DeepSpeed offers no switch for this, and its loaders call `torch.load` through the module
    attribute, so swapping that attribute for the duration is the one place to enforce it."""
    original = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError as err:
            raise _refusal(f, err) from None

    with torch.serialization.safe_globals(_allowed_globals()):
        torch.load = load
        try:
            yield
        finally:
            torch.load = original
