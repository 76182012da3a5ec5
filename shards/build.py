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
import os
import re
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cluster.local_ray import init_local_ray
from shards import storage
from shards.config import to_dict
from shards.lock import build_lock
from shards.manifest import MANIFEST, SIZES, UNITS_DIR, assemble_manifest, read_json, summary_table
from shards.preprocess import PreprocessConfig, preprocess
from shards.recording import Rejected, WorkUnit, fingerprint
from shards.sources import get_source
from shards.writer import (
    UnitShardWriter,
    encode_sample,
    remove_partials,
    remove_unit_shards,
)

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


@dataclass(frozen=True)
class PlannedUnit:
    spec: str
    unit: WorkUnit

    @property
    def fingerprint(self) -> str:
        return self.unit.fingerprint


def plan(config: BuildConfig) -> list[PlannedUnit]:
    """Every unit of every source, in a stable order; raises ValueError for bad specs."""
    planned: list[PlannedUnit] = []
    seen: dict[str, str] = {}
    for spec in config.sources:
        for unit in get_source(spec).units():
            if unit.id in seen:
                raise ValueError(
                    f"work unit {unit.id!r} comes from both {seen[unit.id]!r} and {spec!r}; "
                    "give each source once (or distinct dataset= names)"
                )
            seen[unit.id] = spec
            planned.append(PlannedUnit(spec, unit))
    return planned


def _new_report(spec: str, unit: WorkUnit, config: BuildConfig) -> dict[str, Any]:
    return {
        "unit": unit.id,
        "spec": spec,
        "fingerprint": unit.fingerprint,
        "settings": fingerprint(config.output_settings()),
        "status": "ok",
        "recordings": [],
        "shards": [],
    }


def _save_report(out: storage.Target, report: dict[str, Any]) -> None:
    report["windows"] = sum(s["samples"] for s in report["shards"])
    if not storage.is_uri(out):
        Path(out, UNITS_DIR).mkdir(exist_ok=True)
    path = storage.join(out, UNITS_DIR, f"{report['unit']}.json")
    storage.write_text(path, json.dumps(report, indent=1, sort_keys=True))


def process_unit(spec: str, unit: WorkUnit, config: BuildConfig, out_dir: str) -> dict[str, Any]:
    """Load, preprocess and write one unit; always returns a report (never raises on data)."""
    started = time.perf_counter()
    if storage.is_uri(out_dir):
        report = _write_unit_remote(spec, unit, config, out_dir)
    else:
        report = _write_unit(spec, unit, config, Path(out_dir))
    _save_report(out_dir, report)
    report["seconds"] = time.perf_counter() - started  # not persisted: reports stay deterministic
    return report


def _write_unit_remote(spec: str, unit: WorkUnit, config: BuildConfig, url: str) -> dict:
    """Written locally with the very same writer (same bytes), then uploaded shard by shard;
    the caller uploads the report after, so a report is never ahead of its shards."""
    remove_unit_shards(url, unit.id)
    with tempfile.TemporaryDirectory(prefix="brainmoe-unit-") as stage:
        report = _write_unit(spec, unit, config, Path(stage))
        try:
            for shard in report["shards"]:
                storage.put(Path(stage, shard["name"]), storage.join(url, shard["name"]))
        except Exception as err:  # a lost upload fails the unit (retried next run), not the build
            remove_unit_shards(url, unit.id)
            report.update(
                status="error",
                reason=f"upload to {url} failed: {type(err).__name__}: {err}"[:500],
                shards=[],
            )
    return report


def _write_unit(spec: str, unit: WorkUnit, config: BuildConfig, out: Path) -> dict[str, Any]:
    remove_unit_shards(out, unit.id)
    cfg = config.preprocess
    writer = UnitShardWriter(
        out, unit.id, config.shards.maxcount, int(config.shards.maxsize_mb * 2**20)
    )
    report = _new_report(spec, unit, config)
    try:
        source = get_source(spec)
        for rec_index, item in enumerate(source.load(unit)):
            if isinstance(item, Rejected):
                report["recordings"].append(
                    {
                        "provenance": item.provenance.to_json(),
                        "status": "rejected",
                        "reason": item.reason,
                        "windows": 0,
                        "rejected_windows": {},
                    }
                )
                continue
            processed = preprocess(item, cfg)
            entry = {
                "provenance": item.provenance.to_json(),
                "status": "rejected" if processed.rejected_reason else "ok",
                "reason": processed.rejected_reason,
                "duration_s": round(item.duration_s, 3),
                "sfreq_native": item.sfreq,
                "n_channels": len(processed.channels.names) if processed.channels else 0,
                "windows": len(processed.windows),
                "rejected_windows": dict(sorted(processed.rejected.items())),
                "dropped_channels": processed.dropped_channels,
                "bad_channels": processed.bad_channels,
                "notes": processed.notes,
            }
            report["recordings"].append(entry)
            if processed.rejected_reason:
                continue
            if not processed.windows:
                entry["status"] = "rejected"
                entry["reason"] = "every window rejected: " + ", ".join(
                    f"{k} x{v}" for k, v in sorted(processed.rejected.items())
                )
            ch = processed.channels
            positions = [
                None if not all(map(_finite, p)) else [round(float(v), 6) for v in p]
                for p in ch.positions
            ]
            for win in processed.windows:
                key = f"{unit.id}_r{rec_index:03d}_w{win.index:06d}"
                meta = {
                    "key": key,
                    "ch_names": ch.names,
                    "ch_known": ch.known,
                    "ch_pos": positions,
                    # kept in eeg.npy, but broken for the whole recording: the reader masks them
                    "bad_channels": [n for n in ch.names if n in processed.bad_channels],
                    "layout": ch.layout,
                    "sfreq": processed.sfreq,
                    "unit": "uV",
                    "n_samples": int(win.data.shape[-1]),
                    "provenance": item.provenance.to_json(),
                    "source": spec,
                    "window": {"index": win.index, "start_s": win.start_s, "kind": win.kind},
                    "label": win.label,
                    "stimulus_id": win.stimulus_id,
                    "events": win.events,
                    "extra": {**item.extra, **win.extra},
                }
                writer.write(encode_sample(key, win.data, meta))
        report["shards"] = writer.close()
    except Exception as err:  # a unit that cannot be loaded is reported (and retried), not fatal
        writer.abort()
        report.update(
            status="error",
            reason=f"{type(err).__name__}: {err}",
            traceback=traceback.format_exc(limit=6),
            shards=[],
        )
    return report


def _lost_unit(item: PlannedUnit, config: BuildConfig, out: storage.Target, err: Exception) -> dict:
    """The report of a unit whose Ray task died on every try (its worker crashed, say)."""
    remove_unit_shards(out, item.unit.id)
    report = _new_report(item.spec, item.unit, config)
    first_line = (str(err).strip().splitlines() or [""])[0]
    report.update(status="error", reason=f"{type(err).__name__}: {first_line}"[:500])
    _save_report(out, report)
    return report


def _finite(v: float) -> bool:
    return v == v and abs(v) != float("inf")


def _finished(
    out: storage.Target, item: PlannedUnit, settings: str, reports: set[str], present: set[str]
) -> bool:
    """Built already, with these inputs and settings; a failed unit never is. `reports` and
    `present` are listings of units/ and of the folder, taken once (one request each on an
    object store, instead of one per shard)."""
    name = f"{item.unit.id}.json"
    if name not in reports:
        return False
    report = read_json(storage.join(out, UNITS_DIR, name))
    return (
        report.get("status") == "ok"
        and report.get("fingerprint") == item.fingerprint
        and report.get("settings") == settings
        and all(s["name"] in present for s in report["shards"])
    )


def run_units(
    todo: list[PlannedUnit], config: BuildConfig, out: storage.Target
) -> list[dict[str, Any]]:
    """Process units in this process (workers=0) or as Ray tasks, with a progress bar."""
    bar = tqdm(
        total=len(todo), unit="unit", desc="building shards", file=sys.stderr, dynamic_ncols=True
    )
    reports = []

    def done(report: dict[str, Any]) -> None:
        reports.append(report)
        bar.set_postfix(unit=report["unit"][-32:], windows=report["windows"], refresh=False)
        bar.update()

    if config.workers == 0:
        for item in todo:
            done(process_unit(item.spec, item.unit, config, str(out)))
        bar.close()
        return reports

    import ray

    if not ray.is_initialized():
        if config.ray_address:
            ray.init(address=config.ray_address, log_to_driver=False)
        elif os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=False)  # inside `ray job submit`: join that cluster
        else:
            init_local_ray(num_cpus=config.workers or os.cpu_count())
    task = ray.remote(num_cpus=1, max_retries=config.task_retries)(process_unit)
    limit = config.workers or int(ray.cluster_resources().get("CPU", 1))
    config_ref = ray.put(config)
    pending = list(todo)
    running: dict[Any, PlannedUnit] = {}
    while pending or running:
        while pending and len(running) < 2 * limit:
            item = pending.pop(0)
            running[task.remote(item.spec, item.unit, config_ref, str(out))] = item
        ready, _ = ray.wait(list(running), num_returns=1)
        item = running.pop(ready[0])
        try:
            done(ray.get(ready[0]))
        except ray.exceptions.RayError as err:  # the unit is lost, not the build
            done(_lost_unit(item, config, out, err))
    bar.close()
    return reports


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
    todo = [p for p in planned if not _finished(out, p, settings_fp, reports_done, present)]
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


_SHARD_NAME = re.compile(r"^(?P<unit>.+)-\d{5}\.tar$")


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
        match = _SHARD_NAME.match(name)
        if match and match["unit"] not in keep:
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
