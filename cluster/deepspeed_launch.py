"""The DeepSpeed launcher: `brainmoe pretrain|finetune --launcher deepspeed` (the default).

Every layer's command checks its config in-process, then hands its `<layer>/run.py` to the
`deepspeed` launcher here, so pretraining and finetuning start the same way and no layer
imports another layer's command-line code to do it. On a machine without CUDA the ranks use
DeepSpeed's CPU accelerator (gloo); a single-node run keeps its rendezvous on loopback.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

LAUNCHERS = ("deepspeed", "ray")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def add_launch_arguments(parser: argparse.ArgumentParser, configs: str) -> None:
    """The arguments of every command that launches a layer's training loop."""
    parser.add_argument("--config", help=f"YAML run config ({configs})")
    parser.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default="deepspeed",
        help="deepspeed: `deepspeed <layer>/run.py` on this node or --hostfile's (default); "
        "ray: Ray Train workers on a Ray cluster (--num-workers, --ray-address)",
    )
    parser.add_argument("--num-gpus", type=int, default=1, help="processes per node (default 1)")
    parser.add_argument("--num-nodes", type=int, default=1, help="nodes (with --hostfile)")
    parser.add_argument("--hostfile", help="DeepSpeed hostfile for multi-node runs")
    parser.add_argument("--master-port", type=int, help="rendezvous port (default: a free one)")
    parser.add_argument(
        "--node-rank",
        type=int,
        help="multi-node without ssh: this node's index in --hostfile; every node runs the same "
        "command with its own --node-rank (e.g. srun, one task per node: "
        "cluster/slurm/deepspeed.sbatch) and the same --master-addr/--master-port",
    )
    parser.add_argument("--master-addr", help="with --node-rank: the address of node 0")
    parser.add_argument(
        "--num-workers", type=int, help="--launcher ray: training workers (sets ray.num_workers)"
    )
    parser.add_argument(
        "--ray-address",
        help="--launcher ray: the cluster to join (default: RAY_ADDRESS, as inside `ray job "
        "submit`, else a private local Ray on 127.0.0.1)",
    )
    parser.add_argument(
        "--use-gpu",
        action="store_true",
        default=None,
        help="--launcher ray: one GPU per worker (sets ray.use_gpu=true)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value")


def check_launch_arguments(args: argparse.Namespace) -> int:
    """-> world size of a DeepSpeed launch (the Ray launcher's comes from its config)."""
    if args.num_gpus < 1 or args.num_nodes < 1:
        raise ValueError("--num-gpus and --num-nodes must be at least 1")
    if args.num_nodes > 1 and not args.hostfile:
        raise ValueError("--num-nodes > 1 needs --hostfile listing the nodes")
    node_rank, master_addr = getattr(args, "node_rank", None), getattr(args, "master_addr", None)
    if node_rank is not None:
        if args.num_nodes < 2:
            raise ValueError("--node-rank is for multi-node runs: give --num-nodes and --hostfile")
        if not 0 <= node_rank < args.num_nodes:
            raise ValueError(f"--node-rank {node_rank} must be in 0..{args.num_nodes - 1}")
        if not master_addr or not getattr(args, "master_port", None):
            raise ValueError(
                "--node-rank needs --master-addr and --master-port: every node must meet node 0 "
                "at the same address and port (a free port picked per node would not agree)"
            )
    elif master_addr:
        raise ValueError("--master-addr goes with --node-rank (multi-node without ssh)")
    if getattr(args, "launcher", "deepspeed") == "deepspeed":
        ray_only = [
            flag
            for flag, value in (
                ("--num-workers", getattr(args, "num_workers", None)),
                ("--ray-address", getattr(args, "ray_address", None)),
                ("--use-gpu", getattr(args, "use_gpu", None)),
            )
            if value is not None
        ]
        if ray_only:
            raise ValueError(f"{', '.join(ray_only)} need --launcher ray")
    return args.num_gpus * args.num_nodes


def launch_command(args: argparse.Namespace, run_py: Path) -> list[str]:
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher) if launcher.exists() else "deepspeed"]
    if args.hostfile:
        cmd += ["--hostfile", args.hostfile, "--num_nodes", str(args.num_nodes)]
        if getattr(args, "node_rank", None) is not None:  # this node's ranks only, no ssh/pdsh
            cmd += ["--no_ssh", "--node_rank", str(args.node_rank)]
            cmd += ["--master_addr", args.master_addr]
    else:  # one node: the ranks meet on 127.0.0.1, not on an address other machines reach
        cmd += ["--master_addr", "127.0.0.1"]
    cmd += ["--num_gpus", str(args.num_gpus), "--master_port", str(args.master_port or free_port())]
    cmd += [str(run_py)]
    if args.config:
        cmd += ["--config", args.config]
    return cmd + list(args.overrides)


def launch_env(args: argparse.Namespace) -> dict[str, str]:
    """The launcher's environment: this one's `python`s, CPU DeepSpeed without CUDA, and on one
    node gloo on the loopback interface (it listens on the interface its host name resolves to
    unless told otherwise; torch's TCPStore on --master_port listens on every interface,
    whatever is passed)."""
    env = dict(os.environ)
    # the launcher starts `python`s of its own: make them this environment's
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if "DS_ACCELERATOR" not in env:
        import torch

        if not torch.cuda.is_available():
            env["DS_ACCELERATOR"] = "cpu"  # gloo on CPU: laptops, CI
    if not args.hostfile and Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def launch(args: argparse.Namespace, run_py: Path) -> int:
    """Hand over to the deepspeed launcher, in this environment (CPU: DeepSpeed's gloo)."""
    cmd = launch_command(args, run_py)
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, env=launch_env(args)).returncode
