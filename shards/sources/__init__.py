"""Source registry: a spec string on the command line -> a Source.

Spec grammar: ``name[:argument][?key=value&key=value]``, e.g. ``moabb:PhysionetMI?subjects=1``,
``files:/data/eeg``, ``synthetic?subjects=4&classes=3``. Each source declares its parameters
as a dataclass, so an unknown or ill-typed parameter is a clear error before any work starts.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qsl

from shards.recording import Recording, Rejected, WorkUnit

# name -> "module:Class"; imported lazily so `brainmoe --help` does not import MNE or MOABB.
REGISTRY: dict[str, str] = {
    "synthetic": "shards.sources.synthetic:SyntheticSource",
    "moabb": "shards.sources.moabb_datasets:MoabbSource",
    "files": "shards.sources.files:FilesSource",
    "things-eeg2": "shards.sources.things_eeg2:ThingsEEG2Source",
    "imagenet-eeg": "shards.sources.imagenet_eeg:ImageNetEEGSource",
    "bids": "shards.sources.bids_datasets:BidsSource",
}


class Source(Protocol):
    """What every source provides. Built from a spec on the driver and again inside workers."""

    spec: str

    def units(self) -> list[WorkUnit]:
        """Enumerate the work cheaply (no signal loading); ids must be stable and unique."""
        ...

    def load(self, unit: WorkUnit) -> Iterator[Recording | Rejected]:
        """Load one unit's recordings; yield Rejected for inputs that cannot be used."""
        ...


@dataclass(frozen=True)
class Spec:
    name: str
    argument: str | None
    params: dict[str, str]

    @classmethod
    def parse(cls, spec: str) -> Spec:
        text = spec.strip()
        if not text:
            raise ValueError("empty source spec; expected e.g. 'synthetic' or 'files:/path'")
        query = ""
        if "?" in text:
            text, query = text.split("?", 1)
        name, _, argument = text.partition(":")
        name = name.strip().lower()
        if name not in REGISTRY:
            raise ValueError(
                f"unknown source {name!r} in spec {spec!r}; known sources: {', '.join(sorted(REGISTRY))}"
            )
        params: dict[str, str] = {}
        for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
            if key in params:
                raise ValueError(f"parameter {key!r} given twice in source spec {spec!r}")
            params[key] = value
        return cls(name, argument or None, params)


def get_source(spec: str) -> Source:
    """Build the Source a spec names (ValueError on a bad spec)."""
    parsed = Spec.parse(spec)
    module_name, class_name = REGISTRY[parsed.name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls.from_spec(spec, parsed)


def parse_params(params_cls: type, params: dict[str, str], spec: str) -> Any:
    """Turn query-string values into a typed params dataclass, or say clearly what is wrong."""
    fields = {f.name: f for f in dataclasses.fields(params_cls)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {unknown} in source spec {spec!r}; "
            f"this source takes: {', '.join(sorted(fields)) or 'no parameters'}"
        )
    hints = typing.get_type_hints(params_cls)
    values = {}
    for key, raw in params.items():
        try:
            values[key] = _convert(raw, hints[key])
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"parameter {key}={raw!r} in source spec {spec!r} is not a valid {_type_name(hints[key])}: {err}"
            ) from None
    return params_cls(**values)


def _convert(raw: str, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if raw.lower() in ("", "none", "null") and len(inner) < len(args):
            return None
        return _convert(raw, inner[0])
    if origin in (list, tuple):
        item = args[0] if args else str
        values = [_convert(part.strip(), item) for part in raw.split(",") if part.strip()]
        return values if origin is list else tuple(values)
    if hint is bool:
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true/false")
    if hint in (int, float, str):
        return hint(raw)
    raise TypeError(f"unsupported parameter type {hint!r}")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))
