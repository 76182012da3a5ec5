"""Canonical channel names and 3D positions, so any montage can reach the encoder unpadded.

Vendors spell the same electrode many ways (PhysioNet's ``Fc5.``, TUH's ``EEG FP1-REF``,
upper-case ``FZ``, the old ``T3``). The encoder embeds a channel from its name *and* its
position, so both must be canonical: names are mapped onto the 10-05 system of MNE's
standard montage, positions come from that montage (or from a Biosemi A1..H32 layout, or
from the file itself). Unknown names are kept as they are and flagged, never dropped: the
position (if any) still places them on the scalp.
"""

from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass

import numpy as np

# Old 10-20 temporal names -> modern 10-10 names (same electrodes).
_OLD_NAMES = {"T3": "T7", "T4": "T8", "T5": "P7", "T6": "P8"}
_PREFIX = re.compile(r"^(EEG|EEG-|EEG_)\s*", re.IGNORECASE)
_SUFFIX = re.compile(r"[-_ ](REF|LE|RE|AR|AVG|CAR|A1|A2|M1|M2|LM|RM|Cz)$", re.IGNORECASE)
_BIOSEMI = re.compile(r"^[A-H]([1-9]|[12][0-9]|3[0-2])$")

# Channels typed EEG by some files but carrying something else.
NON_EEG = re.compile(
    r"^(E[OKC]G|EMG|ECG|EKG|HEOG|VEOG|STI.*|STATUS|TRIG.*|TRIGGER|BIP\d*|AUX\d*|ACC\w*|"
    r"RESP.*|GSR|PHOTO.*|ERGO.*|PULSE|SPO2|X|Y|Z|EVENT.*|MARKER.*|PLETH|TEMP.*|EXG\d+|SAO2)$",
    re.IGNORECASE,
)


@functools.cache
def _montage_positions(name: str) -> dict[str, np.ndarray]:
    import mne

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # standard_1005 renamed in MNE 1.13
        montage = mne.channels.make_standard_montage(name)
    return {
        k: np.asarray(v, dtype=np.float64) for k, v in montage.get_positions()["ch_pos"].items()
    }


@functools.cache
def standard_positions() -> dict[str, np.ndarray]:
    """10-05 name -> position (metres, head frame) from MNE's template montage."""
    import mne

    name = (
        "colin27_1005" if "colin27_1005" in mne.channels.get_builtin_montages() else "standard_1005"
    )
    return _montage_positions(name)


@functools.cache
def _lower_index() -> dict[str, str]:
    return {name.lower(): name for name in standard_positions()}


def canonical_name(raw: str) -> tuple[str, bool]:
    """Return (10-05 name, True) if `raw` spells a 10-05 electrode, else (cleaned raw, False)."""
    text = raw.strip()
    text = _PREFIX.sub("", text).strip()
    text = _SUFFIX.sub("", text).strip()
    text = text.strip(".").strip()
    if text.upper() in _OLD_NAMES:
        return _OLD_NAMES[text.upper()], True
    hit = _lower_index().get(text.lower())
    if hit is not None and hit not in ("LPA", "RPA", "Nz") and hit not in _OLD_NAMES:
        return hit, True
    return raw.strip(), False


def is_non_eeg(raw: str) -> bool:
    """Whether a channel name says it is not scalp EEG (EOG, triggers, accelerometers...)."""
    return bool(NON_EEG.match(_PREFIX.sub("", raw.strip()).strip(".").strip()))


@dataclass(frozen=True)
class ChannelInfo:
    """Canonical names, whether each is a known 10-05 name, and positions `[C, 3]` (NaN=unknown)."""

    names: list[str]
    known: list[bool]
    positions: np.ndarray
    layout: str  # "10-05", "biosemi<N>", or "mixed"

    @property
    def n_known(self) -> int:
        return int(sum(self.known))


def canonicalize(raw_names: list[str], file_positions: np.ndarray | None = None) -> ChannelInfo:
    """Canonical names and positions for one recording's channels.

    A channel name that would repeat an earlier canonical name keeps its raw spelling and is
    flagged unknown, so names stay unique within a sample.
    """
    names: list[str] = []
    known: list[bool] = []
    seen: set[str] = set()
    for raw in raw_names:
        name, ok = canonical_name(raw)
        if name in seen:
            name, ok = raw.strip(), False
            suffix = 1
            while name in seen:
                name, suffix = f"{raw.strip()}#{suffix}", suffix + 1
        seen.add(name)
        names.append(name)
        known.append(ok)

    positions = np.full((len(names), 3), np.nan)  # [C, 3]
    std = standard_positions()
    for i, (name, ok) in enumerate(zip(names, known, strict=True)):
        if ok:
            positions[i] = std[name]
    layout = "10-05"
    biosemi = [i for i, raw in enumerate(raw_names) if _BIOSEMI.match(raw.strip())]
    if len(biosemi) >= 0.8 * len(raw_names) and len(biosemi) >= 16:
        # Biosemi's A1..H32 layout shares names with 10-05 (A1, A2 are earlobes there):
        # the layout as a whole decides, and its names are not 10-05 names.
        layout = _biosemi_layout([raw_names[i].strip() for i in biosemi])
        if layout != "10-05":
            table = _montage_positions(layout)
            for i in biosemi:
                names[i], known[i] = raw_names[i].strip(), False
                positions[i] = table[raw_names[i].strip()]
    if file_positions is not None:
        file_positions = np.asarray(file_positions, dtype=np.float64)
        assert file_positions.shape == positions.shape, (file_positions.shape, positions.shape)
        use = ~np.isfinite(positions).all(axis=1) & np.isfinite(file_positions).all(axis=1)
        use &= np.abs(file_positions).sum(axis=1) > 0
        positions[use] = file_positions[use]
    if layout == "10-05" and not all(known):
        layout = "mixed"
    return ChannelInfo(names, known, positions, layout)


def _biosemi_layout(names: list[str]) -> str:
    for n in (128, 160, 256):
        if set(names) <= set(_montage_positions(f"biosemi{n}")):
            return f"biosemi{n}"
    return "10-05"
