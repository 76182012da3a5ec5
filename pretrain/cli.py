"""`brainmoe pretrain | export | register | probe`: the pretraining layer's commands.

`brainmoe pretrain` checks the whole config (world size included, and that an http tracking
server answers) in this process, so a mistake costs a second instead of a launch, then hands
the training loop to a launcher in cluster/: `deepspeed pretrain/run.py` (default) or Ray
Train workers (`--launcher ray`).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from cluster.deepspeed_launch import add_launch_arguments

RUN_PY = Path(__file__).resolve().with_name("run.py")


def add_parsers(subparsers) -> None:
    pre = subparsers.add_parser(
        "pretrain",
        help="masked-signal pretraining of the MoE encoder under DeepSpeed",
        description="Checks the config, then runs `deepspeed pretrain/run.py` on this node "
        "(or on every node of --hostfile), or the same loop on Ray Train workers "
        "(--launcher ray).",
    )
    add_launch_arguments(pre, "configs/pretrain/*.yaml")
    pre.set_defaults(func=_pretrain)

    exp = subparsers.add_parser(
        "export", help="consolidate a (ZeRO) checkpoint into a from_pretrained folder"
    )
    exp.add_argument("checkpoint", help="run_dir/checkpoints (newest) or one step folder in it")
    exp.add_argument("out", help="output folder (model.safetensors, config.json, README.md)")
    exp.add_argument(
        "--eval",
        action="append",
        default=[],
        metavar="JSON",
        help="a `brainmoe evaluate reconstruction|moabb --json` result for the model card "
        "(repeatable)",
    )
    exp.add_argument(
        "--license",
        help="license id for the card's metadata (e.g. apache-2.0; default: other): "
        "what the training data's licenses allow",
    )
    exp.add_argument(
        "--push-to-hub", metavar="ORG/NAME", help="then upload the folder to this Hub repo"
    )
    exp.add_argument("--private", action="store_true", help="create the Hub repo private")
    exp.set_defaults(func=_export)

    reg = subparsers.add_parser(
        "register", help="log an exported encoder to MLflow and register a version with an alias"
    )
    reg.add_argument("folder", help="an exported encoder folder (brainmoe export)")
    reg.add_argument("--name", required=True, help="registered model name")
    reg.add_argument("--alias", default="current", help="alias to point at the new version")
    reg.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: the training run's store, from the folder's "
        "lineage, else $MLFLOW_TRACKING_URI)",
    )
    reg.set_defaults(func=_register)

    probe = subparsers.add_parser(
        "probe", help="linear probe of a frozen encoder vs a random-init twin and chance"
    )
    probe.add_argument("--model", required=True, help="encoder folder or models:/<name>@<alias>")
    probe.add_argument("--source", required=True, help="a labelled source spec")
    probe.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ (or env)")
    probe.add_argument("--max-windows", type=int, default=2000)
    probe.add_argument("--seed", type=int, default=0, help="seed of the first random-init twin")
    probe.add_argument(
        "--random-seeds", type=int, default=3, help="random-init twins averaged (default 3)"
    )
    probe.add_argument(
        "--pooling",
        choices=("mean", "regions", "moments"),
        default="mean",
        help="mean of all tokens, or per 10-20 region (keeps left/right; see pretrain.probe)",
    )
    probe.add_argument(
        "--finetune",
        action="store_true",
        help="fine-tune the encoder and a linear head per fold instead of a frozen linear "
        "probe (the random-init twins get the same folds, batches and budget)",
    )
    probe.add_argument("--epochs", type=int, default=10, help="--finetune: epochs per fold")
    probe.add_argument(
        "--lr", type=float, default=3e-4, help="--finetune: the encoder's learning rate"
    )
    probe.add_argument("--json", help="also write the result to this JSON file")
    probe.set_defaults(func=_probe)

    evaluate = subparsers.add_parser(
        "evaluate", help="score a pretrained encoder against classical baselines"
    )
    kinds = evaluate.add_subparsers(dest="evaluation", required=True)
    from pretrain import reconstruction

    rec = kinds.add_parser(
        "reconstruction",
        help="hidden-patch reconstruction vs spherical splines, nearest channel, linear, zero",
        description=reconstruction.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    reconstruction.add_arguments(rec)
    rec.set_defaults(func=reconstruction.run)
    from pretrain import moabb_eval

    moabb = kinds.add_parser(
        "moabb",
        help="MOABB's own evaluations: brainmoe features vs random init, CSP+LDA, TS+LR",
        description=moabb_eval.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    moabb_eval.add_arguments(moabb)
    moabb.set_defaults(func=moabb_eval.run)


def _pretrain(args: argparse.Namespace) -> int:
    from cluster.deepspeed_launch import check_launch_arguments, launch
    from cluster.ray_train import config_overrides, launch_ray, world_size
    from pretrain.config import PretrainConfig, load_run_config
    from pretrain.model import validate_config
    from pretrain.tracking import check_tracking_store

    world = check_launch_arguments(args)
    args.overrides = [*args.overrides, *config_overrides(args)]
    cfg = load_run_config(PretrainConfig, args.config, args.overrides)
    world = world_size(args, cfg, world)
    validate_config(cfg, world_size=world)
    check_tracking_store(cfg.tracking)
    if args.launcher == "ray":
        return launch_ray("pretrain", cfg, args)
    return launch(args, RUN_PY)


def _export(args: argparse.Namespace) -> int:
    from pretrain.encoder import Encoder
    from pretrain.export import export_checkpoint
    from pretrain.hub import check_can_push, push_folder

    repo = args.push_to_hub
    if repo:
        check_can_push(repo)  # offline, no token, bad id: before the consolidation
    out = export_checkpoint(args.checkpoint, args.out, args.eval, args.license, repo)
    n = Encoder.from_pretrained(out).num_parameters()  # proves the folder loads on its own
    print(f"exported {out} ({n['total'] / 1e6:.2f}M parameters, {n['active'] / 1e6:.2f}M active)")
    if repo:
        print(f"pushed to {repo}: {push_folder(out, repo, private=args.private or None)}")
    return 0


def default_tracking_uri(folder: str | Path) -> str:
    lineage = Path(folder) / "lineage.json"
    if lineage.exists():
        uri = json.loads(lineage.read_text()).get("tracking_uri")
        if uri:
            return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    raise ValueError(
        f"no tracking URI for {folder}: pass --tracking-uri (e.g. sqlite:///mlflow.db) "
        "or set MLFLOW_TRACKING_URI"
    )


def _register(args: argparse.Namespace) -> int:
    from pretrain.export import register_export

    uri = args.tracking_uri or default_tracking_uri(args.folder)
    info = register_export(args.folder, args.name, args.alias, uri)
    print(
        f"registered {info['name']} version {info['version']} as "
        f"models:/{info['name']}@{info['alias']} in {uri}"
    )
    for key, value in sorted(info["tags"].items()):
        if key != "resolved_config":
            print(f"  {key}: {value}")
    return 0


def _probe(args: argparse.Namespace) -> int:
    import tempfile

    from pretrain.encoder import Encoder
    from pretrain.probe import format_result, probe
    from pretrain.tracking import resolve_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = resolve_model(args.model, args.tracking_uri, tmp)  # None: $MLFLOW_TRACKING_URI
        encoder = Encoder.from_pretrained(folder)
        if args.finetune:
            from pretrain.finetune_probe import FinetuneProbeConfig, finetune_probe

            cfg = FinetuneProbeConfig(epochs=args.epochs, lr=args.lr)
            cfg.validate()  # before the windows load
            result = finetune_probe(
                encoder,
                args.source,
                cfg,
                seed=args.seed,
                max_windows=args.max_windows,
                pooling=args.pooling,
                random_seeds=args.random_seeds,
                progress=lambda line: print(line, flush=True),
            )
        else:
            result = probe(
                encoder,
                args.source,
                seed=args.seed,
                max_windows=args.max_windows,
                pooling=args.pooling,
                random_seeds=args.random_seeds,
            )
    result["model"] = args.model
    print(format_result(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0
