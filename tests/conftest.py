"""Shared fixtures: the real recordings in ../shared/data, and small file builders."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()
PHYSIONET = SHARED_DATA / "physionet-eegmmidb"
MNE_TESTING = SHARED_DATA / "mne-testing"


def _need(path: Path) -> Path:
    """Skip without the real data, except under CI (.ci/run), where a skip would hide a gap."""
    if not path.exists():
        message = (
            f"real EEG recordings not found at {path} (they live beside the repo in ../shared/data)"
        )
        if os.environ.get("BRAINMOE_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(message + "; BRAINMOE_REQUIRE_SHARED_DATA=1 forbids skipping")
        pytest.skip(message)
    return path


@pytest.fixture
def mne_testing() -> Path:
    return _need(MNE_TESTING)


@pytest.fixture
def physionet(monkeypatch, tmp_path) -> Path:
    """MOABB's PhysionetMI reads subject 1 offline from the shared copy."""
    _need(PHYSIONET)
    monkeypatch.setenv("MNE_DATA", str(PHYSIONET))
    monkeypatch.setenv("MOABB_DOWNLOAD_PROVIDER", "upstream")
    return PHYSIONET


@pytest.fixture(autouse=True)
def _quiet_mne(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("MNE_LOGGING_LEVEL", "ERROR")
    # MOABB/MNE write their config and fake data under MNE_DATA/home: keep tests out of ~.
    if "MNE_DATA" not in os.environ:
        monkeypatch.setenv("MNE_DATA", str(tmp_path_factory.mktemp("mne_data")))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
