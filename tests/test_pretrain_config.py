"""Config mistakes stop `brainmoe pretrain` before DeepSpeed spawns a single process.

Each case goes through the real command; the run folder must not exist afterwards (a rank
would have created it), and the message must name the key to fix.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from cluster.cli import main as brainmoe
from pretrain.config import PretrainConfig
from pretrain.ds_config import deepspeed_config
from shards.build import BuildConfig, build
from shards.config import load_config
from tests.conftest import REPO

TINY = str(REPO / "configs" / "pretrain" / "tiny.yaml")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    build(
        load_config(
            BuildConfig,
            sources=["synthetic?subjects=1&runs=1&duration_s=16"],
            out=str(out),
            workers=0,
        )
    )
    return out


CASES = [
    (["dist.zero_stage=4"], "dist.zero_stage must be 0, 1, 2 or 3"),
    (["dist.precision=fp16"], "dist.precision must be bf16 or fp32"),
    (["dist.micro_batch=4"], "differs from dist.micro_batch"),
    (["dist.global_batch=24"], "dist.global_batch=24 but micro_batch x grad_accum x world size"),
    (["model.name=huge"], "is not a named encoder config"),
    (["model.overrides.top_k=5"], "top_k <= n_experts"),
    (["model.overrides.heads=5"], "not divisible by heads"),
    (["model.overrides.n_expert=8"], "unknown encoder fields ['n_expert']"),
    (["model.overrides.patch_seconds=8.0"], "longer than the 4.0 s windows"),
    (["msm.mask_ratio=1.5"], "mask_ratio must be in (0, 1)"),
    (["optim.warmup_steps=400"], "must be below train.steps"),
    (["train.steps=0"], "train.steps must be >= 1"),
    (["register.name=enc", "tracking.enabled=false"], "needs MLflow"),
    (["train.stepz=3"], "train.stepz"),
]


@pytest.mark.parametrize("overrides, message", CASES, ids=[c[0][0] for c in CASES])
def test_bad_config_stops_before_launch(corpus, tmp_path, capsys, overrides, message):
    run_dir = tmp_path / "run"
    args = ["pretrain", "--num-gpus", "2", "--config", TINY, f"data.shards=[{corpus}]"]
    args += [f"train.run_dir={run_dir}", *overrides]
    assert brainmoe(args) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not run_dir.exists(), "a rank started: the check came too late"


def test_missing_shards_are_named(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert brainmoe(["pretrain", "--config", TINY, f"data.shards=[{missing}]"]) == 2
    assert f"data.shards: {missing} is not a folder" in capsys.readouterr().err
    assert brainmoe(["pretrain", "--config", TINY]) == 2
    assert "data.shards is empty" in capsys.readouterr().err


def test_deepspeed_json_is_generated_from_the_run_config():
    cfg = load_config(
        PretrainConfig,
        TINY,
        ["dist.zero_stage=3", "dist.grad_accum=4", "optim.lr=3e-4", "dist.precision=fp32"],
    )
    ds = deepspeed_config(cfg.dist, cfg.optim, cfg.train.steps)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_micro_batch_size_per_gpu"] == cfg.dist.micro_batch
    assert ds["optimizer"]["params"]["lr"] == 3e-4
    assert ds["optimizer"]["params"]["fused"] is True  # torch's fused AdamW kernel
    off = deepspeed_config(cfg.dist, dataclasses.replace(cfg.optim, torch_adam=False), 1)
    assert "fused" not in off["optimizer"]["params"]  # DeepSpeed's own FusedAdam takes no flag
    assert ds["bf16"] == {"enabled": False}
    assert ds["scheduler"]["params"]["total_num_steps"] == cfg.train.steps
    assert ds["scheduler"]["params"]["warmup_num_steps"] == cfg.optim.warmup_steps
    json.dumps(ds)  # what DeepSpeed receives is plain JSON


def test_existing_run_is_not_overwritten_without_resume(corpus, tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step0000100").mkdir(parents=True)
    args = ["pretrain", "--config", TINY, f"data.shards=[{corpus}]", f"train.run_dir={run_dir}"]
    assert brainmoe(args) == 2
    assert "already holds checkpoints: pass train.resume=true" in capsys.readouterr().err


def test_existing_ray_run_is_not_overwritten_without_resume(corpus, tmp_path, capsys):
    """Under `--launcher ray` the checkpoints live in ray.storage_path/<run name>: Ray would
    resume from them whatever the config says, so a fresh run there is refused before Ray
    starts (tests/test_object_store.py checks the same for an s3:// storage_path)."""
    run_dir = tmp_path / "run"
    (run_dir / "ray" / "run" / "step0000004").mkdir(parents=True)
    args = ["pretrain", "--launcher", "ray", "--num-workers", "1", "--config", TINY]
    args += [f"data.shards=[{corpus}]", f"train.run_dir={run_dir}"]
    assert brainmoe(args) == 2
    assert "already holds checkpoints of a Ray run" in capsys.readouterr().err


def test_unreachable_ray_storage_is_a_clear_error(corpus, tmp_path, capsys, monkeypatch):
    """A bucket the driver cannot list (here: no credentials) stops the launch before Ray
    starts, naming the variables to set, not with a botocore traceback."""
    s3fs = pytest.importorskip("s3fs")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))  # keep ~/.aws out
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()  # a client made under other variables
    try:
        args = ["pretrain", "--launcher", "ray", "--num-workers", "1", "--config", TINY]
        args += [f"data.shards=[{corpus}]", f"train.run_dir={tmp_path / 'run'}"]
        assert brainmoe([*args, "ray.storage_path=s3://no-such-bucket/ray"]) == 2
    finally:
        s3fs.S3FileSystem.clear_instance_cache()  # nor leave this one to later tests
    err = capsys.readouterr().err
    assert "cannot look into s3://no-such-bucket/ray/run" in err, err
    assert "AWS_ACCESS_KEY_ID" in err, err


def test_launch_command_for_one_node_and_for_a_hostfile(tmp_path):
    from cluster.cli import build_parser
    from cluster.deepspeed_launch import launch_command
    from pretrain.cli import RUN_PY

    parser = build_parser()
    one = parser.parse_args(["pretrain", "--num-gpus", "8", "--master-port", "29500", "a=1"])
    cmd = launch_command(one, RUN_PY)
    assert Path(cmd[0]).name == "deepspeed"
    assert cmd[1:] == [
        *["--master_addr", "127.0.0.1", "--num_gpus", "8", "--master_port", "29500"],
        *[str(RUN_PY), "a=1"],
    ]
    hosts = tmp_path / "hostfile"
    hosts.write_text("node1 slots=8\nnode2 slots=8\n")
    multi = parser.parse_args(
        ["pretrain", "--hostfile", str(hosts), "--num-nodes", "2", "--num-gpus", "8"]
        + ["--config", TINY, "--master-port", "29500"]
    )
    cmd = launch_command(multi, RUN_PY)
    assert cmd[1:5] == ["--hostfile", str(hosts), "--num_nodes", "2"]
    assert cmd[-3:] == [str(RUN_PY), "--config", TINY]


def test_node_rank_launches_this_nodes_ranks_without_ssh(tmp_path, capsys):
    """--node-rank: each node runs DeepSpeed's launcher for its own ranks (`--no_ssh`), all
    meeting node 0 at one address and port; what cannot agree is refused before launching."""
    from cluster.cli import build_parser
    from cluster.deepspeed_launch import launch_command
    from pretrain.cli import RUN_PY

    hosts = tmp_path / "hostfile"
    hosts.write_text("node1 slots=2\nnode2 slots=2\n")
    multi = ["pretrain", "--hostfile", str(hosts), "--num-nodes", "2", "--num-gpus", "2"]
    args = build_parser().parse_args(
        [*multi, "--node-rank", "1", "--master-addr", "10.0.0.1", "--master-port", "29500"]
    )
    cmd = launch_command(args, RUN_PY)
    assert cmd[1:10] == [
        *["--hostfile", str(hosts), "--num_nodes", "2", "--no_ssh", "--node_rank", "1"],
        *["--master_addr", "10.0.0.1"],
    ]
    assert cmd[cmd.index("--master_port") + 1] == "29500"
    for extra, message in [
        (
            ["--node-rank", "1", "--master-addr", "10.0.0.1"],
            "needs --master-addr and --master-port",
        ),
        (["--node-rank", "2", "--master-addr", "a", "--master-port", "1"], "must be in 0..1"),
        (["--master-addr", "10.0.0.1"], "--master-addr goes with --node-rank"),
    ]:
        assert brainmoe([*multi, "--config", TINY, *extra]) == 2
        assert message in capsys.readouterr().err
    assert brainmoe(["pretrain", "--node-rank", "0", "--config", TINY]) == 2
    assert "--node-rank is for multi-node runs" in capsys.readouterr().err


def test_multi_node_needs_a_hostfile(capsys):
    assert brainmoe(["pretrain", "--num-nodes", "2", "--config", TINY]) == 2
    assert "--num-nodes > 1 needs --hostfile" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs/pretrain").glob("*.yaml")))
def test_every_named_recipe_builds(name, corpus, tmp_path):
    """Each size's recipe (the GPU ones included) is a valid run config whose model builds;
    on the meta device, so `large` costs no memory."""
    import torch

    from pretrain.model import msm_config, validate_config
    from pretrain.msm import MaskedSignalModel

    cfg = load_config(
        PretrainConfig,
        str(REPO / f"configs/pretrain/{name}.yaml"),
        [f"data.shards=[{corpus}]", f"train.run_dir={tmp_path / 'run'}"],
    )
    validate_config(cfg, world_size=None)
    with torch.device("meta"):
        model = MaskedSignalModel(msm_config(cfg))
    assert model.num_parameters()["total"] > 0
