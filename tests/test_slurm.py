"""cluster/slurm/*.sbatch submitted for real, to a one-machine Slurm the test starts.

A script that is only read never fails: the `scontrol show hostnames` idiom, the arguments
handed through to `brainmoe pretrain`, the environment a job step inherits are each easy to
get wrong in ways only a real slurmctld + slurmd shows. So munged, slurmctld and slurmd run
here in the foreground from a slurm.conf in a temp dir (no systemd, no cgroups, nothing
under /etc touched), each in its own session; the teardown cancels every job, then stops the
daemons by their PIDs, so nothing is left running. Needs Debian's `slurm-wlm` and `munge`
(Slurm 22.05), and root, as Slurm's daemons run as SlurmUser=root here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.checkpoint import problem, tag_for
from shards.build import BuildConfig, build
from shards.config import load_config
from tests.conftest import REPO, free_port

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
TINY = str(REPO / "configs" / "pretrain" / "tiny.yaml")
CORPUS = "synthetic?subjects=2&runs=1&duration_s=60"
STEPS = 20
SCHEDULE = (
    f"train.steps={STEPS}",
    "train.log_every=10",
    f"train.ckpt_every={STEPS}",
    "train.plots=false",
    "tracking.enabled=false",
    "optim.warmup_steps=5",  # tiny.yaml warms up for 20 steps, the whole run here
)
DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "squeue", "scancel", "sinfo")


def _binary(name: str) -> str | None:
    # Debian puts the daemons in /usr/sbin, which a non-login PATH may lack.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")


def _need_slurm() -> dict[str, str]:
    missing = [name for name in DAEMONS + CLIENTS if _binary(name) is None]
    reason = None
    if missing:
        reason = (
            f"Slurm not installed (missing {', '.join(missing)}): "
            "apt-get install -y slurm-wlm munge"
        )
    elif os.geteuid() != 0:
        reason = "the one-machine Slurm runs its daemons as root (SlurmUser=root)"
    if reason and os.environ.get("BRAINMOE_REQUIRE_SLURM") == "1":
        pytest.fail(reason + "; BRAINMOE_REQUIRE_SLURM=1 (.ci/run) forbids skipping")
    if reason:
        pytest.skip(reason)
    return {name: _binary(name) for name in DAEMONS + CLIENTS}


SLURM_CONF = """\
ClusterName=brainmoe-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge.socket
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool-%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
MinJobAge=600
MailProg=/bin/true
NodeName={host} NodeAddr=127.0.0.1 Port={slurmd_port} CPUs=2 State=UNKNOWN
NodeName={host}-2 NodeHostname={host} NodeAddr=127.0.0.1 Port={slurmd_port2} CPUs=2 State=UNKNOWN
PartitionName=debug Nodes={host},{host}-2 Default=YES MaxTime=INFINITE State=UP
"""


class Slurm:
    """A running one-node cluster: its config, binaries, and the env clients need."""

    def __init__(self, folder: Path, bins: dict[str, str]):
        self.dir, self.bins = folder, bins
        self.conf = folder / "slurm.conf"
        self.env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RANK")}
        self.env["SLURM_CONF"] = str(self.conf)
        # the job inherits this PATH: `brainmoe`, `deepspeed` and `python` from this venv
        self.env["PATH"] = f"{BIN}{os.pathsep}{self.env.get('PATH', '')}"

    def run(self, name: str, *args: str, timeout: float = 30, check: bool = True):
        return subprocess.run(
            [self.bins[name], *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def job(self, job_id: str) -> dict[str, str]:
        line = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.dir.glob("*.log"))
        )


def _wait_for(what: str, ready, procs: list[subprocess.Popen], slurm: Slurm, timeout=60):
    deadline = time.monotonic() + timeout
    while not ready():
        for proc in procs:
            assert proc.poll() is None, f"{proc.args[0]} exited early\n{slurm.logs()}"
        assert time.monotonic() < deadline, f"{what} not ready in {timeout} s\n{slurm.logs()}"
        time.sleep(0.5)


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in reversed(procs):  # slurmd, slurmctld, then munged
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    bins = _need_slurm()
    # short: munge's socket path must fit a sockaddr_un
    folder = Path(tmp_path_factory.mktemp("slurm", numbered=True))
    host = socket.gethostname()
    for sub in ("state", f"spool-{host}", f"spool-{host}-2"):
        (folder / sub).mkdir()
    cluster = Slurm(folder, bins)
    cluster.conf.write_text(
        SLURM_CONF.format(
            host=host,
            dir=folder,
            ctld_port=free_port(),
            slurmd_port=free_port(),
            slurmd_port2=free_port(),
        )
    )
    key = folder / "munge.key"
    cluster.run("mungekey", "--create", f"--keyfile={key}")
    key.chmod(0o600)
    procs: list[subprocess.Popen] = []

    def start(*cmd: str, log: str) -> None:
        out = (folder / log).open("ab")
        procs.append(
            subprocess.Popen(
                cmd,
                env=cluster.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        )

    try:
        start(
            bins["munged"],
            "--foreground",
            "--force",
            f"--socket={folder / 'munge.socket'}",
            f"--key-file={key}",
            f"--pid-file={folder / 'munged.pid'}",
            f"--log-file={folder / 'munged.log'}",
            f"--seed-file={folder / 'munged.seed'}",
            log="munged.out.log",
        )
        _wait_for("munged", (folder / "munge.socket").exists, procs, cluster)
        start(bins["slurmctld"], "-D", "-f", str(cluster.conf), log="slurmctld.out.log")
        _wait_for(
            "slurmctld",
            lambda: cluster.run("scontrol", "ping", check=False).returncode == 0,
            procs,
            cluster,
        )
        # two nodes on this machine (Debian's slurmd is built with multiple-slurmd support):
        # one per slurmd, each on its own port; both reached at 127.0.0.1
        for node in (host, f"{host}-2"):
            start(bins["slurmd"], "-D", "-N", node, "-f", str(cluster.conf), log=f"{node}.out.log")

        def nodes_idle() -> bool:
            states = cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
            return len(states) == 2 and all(s.rstrip("*") == "idle" for s in states)

        _wait_for("slurmd (both nodes idle)", nodes_idle, procs, cluster)
        yield cluster
    finally:
        with contextlib.suppress(Exception):
            jobs = cluster.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if jobs:
                cluster.run("scancel", *jobs, check=False)
                deadline = time.monotonic() + 30
                while (
                    time.monotonic() < deadline
                    and cluster.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
                ):
                    time.sleep(1)
        _stop(procs)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    build(load_config(BuildConfig, sources=[CORPUS], out=str(out), workers=0))
    return out


def sbatch(slurm: Slurm, script: str, *args: str, options=(), env=None, timeout: float = 900):
    """Submit, wait for the end; -> (job id, its scontrol record, its output)."""
    out = slurm.dir / "job-%j.out"
    saved = slurm.env
    slurm.env = {**saved, **(env or {})}  # sbatch hands its environment to the job
    try:
        result = slurm.run(
            "sbatch",
            "--wait",
            "--parsable",
            f"--chdir={REPO}",
            f"--output={out}",
            *options,
            str(REPO / "cluster" / "slurm" / script),
            *args,
            timeout=timeout,
            check=False,
        )
    finally:
        slurm.env = saved
    job_id = result.stdout.strip().split(";")[0]
    assert job_id.isdigit(), f"sbatch: {result.stdout}{result.stderr}\n{slurm.logs()}"
    log_path = slurm.dir / f"job-{job_id}.out"
    log = log_path.read_text(errors="replace") if log_path.exists() else "(no job output)"
    return job_id, slurm.job(job_id), log + f"\n[sbatch rc {result.returncode}] {result.stderr}"


def test_deepspeed_sbatch_pretrains(slurm, corpus, tmp_path):
    """One node, two ranks (tasks) on CPU: the script's hostfile names this node, and the
    run it launches trains, logs and checkpoints like a direct `brainmoe pretrain`."""
    run_dir = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    job_id, job, log = sbatch(
        slurm,
        "deepspeed.sbatch",
        "--config",
        TINY,
        f"data.shards=[{corpus}]",
        f"train.run_dir={run_dir}",
        *SCHEDULE,
        options=("--nodes=1", "--ntasks-per-node=2", f"--nodelist={socket.gethostname()}"),
        env={"BRAINMOE_HOSTFILE": str(hostfile)},
    )
    assert job["JobState"] == "COMPLETED", f"{job}\n{log[-6000:]}\n{slurm.logs()}"
    assert job["ExitCode"] == "0:0", job
    assert "1 node(s) x 2 rank(s)" in log, log[-3000:]
    assert hostfile.read_text() == f"{socket.gethostname()} slots=2\n"
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [10, 20], history
    checkpoint = run_dir / "checkpoints" / tag_for(STEPS)
    assert checkpoint.is_dir(), sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert problem(checkpoint) is None, problem(checkpoint)
    assert "dist_world_size=2" in log, log[-3000:]  # DeepSpeed's launcher: both ranks ran


def test_deepspeed_sbatch_spans_two_nodes_without_ssh(slurm, corpus, tmp_path):
    """Two Slurm nodes (two slurmd on this machine), one rank each: srun starts one DeepSpeed
    launcher per node (`--no_ssh --node_rank`), the ranks meet node 0 at its NodeAddr, and
    the run trains and checkpoints as on one node -- no ssh or pdsh anywhere."""
    run_dir = tmp_path / "run"
    host = socket.gethostname()
    job_id, job, log = sbatch(
        slurm,
        "deepspeed.sbatch",
        "--config",
        TINY,
        f"data.shards=[{corpus}]",
        f"train.run_dir={run_dir}",
        *SCHEDULE,
        options=("--nodes=2", "--ntasks-per-node=1"),
        env={"GLOO_SOCKET_IFNAME": "lo"},  # both "nodes" are this machine: stay on loopback
    )
    assert job["JobState"] == "COMPLETED", f"{job}\n{log[-8000:]}\n{slurm.logs()}"
    assert job["NodeList"] == f"{host},{host}-2" or job["NodeList"] == f"{host}{{,-2}}", job
    assert "2 node(s) x 1 rank(s)" in log, log[-3000:]
    assert f"rendezvous: node 0 ({host}) at 127.0.0.1:" in log, log[-3000:]
    for rank in (0, 1):  # DeepSpeed's per-node launcher, started once on each node
        assert f"--node_rank={rank}" in log, log[-6000:]
    assert "pdsh" not in log and "ssh -o" not in log, log[-6000:]
    assert "dist_world_size=2" in log, log[-3000:]
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [10, 20], history
    checkpoint = run_dir / "checkpoints" / tag_for(STEPS)
    assert problem(checkpoint) is None, problem(checkpoint)


def ray_processes(job_id: str) -> list[str]:
    """Processes of the job's Ray (its temp dir, /tmp/ray-<job id>, is in their arguments)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(f"/tmp/ray-{job_id}" in part for part in proc.info["cmdline"] or ()):
                found.append(" ".join(proc.info["cmdline"])[:200])
    return found


def test_ray_sbatch_pretrains_and_stops_ray(slurm, corpus, tmp_path):
    """One node: the Ray head in an srun step, on this node's address, `brainmoe pretrain
    --launcher ray` against it, and no Ray process left once the job has ended."""
    import psutil

    run_dir = tmp_path / "run"
    ports = {"port": free_port(), "dash": free_port(), "agent": free_port()}
    job_id, job, log = sbatch(
        slurm,
        "ray.sbatch",
        "--config",
        TINY,
        f"data.shards=[{corpus}]",
        f"train.run_dir={run_dir}",
        *SCHEDULE,
        f"ray.storage_path={tmp_path / 'store'}",
        "ray.resources_per_worker={CPU: 1}",
        options=("--nodes=1", f"--nodelist={socket.gethostname()}"),
        env={
            "BRAINMOE_RAY_PORT": str(ports["port"]),
            # fixed defaults (8265, 52365) another Ray on this machine may hold
            "BRAINMOE_RAY_HEAD_ARGS": f"--dashboard-port={ports['dash']} "
            f"--dashboard-agent-listen-port={ports['agent']}",
        },
    )
    try:
        assert job["JobState"] == "COMPLETED", f"{job}\n{log[-6000:]}\n{slurm.logs()}"
        head = re.search(r"Ray head (\S+):(\d+)", log)
        assert head and int(head.group(2)) == ports["port"], log[-3000:]
        addresses = {a.address for nic in psutil.net_if_addrs().values() for a in nic}
        assert head.group(1) in addresses, f"{head.group(1)}: not this node's ({addresses})"
        history = [
            json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        ]
        assert [h["step"] for h in history] == [10, 20], history
        store = tmp_path / "store" / run_dir.name / tag_for(STEPS)
        assert problem(store) is None, problem(store)
        deadline = time.monotonic() + 30
        while ray_processes(job_id) and time.monotonic() < deadline:
            time.sleep(1)
        assert ray_processes(job_id) == [], "Ray outlived its job"
    finally:  # the script leaves Ray's session logs on the node, for a failed job's sake
        shutil.rmtree(f"/tmp/ray-{job_id}", ignore_errors=True)
