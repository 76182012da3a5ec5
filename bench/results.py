"""bench/RESULTS.md holds one section per benchmark; each run replaces its own section.

Measured figures are regenerated; what a person wrote about them is not: a block between
``<!-- notes -->`` and ``<!-- /notes -->`` in a section survives the next run of its script
(appended after the new figures), so a re-run never silently deletes the analysis."""

from __future__ import annotations

import platform
import re
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
NOTES = re.compile(r"<!-- notes -->.*?<!-- /notes -->", re.S)
HEADER = "# Benchmark results\n\nWritten by the scripts in bench/; each section by the script it names.\n"


def cpu_name() -> str:
    """The CPU's model name and whether it has AMX (bf16 runs ~3x fp32 with it, slower without):
    CPU timings compare only on the same kind, and this machine's kind changes between runs."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
    amx = "AMX" if flags and "amx_tile" in flags.group(1).split() else "no AMX"
    return f"{name.group(1).strip() if name else platform.machine()} ({amx})"


def machine() -> str:
    import os

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu_name()}, {os.cpu_count()} CPUs, {gpu}, torch {torch.__version__}"


def write_section(title: str, body: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = f"## {title}\n\n_{stamp}; {machine()}_\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    old = pattern.search(text)
    notes = NOTES.search(old.group(0)) if old else None
    if notes and NOTES.search(body) is None:
        section += f"\n{notes.group(0).strip()}\n"
    text = (
        pattern.sub(lambda _: section + "\n", text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + section
    )
    RESULTS.write_text(text)
