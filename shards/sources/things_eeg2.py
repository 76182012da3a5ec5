"""THINGS-EEG2 (Gifford et al. 2022): the released preprocessed epochs, paired with image ids.

Layout, as downloaded from the dataset's OSF page::

    <folder>/sub-01/preprocessed_eeg_training.npy   dict, data [16540, 4, C, T]
    <folder>/sub-01/preprocessed_eeg_test.npy       dict, data [200, 80, C, T]
    <folder>/image_metadata.npy                     dict of image concepts and file names

Spec: ``things-eeg2:<folder>[?subjects=1,2&splits=training,test&chunk=2000&metadata=<path>]``.

The released signals are multivariate-noise-normalised (whitened per session), so they are in
arbitrary units, not volts: recordings say ``unit="auto"`` and ``extra={"whitened": True}`` so
nobody downstream mistakes their scale for a physical amplitude.

The ``.npy`` files are ``np.save`` of a Python dict, i.e. pickles. Loading them with
``np.load(allow_pickle=True)`` would execute whatever a tampered file asks for, so
`load_pickled_npy` unpickles with an allow-list that admits only what numpy arrays, dtypes and
scalars need; everything else is refused before it can run.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from numpy.lib import format as npy_format

from shards.recording import Provenance, Recording, Rejected, Trial, WorkUnit, fingerprint
from shards.sources import Spec, parse_params

DATASET = "things-eeg2"
SPLITS = ("training", "test")
# Bump when load() changes what it yields for the same input, so finished work is redone.
_VERSION = 1
# Training images come as 10 exemplars per concept, in concept order.
_TRAIN_IMAGES_PER_CONCEPT = 10
_DATA_KEYS = ("preprocessed_eeg_data", "ch_names", "times")
_METADATA_KEYS = {
    "training": ("train_img_concepts", "train_img_files"),
    "test": ("test_img_concepts", "test_img_files"),
}
_SUBJECT_DIR = re.compile(r"^sub-(\d+)$")
_CONCEPT_PREFIX = re.compile(r"^\d+_")


# ---------------------------------------------------------------- safe loading of pickled .npy


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a callable outside the allow-list (a tampered or foreign file)."""


def _allowed_globals() -> dict[tuple[str, str], Any]:
    # Taken from live objects rather than imported by module name, so the same table works on
    # numpy 1.x (numpy.core) and 2.x (numpy._core), and either spelling found in a file maps
    # to the real function without importing numpy's deprecated shim modules.
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
    scalar = np.float64(0).__reduce__()[0]
    table: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(module, "_reconstruct")] = reconstruct
        table[(module, "scalar")] = scalar
    return table


_ALLOWED = _allowed_globals()


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only numpy's array/dtype/scalar constructors; dicts, lists, str, numbers and
    tuples are built by pickle opcodes without any global, so they need no entry."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name}: only numpy arrays, dtypes, scalars "
                "and plain containers are allowed"
            ) from None


def load_pickled_npy(path: str | Path) -> Any:
    """Read an ``np.save``-of-an-object file without executing arbitrary pickled code.

    Returns the saved object (for ``np.save(path, some_dict)`` the dict). Raises ValueError,
    naming the file, for anything that is not such a file or that the allow-list refuses.
    """
    path = Path(path)
    with path.open("rb") as fp:
        _read_object_header(fp, path)
        try:
            obj = _NumpyOnlyUnpickler(fp, encoding="latin1").load()
        except UnsafePickleError as err:
            raise ValueError(
                f"{path}: {err}. The file is not a genuine THINGS-EEG2 release file (or was "
                "tampered with); re-download it from the dataset's OSF page"
            ) from None
        except Exception as err:  # truncated or corrupt pickles raise all sorts of types
            raise ValueError(
                f"{path}: could not unpickle the object after the .npy header "
                f"({type(err).__name__}: {err}); the file is corrupt or truncated, re-download it"
            ) from None
    # np.save wraps the dict in a 0-d object array.
    if isinstance(obj, np.ndarray) and obj.shape == () and obj.dtype == object:
        obj = obj.item()
    return obj


def _read_object_header(fp: BinaryIO, path: Path) -> None:
    """Check the .npy header says "one pickled object" (cheap: reads a few hundred bytes)."""
    try:
        version = npy_format.read_magic(fp)
        if version == (1, 0):
            shape, _, dtype = npy_format.read_array_header_1_0(fp)
        elif version in ((2, 0), (3, 0)):
            shape, _, dtype = npy_format.read_array_header_2_0(fp)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except ValueError as err:
        raise ValueError(f"{path}: not a readable .npy file ({err})") from None
    if dtype.kind != "O" or shape != ():
        raise ValueError(
            f"{path}: holds a plain {dtype} array of shape {shape}, but THINGS-EEG2 files are "
            "np.save of a dict (a pickled 0-d object array); point the source at the dataset's "
            "preprocessed data folder or image_metadata.npy as released"
        )


def check_pickled_npy_header(path: str | Path) -> None:
    """The cheap structural check units() can afford before any worker unpickles gigabytes."""
    path = Path(path)
    with path.open("rb") as fp:
        _read_object_header(fp, path)


# ------------------------------------------------------------------------------------- source


@dataclass
class ThingsEEG2Params:
    subjects: list[int] | None = None
    splits: list[str] = field(default_factory=lambda: list(SPLITS))
    # Images per yielded Recording (each brings all its repetitions).
    chunk: int = 2000
    metadata: str | None = None


@dataclass
class _Metadata:
    concepts: list[str]
    files: list[str]


class ThingsEEG2Source:
    """One work unit per (subject, split); loads yield epoched chunks of `chunk` images."""

    def __init__(self, spec: str, folder: Path, params: ThingsEEG2Params) -> None:
        self.spec = spec
        self.folder = folder
        self.params = params

    @classmethod
    def from_spec(cls, spec: str, parsed: Spec) -> ThingsEEG2Source:
        params = parse_params(ThingsEEG2Params, parsed.params, spec)
        if not parsed.argument:
            raise ValueError(
                f"source spec {spec!r} names no folder; use things-eeg2:<folder>, the folder "
                "holding sub-01/preprocessed_eeg_training.npy etc."
            )
        folder = Path(parsed.argument).expanduser()
        if not folder.is_dir():
            raise ValueError(
                f"THINGS-EEG2 folder {str(folder)!r} (from spec {spec!r}) does not exist or is not "
                "a folder; download the preprocessed EEG data and point the spec at the folder "
                "holding the sub-XX folders"
            )
        bad_splits = sorted(set(params.splits) - set(SPLITS))
        if bad_splits or not params.splits:
            raise ValueError(
                f"splits={','.join(params.splits)!s} in spec {spec!r} is not valid; choose from "
                f"{', '.join(SPLITS)}"
            )
        if params.chunk < 1:
            raise ValueError(f"chunk={params.chunk} in spec {spec!r} must be at least 1 image")
        if params.metadata is not None and not Path(params.metadata).expanduser().is_file():
            raise ValueError(
                f"metadata={params.metadata!r} in spec {spec!r} is not a file; give the path to "
                "the dataset's image_metadata.npy or leave metadata out"
            )
        return cls(spec, folder, params)

    # -- enumeration (driver side: cheap, no signal loading)

    def _subject_dirs(self) -> dict[int, Path]:
        found: dict[int, Path] = {}
        for child in sorted(self.folder.iterdir()):
            match = _SUBJECT_DIR.match(child.name)
            if match and child.is_dir():
                found[int(match.group(1))] = child
        if not found:
            raise ValueError(
                f"no sub-XX folders in THINGS-EEG2 folder {str(self.folder)!r}; expected e.g. "
                f"{self.folder / 'sub-01' / 'preprocessed_eeg_training.npy'}"
            )
        if self.params.subjects is None:
            return found
        missing = sorted(set(self.params.subjects) - set(found))
        if missing:
            raise ValueError(
                f"subject(s) {missing} requested in {self.spec!r} have no sub-XX folder in "
                f"{str(self.folder)!r}; available: {sorted(found)}"
            )
        return {s: found[s] for s in sorted(set(self.params.subjects))}

    def _metadata_path(self) -> Path | None:
        if self.params.metadata is not None:
            return Path(self.params.metadata).expanduser()
        for candidate in (
            self.folder / "image_metadata.npy",
            self.folder / "image_set" / "image_metadata.npy",
        ):
            if candidate.is_file():
                return candidate
        return None

    def units(self) -> list[WorkUnit]:
        subjects = self._subject_dirs()
        metadata_path = self._metadata_path()
        metadata_size = None
        if metadata_path is not None:
            # Small (a few MB), so worth validating here rather than in every worker.
            for split in self.params.splits:
                _read_metadata(metadata_path, split)
            metadata_size = metadata_path.stat().st_size
        # Which subjects and splits are built does not change any one unit's output.
        params = {k: v for k, v in asdict(self.params).items() if k not in ("subjects", "splits")}
        units = []
        for subject_dir in subjects.values():
            subject = _SUBJECT_DIR.match(subject_dir.name).group(1)  # keep "01" as written
            for split in self.params.splits:
                path = subject_dir / f"preprocessed_eeg_{split}.npy"
                if not path.is_file():
                    raise ValueError(
                        f"{path} is missing; download subject {subject}'s {split} file, or "
                        f"restrict the spec with splits=/subjects="
                    )
                check_pickled_npy_header(path)
                payload = {
                    "subject": subject,
                    "split": split,
                    "path": str(path),
                    "metadata": None if metadata_path is None else str(metadata_path),
                }
                units.append(
                    WorkUnit(
                        id=f"{DATASET}-sub-{subject}-{split}",
                        fingerprint=fingerprint(
                            DATASET,
                            _VERSION,
                            params,
                            payload,
                            path.stat().st_size,
                            metadata_size,
                        ),
                        payload=payload,
                    )
                )
        return units

    # -- loading (worker side)

    def load(self, unit: WorkUnit) -> Iterator[Recording | Rejected]:
        """Yield `[N, C, T]` float32 chunks, N = images in the chunk x repetitions.

        The file is a pickle, so it is read whole once; each chunk is then a bounded copy of
        its slice (float32), so a consumer keeping a chunk does not pin the whole unit.
        """
        payload = unit.payload
        split: str = payload["split"]
        path = Path(payload["path"])
        data, ch_names, times = _read_data(path)
        n_images, n_reps, _, _ = data.shape  # [images, repetitions, C, T]
        metadata = None
        if payload.get("metadata"):
            metadata = _read_metadata(Path(payload["metadata"]), split)
            if len(metadata.concepts) != n_images:
                raise ValueError(
                    f"{payload['metadata']} lists {len(metadata.concepts)} {split} images but "
                    f"{path} holds {n_images}; the metadata belongs to a different release, give "
                    "the matching image_metadata.npy with metadata="
                )
        tmin = float(times[0])
        sfreq = _sfreq(times, path)
        for k, start in enumerate(range(0, n_images, self.params.chunk)):
            stop = min(start + self.params.chunk, n_images)
            block = data[start:stop]  # [images, repetitions, C, T], a view
            chunk_data = block.reshape(-1, *block.shape[2:]).astype(np.float32)  # [N, C, T]
            trials = [
                _trial(split, image, rep, tmin, metadata)
                for image in range(start, stop)
                for rep in range(n_reps)
            ]
            yield Recording(
                data=chunk_data,
                sfreq=sfreq,
                ch_names=list(ch_names),
                unit="auto",
                provenance=Provenance(
                    dataset=DATASET,
                    subject=payload["subject"],
                    session=split,
                    run=f"chunk{k:03d}",
                    file=str(path),
                ),
                trials=trials,
                extra={
                    "whitened": True,
                    "split": split,
                    "tmin": tmin,
                    "image_range": [start, stop],
                    "repetitions": n_reps,
                },
            )


def _trial(split: str, image: int, rep: int, tmin: float, metadata: _Metadata | None) -> Trial:
    concept = image // _TRAIN_IMAGES_PER_CONCEPT if split == "training" else image
    if metadata is not None:
        label = _CONCEPT_PREFIX.sub("", metadata.concepts[image])
        stimulus_id = metadata.files[image]
    else:
        label = f"concept_{concept:04d}"
        stimulus_id = f"{DATASET}:{split}:{image:05d}"
    return Trial(
        label=label,
        stimulus_id=stimulus_id,
        extra={
            "split": split,
            "image_index": image,
            "concept_index": concept,
            "repetition": rep,
            "tmin": tmin,
        },
    )


def _read_data(path: Path) -> tuple[np.ndarray, list[str], np.ndarray]:
    obj = load_pickled_npy(path)
    if not isinstance(obj, dict):
        raise ValueError(
            f"{path}: holds a {type(obj).__name__}, expected the dict with keys "
            f"{', '.join(_DATA_KEYS)} that THINGS-EEG2 releases"
        )
    missing = [key for key in _DATA_KEYS if key not in obj]
    if missing:
        raise ValueError(
            f"{path}: dict lacks key(s) {missing} (has {sorted(map(str, obj))}); expected a "
            "THINGS-EEG2 preprocessed_eeg_*.npy file"
        )
    data, raw_names, raw_times = (obj[key] for key in _DATA_KEYS)
    del obj  # drop any other entries of the dict before the big copies start
    if not isinstance(data, np.ndarray) or data.ndim != 4:
        shape = getattr(data, "shape", type(data).__name__)
        raise ValueError(
            f"{path}: preprocessed_eeg_data is {shape}, expected a 4-D array "
            "[images, repetitions, channels, time]"
        )
    if not (np.issubdtype(data.dtype, np.floating) or np.issubdtype(data.dtype, np.integer)):
        raise ValueError(f"{path}: preprocessed_eeg_data has non-numeric dtype {data.dtype}")
    ch_names = _strings(raw_names, path, "ch_names")
    times = np.asarray(raw_times)
    n_images, n_reps, n_channels, n_times = data.shape
    if min(n_images, n_reps) == 0:
        raise ValueError(f"{path}: preprocessed_eeg_data has shape {data.shape}, i.e. no epochs")
    if len(ch_names) != n_channels:
        raise ValueError(
            f"{path}: {len(ch_names)} ch_names for {n_channels} channels in "
            f"preprocessed_eeg_data {data.shape}"
        )
    if times.shape != (n_times,) or n_times < 2 or not np.issubdtype(times.dtype, np.number):
        raise ValueError(
            f"{path}: times is {times.dtype} of shape {times.shape}, expected ({n_times},) "
            f"numbers matching the time axis of preprocessed_eeg_data {data.shape} (at least 2 samples)"
        )
    return data, ch_names, times


def _strings(values: Any, path: Path, key: str) -> list[str]:
    if isinstance(values, np.ndarray):
        values = values.tolist()
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{path}: {key} must be a list of strings, got {type(values).__name__}")
    return list(values)


def _sfreq(times: np.ndarray, path: Path) -> float:
    steps = np.diff(times.astype(np.float64))
    step = float(np.median(steps))
    if not np.isfinite(step) or step <= 0 or np.abs(steps - step).max() > 1e-3 * step:
        raise ValueError(
            f"{path}: times are not evenly spaced and increasing ({times[:3]}...), so the "
            "sampling rate cannot be derived"
        )
    return round(1.0 / step, 6)


def _read_metadata(path: Path, split: str) -> _Metadata:
    obj = load_pickled_npy(path)
    if not isinstance(obj, dict):
        raise ValueError(
            f"{path}: holds a {type(obj).__name__}, expected the image_metadata.npy dict of "
            "THINGS-EEG2"
        )
    concepts_key, files_key = _METADATA_KEYS[split]
    missing = [key for key in (concepts_key, files_key) if key not in obj]
    if missing:
        raise ValueError(
            f"{path}: lacks key(s) {missing} needed for the {split} split (has "
            f"{sorted(map(str, obj))}); give THINGS-EEG2's image_metadata.npy with metadata="
        )
    concepts = _strings(obj[concepts_key], path, concepts_key)
    files = _strings(obj[files_key], path, files_key)
    if len(concepts) != len(files):
        raise ValueError(
            f"{path}: {concepts_key} has {len(concepts)} entries but {files_key} has {len(files)}"
        )
    return _Metadata(concepts, files)
