"""`files:<folder>`: every recording MNE can read under a folder (or a BIDS tree).

One work unit per file, so one unreadable file costs one unit and is reported as such.
BIDS entities in file names (sub-, ses-, run-) become the provenance; otherwise the path
relative to the folder identifies the recording, and every file is its own subject unless
``subject=<regex>`` says where in the path the subject is (EEGMMIDB's ``S001/S001R03.edf``:
``subject=S([0-9]{3})R``; write a ``+`` as ``%2B``). Subject-level splits,
``msm.contrast_negatives=subject`` and ``msm.subject_adversary`` group windows by subject.
Files are read in a child process (contained.py): a reader that dies there by a signal
rejects its file, with the signal in the reason, instead of taking the build down.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from shards.recording import Provenance, Recording, Rejected, WorkUnit, fingerprint, safe_key
from shards.sources import Spec, parse_params
from shards.sources.contained import ReaderCrashed, call_contained
from shards.sources.mne_raw import recording_from_raw

# Header files that name a recording; companions (.fdt, .eeg, .vmrk, .evt) are read through them.
EXTENSIONS = (
    ".edf",
    ".bdf",
    ".gdf",
    ".vhdr",
    ".set",
    ".cnt",
    ".fif",
    ".fif.gz",
    ".mff",
    ".nxe",
    ".edf+",
    ".bdf+",
    ".lay",
    ".nedf",
    ".xdf",
)
_BIDS = {key: re.compile(rf"(?:^|_){key}-([A-Za-z0-9]+)") for key in ("sub", "ses", "run", "task")}


@dataclass
class FilesParams:
    dataset: str | None = None  # dataset name in provenance; default: the folder's name
    pattern: str = "**/*"  # glob under the folder
    preload_limit_mb: float = 4096.0  # larger files are rejected instead of exhausting memory
    read_timeout_s: float = 1800.0  # a reader still busy after this is killed (0: no limit)
    # a regular expression searched in each file's path relative to the folder: its first
    # group is the file's subject (the whole path is then the run). None: a BIDS sub- entity,
    # else the file itself
    subject: str | None = None


class FilesSource:
    def __init__(self, spec: str, folder: Path, params: FilesParams):
        self.spec, self.folder, self.params = spec, folder, params
        self.dataset = params.dataset or folder.name
        # checked in from_spec; every file's subject comes from it
        self.subject_rx = re.compile(params.subject) if params.subject is not None else None

    @classmethod
    def from_spec(cls, spec: str, parsed: Spec) -> FilesSource:
        if not parsed.argument:
            raise ValueError(f"source {spec!r} needs a folder: files:<folder>")
        folder = Path(parsed.argument).expanduser()
        if not folder.is_dir():
            raise ValueError(f"source {spec!r}: {folder} is not a folder")
        params = parse_params(FilesParams, parsed.params, spec)
        if params.subject is not None:
            try:
                groups = re.compile(params.subject).groups
            except re.error as err:
                raise ValueError(f"source {spec!r}: subject={params.subject!r}: {err}") from None
            if groups < 1:
                raise ValueError(
                    f"source {spec!r}: subject={params.subject!r} has no group; put the "
                    "subject in parentheses, e.g. subject=S([0-9]{3})R for S001R03.edf"
                )
        return cls(spec, folder.resolve(), params)

    def _paths(self) -> list[Path]:
        paths = [
            p
            for p in self.folder.glob(self.params.pattern)
            if p.is_file() and p.name.lower().endswith(EXTENSIONS)
        ]
        return sorted(paths, key=lambda p: p.relative_to(self.folder).as_posix())

    def units(self) -> list[WorkUnit]:
        paths = self._paths()
        if not paths:
            raise ValueError(
                f"source {self.spec!r}: no recordings under {self.folder} (looked for "
                f"{', '.join(EXTENSIONS)} matching {self.params.pattern!r})"
            )
        rx = self.subject_rx
        if rx is not None:  # every file must say its subject: refuse before reading any
            rels = (p.relative_to(self.folder).as_posix() for p in paths)
            unmatched = [rel for rel in rels if not rx.search(rel)]
            if unmatched:
                raise ValueError(
                    f"source {self.spec!r}: subject={rx.pattern!r} finds no subject in "
                    f"{len(unmatched)} of {len(paths)} files (first: {unmatched[0]!r}); fix the "
                    "pattern or narrow the files with pattern=<glob>"
                )
        units = []
        for path in paths:
            rel = path.relative_to(self.folder).as_posix()
            size = sum(p.stat().st_size for p in _companions(path))
            units.append(
                WorkUnit(
                    id=safe_key(f"files-{self.dataset}-{rel}"),
                    fingerprint=fingerprint(self.dataset, rel, size),
                    payload={"path": str(path), "rel": rel},
                )
            )
        return units

    def load(self, unit: WorkUnit) -> Iterator[Recording | Rejected]:
        path, rel = Path(unit.payload["path"]), unit.payload["rel"]
        provenance = _provenance(self.dataset, rel, rel, self.subject_rx)
        size_mb = sum(p.stat().st_size for p in _companions(path)) / 2**20
        if size_mb > self.params.preload_limit_mb:
            yield Rejected(provenance, f"file too large to preload ({size_mb:.0f} MB)")
            return
        timeout = self.params.read_timeout_s or None
        try:  # any reader failure, crash included, is this file's problem, not the build's
            recording = call_contained(read_recording, path, provenance, timeout_s=timeout)
        except ReaderCrashed as err:
            yield Rejected(provenance, str(err))
            return
        except Exception as err:
            yield Rejected(provenance, f"unreadable: {err}")
            return
        yield recording


def read_recording(path: Path, provenance: Provenance) -> Recording:
    """One file as a Recording; `load` runs it in the reader child."""
    return recording_from_raw(read_raw(path), provenance)


def is_riff(path: Path) -> bool:
    """A RIFF container (ANT Neuro eego `.cnt`), by its first four bytes: RIFF, or RF64."""
    with open(path, "rb") as fh:
        return fh.read(4) in (b"RIFF", b"RF64")


def read_raw(path: Path):
    """MNE's reader for a path. `.cnt` is two formats, told apart by content, never by trial:
    ANT Neuro's are RIFF containers, Neuroscan's are not -- and the ANT reader (libeep)
    segfaults or exits on a Neuroscan file instead of raising, so it must never see one."""
    import mne

    if path.suffix.lower() == ".cnt":
        if is_riff(path):
            return mne.io.read_raw_ant(path, preload=True, verbose="error")
        return mne.io.read_raw_cnt(path, preload=True, verbose="error")
    return mne.io.read_raw(path, preload=True, verbose="error")


def _companions(path: Path) -> list[Path]:
    siblings = [path.with_suffix(ext) for ext in (".fdt", ".eeg", ".vmrk", ".evt")]
    return [path] + [p for p in siblings if p != path and p.exists()]


def _provenance(
    dataset: str, rel: str, file: str, subject: re.Pattern[str] | None = None
) -> Provenance:
    if subject is not None:  # checked in units(): every path matches
        found_subject = subject.search(rel)
        assert found_subject is not None, rel
        return Provenance(dataset, safe_key(found_subject.group(1)), "0", safe_key(rel), file)
    stem = Path(rel).name
    found = {key: rx.search(stem) for key, rx in _BIDS.items()}
    if found["sub"]:
        session = found["ses"].group(1) if found["ses"] else "0"
        run = found["run"].group(1) if found["run"] else "0"
        if found["task"]:
            run = f"{found['task'].group(1)}-{run}"
        return Provenance(dataset, found["sub"].group(1), session, run, file)
    return Provenance(dataset, safe_key(rel), "0", "0", file)
