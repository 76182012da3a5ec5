"""`files:` subjects: a folder of non-BIDS recordings (EEGMMIDB's S001R03.edf) names its
subjects by a pattern, so windows of one person group together downstream."""

from __future__ import annotations

from pathlib import Path

import pytest

from shards.recording import Recording
from shards.sources import get_source
from tests.eeg_files import CHANNELS, eeg_array, write_raw


def _folder(tmp: Path) -> Path:
    for i, rel in enumerate(("S001/S001R03.edf", "S001/S001R04.edf", "S002/S002R03.edf")):
        write_raw(tmp / "eeg" / rel, eeg_array(len(CHANNELS), 4.0, 160.0, i), 160.0, CHANNELS)
    return tmp / "eeg"


def _provenances(spec: str) -> list:
    source = get_source(spec)
    out = []
    for unit in source.units():
        (rec,) = list(source.load(unit))
        assert isinstance(rec, Recording), rec
        out.append(rec.provenance)
    return out


def test_subject_pattern_groups_runs_by_person(tmp_path: Path):
    folder = _folder(tmp_path)
    plain = _provenances(f"files:{folder}")
    assert len({p.subject for p in plain}) == 3  # without a pattern, every file is a subject

    found = _provenances(f"files:{folder}?subject=S([0-9]{{3}})R")
    assert [p.subject for p in found] == ["001", "001", "002"]
    assert len({p.key_prefix() for p in found}) == 3  # the runs keep their own keys
    assert [p.file for p in found] == [p.file for p in plain]


def test_subject_pattern_errors_before_any_file_is_read(tmp_path: Path):
    folder = _folder(tmp_path)
    with pytest.raises(ValueError, match="has no group"):
        get_source(f"files:{folder}?subject=S[0-9]+")
    with pytest.raises(ValueError, match="subject="):
        get_source(f"files:{folder}?subject=S(")
    source = get_source(f"files:{folder}?subject=sub([0-9]{{3}})")
    with pytest.raises(
        ValueError, match=r"no subject in 3 of 3 files \(first: 'S001/S001R03.edf'\)"
    ):
        source.units()
