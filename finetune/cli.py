"""`brainmoe embed-stimuli | finetune | generate`: the finetuning layer's commands.

`brainmoe finetune` does everything that can fail or is done once in this process -- the
config, the split, the stimuli (a missing image stops here), the encoder, the heads' base
models, and the CLIP embeddings (a Ray job, skipped when cached) -- writes the preparation
into the run folder for the ranks to read (finetune/prepared.py), then hands over to a
launcher in cluster/ (`deepspeed`, or Ray Train with `--launcher ray`), like `brainmoe pretrain`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from cluster.deepspeed_launch import add_launch_arguments, check_launch_arguments, launch
from finetune import embed_stimuli

RUN_PY = Path(__file__).resolve().with_name("run.py")


def add_parsers(subparsers) -> None:
    emb = subparsers.add_parser(
        "embed-stimuli",
        help="CLIP image/text embeddings of the shards' stimuli, once (a Ray job)",
        description=embed_stimuli.DESCRIPTION,
    )
    embed_stimuli.add_arguments(emb)
    emb.set_defaults(func=embed_stimuli.run)

    fin = subparsers.add_parser(
        "finetune",
        help="train the image/text/retrieval heads on a pretrained encoder under DeepSpeed",
        description="Checks and precomputes everything, then runs `deepspeed finetune/run.py`.",
    )
    add_launch_arguments(fin, "configs/finetune/*.yaml")
    fin.add_argument("--clip-workers", type=int, default=1, help="Ray actors for CLIP embedding")
    fin.set_defaults(func=_finetune)

    gen = subparsers.add_parser(
        "generate", help="images and captions from EEG with a finetuned model"
    )
    gen.add_argument(
        "--model", required=True, help="finetune output folder or models:/<name>@<alias>"
    )
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--eeg", help="a recording file (any format MNE reads, any montage)")
    src.add_argument("--shards", nargs="+", help="shard build folder(s), with --keys")
    gen.add_argument("--keys", nargs="+", help="window keys in --shards")
    gen.add_argument("--out", required=True, help="output folder")
    gen.add_argument("--num-images", type=int, default=1, help="images per input window")
    gen.add_argument("--steps", type=int, help="denoising steps (default: the model's config)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--max-windows", type=int, default=4, help="windows of --eeg to decode")
    gen.add_argument("--tracking-uri", help="MLflow store of models:/ URIs (or env)")
    gen.set_defaults(func=_generate)


def _finetune(args: argparse.Namespace) -> int:
    from cluster.ray_train import config_overrides, launch_ray, world_size
    from finetune.config import FinetuneConfig
    from finetune.prepare import ensure_clip, validate_finetune
    from finetune.prepared import load_prepared, prepare_run
    from pretrain.config import load_run_config
    from pretrain.tracking import check_tracking_store

    world = check_launch_arguments(args)
    args.overrides = [*args.overrides, *config_overrides(args)]
    cfg = load_run_config(FinetuneConfig, args.config, args.overrides)
    world = world_size(args, cfg, world)
    validate_finetune(cfg, world)  # the cheap checks, before prepare() reads anything
    check_tracking_store(cfg.tracking)  # before prepare() resolves models:/ URIs through it
    record = prepare_run(cfg, world)  # once, into the run folder: the ranks read it
    with tempfile.TemporaryDirectory() as tmp:
        prepared = load_prepared(cfg, record, Path(tmp))
    print(prepared.split.summary(), flush=True)
    print(f"CLIP embeddings: {ensure_clip(cfg, prepared.stimuli, args.clip_workers)}", flush=True)
    if args.launcher == "ray":
        return launch_ray("finetune", cfg, args, prepared=record)
    return launch(args, RUN_PY)


def _generate(args: argparse.Namespace) -> int:
    from finetune.generate import generate_cli

    return generate_cli(args)
