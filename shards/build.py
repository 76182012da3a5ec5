"""Build a corpus: EEG sources -> preprocessed windows -> WebDataset shards, on Ray.

    python -m shards.build --source synthetic --source files:/data/eeg --out corpus/
    ray job submit --working-dir . -- python -m shards.build --source ... --out /shared/corpus

One Ray task per work unit (a subject or a file). A unit writes its own shards and then a
small report under `units/`; the report is the unit's commit record. So a re-run skips
every unit whose report matches, an interrupted build resumes where it stopped, and the
final manifest is assembled from the reports -- same inputs and config, same bytes.
A unit that failed is reported too, with the reason, but not taken as done: the next run
retries it. One build at a time per output folder (lock.py).

`--out s3://bucket/corpus` (any fsspec URL, see storage.py): each unit is written into a
private local temp folder (TMPDIR needs room for one unit per worker), its shards are
uploaded, then its report -- so an object store holds a report only once its shards are
all there, and resume works there exactly as on disk. The manifest is uploaded last.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shards import storage
from shards.config import to_dict
from shards.lock import build_lock
from shards.manifest import MANIFEST, SIZES, UNITS_DIR, assemble_manifest, read_json, summary_table
from shards.preprocess import PreprocessConfig
from shards.recording import fingerprint
from shards.work_units import finished, plan, run_units
from shards.writer import remove_partials, shard_unit

FORMAT_VERSION = 1


@dataclass
class ShardConfig:
    maxcount: int = 2000  # samples per shard at most
    maxsize_mb: float = 256.0  # shard size at most (MiB); a shard closes once past it


@dataclass
class BuildConfig:
    sources: list[str] = field(default_factory=list)
    out: str = ""
    # Parallel Ray tasks at once; 0 runs in this process without Ray (debugging).
    # None: every CPU of the machine or cluster.
    workers: int | None = None
    ray_address: str | None = None  # None: a Ray cluster this process is part of, else local
    task_retries: int = 3  # Ray re-runs a unit whose worker died (not one that raised)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)

    def validate(self) -> None:
        if not self.sources:
            raise ValueError("no sources given: pass --source SPEC (e.g. --source synthetic)")
        if not self.out:
            raise ValueError("no output folder given: pass --out DIR")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.shards.maxcount < 1 or self.shards.maxsize_mb <= 0:
            raise ValueError("shards.maxcount and shards.maxsize_mb must be positive")
        self.preprocess.validate()

    def output_settings(self) -> dict[str, Any]:
        """The part of the config that decides the bytes written (not how they are computed)."""
        return {
            "format": FORMAT_VERSION,
            "preprocess": to_dict(self.preprocess),
            "shards": to_dict(self.shards),
        }


def build(config: BuildConfig) -> dict[str, Any]:
    """Build (or finish, or confirm) the corpus at `config.out`; returns the manifest.

    Raises ValueError for bad configs and specs, and BuildLocked (a ValueError) while
    another build writes into the same folder.
    """
    config.validate()
    out = config.out if storage.is_uri(config.out) else Path(config.out)
    if storage.is_uri(out):
        storage.filesystem(out)  # an unknown scheme or a missing s3fs: say so before any work
    with build_lock(out):
        return _build_locked(config, out)


def _build_locked(config: BuildConfig, out: storage.Target) -> dict[str, Any]:
    if not storage.is_uri(out):  # an object store has no partial objects to clean up
        remove_partials(out, out / UNITS_DIR)  # a killed build's leftovers; nobody else writes
    planned = plan(config)
    settings = config.output_settings()
    settings_fp = fingerprint(settings)
    build_fp = fingerprint(settings, [(p.spec, p.unit.id, p.fingerprint) for p in planned])

    settings_path = storage.join(out, "build.json")
    if storage.exists(settings_path):
        previous = read_json(settings_path)
        if previous.get("settings") != settings:
            raise ValueError(
                f"{out} holds shards built with other preprocessing/shard settings; "
                "use a new --out folder (or delete this one) to build with these settings"
            )
    else:
        storage.write_text(
            settings_path, json.dumps({"settings": settings}, indent=1, sort_keys=True)
        )

    _remove_stale(out, {p.unit.id for p in planned})
    manifest_path = storage.join(out, MANIFEST)
    present = set(storage.list_sizes(out))
    if MANIFEST in present:
        manifest = read_json(manifest_path)
        if (
            manifest.get("build") == build_fp
            and not manifest["totals"].get("units_failed")
            and all(s["name"] in present for s in manifest["shards"])
        ):
            print(
                f"{out}: up to date ({len(manifest['shards'])} shards, "
                f"{manifest['totals']['samples']} samples); nothing to do",
                file=sys.stderr,
            )
            return manifest

    reports_done = set(storage.list_sizes(storage.join(out, UNITS_DIR)))
    todo = [p for p in planned if not finished(out, p, settings_fp, reports_done, present)]
    print(
        f"{len(planned)} work units from {len(config.sources)} source(s); "
        f"{len(planned) - len(todo)} already done, {len(todo)} to build",
        file=sys.stderr,
    )
    started = time.perf_counter()
    reports = run_units(todo, config, out) if todo else []
    elapsed = time.perf_counter() - started

    units = [(p.unit.id, p.spec) for p in planned]
    manifest = assemble_manifest(out, units, _header(config, build_fp))
    storage.write_text(
        storage.join(out, SIZES),
        json.dumps({s["name"]: s["samples"] for s in manifest["shards"]}, indent=1, sort_keys=True),
    )
    storage.write_text(manifest_path, json.dumps(manifest, indent=1, sort_keys=True))
    print(summary_table(manifest), file=sys.stderr)
    if reports:
        hours = sum(r.get("duration_s", 0) for rep in reports for r in rep["recordings"]) / 3600
        print(
            f"built {len(reports)} units in {elapsed:.1f} s "
            f"({hours / max(elapsed / 60, 1e-9):.2f} recording-hours per minute)",
            file=sys.stderr,
        )
    return manifest


def _remove_stale(out: storage.Target, keep: set[str]) -> None:
    """Units of earlier builds that are no longer asked for lose their shards and reports.
    A build killed between finishing a shard and writing its unit's report leaves a shard no
    report names; it is removed by its `<unit id>-NNNNN.tar` name (runs under the build lock,
    so no other build is writing into this folder)."""
    units_dir = storage.join(out, UNITS_DIR)
    for name in sorted(storage.list_sizes(units_dir)):
        unit_id = name.removesuffix(".json")
        if name.endswith(".json") and unit_id not in keep:
            path = storage.join(units_dir, name)
            for shard in read_json(path).get("shards", []):
                storage.remove(storage.join(out, shard["name"]))
            storage.remove(path)
    for name in sorted(storage.list_sizes(out)):
        unit = shard_unit(name)
        if unit is not None and unit not in keep:
            storage.remove(storage.join(out, name))


def _header(config: BuildConfig, build_fp: str) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "build": build_fp,
        "config": {"sources": list(config.sources), **config.output_settings()},
        "window_s": config.preprocess.window_s,
    }


def main(argv: list[str] | None = None) -> int:
    from shards.cli import add_build_arguments, build_config_from_args, build_exit_code

    parser = argparse.ArgumentParser(
        prog="python -m shards.build",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_build_arguments(parser)
    args = parser.parse_args(argv)
    try:
        manifest = build(build_config_from_args(args))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return build_exit_code(manifest)


if __name__ == "__main__":
    sys.exit(main())
