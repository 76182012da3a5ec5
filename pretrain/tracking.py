"""MLflow behind one small module: every run logs and registers models through here.

Only rank 0 talks to MLflow (other ranks get a tracker that does nothing), the default
store is an sqlite file in the run folder so a laptop needs no server, and any tracking
URI (a shared server, Databricks...) is one config key away.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class TrackingConfig:
    enabled: bool = True
    # None: sqlite:///<run dir>/mlflow.db with artifacts in <run dir>/mlartifacts.
    tracking_uri: str | None = None
    experiment: str = "brainmoe"
    run_name: str | None = None


def default_uri(run_dir: str | Path) -> str:
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def tracking_uri(config: TrackingConfig, run_dir: str | Path) -> str:
    """The store a run logs to: the configured URI, else sqlite in the run folder."""
    return config.tracking_uri or default_uri(run_dir)


def _get(url: str, timeout: float, headers: dict[str, str]) -> int | str:
    """HTTP status of a GET, or why there was none (refused, unknown host, timeout)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout):
            return 200
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError) as err:
        return str(getattr(err, "reason", err))


def _auth_headers() -> dict[str, str]:
    """The credentials MLflow's client would send (its documented environment variables)."""
    import base64

    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"}
    user, password = (os.environ.get(f"MLFLOW_TRACKING_{k}") for k in ("USERNAME", "PASSWORD"))
    if user and password:
        return {
            "Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        }
    return {}


def check_tracking_store(config: TrackingConfig, timeout: float = 3.0, attempts: int = 2) -> None:
    """ValueError, within about ``attempts x 2 x timeout`` seconds, unless an http(s) tracking
    URI is an MLflow server that answers.

    Run by the launcher before DeepSpeed starts: MLflow's own client retries for minutes
    (7 retries with backoff, 120 s timeouts) before rank 0 gives up, and then every rank
    fails. An MLflow server answers 200 on /health, or (behind a proxy that does not route
    it) on its REST API; other stores (sqlite, file, databricks) are not probed."""
    import time

    uri = config.tracking_uri
    if not config.enabled or not uri or not uri.startswith(("http://", "https://")):
        return
    base = uri.rstrip("/")
    api = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
    for attempt in range(attempts):
        health = _get(f"{base}/health", timeout, {})
        if health == 200:
            return
        answer = _get(api, timeout, _auth_headers()) if isinstance(health, int) else health
        if answer == 200:
            return
        if answer in (401, 403):
            reason = (
                f"the server refuses the credentials (HTTP {answer}); set MLFLOW_TRACKING_TOKEN "
                "or MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD"
            )
            break
        if isinstance(answer, int):
            reason = f"HTTP {health} on /health and {answer} on the REST API: not an MLflow server"
            if answer < 500:
                break  # an answer, just not MLflow's: asking again will not change it
        else:
            reason = answer
        if attempt + 1 < attempts:
            time.sleep(0.5)
    raise ValueError(
        f"tracking.tracking_uri={uri}: no MLflow server answers there ({reason}); start the "
        "server, fix the URI, or set tracking.enabled=false"
    )


def run_in_store(run_id: str) -> bool:
    """Whether the current tracking store knows `run_id` (a run folder may have moved, or
    the URI changed, since the id was written down)."""
    import mlflow

    try:
        mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return False
    return True


def git_commit() -> str:
    """The commit the code runs from (with '-dirty' if modified), or 'unknown'."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Tracker:
    """A run in MLflow (or nothing, when disabled or not rank 0)."""

    def __init__(
        self,
        config: TrackingConfig,
        run_dir: str | Path,
        active: bool = True,
        run_id: str | None = None,
    ):
        self.active = active and config.enabled
        self.run_id = run_id
        if not self.active:
            return
        import mlflow

        self.mlflow = mlflow
        run_dir = Path(run_dir)
        uri = tracking_uri(config, run_dir)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        if mlflow.get_experiment_by_name(config.experiment) is None:
            location = (
                (run_dir / "mlartifacts").resolve().as_uri() if not config.tracking_uri else None
            )
            mlflow.create_experiment(config.experiment, artifact_location=location)
        mlflow.set_experiment(config.experiment)
        # resume=true continues the same MLflow run, so one training shows as one curve --
        # unless that run is not in this store (run folder moved, tracking URI changed): then
        # a new run, pointing at the old id, rather than a crash after the checkpoint loaded.
        tags = None
        if run_id is not None and not run_in_store(run_id):
            warnings.warn(
                f"MLflow run {run_id} of the checkpoint is not in {uri}; logging the resumed "
                "training to a new run",
                stacklevel=2,
            )
            tags, run_id = {"resumed_from_run_id": run_id}, None
        run = mlflow.start_run(run_id=run_id, run_name=config.run_name, tags=tags)
        self.run_id = run.info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        if self.active:
            existing = self.mlflow.get_run(self.run_id).data.params
            fresh = {k: str(v)[:6000] for k, v in params.items() if k not in existing}
            if fresh:
                self.mlflow.log_params(fresh)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.active:
            self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.active:
            path = Path(path)
            if path.is_dir():
                self.mlflow.log_artifacts(str(path), artifact_path)
            else:
                self.mlflow.log_artifact(str(path), artifact_path)

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        if self.active:
            self.mlflow.log_dict(data, name)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.active:
            self.mlflow.set_tags(tags)

    def finish(self, status: str = "FINISHED") -> None:
        if self.active:
            self.mlflow.end_run(status=status)
            self.active = False


def lineage_tags(lineage: dict[str, Any]) -> dict[str, str]:
    """Registry tags that say where a model came from (a trainer's `lineage()` record)."""
    manifests = lineage.get("shard_manifests", {})
    return {
        "shard_manifest_sha256": ",".join(sorted(manifests.values())) or "unknown",
        "config_sha256": lineage.get("config_sha256", "unknown"),
        "git_commit": lineage.get("git_commit", "unknown"),
        "step": str(lineage.get("step", "unknown")),
        # how it was trained: launcher, ranks, and the Ray job (ray job logs <id>)
        "launcher": str(lineage.get("launcher", "deepspeed")),
        "world_size": str(lineage.get("world_size", "unknown")),
        **({"ray_job_id": str(lineage["ray_job_id"])} if lineage.get("ray_job_id") else {}),
    }


def register_folder(
    folder: str | Path,
    name: str,
    alias: str | None,
    tags: dict[str, str],
    tracking_uri: str,
    experiment: str = "brainmoe",
    run_id: str | None = None,
    log_model: Callable[[Path], Any] | None = None,
) -> dict[str, Any]:
    """Log a saved model folder as an MLflow pyfunc model and register it as a new version.

    ``log_model(folder)`` logs the pyfunc model in the active run and returns its ModelInfo
    (pretrain.pyfunc.log_encoder, the default, or finetune.pyfunc.log_heads): the folder --
    a `save_pretrained` directory, safetensors + JSON -- lies unchanged in the model's
    artifacts, where `resolve_model` finds it, so `from_pretrained` reads exactly what was
    saved and `mlflow.pyfunc.load_model` / `mlflow models serve` can use the same version.
    """
    import mlflow
    from mlflow import MlflowClient

    if log_model is None:
        from pretrain.pyfunc import log_encoder as log_model
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        local = tracking_uri.startswith("sqlite:///")
        location = (
            (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts")
            .resolve()
            .as_uri()
            if local
            else None
        )
        mlflow.create_experiment(experiment, artifact_location=location)
    mlflow.set_experiment(experiment)
    active = mlflow.active_run()
    running_elsewhere = active is None or active.info.run_id != run_id
    if run_id is not None and running_elsewhere and not run_in_store(run_id):
        run_id = None  # the training run lives in another store: log to a new run here
    if active is not None and run_id in (None, active.info.run_id):
        ctx = contextlib.nullcontext()  # called from inside a training run: log there
    else:
        ctx = mlflow.start_run(run_id=run_id)
    with ctx:
        run = mlflow.active_run()
        info = log_model(Path(folder))
        mlflow.set_tags({f"model.{k}": v for k, v in tags.items()})
        run_id = run.info.run_id
    with contextlib.suppress(Exception):  # already registered is fine
        client.create_registered_model(name)
    # MLflow 3: the logged model's own URI (models:/m-...) and id; MLflow 2: runs:/.../model
    model_id = getattr(info, "model_id", None)
    source = info.model_uri if model_id else client.get_run(run_id).info.artifact_uri + "/model"
    extra = {"model_id": model_id} if model_id else {}
    version = client.create_model_version(name, source, run_id=run_id, tags=tags, **extra)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return {
        "name": name,
        "version": version.version,
        "alias": alias,
        "source": version.source,
        "run_id": run_id,
        "tags": tags,
    }


def resolve_model(uri: str, tracking_uri: str | None = None, dst: str | Path | None = None) -> Path:
    """A local folder for `models:/name@alias`, `models:/name/3`, `runs:/...`, a path, or a
    Hugging Face Hub repo id (`org/name`, through the Hub cache: pretrain/hub.py), so every
    command that takes a model takes all four.

    For a pyfunc model (an MLmodel file at the top) that is the saved folder in its
    artifacts (``artifacts/model``), not the MLflow wrapper around it."""
    if "://" not in uri and not uri.startswith("models:/") and not uri.startswith("runs:/"):
        from pretrain.hub import resolve

        return _inner_folder(resolve(uri))
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    try:
        path = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(dst) if dst else None))
    except Exception as err:
        raise ValueError(f"cannot resolve {uri!r} at {mlflow.get_tracking_uri()}: {err}") from err
    return _inner_folder(path)


def _inner_folder(path: Path) -> Path:
    """The saved folder of a downloaded pyfunc model; any other folder as it is (versions
    registered before the pyfunc wrapper are bare folders)."""
    if not (path / "MLmodel").is_file():
        return path
    import yaml

    conf = yaml.safe_load((path / "MLmodel").read_text()) or {}
    pyfunc = conf.get("flavors", {}).get("python_function", {})
    # PythonModel flavour: {"artifacts": {"model": {"path": "artifacts/model", ...}}}
    found = pyfunc.get("artifacts", {}).get("model", {}).get("path")
    if not found or not (path / found).is_dir():
        raise ValueError(
            f"{path} is an MLflow model, but not one of brainmoe's (no model artifact)"
        )
    return path / found


def model_version_info(uri: str, tracking_uri: str) -> dict[str, Any]:
    """Name, version and tags of a registry URI models:/name@alias or models:/name/N."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    body = uri.removeprefix("models:/")
    if "@" in body:
        name, alias = body.split("@", 1)
        mv = client.get_model_version_by_alias(name, alias)
    else:
        name, version = body.rsplit("/", 1)
        mv = client.get_model_version(name, version)
    return {"name": mv.name, "version": mv.version, "tags": dict(mv.tags), "source": mv.source}


os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
