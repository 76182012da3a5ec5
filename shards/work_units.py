"""The work units of a build: which there are, how one is written, how they all run on Ray.

Kept apart from the build (build.py) because this is the part that runs on Ray's workers:
`process_unit` is shipped to them by reference, so it lives at module level here, and a
worker importing it does not need the orchestration around it. A unit's report under
`units/` is written last, after its shards, because it is the unit's commit record: the
build skips exactly the units whose report says they are done (`finished`).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from cluster.local_ray import init_local_ray
from shards import storage
from shards.manifest import UNITS_DIR, read_json
from shards.preprocess import preprocess
from shards.recording import Rejected, WorkUnit, fingerprint
from shards.sources import get_source
from shards.writer import UnitShardWriter, encode_sample, remove_unit_shards

if TYPE_CHECKING:  # build.py imports this module; the config class is only named here
    from shards.build import BuildConfig


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


def finished(
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
