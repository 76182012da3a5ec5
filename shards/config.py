"""Run configs: a dataclass beside the code it configures, YAML files, `key=value` overrides.

Every entry point (shard builds, pretraining, finetuning) loads its config the same way,
so `configs/<layer>/<name>.yaml` plus overrides on the command line always mean the same
thing, and the resolved config is what gets saved with the run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: list[str] = (), **values: Any
) -> T:
    """Defaults of `cls` <- YAML file <- explicit values <- `key=value` overrides.

    Raises ValueError naming the bad key or value, before any work starts.
    """
    config = OmegaConf.structured(cls)
    try:
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ValueError(f"config file {path} does not exist")
            config = OmegaConf.merge(config, OmegaConf.load(path))
        if values:
            config = OmegaConf.merge(config, {k: v for k, v in values.items() if v is not None})
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ValueError(f"overrides must look like key=value, got {bad}")
        config = OmegaConf.merge(config, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(config)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        first = str(err).splitlines()[0]
        raise ValueError(f"bad config value{f' for {key!r}' if key else ''}: {first}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """The resolved config as plain data (for JSON/YAML files and MLflow params)."""
    return dataclasses.asdict(config)


def to_yaml(config: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}, the form MLflow params and overrides use."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
