"""The `brainmoe` command: one entry point that hands each subcommand to its layer."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="brainmoe",
        description="EEG foundation models: shards -> MoE pretraining -> image/text heads",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    from shards.cli import add_parser as add_shards

    add_shards(sub)
    from pretrain.cli import add_parsers as add_pretrain

    add_pretrain(sub)
    from finetune.cli import add_parsers as add_finetune

    add_finetune(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:  # user input problems: say what and how to fix, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
