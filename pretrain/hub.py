"""Encoder folders on the Hugging Face Hub: ``from_pretrained("org/name")`` and ``push_to_hub``.

A Hub model repo holds exactly the folder ``Encoder.save_pretrained`` writes (config.json +
model.safetensors, with the weights' sha256 in config.json, and the README.md model card of
``brainmoe export``), so one loader, checksum check included, reads a local folder and a Hub
snapshot alike. A repo id resolves through the Hub cache (``HF_HUB_CACHE`` / ``HF_HOME``):
``snapshot_download`` fetches one commit's files once, and with ``HF_HUB_OFFLINE=1`` (or
``local_files_only``) reads the cached snapshot without a network call. A finetune output
(finetune.json + the files it lists) resolves and pushes the same way.

Why not ``huggingface_hub.ModelHubMixin``: it maps config.json onto ``__init__`` arguments and
drops unknown keys silently (brainmoe refuses them: a silently ignored key builds another
model), writes a generic README.md on every save, and downloads config.json and the weights
in two calls that can see two different commits.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
FINETUNE_FILE = "finetune.json"  # finetune/model.py: adapters + projectors, its own checksums
META_FILES = (CONFIG_FILE, FINETUNE_FILE)


def is_local(name: str | Path) -> bool:
    """A path (absolute, ./-relative, ~, or an existing entry), not a Hub repo id."""
    text = str(name)
    return isinstance(name, Path) or text.startswith((".", "/", "~")) or Path(text).exists()


def resolve(
    name_or_path: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path:
    """A local folder for a folder path or a Hub repo id ("org/name").

    A repo id is fetched into (or, offline, read from) the Hub cache in two steps at one
    commit: the folder's metadata JSON (config.json of an encoder, finetune.json of a
    finetune output), then exactly the files its checksums list, and README.md. The result
    is that commit's snapshot folder. Every failure is a ValueError saying what to do.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file: give the folder that holds {CONFIG_FILE}")
    if is_local(name_or_path):
        raise ValueError(f"{path}: no such folder")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id = str(name_or_path)
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ValueError(f"{repo_id!r}: no such folder, and not a Hub repo id (org/name)") from None
    kw = {"cache_dir": cache_dir, "local_files_only": local_files_only, "token": token}
    folder = _download(repo_id, revision, list(META_FILES), **kw)
    meta_file = next((m for m in META_FILES if (folder / m).is_file()), None)
    if meta_file is None:
        raise ValueError(
            f"Hub repo {repo_id} is not a brainmoe folder: no {' or '.join(META_FILES)} at "
            f"revision {revision or 'main'}"
        )
    from pretrain.artifacts import read_json

    listed = read_json(folder / meta_file).get("checksums") or {WEIGHTS_FILE: None}
    commit = folder.name  # snapshots/<commit>: the second step reads the same commit
    return _download(repo_id, commit, [meta_file, CARD_FILE, *listed], **kw)


def _download(repo_id: str, revision: str | None, patterns: list[str], **kw: Any) -> Path:
    """``snapshot_download`` with its failures as ValueErrors that say what to do."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id!r} is not a local folder, and on the Hub"
    try:
        folder = snapshot_download(
            repo_id, revision=revision, allow_patterns=patterns, library_name="brainmoe", **kw
        )
    except RevisionNotFoundError:
        raise ValueError(f"{where} it has no revision {revision!r}") from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise ValueError(
            f"{where} there is no model repo {repo_id} you may read (private or gated: "
            "log in with `hf auth login` or pass token=)"
        ) from None
    except LocalEntryNotFoundError as err:
        raise ValueError(
            f"{where} it is not in the Hub cache and the Hub cannot be reached ({err}); "
            f"download it once online (`hf download {repo_id}`), or point HF_HUB_CACHE / "
            "HF_HOME at the cache that holds it"
        ) from None
    except HfHubHTTPError as err:
        raise ValueError(f"{where} the download failed: {err}") from None
    return Path(folder)


def check_can_push(repo_id: str, token: str | None = None) -> str:
    """The token to push with; a ValueError, before any work, if a push cannot succeed."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"push to {repo_id!r}: not a Hub repo id (org/name): {err}") from None
    if constants.HF_HUB_OFFLINE:
        raise ValueError(f"push to {repo_id}: HF_HUB_OFFLINE is set; unset it to push")
    token = token or get_token()
    if not token:
        raise ValueError(
            f"push to {repo_id}: no Hugging Face token; run `hf auth login` or set HF_TOKEN"
        )
    return token


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
) -> str:
    """Upload a verified folder -- an exported encoder (config.json) or a finetune output
    (finetune.json) -- as one commit of ``repo_id``: its metadata JSON, the files its
    checksums list and README.md. Creates the repo if needed; returns the commit URL.

    lineage.json stays local: it names tracking servers and storage paths of the run.
    """
    from huggingface_hub import HfApi, constants

    from pretrain.artifacts import read_json, verify_checksums

    folder = Path(folder)
    token = check_can_push(repo_id, token)
    meta_file = next((m for m in META_FILES if (folder / m).is_file()), None)
    if meta_file is None:
        raise ValueError(f"{folder} is not a brainmoe folder (no {' or '.join(META_FILES)})")
    meta = read_json(folder / meta_file, "save or export the folder again")
    if meta_file == CONFIG_FILE and meta.get("model_type") != "brainmoe-encoder":
        raise ValueError(f"{folder} is not a brainmoe encoder folder (config.json model_type)")
    if not verify_checksums(folder, meta_file, "save or export the folder again"):
        raise ValueError(f"{folder} records no checksums: save or export it again to push it")
    from huggingface_hub import CommitOperationAdd

    card = {CARD_FILE} if (folder / CARD_FILE).is_file() else set()
    files = sorted((set(meta["checksums"]) | card) - {meta_file})
    operations = [CommitOperationAdd(f, str(folder / f)) for f in files]
    if meta_file == FINETUNE_FILE:
        public = json.dumps(public_finetune_meta(meta), indent=1, default=str) + "\n"
        operations.append(CommitOperationAdd(meta_file, public.encode()))
    else:  # an encoder's config.json goes as written (lineage.json is not in its checksums)
        operations.append(CommitOperationAdd(meta_file, str(folder / meta_file)))
    api = HfApi(token=token)
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.create_commit(
            repo_id=repo.repo_id,
            operations=operations,
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message or f"brainmoe: {folder.name} ({len(operations)} files)",
        )
    except Exception as err:  # HTTP, auth and connection errors of whichever client
        raise ValueError(
            f"push of {folder} to {repo_id} at {constants.ENDPOINT} failed: "
            f"{type(err).__name__}: {err}"
        ) from err
    return str(getattr(info, "commit_url", info))


def public_finetune_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """What a pushed finetune output's finetune.json shows: the saved one without
    its ``lineage`` (tracking server, storage paths, run ids) and its config's ``tracking``
    section, as an encoder export keeps lineage.json local. Neither is read when loading, and
    the checksums (of the other files) are unchanged."""
    public = {k: v for k, v in meta.items() if k != "lineage"}
    if isinstance(public.get("config"), dict):
        public["config"] = {k: v for k, v in public["config"].items() if k != "tracking"}
    return public


def push_encoder(
    save: Callable[[Path], Any], card: Callable[[Path], Any], repo_id: str, **kwargs: Any
) -> str:
    """``save(folder)`` and ``card(folder)`` into a temporary folder, then push it; the push
    preconditions are checked first, so a model is never serialised for nothing."""
    check_can_push(repo_id, kwargs.get("token"))
    with tempfile.TemporaryDirectory(prefix="brainmoe-push-") as tmp:
        folder = Path(tmp) / "encoder"
        save(folder)
        if not (folder / CARD_FILE).exists():
            card(folder)
        return push_folder(folder, repo_id, **kwargs)
