"""`brainmoe shards ...`: build, verify, stats, inspect."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> None:
    shards = subparsers.add_parser("shards", help="build and check EEG WebDataset shards")
    sub = shards.add_subparsers(dest="shards_command", required=True)

    build = sub.add_parser("build", help="turn EEG sources into shards (Ray-parallel, resumable)")
    add_build_arguments(build)
    build.set_defaults(func=_build)

    verify = sub.add_parser(
        "verify", help="re-hash shards against the manifest; fails while any unit failed"
    )
    verify.add_argument("dir")
    verify.set_defaults(func=_verify)

    stats = sub.add_parser("stats", help="hours, samples and channels per dataset and subject")
    stats.add_argument("dir")
    stats.set_defaults(func=_stats)

    inspect = sub.add_parser("inspect", help="plot one window to a PNG")
    inspect.add_argument("dir")
    inspect.add_argument("--key", help="sample key (default: the first sample)")
    inspect.add_argument("--png", default="window.png", help="output image (default window.png)")
    inspect.set_defaults(func=_inspect)


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source",
        action="append",
        default=None,
        metavar="SPEC",
        help="an EEG source, e.g. synthetic, moabb:PhysionetMI?subjects=1, "
        "files:DIR, bids:DIR, things-eeg2:DIR, imagenet-eeg:FILE (repeatable)",
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


def build_config_from_args(args: argparse.Namespace):
    from shards.build import BuildConfig
    from shards.config import load_config

    return load_config(
        BuildConfig,
        args.config,
        args.overrides,
        sources=args.source,
        out=args.out,
        workers=args.workers,
        ray_address=args.ray_address,
    )


def build_exit_code(manifest: dict) -> int:
    """0 when every unit was built; 1 when some failed (the summary said which, and why)."""
    return 1 if manifest["totals"].get("units_failed") else 0


def _build(args: argparse.Namespace) -> int:
    from shards.build import build

    return build_exit_code(build(build_config_from_args(args)))


def _verify(args: argparse.Namespace) -> int:
    from shards.manifest import load_manifest, verify

    problems = verify(args.dir)
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    n = len(load_manifest(args.dir)["shards"])
    if problems:
        print(f"{len(problems)} problem(s) in {args.dir}", file=sys.stderr)
        return 1
    print(f"OK: {n} shards match the manifest")
    return 0


def _stats(args: argparse.Namespace) -> int:
    from shards.manifest import format_stats

    print(format_stats(args.dir))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import json

    from shards.inspect import plot_sample, read_sample

    eeg, meta = read_sample(args.dir, args.key)
    plot_sample(eeg, meta, args.png)
    summary = {k: meta[k] for k in ("key", "label", "stimulus_id", "sfreq", "provenance", "window")}
    summary["shape"] = list(eeg.shape)
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.png}")
    return 0
