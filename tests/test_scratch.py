"""A fine-tuning rank's scratch copy (an encoder fetched from the registry or another node)
is swept once its process is gone, as Ray ranks' checkpoint copies are (pretrain/scratch.py)."""

from __future__ import annotations

import subprocess
import sys

from finetune.trainer import SCRATCH_PREFIX
from pretrain.scratch import scratch_path, sweep_dead


def test_a_dead_ranks_scratch_is_swept_and_a_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = scratch_path(tmp_path, SCRATCH_PREFIX)  # this process: alive
    gone = tmp_path / f"{SCRATCH_PREFIX}-pid{dead.pid}-0123456789ab"
    old_style = tmp_path / f"{SCRATCH_PREFIX}-0123456789ab"  # no pid: not ours to judge
    other = tmp_path / f"brainmoe-ray-rank0-pid{dead.pid}-abc"  # another prefix
    for folder in (mine, gone, old_style, other):
        (folder / "encoder").mkdir(parents=True)
    assert sweep_dead(tmp_path, SCRATCH_PREFIX) == [gone]
    assert mine.exists() and old_style.exists() and other.exists() and not gone.exists()
