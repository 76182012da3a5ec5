"""DeepSpeed's CPU all-reduce leaves its shared memory behind; this takes the names away.

On the CPU accelerator each rank of a one-node run creates a ~69 MB segment
`/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`, maps every
peer's, and never unlinks its own (deepspeed/ops/csrc/cpu/comm/shm.cpp). /dev/shm is RAM: every
run leaked world x 69 MB until reboot, and a test suite or a sweep of runs on one machine filled
memory until the OOM killer stopped it. `deepspeed.init_distributed` returns only after this rank
has mapped all peers' segments, so once every rank is past it (a barrier) the names can go: the
mappings live until the processes exit, however they exit, and nothing is left behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist

SHM_DIR = Path("/dev/shm")


def allreduce_segment(rank: int) -> Path:
    """Where DeepSpeed's CPU comm op put this rank's segment (named from the rendezvous env)."""
    addr = os.environ.get("MASTER_ADDR", "")
    port = os.environ.get("MASTER_PORT", "")
    return SHM_DIR / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_allreduce_segment() -> None:
    """Call on every rank right after `deepspeed.init_distributed` (a run whose ranks are not
    all local, or not on CPU, has no segment: nothing to remove)."""
    dist.barrier()  # every rank has mapped every peer's segment
    allreduce_segment(dist.get_rank()).unlink(missing_ok=True)
