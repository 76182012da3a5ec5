"""Corpus build and read throughput; writes the 'Shards' section of bench/RESULTS.md.

    python bench/shards.py            (make bench)

Build: recording-hours per CPU-minute with 1 and 2 Ray workers (Ray started before the
clock, so the figure is the steady state a long build sees). Read: samples/s through the
training reader with 2 DataLoader workers, against producing the same windows on the fly
from the raw source (load + preprocess), which is what training without shards costs.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results import write_section  # noqa: E402
from cluster.local_ray import init_local_ray  # noqa: E402
from shards.build import BuildConfig, build  # noqa: E402
from shards.config import load_config  # noqa: E402
from shards.preprocess import PreprocessConfig, preprocess  # noqa: E402
from shards.reader import ReaderConfig, make_loader  # noqa: E402
from shards.recording import Rejected  # noqa: E402
from shards.sources import get_source  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SYNTH = "synthetic?subjects=16&runs=2&duration_s=120"
WARMUP = "synthetic?subjects=4&runs=1&duration_s=8&seed=99"


def sources() -> list[tuple[str, str]]:
    found = [("synthetic (16 subjects x 2 runs x 120 s)", SYNTH)]
    edfs = SHARED / "physionet-eegmmidb" / "MNE-eegbci-data" / "files" / "eegmmidb" / "1.0.0"
    if edfs.exists():  # the 12 runs as files: one work unit each, so workers can share them
        found.append(("EEGMMIDB S001, 12 EDF runs (real, 64 ch, 160 Hz)", f"files:{edfs}"))
    return found


def time_build(spec: str, workers: int, work: Path) -> tuple[float, float, int]:
    import ray

    out = work / f"build-{workers}"
    shutil.rmtree(out, ignore_errors=True)
    init_local_ray(num_cpus=workers)  # on 127.0.0.1 only, as `shards build` starts it
    try:
        # warm the workers (imports of MNE/SciPy) so the clock sees the steady state
        build(load_config(BuildConfig, sources=[WARMUP], out=str(work / "warmup"), workers=workers))
        shutil.rmtree(work / "warmup")
        config = load_config(BuildConfig, sources=[spec], out=str(out), workers=workers)
        start = time.perf_counter()
        manifest = build(config)
        wall = time.perf_counter() - start
    finally:
        ray.shutdown()
    hours = sum(r.get("duration_s", 0) for r in manifest["recordings"]) / 3600
    return hours, wall, manifest["totals"]["samples"]


def time_reader(build_dir: Path) -> tuple[float, int]:
    loader = make_loader(build_dir, ReaderConfig(batch_size=32, num_workers=2, shuffle=True))
    start = time.perf_counter()
    n = sum(batch["eeg"].shape[0] for batch in loader)
    return n / (time.perf_counter() - start), n


def time_raw(spec: str) -> tuple[float, int]:
    source, cfg = get_source(spec), PreprocessConfig()
    start = time.perf_counter()
    n = 0
    for unit in source.units():
        for rec in source.load(unit):
            if not isinstance(rec, Rejected):
                n += len(preprocess(rec, cfg).windows)
    return n / (time.perf_counter() - start), n


def main() -> None:
    rows_build, rows_read = [], []
    with tempfile.TemporaryDirectory(prefix="brainmoe-bench-") as tmp:
        work = Path(tmp)
        for name, spec in sources():
            results = {}
            for workers in (1, 2):
                hours, wall, samples = time_build(spec, workers, work)
                results[workers] = wall
                rows_build.append(
                    f"| {name} | {workers} | {hours:.3f} | {samples} | {wall:.1f} | "
                    f"{hours / (wall / 60):.3f} | {hours / (wall * workers / 60):.3f} |"
                )
                print(rows_build[-1], flush=True)
            rows_build.append(
                f"| (speed-up 1 -> 2 workers: {results[1] / results[2]:.2f}x) | | | | | | |"
            )
            shard_rate, n = time_reader(work / "build-2")
            raw_rate, n_raw = time_raw(spec)
            rows_read.append(
                f"| {name} | {n} | {shard_rate:.0f} | {raw_rate:.0f} | {shard_rate / raw_rate:.1f}x |"
            )
            print(rows_read[-1], flush=True)
    body = "\n".join(
        [
            "Build throughput (`bench/shards.py`; Ray started before timing; CPU-minutes = wall x workers):",
            "",
            "| source | Ray workers | recording-hours | windows | wall s | rec-hours / wall-min | rec-hours / CPU-min |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
            *rows_build,
            "",
            "Read throughput, one epoch, 4 s windows at 200 Hz, batch 32:",
            "",
            "| corpus | samples | shards via reader, 2 workers (samples/s) | raw source on the fly, 1 process (samples/s) | ratio |",
            "| --- | ---: | ---: | ---: | ---: |",
            *rows_read,
        ]
    )
    write_section("Shards", body)
    print(body)


if __name__ == "__main__":
    main()
