"""Build a corpus: EEG sources -> preprocessed windows -> WebDataset shards, on Ray.

    python -m shards.build --source synthetic --source files:/data/eeg --out corpus/
    ray job submit --working-dir . -- python -m shards.build --source ... --out /shared/corpus

One Ray task per work unit (a subject or a file). A unit writes its own shards and then a
small report under `units/`; the report is the unit's commit record. So a re-run skips
every unit whose report matches, an interrupted build resumes where it stopped, and the
final manifest is assembled from the reports -- same inputs and config, same bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from shards.config import load_config, to_dict
from shards.manifest import MANIFEST, SIZES, UNITS_DIR, read_json
from shards.preprocess import PreprocessConfig, preprocess
from shards.recording import Rejected, WorkUnit, fingerprint
from shards.sources import get_source
from shards.writer import UnitShardWriter, atomic_write_text, encode_sample, remove_unit_shards

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


def process_unit(spec: str, unit: WorkUnit, config: BuildConfig, out_dir: str) -> dict[str, Any]:
    """Load, preprocess and write one unit; always returns a report (never raises on data)."""
    out = Path(out_dir)
    remove_unit_shards(out, unit.id)
    cfg = config.preprocess
    writer = UnitShardWriter(
        out, unit.id, config.shards.maxcount, int(config.shards.maxsize_mb * 2**20)
    )
    report: dict[str, Any] = {
        "unit": unit.id,
        "spec": spec,
        "fingerprint": unit.fingerprint,
        "settings": fingerprint(config.output_settings()),
        "status": "ok",
        "recordings": [],
        "shards": [],
    }
    started = time.perf_counter()
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
    except Exception as err:  # a unit that cannot be loaded is reported, not fatal
        writer.abort()
        report.update(
            status="error",
            reason=f"{type(err).__name__}: {err}",
            traceback=traceback.format_exc(limit=6),
            shards=[],
        )
    report["windows"] = sum(s["samples"] for s in report["shards"])
    units_dir = out / UNITS_DIR
    units_dir.mkdir(exist_ok=True)
    atomic_write_text(units_dir / f"{unit.id}.json", json.dumps(report, indent=1, sort_keys=True))
    report["seconds"] = time.perf_counter() - started  # not persisted: reports stay deterministic
    return report


def _finite(v: float) -> bool:
    return v == v and abs(v) != float("inf")


def _finished(out: Path, item: PlannedUnit, settings: str) -> bool:
    path = out / UNITS_DIR / f"{item.unit.id}.json"
    if not path.exists():
        return False
    report = read_json(path)
    return (
        report.get("fingerprint") == item.fingerprint
        and report.get("settings") == settings
        and all((out / s["name"]).exists() for s in report["shards"])
    )


def run_units(todo: list[PlannedUnit], config: BuildConfig, out: Path) -> list[dict[str, Any]]:
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
            ray.init(
                num_cpus=config.workers or os.cpu_count(),
                include_dashboard=False,
                log_to_driver=False,
            )
    task = ray.remote(num_cpus=1, max_retries=config.task_retries)(process_unit)
    limit = config.workers or int(ray.cluster_resources().get("CPU", 1))
    config_ref = ray.put(config)
    pending = list(todo)
    running = []
    while pending or running:
        while pending and len(running) < 2 * limit:
            item = pending.pop(0)
            running.append(task.remote(item.spec, item.unit, config_ref, str(out)))
        ready, running = ray.wait(running, num_returns=1)
        done(ray.get(ready[0]))
    bar.close()
    return reports


def build(config: BuildConfig) -> dict[str, Any]:
    """Build (or finish, or confirm) the corpus at `config.out`; returns the manifest."""
    config.validate()
    out = Path(config.out)
    planned = plan(config)
    settings = config.output_settings()
    settings_fp = fingerprint(settings)
    build_fp = fingerprint(settings, [(p.spec, p.unit.id, p.fingerprint) for p in planned])

    out.mkdir(parents=True, exist_ok=True)
    settings_path = out / "build.json"
    if settings_path.exists():
        previous = read_json(settings_path)
        if previous.get("settings") != settings:
            raise ValueError(
                f"{out} holds shards built with other preprocessing/shard settings; "
                "use a new --out folder (or delete this one) to build with these settings"
            )
    else:
        atomic_write_text(
            settings_path, json.dumps({"settings": settings}, indent=1, sort_keys=True)
        )

    manifest_path = out / MANIFEST
    if manifest_path.exists():
        manifest = read_json(manifest_path)
        if manifest.get("build") == build_fp and all(
            (out / s["name"]).exists() for s in manifest["shards"]
        ):
            print(
                f"{out}: up to date ({len(manifest['shards'])} shards, "
                f"{manifest['totals']['samples']} samples); nothing to do",
                file=sys.stderr,
            )
            return manifest

    todo = [p for p in planned if not _finished(out, p, settings_fp)]
    print(
        f"{len(planned)} work units from {len(config.sources)} source(s); "
        f"{len(planned) - len(todo)} already done, {len(todo)} to build",
        file=sys.stderr,
    )
    started = time.perf_counter()
    reports = run_units(todo, config, out) if todo else []
    elapsed = time.perf_counter() - started

    _remove_stale(out, {p.unit.id for p in planned})
    manifest = assemble_manifest(out, planned, config, build_fp)
    atomic_write_text(
        out / SIZES,
        json.dumps({s["name"]: s["samples"] for s in manifest["shards"]}, indent=1, sort_keys=True),
    )
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1, sort_keys=True))
    print(summary_table(manifest), file=sys.stderr)
    if reports:
        hours = sum(r.get("duration_s", 0) for rep in reports for r in rep["recordings"]) / 3600
        print(
            f"built {len(reports)} units in {elapsed:.1f} s "
            f"({hours / max(elapsed / 60, 1e-9):.2f} recording-hours per minute)",
            file=sys.stderr,
        )
    return manifest


def _remove_stale(out: Path, keep: set[str]) -> None:
    """Units of earlier builds that are no longer asked for lose their shards and reports."""
    units_dir = out / UNITS_DIR
    for path in sorted(units_dir.glob("*.json")):
        if path.stem not in keep:
            for shard in read_json(path).get("shards", []):
                (out / shard["name"]).unlink(missing_ok=True)
            path.unlink()


def assemble_manifest(
    out: Path, planned: list[PlannedUnit], config: BuildConfig, build_fp: str
) -> dict[str, Any]:
    shards, recordings, units = [], [], []
    totals: Counter = Counter()
    rejected_windows: Counter = Counter()
    for item in planned:
        report = read_json(out / UNITS_DIR / f"{item.unit.id}.json")
        units.append(
            {
                "unit": item.unit.id,
                "spec": item.spec,
                "status": report["status"],
                "reason": report.get("reason"),
                "windows": report["windows"],
                "shards": [s["name"] for s in report["shards"]],
            }
        )
        shards.extend({**s, "unit": item.unit.id} for s in report["shards"])
        for rec in report["recordings"]:
            recordings.append({"unit": item.unit.id, **rec})
            rejected_windows.update(rec.get("rejected_windows", {}))
            totals["recordings"] += 1
            totals["recordings_rejected"] += rec["status"] != "ok"
        totals["units_failed"] += report["status"] != "ok"
    totals["samples"] = sum(s["samples"] for s in shards)
    totals["bytes"] = sum(s["bytes"] for s in shards)
    totals["shards"] = len(shards)
    totals["units"] = len(planned)
    return {
        "format": FORMAT_VERSION,
        "build": build_fp,
        "config": {"sources": list(config.sources), **config.output_settings()},
        "window_s": config.preprocess.window_s,
        "totals": dict(sorted(totals.items())),
        "rejected_windows": dict(sorted(rejected_windows.items())),
        "units": units,
        "shards": shards,
        "recordings": recordings,
    }


def summary_table(manifest: dict[str, Any]) -> str:
    """Per dataset: units, recordings, windows kept and rejected, hours, failures."""
    rows: dict[str, Counter] = defaultdict(Counter)
    window_h = manifest["window_s"] / 3600
    for rec in manifest["recordings"]:
        row = rows[rec["provenance"]["dataset"]]
        row["recordings"] += 1
        row["rejected recs"] += rec["status"] != "ok"
        row["windows"] += rec["windows"]
        row["rejected windows"] += sum(rec.get("rejected_windows", {}).values())
    for unit in manifest["units"]:
        if unit["status"] != "ok":
            rows[f"(failed) {unit['unit']}"]["recordings"] += 0
    header = ["dataset", "recordings", "rejected recs", "windows", "rejected windows", "hours"]
    lines = [header]
    for name, row in sorted(rows.items()):
        lines.append(
            [name] + [str(row[h]) for h in header[1:-1]] + [f"{row['windows'] * window_h:.2f}"]
        )
    t = manifest["totals"]
    lines.append(
        [
            "total",
            str(t.get("recordings", 0)),
            str(t.get("recordings_rejected", 0)),
            str(t["samples"]),
            str(sum(manifest["rejected_windows"].values())),
            f"{t['samples'] * window_h:.2f}",
        ]
    )
    widths = [max(len(r[i]) for r in lines) for i in range(len(header))]

    def fmt(r: list[str]) -> str:
        cells = zip(r, widths, strict=True)
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells))

    out = [fmt(lines[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in lines[1:]]
    failed = [u for u in manifest["units"] if u["status"] != "ok"]
    for unit in failed:
        out.append(f"unit {unit['unit']} failed: {unit['reason']}")
    out.append(f"{t['shards']} shards, {t['bytes'] / 2**20:.1f} MiB")
    return "\n".join(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source",
        action="append",
        default=None,
        metavar="SPEC",
        help="an EEG source, e.g. synthetic, moabb:PhysionetMI?subjects=1, "
        "files:DIR, things-eeg2:DIR, imagenet-eeg:FILE (repeatable)",
    )
    parser.add_argument("--out", help="output folder for shards and manifest")
    parser.add_argument("--workers", type=int, help="parallel Ray tasks (0: no Ray, in-process)")
    parser.add_argument(
        "--ray-address",
        help="Ray cluster address (default: local, or the cluster of `ray job submit`)",
    )
    parser.add_argument("--config", help="YAML config (e.g. configs/shards/default.yaml)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. preprocess.sfreq=250 shards.maxcount=500",
    )


def config_from_args(args: argparse.Namespace) -> BuildConfig:
    return load_config(
        BuildConfig,
        args.config,
        args.overrides,
        sources=args.source,
        out=args.out,
        workers=args.workers,
        ray_address=args.ray_address,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shards.build",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        build(config)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
