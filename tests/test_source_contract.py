"""The contract every registered source keeps, checked on a tiny valid spec of each.

The builder relies on it: `units()` is cheap, stable and unique (unit ids name shards and
resume records), a worker that rebuilds the source from its spec gets the same units, `load`
yields Recordings whose arrays agree with their channel lists, and a misspelt parameter is a
ValueError before any work. A source added to REGISTRY without a case here fails the test.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from shards.recording import UNITS, Recording, Rejected
from shards.sources import REGISTRY, get_source
from tests.eeg_files import CHANNELS, eeg_array, write_raw
from tests.test_bids_source import write_synthetic_bids
from tests.test_imagenet_eeg_source import _content as imagenet_content
from tests.test_things_eeg2_source import _make as make_things_eeg2


def _files(tmp: Path) -> str:
    write_raw(tmp / "eeg" / "a.edf", eeg_array(len(CHANNELS), 12.0, 200.0), 200.0, CHANNELS)
    write_raw(tmp / "eeg" / "b.fif", eeg_array(len(CHANNELS), 12.0, 250.0, 1), 250.0, CHANNELS)
    return f"files:{tmp / 'eeg'}"


def _bids(tmp: Path) -> str:
    return f"bids:{write_synthetic_bids(tmp / 'ds', runs=('1',), seconds=12.0)}"


def _things_eeg2(tmp: Path) -> str:
    return f"things-eeg2:{make_things_eeg2(tmp / 'things', subjects=(1,))}"


def _imagenet_eeg(tmp: Path) -> str:
    torch.save(imagenet_content(), tmp / "eeg_5_95_std.pth")
    return f"imagenet-eeg:{tmp / 'eeg_5_95_std.pth'}"


# source name -> a function of a temp folder that makes tiny inputs and returns a valid spec
CASES: dict[str, Callable[[Path], str]] = {
    "synthetic": lambda tmp: "synthetic?subjects=2&runs=1&duration_s=16",
    "moabb": lambda tmp: "moabb:FakeDataset?n_subjects=2&n_sessions=1&n_runs=1&duration=20&seed=3",
    "files": _files,
    "bids": _bids,
    "things-eeg2": _things_eeg2,
    "imagenet-eeg": _imagenet_eeg,
}


def test_every_case_is_a_registered_source():
    assert sorted(CASES) == sorted(REGISTRY)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_source_contract(name: str, tmp_path: Path):
    if name not in CASES:
        pytest.fail(f"source {name!r} is in REGISTRY but has no contract case: add one to CASES")
    spec = CASES[name](tmp_path)
    source = get_source(spec)
    assert source.spec == spec

    units = source.units()
    ids = [u.id for u in units]
    assert units, f"{spec}: no units"
    assert len(set(ids)) == len(ids), f"{spec}: duplicate unit ids {ids}"
    assert all(i and "." not in i and "/" not in i for i in ids), ids  # they name shard files
    again = [(u.id, u.fingerprint, u.payload) for u in get_source(spec).units()]
    assert again == [(u.id, u.fingerprint, u.payload) for u in units]  # as a worker sees them
    for unit in units:
        json.dumps(unit.payload)  # payloads travel to Ray workers and into reports

    items = list(source.load(units[0]))
    recordings = [r for r in items if isinstance(r, Recording)]
    assert recordings, f"{spec}: the first unit gave no recording ({items})"
    for item in items:
        assert isinstance(item, Recording | Rejected), type(item)
        json.dumps(item.provenance.to_json())
        item.provenance.key_prefix()
        if isinstance(item, Rejected):
            assert item.reason
            continue
        data = item.data  # [C, T], or [N, C, T] when epoched
        assert data.ndim == (3 if item.epoched else 2), data.shape
        assert data.shape[-2] == len(item.ch_names) > 0 and data.shape[-1] > 0, data.shape
        assert np.issubdtype(data.dtype, np.floating) and np.isfinite(data).all()
        assert item.sfreq > 0 and item.unit in UNITS
        if item.epoched:
            assert len(item.trials) == data.shape[0]
        if item.ch_pos is not None:
            assert item.ch_pos.shape == (len(item.ch_names), 3)

    joiner = "&" if "?" in spec else "?"
    with pytest.raises(ValueError, match="no_such_param"):
        get_source(f"{spec}{joiner}no_such_param=1")
