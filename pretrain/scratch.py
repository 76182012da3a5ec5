"""Per-process scratch folders in the node's temp dir, named by their pid, and the sweep that
removes those whose process is gone.

A killed process (a preempted node, a restarted worker group, `kill -9`) never reaches its
clean-up, and its scratch may hold a full encoder or checkpoint copy: a node that restarts
ranks after failures would otherwise fill its temp disk. The pid in the name says whether the
owner still runs; a reused pid only keeps a stale folder (safe), a live process's folder is
never touched. Ray ranks (cluster/ray_train.py) and fine-tuning ranks (finetune/trainer.py)
use it.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def pid_prefix(prefix: str) -> str:
    """``<prefix>-pid<this pid>-``: what a scratch folder's name starts with."""
    return f"{prefix}-pid{os.getpid()}-"


def scratch_path(tmp: Path, prefix: str) -> Path:
    """A fresh folder name under ``tmp`` for this process (not created: whoever fills it
    makes it, so a process that fetches nothing leaves nothing)."""
    return tmp / f"{pid_prefix(prefix)}{uuid.uuid4().hex[:12]}"


def sweep_dead(tmp: Path, prefix: str) -> list[Path]:
    """Remove the ``<prefix>*-pid<pid>-*`` folders under ``tmp`` whose pid is not running."""
    import psutil

    removed = []
    for folder in tmp.glob(f"{prefix}*-pid*-*"):
        pid = folder.name[len(prefix) :].split("-pid", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed
