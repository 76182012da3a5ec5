"""cluster/kuberay/*.yaml against KubeRay's own schema and brainmoe's own parsers.

No Kubernetes here, so what `kubectl apply` and the operator would refuse is checked with
the RayJob CRD's OpenAPI schema (KubeRay v1.7.0, in ../shared/kuberay-crds), closed against
unknown keys as `kubectl apply --validate=strict` is: a misspelt `replica:` would otherwise
be dropped silently and the job would run with defaults. The entrypoints are parsed by
`brainmoe`'s argument parser and their configs loaded and checked as `brainmoe` would
before launching, so a renamed flag or config key breaks this test, not a cluster job.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import os
import shlex
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, _need

CRD_DIR = REPO.parent / "shared" / "kuberay-crds"
MANIFESTS = REPO / "cluster" / "kuberay"
PRETRAIN, SHARDS = "pretrain-rayjob.yaml", "shards-rayjob.yaml"
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the CRD is 1.4 MB


def _close(node):
    """additionalProperties: false wherever the schema lists properties (maps stay open)."""
    if isinstance(node, dict):
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node.setdefault("additionalProperties", False)
        children = node.values()
    else:
        children = node if isinstance(node, list) else ()
    for child in children:
        _close(child)
    return node


@functools.cache
def _validator(plural: str):
    from jsonschema import Draft202012Validator

    if not CRD_DIR.exists() and os.environ.get("BRAINMOE_REQUIRE_SHARED_DATA") != "1":
        pytest.skip(f"KubeRay CRD schemas not found at {CRD_DIR} (../shared/kuberay-crds)")
    crd_file = _need(CRD_DIR) / f"ray.io_{plural}.yaml"  # under CI (.ci/run): fail, not skip
    crd = yaml.load(crd_file.read_text(), Loader=LOADER)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1" and v["served"])
    return Draft202012Validator(_close(version["schema"]["openAPIV3Schema"]))


def crd_errors(manifest: dict, plural: str = "rayjobs") -> list[str]:
    return [f"{e.json_path}: {e.message}" for e in _validator(plural).iter_errors(manifest)]


def manifest(name: str) -> dict:
    return yaml.safe_load((MANIFESTS / name).read_text())


def entrypoint_args(doc: dict):
    from cluster.cli import build_parser

    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "brainmoe", argv
    return build_parser().parse_args(argv[1:])


def workers(doc: dict) -> list[dict]:
    return doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


@pytest.mark.parametrize("name", [PRETRAIN, SHARDS])
def test_manifest_matches_kuberay_crd(name):
    doc = manifest(name)
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")  # not in the schema
    assert crd_errors(doc) == []
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True  # no idle GPUs after the run
    # the image's Ray must be the one brainmoe is tested with (its venv's)
    assert spec["rayClusterSpec"]["rayVersion"] == importlib.metadata.version("ray")


def test_strict_schema_catches_typos():
    """The check above is not vacuous: a misspelt key and a wrong type are both reported."""
    doc = manifest(PRETRAIN)
    bad = copy.deepcopy(doc)
    group = workers(bad)[0]
    group["replica"] = group.pop("replicas")
    bad["spec"]["shutdownAfterJobFinishes"] = "yes"
    errors = crd_errors(bad)
    assert any("'replica' was unexpected" in e for e in errors), errors
    assert any("shutdownAfterJobFinishes" in e for e in errors), errors


@pytest.fixture(scope="module")
def local_corpus(tmp_path_factory) -> Path:
    """Stands in for the S3 corpus the job reads (this test reaches no object store)."""
    from shards.build import BuildConfig, build
    from shards.config import load_config

    out = tmp_path_factory.mktemp("corpus")
    spec = "synthetic?subjects=1&runs=1&duration_s=20"
    build(load_config(BuildConfig, sources=[spec], out=str(out), workers=0))
    return out


def pretrain_config(doc: dict):
    from cluster.ray_train import config_overrides
    from pretrain.config import PretrainConfig, load_run_config

    args = entrypoint_args(doc)
    overrides = [*args.overrides, *config_overrides(args)]
    return args, load_run_config(PretrainConfig, REPO / args.config, overrides)


def env_names(doc: dict) -> list[set[str]]:
    cluster = doc["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [{e["name"] for e in c.get("env", [])} for g in groups for c in containers(g)]


S3_ENV = {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def test_pretrain_entrypoint_is_a_valid_run(local_corpus):
    """Parsed as `brainmoe` parses it, its config loaded and checked as the launcher does
    before Ray starts (unknown keys, ranges, world size, model against the shards). The
    launcher's look into the bucket (`check_storage`) needs the bucket, so it is tested against
    a real S3 server in tests/test_object_store.py, not here."""
    from pretrain.model import validate_config
    from shards.storage import is_uri

    doc = manifest(PRETRAIN)
    args, cfg = pretrain_config(doc)
    assert (args.command, args.launcher, args.use_gpu) == ("pretrain", "ray", True)
    assert cfg.ray.use_gpu and cfg.ray.num_workers == args.num_workers
    cfg.ray.validate()
    # pods share no disk: the corpus and the checkpoints are in S3, every pod has the keys
    assert cfg.data.shards and all(is_uri(s) for s in cfg.data.shards), cfg.data.shards
    assert is_uri(cfg.ray.storage_path), cfg.ray.storage_path
    assert all(names >= S3_ENV for names in env_names(doc)), env_names(doc)
    assert cfg.tracking.enabled and cfg.tracking.tracking_uri.startswith("http")
    cfg.data.shards = [str(local_corpus)]
    validate_config(cfg, world_size=cfg.ray.num_workers)


def test_pretrain_workers_fit_the_worker_pods():
    """STRICT_SPREAD puts each training worker on its own Ray node (pod), each with the GPU
    it asks for: more workers than pods, or a pod without a GPU, would wait forever for a
    placement."""
    doc = manifest(PRETRAIN)
    _, cfg = pretrain_config(doc)
    assert cfg.ray.placement_strategy == "STRICT_SPREAD"
    groups = workers(doc)
    assert cfg.ray.num_workers <= sum(g["replicas"] for g in groups)
    for group in groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for container in containers(group):
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1, group
    head = doc["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # the driver only, no worker beside it
    assert all("nvidia.com/gpu" not in c["resources"]["limits"] for c in containers(head))


def test_shards_entrypoint_is_a_valid_build():
    from shards.cli import build_config_from_args
    from shards.sources import Spec
    from shards.storage import is_uri

    doc = manifest(SHARDS)
    args = entrypoint_args(doc)
    assert (args.command, args.shards_command) == ("shards", "build"), args
    config = build_config_from_args(args)
    config.validate()
    for source in config.sources:
        Spec.parse(source)  # a known source name, well-formed parameters
    # where pretrain-rayjob.yaml reads it, in S3 (pods share no disk)
    assert is_uri(config.out), config.out
    _, pretrain = pretrain_config(manifest(PRETRAIN))
    assert [config.out] == pretrain.data.shards
    assert all(names >= S3_ENV for names in env_names(doc)), env_names(doc)
    slots = sum(g["replicas"] * int(g["rayStartParams"]["num-cpus"]) for g in workers(doc))
    assert 0 < config.workers <= slots, (config.workers, slots)
    for group in workers(doc):
        assert all("nvidia.com/gpu" not in c["resources"]["limits"] for c in containers(group))
