"""What a build directory holds, and checking it: the manifest is the corpus' ledger.

DIR/manifest.json   every shard (samples, bytes, sha256) and every input recording
                    (windows written, or rejected with the reason; dropped and flagged
                    bad channels), totals, config
DIR/sizes.json      {shard name: samples}, as open_clip's reader expects
DIR/build.json      the settings the shards were written with
DIR/units/*.json    one report per work unit (the resume records)
DIR/*.tar           the shards
DIR/.lock/          held while a build runs (lock.py)

DIR may be an object-store URL (s3://bucket/corpus); see storage.py.

A unit whose build failed keeps its report (the manifest lists it as failed, with the
reason) but does not count as done: the next build retries it, and `verify` fails until
every unit is built.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from shards import storage

MANIFEST = "manifest.json"
SIZES = "sizes.json"
UNITS_DIR = "units"


def read_json(path: storage.Target) -> Any:
    return storage.read_json(path)


def load_manifest(build_dir: storage.Target) -> dict[str, Any]:
    path = storage.join(build_dir, MANIFEST)
    if not storage.isfile(path):
        raise ValueError(
            f"{build_dir} has no {MANIFEST}: is it a finished `brainmoe shards build` output?"
        )
    return read_json(path)


def assemble_manifest(
    out: storage.Target, units: list[tuple[str, str]], header: dict[str, Any]
) -> dict[str, Any]:
    """The manifest from the reports of `units` ([(unit id, source spec)], in build order)."""
    shards, recordings, entries = [], [], []
    totals: Counter = Counter()
    rejected_windows: Counter = Counter()
    for unit_id, spec in units:
        report = read_json(storage.join(out, UNITS_DIR, f"{unit_id}.json"))
        entries.append(
            {
                "unit": unit_id,
                "spec": spec,
                "status": report["status"],
                "reason": report.get("reason"),
                "windows": report["windows"],
                "shards": [s["name"] for s in report["shards"]],
            }
        )
        shards.extend({**s, "unit": unit_id} for s in report["shards"])
        for rec in report["recordings"]:
            recordings.append({"unit": unit_id, **rec})
            rejected_windows.update(rec.get("rejected_windows", {}))
            totals["recordings"] += 1
            totals["recordings_rejected"] += rec["status"] != "ok"
        totals["units_failed"] += report["status"] != "ok"
    totals["samples"] = sum(s["samples"] for s in shards)
    totals["bytes"] = sum(s["bytes"] for s in shards)
    totals["shards"] = len(shards)
    totals["units"] = len(units)
    return {
        **header,
        "totals": dict(sorted(totals.items())),
        "rejected_windows": dict(sorted(rejected_windows.items())),
        "units": entries,
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
    if failed:
        out.append(
            f"{len(failed)} unit(s) failed and are not in the shards; "
            "run the same build again to retry them"
        )
    return "\n".join(out)


def unit_problems(build_dir: storage.Target, manifest: dict[str, Any]) -> list[str]:
    """Units that are failed, or whose report is gone: the corpus is not whole."""
    problems = []
    reports = storage.list_sizes(storage.join(build_dir, UNITS_DIR))
    for unit in manifest["units"]:
        if unit["status"] != "ok":
            problems.append(
                f"unit {unit['unit']} failed ({unit['reason']}); its data is not in the "
                "shards: re-run the build to retry it"
            )
        elif f"{unit['unit']}.json" not in reports:
            problems.append(f"unit {unit['unit']}: report {UNITS_DIR}/{unit['unit']}.json missing")
    if len(manifest["units"]) != manifest["totals"].get("units", len(manifest["units"])):
        problems.append(
            f"manifest lists {len(manifest['units'])} units, its totals say "
            f"{manifest['totals']['units']}"
        )
    return problems


def verify(build_dir: storage.Target) -> list[str]:
    """Re-hash every shard against the manifest, and check that every unit was built;
    returns the problems (empty if all is well). One listing gives every size, so a corpus
    in an object store costs one request per shard (its bytes), not three."""
    build_dir = build_dir if storage.is_uri(build_dir) else Path(build_dir)
    manifest = load_manifest(build_dir)
    problems = unit_problems(build_dir, manifest)
    present = storage.list_sizes(build_dir)
    listed = set()
    for shard in manifest["shards"]:
        listed.add(shard["name"])
        size = present.get(shard["name"])
        if size is None:
            problems.append(f"{shard['name']}: missing")
        elif size != shard["bytes"]:
            problems.append(f"{shard['name']}: {size} bytes, manifest says {shard['bytes']}")
        elif storage.sha256(storage.join(build_dir, shard["name"])) != shard["sha256"]:
            problems.append(f"{shard['name']}: sha256 differs from the manifest")
    for name in sorted(present):
        if name.endswith(".tar") and name not in listed:
            problems.append(f"{name}: not in the manifest")
    sizes_path = storage.join(build_dir, SIZES)
    if SIZES not in present or read_json(sizes_path) != {
        s["name"]: s["samples"] for s in manifest["shards"]
    }:
        problems.append(f"{SIZES}: missing or does not match the manifest")
    return problems


def stats(build_dir: storage.Target) -> dict[str, dict[str, dict[str, Any]]]:
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


def format_stats(build_dir: storage.Target) -> str:
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
