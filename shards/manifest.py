"""What a build directory holds, and checking it: the manifest is the corpus' ledger.

DIR/manifest.json   every shard (samples, bytes, sha256) and every input recording
                    (windows written, or rejected with the reason; dropped and flagged
                    bad channels), totals, config
DIR/sizes.json      {shard name: samples}, as open_clip's reader expects
DIR/build.json      the settings the shards were written with
DIR/units/*.json    one report per work unit (the resume records)
DIR/*.tar           the shards
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
SIZES = "sizes.json"
UNITS_DIR = "units"


def read_json(path: Path) -> Any:
    with open(path) as fh:
        return json.load(fh)


def load_manifest(build_dir: str | Path) -> dict[str, Any]:
    path = Path(build_dir) / MANIFEST
    if not path.exists():
        raise ValueError(
            f"{build_dir} has no {MANIFEST}: is it a finished `brainmoe shards build` output?"
        )
    return read_json(path)


def verify(build_dir: str | Path) -> list[str]:
    """Re-hash every shard against the manifest; returns the problems (empty if all is well)."""
    from shards.writer import sha256_file

    build_dir = Path(build_dir)
    manifest = load_manifest(build_dir)
    problems = []
    listed = set()
    for shard in manifest["shards"]:
        listed.add(shard["name"])
        path = build_dir / shard["name"]
        if not path.exists():
            problems.append(f"{shard['name']}: missing")
        elif path.stat().st_size != shard["bytes"]:
            problems.append(
                f"{shard['name']}: {path.stat().st_size} bytes, manifest says {shard['bytes']}"
            )
        elif sha256_file(path) != shard["sha256"]:
            problems.append(f"{shard['name']}: sha256 differs from the manifest")
    for path in sorted(build_dir.glob("*.tar")):
        if path.name not in listed:
            problems.append(f"{path.name}: not in the manifest")
    sizes_path = build_dir / SIZES
    if not sizes_path.exists() or read_json(sizes_path) != {
        s["name"]: s["samples"] for s in manifest["shards"]
    }:
        problems.append(f"{SIZES}: missing or does not match the manifest")
    return problems


def stats(build_dir: str | Path) -> dict[str, dict[str, dict[str, Any]]]:
    """Hours, samples and channel counts per dataset and per subject."""
    manifest = load_manifest(build_dir)
    hours_per_window = manifest["window_s"] / 3600
    table: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for rec in manifest["recordings"]:
        prov = rec["provenance"]
        row = table[prov["dataset"]].setdefault(
            prov["subject"], {"recordings": 0, "samples": 0, "hours": 0.0, "channels": Counter()}
        )
        row["recordings"] += 1
        row["samples"] += rec["windows"]
        row["hours"] += rec["windows"] * hours_per_window
        if rec["windows"]:
            row["channels"][rec["n_channels"]] += rec["windows"]
    return table


def format_stats(build_dir: str | Path) -> str:
    table = stats(build_dir)
    lines = [f"{'dataset':<24} {'subject':<28} {'recs':>5} {'samples':>8} {'hours':>8}  channels"]
    total_s = total_h = 0
    for dataset in sorted(table):
        d_s = d_h = 0
        chans: Counter = Counter()
        for subject in sorted(table[dataset]):
            row = table[dataset][subject]
            ch = ",".join(str(c) for c in sorted(row["channels"])) or "-"
            lines.append(
                f"{dataset:<24} {subject[:28]:<28} {row['recordings']:>5} "
                f"{row['samples']:>8} {row['hours']:>8.3f}  {ch}"
            )
            d_s, d_h = d_s + row["samples"], d_h + row["hours"]
            chans.update(row["channels"])
        ch = ",".join(str(c) for c in sorted(chans)) or "-"
        lines.append(
            f"{dataset:<24} {'(all ' + str(len(table[dataset])) + ' subjects)':<28} "
            f"{'':>5} {d_s:>8} {d_h:>8.3f}  {ch}"
        )
        total_s, total_h = total_s + d_s, total_h + d_h
    lines.append(f"{'total':<24} {'':<28} {'':>5} {total_s:>8} {total_h:>8.3f}")
    return "\n".join(lines)
