"""`bids:<root>`: a BIDS EEG dataset read through MNE-BIDS, sidecars and all.

Spec: ``bids:<root>[?subjects=001,002&sessions=1&tasks=rest&runs=1,2&derivative=<name>]``;
values are BIDS labels (``sub-``/``ses-``/``task-``/``run-`` prefixes may be given or not),
and ``derivative=<name>`` reads the preprocessed files of ``<root>/derivatives/<name>``.

`files:` over a BIDS tree reads each data file alone; the sidecars say what the file does not:
channel types and broken channels (channels.tsv), events (events.tsv: trial_type is the label),
the line frequency (eeg.json), who the subject was (participants.tsv). `read_raw_bids` applies
them, and the Raw becomes a Recording through the very `recording_from_raw` of every file, read
in the same contained child process (contained.py) so one bad file is one rejected unit.

Channels marked ``status=bad`` are excluded from the recording: the preprocessor takes no list
of known-bad channels, and absent is what the encoder makes of a flagged channel anyway. They
are kept, with channels.tsv's status_description, in the provenance (`excluded_channels`),
beside the BIDS entities and the subject's participants.tsv row (`participant`); so they are in
the manifest and in every sample's JSON. Sidecar contents are part of each unit's fingerprint:
marking a channel bad, or editing events, rebuilds that recording and nothing else.
One work unit per recording; only `*_eeg.*` recordings are read (not MEG or iEEG).
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from shards.recording import Provenance, Recording, Rejected, WorkUnit, fingerprint, safe_key
from shards.sources import Spec, parse_params
from shards.sources.contained import ReaderCrashed, call_contained
from shards.sources.files import _companions
from shards.sources.mne_raw import recording_from_raw

# BIDS EEG formats, and FIF for derivatives (MNE-based pipelines write it).
EXTENSIONS = (".edf", ".bdf", ".vhdr", ".set", ".fif")
# Sidecars whose contents change the recording read_raw_bids returns (inheritance resolved).
_SIDECARS = (
    ("channels", ".tsv"),
    ("events", ".tsv"),
    ("eeg", ".json"),
    ("electrodes", ".tsv"),
    ("coordsystem", ".json"),
)
# Spec parameter -> BIDS entity, and the prefix a user may type with a label.
_FILTERS = (
    ("subjects", "subject", "sub-"),
    ("sessions", "session", "ses-"),
    ("tasks", "task", "task-"),
    ("runs", "run", "run-"),
)
# Bump when load() changes what it yields for the same input, so finished work is redone.
_VERSION = 1


@dataclass
class BidsParams:
    subjects: list[str] | None = None  # labels, e.g. 001,002 (default: all)
    sessions: list[str] | None = None
    tasks: list[str] | None = None
    runs: list[str] | None = None
    derivative: str | None = None  # read <root>/derivatives/<name> instead of the raw data
    dataset: str | None = None  # dataset name in provenance; default: the root folder's name
    read_timeout_s: float = 1800.0  # a reader still busy after this is killed (0: no limit)


@dataclass(frozen=True)
class BidsProvenance(Provenance):
    """Provenance plus what the BIDS sidecars said about the recording (JSON in the manifest)."""

    entities: dict[str, str] = field(default_factory=dict, hash=False)
    participant: dict[str, Any] = field(default_factory=dict, hash=False)
    excluded_channels: dict[str, str] = field(default_factory=dict, hash=False)


class BidsSource:
    def __init__(self, spec: str, root: Path, data_root: Path, params: BidsParams):
        self.spec, self.root, self.data_root, self.params = spec, root, data_root, params
        name = params.dataset or root.name
        if params.derivative and not params.dataset:
            name = f"{name}-{params.derivative}"
        self.dataset = name

    @classmethod
    def from_spec(cls, spec: str, parsed: Spec) -> BidsSource:
        params = parse_params(BidsParams, parsed.params, spec)
        if not parsed.argument:
            raise ValueError(
                f"source {spec!r} needs a dataset folder: bids:<root>, the folder holding "
                "dataset_description.json"
            )
        root = Path(parsed.argument).expanduser()
        if not root.is_dir():
            raise ValueError(f"source {spec!r}: {root} is not a folder")
        if not (root / "dataset_description.json").is_file():
            raise ValueError(
                f"source {spec!r}: {root} is not a BIDS dataset (no dataset_description.json); "
                f"point bids: at the dataset's root, or read a plain folder with files:{root}"
            )
        data_root = root
        if params.derivative is not None:
            data_root = root / "derivatives" / params.derivative
            if not (data_root / "dataset_description.json").is_file():
                have = sorted(
                    p.parent.name for p in root.glob("derivatives/*/dataset_description.json")
                )
                raise ValueError(
                    f"source {spec!r}: no derivative {params.derivative!r} (no "
                    f"{data_root / 'dataset_description.json'}); "
                    f"{root} has: {', '.join(have) or 'no derivatives'}"
                )
        for key, _, _ in _FILTERS:
            if getattr(params, key) == []:
                raise ValueError(
                    f"{key}= in source spec {spec!r} is empty; list labels or leave it out"
                )
        return cls(spec, root.resolve(), data_root.resolve(), params)

    def _recordings(self) -> list:
        """Every EEG recording under the data root, filtered by the spec; ValueError when a
        filter names a label the dataset does not have."""
        import mne_bids

        found = mne_bids.find_matching_paths(
            self.data_root, suffixes="eeg", extensions=list(EXTENSIONS), ignore_nosub=True
        )
        found = [p for p in found if p.split in (None, "01")]  # later FIF splits: read via 01
        if not found:
            raise ValueError(
                f"source {self.spec!r}: no EEG recordings (sub-*/.../*_eeg with one of "
                f"{', '.join(EXTENSIONS)}) under {self.data_root}"
            )
        selected = found
        for key, entity, prefix in _FILTERS:
            wanted = getattr(self.params, key)
            if wanted is None:
                continue
            wanted = [w.removeprefix(prefix) for w in wanted]
            have = sorted({getattr(p, entity) for p in found} - {None})
            missing = [w for w in wanted if w not in have]
            if missing:
                raise ValueError(
                    f"source {self.spec!r}: {key} {missing} not in {self.data_root} "
                    f"(it has {', '.join(have) if have else f'no {entity} entity'})"
                )
            selected = [p for p in selected if getattr(p, entity) in wanted]
        if not selected:
            raise ValueError(
                f"source {self.spec!r}: no recording has every label the spec asks for; "
                "drop one of subjects/sessions/tasks/runs"
            )
        return sorted(selected, key=lambda p: p.fpath.relative_to(self.data_root).as_posix())

    def units(self) -> list[WorkUnit]:
        participants = _participants(self.data_root, self.root)
        units = []
        for path in self._recordings():
            rel = path.fpath.relative_to(self.data_root).as_posix()
            size = sum(p.stat().st_size for p in _companions(path.fpath))
            row = participants.get(f"sub-{path.subject}", {})
            entities = {k: v for k, v in path.entities.items() if v is not None}
            units.append(
                WorkUnit(
                    id=safe_key(f"bids-{self.dataset}-{path.basename}"),
                    fingerprint=fingerprint(
                        _VERSION, self.dataset, rel, size, _sidecar_digests(path), row
                    ),
                    payload={
                        "path": str(path.fpath),
                        "rel": rel,
                        "datatype": path.datatype,
                        "entities": entities,
                        "participant": row,
                    },
                )
            )
        return units

    def load(self, unit: WorkUnit) -> Iterator[Recording | Rejected]:
        p = unit.payload
        entities = p["entities"]
        run = entities.get("run", "0")
        if entities.get("task"):  # as files: names a BIDS file's run
            run = f"{entities['task']}-{run}"
        provenance = BidsProvenance(
            self.dataset,
            entities["subject"],
            entities.get("session", "0"),
            run,
            p["rel"],
            entities=entities,
            participant=p["participant"],
        )
        timeout = self.params.read_timeout_s or None
        try:  # any reader failure, crash included, is this recording's problem, not the build's
            recording = call_contained(
                read_bids_recording,
                str(self.data_root),
                p["datatype"],
                entities,
                Path(p["path"]).name,
                provenance,
                timeout_s=timeout,
            )
        except ReaderCrashed as err:
            yield Rejected(provenance, str(err))
            return
        except Exception as err:
            yield Rejected(provenance, f"unreadable: {err}")
            return
        yield recording


def read_bids_recording(
    root: str, datatype: str, entities: dict[str, str], name: str, provenance: BidsProvenance
) -> Recording:
    """One recording with its sidecars applied, status=bad channels excluded; `load` runs it
    in the reader child."""
    import mne_bids

    suffix, extension = _suffix_extension(name)
    bids_path = mne_bids.BIDSPath(
        **entities, root=root, datatype=datatype, suffix=suffix, extension=extension, check=False
    )
    raw = mne_bids.read_raw_bids(bids_path, verbose="error")
    bads = [b for b in raw.info["bads"] if b in raw.ch_names]
    reasons = _bad_reasons(bids_path, bads)
    raw.drop_channels(bads)
    return recording_from_raw(raw, replace(provenance, excluded_channels=reasons))


def _suffix_extension(name: str) -> tuple[str, str]:
    stem, _, extension = name.partition(".")
    return stem.rsplit("_", 1)[-1], f".{extension}"


def _bad_reasons(bids_path, bads: list[str]) -> dict[str, str]:
    """{name: why} for the bad channels, from channels.tsv's status_description if it says."""
    described: dict[str, str] = {}
    tsv = bids_path.find_matching_sidecar(suffix="channels", extension=".tsv", on_error="ignore")
    if tsv is not None:
        for row in _read_tsv(Path(tsv)):
            text = (row.get("status_description") or "").strip()
            if text and text != "n/a":
                described[row.get("name", "")] = text
    return {name: described.get(name, "status=bad") for name in bads}


def _sidecar_digests(bids_path) -> list[str | None]:
    digests: list[str | None] = []
    for suffix, extension in _SIDECARS:
        found = bids_path.find_matching_sidecar(
            suffix=suffix, extension=extension, on_error="ignore"
        )
        digests.append(hashlib.sha256(Path(found).read_bytes()).hexdigest() if found else None)
    return digests


def _participants(*folders: Path) -> dict[str, dict[str, Any]]:
    """participants.tsv rows by participant_id (the first folder that has the file wins: a
    derivative's own, else the raw dataset's); {} when there is none."""
    for folder in folders:
        path = folder / "participants.tsv"
        if path.is_file():
            rows = _read_tsv(path)
            if rows and "participant_id" not in rows[0]:
                raise ValueError(f"{path} has no participant_id column (BIDS requires one)")
            return {
                row["participant_id"]: {
                    k: _value(v) for k, v in row.items() if k != "participant_id"
                }
                for row in rows
            }
    return {}


def _read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


_INT = re.compile(r"-?(0|[1-9]\d*)")
_FLOAT = re.compile(r"-?\d+\.\d+")


def _value(text: str | None) -> Any:
    """A TSV cell as JSON: n/a -> None, plain numbers as numbers (an id like 007 stays text)."""
    if text is None or text.strip() in ("", "n/a"):
        return None
    text = text.strip()
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    return text
