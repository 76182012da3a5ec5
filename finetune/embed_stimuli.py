"""`brainmoe embed-stimuli`: the CLIP cache of a corpus' stimuli, built once (a Ray job).

The flags live here, apart from finetune/clip_cache.py, so that building the `brainmoe`
parser stays free of torch and open_clip (0.1 s instead of 3 s for every command); the
defaults are ClipConfig's, filled in when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

DESCRIPTION = (
    "Embed the shards' stimuli with CLIP once (a Ray job); writes <shards>/clip/<model key>/"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shards", required=True, help="where to write (beside the shards): a folder or s3://..."
    )
    parser.add_argument("--ids-from", help="shards to read stimulus ids from (default: --shards)")
    parser.add_argument(
        "--image-root", type=Path, help="the dataset's image folder (real datasets)"
    )
    parser.add_argument(
        "--captions", help="captions .json {id: caption(s)} or .csv id,caption (path or URL)"
    )
    parser.add_argument(
        "--source-kind",
        choices=("synthetic", "things-eeg2", "imagenet-eeg"),
        help="default: read off the ids",
    )
    parser.add_argument(
        "--model",
        help="open_clip architecture or local model folder (default: ClipConfig.model, ViT-B-32)",
    )
    parser.add_argument(
        "--pretrained", help="pretrained tag or checkpoint file (default: ClipConfig.pretrained)"
    )
    parser.add_argument("--device", help="where each actor runs CLIP (default: cpu)")
    parser.add_argument("--batch-size", type=int, help="images or captions per forward pass")
    parser.add_argument("--workers", type=int, default=1, help="Ray actors, one model each")


def run(args: argparse.Namespace) -> int:
    from finetune.clip_cache import ClipConfig, embed_stimuli, stimulus_ids_from_shards
    from finetune.stimuli import stimuli_for
    from shards import storage

    ids = stimulus_ids_from_shards(args.ids_from or args.shards)
    stimuli = stimuli_for(
        ids,
        args.source_kind,
        image_root=args.image_root,
        captions=args.captions,
        render_dir=storage.join(args.shards, "stimuli", "synthetic"),
    )
    default = ClipConfig()
    cfg = ClipConfig(
        args.model or default.model,
        args.pretrained or default.pretrained,
        args.batch_size or default.batch_size,
        args.device or default.device,
    )
    folder = embed_stimuli(stimuli, cfg, args.shards, workers=args.workers)
    print(folder)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="brainmoe embed-stimuli", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
