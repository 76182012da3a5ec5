"""ImageNet-EEG (Spampinato et al. 2017): 40 ImageNet classes seen by 6 subjects, 128 channels.

This reads the ``eeg_*.pth`` file DreamDiffusion and its successors train on (e.g.
``eeg_5_95_std.pth``: band-passed 5-95 Hz and standardised, hence ``unit="auto"``)::

    {"dataset": [{"eeg": FloatTensor [C, T], "label": int, "image": int, "subject": int}, ...],
     "labels": ["n02389026", ...],          # 40 ImageNet wnids, indexed by "label"
     "images": ["n02389026_3875", ...]}     # image names, indexed by "image"

Spec: ``imagenet-eeg:<eeg .pth>[?splits=<splits .pth>&split_index=0&subjects=1,2&crop=20,460
&chunk=2000&channels=<names.txt>]``.

Trials are 1 kHz and their length varies by a few samples, so every trial is cropped to
samples ``[crop[0], crop[1])`` exactly as DreamDiffusion does (default 20..460); trials too short
for that are reported together in one Rejected per subject rather than silently dropped.
Both files are read with ``torch.load(weights_only=True)``, which refuses pickled code.

Enumerating units does not open the (multi-GB) EEG file, so the subjects default to the six of
the published recording; pass ``subjects=`` for a file with others.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shards.recording import Provenance, Recording, Rejected, Trial, WorkUnit, fingerprint
from shards.sources import Spec, parse_params

DATASET = "imagenet-eeg"
SFREQ = 1000.0
DEFAULT_SUBJECTS = (1, 2, 3, 4, 5, 6)
SPLIT_NAMES = ("train", "val", "test")
# Bump when load() changes what it yields for the same input, so finished work is redone.
_VERSION = 1


@dataclass
class ImageNetEEGParams:
    splits: str | None = None
    split_index: int = 0
    subjects: list[int] | None = None
    crop: tuple[int, int] = (20, 460)
    # Trials per yielded Recording.
    chunk: int = 2000
    channels: str | None = None


class ImageNetEEGSource:
    """One work unit per subject; loads yield epoched chunks of `chunk` cropped trials."""

    def __init__(self, spec: str, path: Path, params: ImageNetEEGParams) -> None:
        self.spec = spec
        self.path = path
        self.params = params

    @classmethod
    def from_spec(cls, spec: str, parsed: Spec) -> ImageNetEEGSource:
        params = parse_params(ImageNetEEGParams, parsed.params, spec)
        if not parsed.argument:
            raise ValueError(
                f"source spec {spec!r} names no file; use imagenet-eeg:<path to eeg_*.pth>"
            )
        path = Path(parsed.argument).expanduser()
        if not path.is_file():
            raise ValueError(
                f"ImageNet-EEG file {str(path)!r} (from spec {spec!r}) does not exist or is not a "
                "file; point the spec at the eeg_*.pth file (e.g. eeg_5_95_std.pth)"
            )
        if len(params.crop) != 2 or not 0 <= params.crop[0] < params.crop[1]:
            raise ValueError(
                f"crop={','.join(map(str, params.crop))} in spec {spec!r} must be two sample "
                "indices start,stop with 0 <= start < stop, e.g. crop=20,460"
            )
        if params.chunk < 1:
            raise ValueError(f"chunk={params.chunk} in spec {spec!r} must be at least 1 trial")
        if params.subjects is not None and not params.subjects:
            raise ValueError(f"subjects= in spec {spec!r} is empty; list subject numbers, e.g. 1,2")
        for key in ("splits", "channels"):
            value = getattr(params, key)
            if value is not None and not Path(value).expanduser().is_file():
                raise ValueError(f"{key}={value!r} in spec {spec!r} is not a file")
        if params.splits is None and parsed.params.get("split_index") is not None:
            raise ValueError(
                f"split_index in spec {spec!r} needs splits=<splits .pth> to pick from"
            )
        return cls(spec, path, params)

    # -- enumeration (driver side: cheap, the EEG file is not opened beyond its first bytes)

    def units(self) -> list[WorkUnit]:
        _check_torch_file(self.path)
        extra_sizes: dict[str, int] = {}
        # Both side files are small; validating them here fails the build before any worker.
        if self.params.splits is not None:
            splits_path = Path(self.params.splits).expanduser()
            _read_splits(splits_path, self.params.split_index)
            extra_sizes["splits"] = splits_path.stat().st_size
        if self.params.channels is not None:
            channels_path = Path(self.params.channels).expanduser()
            _read_channels(channels_path)
            extra_sizes["channels"] = channels_path.stat().st_size
        subjects = sorted(set(self.params.subjects or DEFAULT_SUBJECTS))
        # Which subjects are built does not change any one unit's output.
        params = {k: v for k, v in asdict(self.params).items() if k != "subjects"}
        size = self.path.stat().st_size
        return [
            WorkUnit(
                id=f"{DATASET}-sub-{subject}",
                fingerprint=fingerprint(
                    DATASET, _VERSION, params, str(self.path), size, extra_sizes, subject
                ),
                payload={"path": str(self.path), "subject": subject},
            )
            for subject in subjects
        ]

    # -- loading (worker side)

    def load(self, unit: WorkUnit) -> Iterator[Recording | Rejected]:
        """Yield `[N, C, T]` float32 chunks of the subject's trials, in file order.

        The whole file is loaded (memory-mapped when it is in torch's zip format); each chunk
        copies only its own cropped trials.
        """
        path = Path(unit.payload["path"])
        subject = int(unit.payload["subject"])
        start, stop = self.params.crop
        content = _read_eeg_file(path)
        dataset, labels, images = content["dataset"], content["labels"], content["images"]
        split_of: dict[int, str] = {}
        if self.params.splits is not None:
            split_of = _read_splits(Path(self.params.splits).expanduser(), self.params.split_index)
            beyond = [i for i in split_of if i >= len(dataset)]
            if beyond:
                raise ValueError(
                    f"splits file {self.params.splits} refers to trial {max(beyond)} but {path} "
                    f"has {len(dataset)} trials; the splits file belongs to another EEG file"
                )

        n_channels = None
        mine: list[int] = []
        subjects_seen: set[int] = set()
        for i, entry in enumerate(dataset):
            c = _check_entry(entry, i, path, len(labels), len(images))
            if n_channels is None:
                n_channels = c
            elif c != n_channels:
                raise ValueError(
                    f"{path}: dataset[{i}]['eeg'] has {c} channels but earlier trials have "
                    f"{n_channels}; every trial must have the same channels"
                )
            subjects_seen.add(int(entry["subject"]))
            if int(entry["subject"]) == subject:
                mine.append(i)

        provenance = Provenance(dataset=DATASET, subject=str(subject), file=str(path))
        if not mine:
            yield Rejected(
                provenance,
                f"no trials of subject {subject} in {path}; subjects present: "
                f"{sorted(subjects_seen)}",
            )
            return
        ch_names = self._ch_names(n_channels, path)
        good = [i for i in mine if dataset[i]["eeg"].shape[1] >= stop]
        short = [i for i in mine if dataset[i]["eeg"].shape[1] < stop]

        for k, first in enumerate(range(0, len(good), self.params.chunk)):
            indices = good[first : first + self.params.chunk]
            data = np.empty((len(indices), n_channels, stop - start), np.float32)  # [N, C, T]
            for j, i in enumerate(indices):
                data[j] = dataset[i]["eeg"][:, start:stop].detach().float().numpy()
            trials = [
                Trial(
                    label=str(labels[int(dataset[i]["label"])]),
                    stimulus_id=str(images[int(dataset[i]["image"])]),
                    extra={
                        "class_index": int(dataset[i]["label"]),
                        "image_index": int(dataset[i]["image"]),
                        "split": split_of.get(i),
                        "dataset_index": i,
                    },
                )
                for i in indices
            ]
            yield Recording(
                data=data,
                sfreq=SFREQ,
                ch_names=ch_names,
                unit="auto",
                provenance=Provenance(
                    dataset=DATASET,
                    subject=str(subject),
                    session="0",
                    run=f"chunk{k:03d}",
                    file=str(path),
                ),
                trials=trials,
                extra={"crop_samples": [start, stop], "tmin": start / SFREQ},
            )
        if short:
            lengths = sorted({int(dataset[i]["eeg"].shape[1]) for i in short})
            yield Rejected(
                Provenance(dataset=DATASET, subject=str(subject), run="short", file=str(path)),
                f"{len(short)} trial(s) of subject {subject} have fewer than the {stop} samples "
                f"crop={start},{stop} needs (lengths {lengths[:10]}; dataset indices "
                f"{short[:10]}{' ...' if len(short) > 10 else ''})",
            )

    def _ch_names(self, n_channels: int, path: Path) -> list[str]:
        if self.params.channels is None:
            # The file carries no names; these are placeholders for the 128-channel actiCAP.
            return [f"E{i + 1:03d}" for i in range(n_channels)]
        names = _read_channels(Path(self.params.channels).expanduser())
        if len(names) != n_channels:
            raise ValueError(
                f"channels file {self.params.channels} lists {len(names)} names but the trials "
                f"in {path} have {n_channels} channels"
            )
        return names


def _check_torch_file(path: Path) -> None:
    """Cheap sniff: torch.save writes a zip archive (new format) or a pickle (legacy)."""
    with path.open("rb") as fp:
        head = fp.read(2)
    if not (zipfile.is_zipfile(path) or head[:1] == b"\x80"):
        raise ValueError(
            f"{path} is not a torch.save file (neither a zip archive nor a pickle); point the "
            "spec at the eeg_*.pth file of ImageNet-EEG"
        )


def _torch_load(path: Path, what: str) -> Any:
    import pickle

    import torch

    try:
        return torch.load(
            path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
        )
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        raise ValueError(
            f"{path}: could not read it as {what} with torch.load(weights_only=True) "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); it must be "
            "a torch.save of plain dicts, lists, numbers, strings and tensors"
        ) from None


def _read_eeg_file(path: Path) -> dict[str, Any]:
    content = _torch_load(path, "an ImageNet-EEG file")
    if not isinstance(content, dict):
        raise ValueError(
            f"{path}: holds a {type(content).__name__}, expected a dict with keys dataset, "
            "labels, images"
        )
    missing = [key for key in ("dataset", "labels", "images") if key not in content]
    if missing:
        raise ValueError(
            f"{path}: dict lacks key(s) {missing} (has {sorted(map(str, content))}); expected "
            "the ImageNet-EEG eeg_*.pth layout {dataset, labels, images}"
        )
    for key in ("dataset", "labels", "images"):
        if not isinstance(content[key], (list, tuple)):
            raise ValueError(f"{path}: {key} is a {type(content[key]).__name__}, expected a list")
    for key in ("labels", "images"):
        if not all(isinstance(v, str) for v in content[key]):
            raise ValueError(f"{path}: {key} must be a list of strings")
    return content


def _is_int(value: Any) -> bool:
    import torch

    if isinstance(value, torch.Tensor):
        return value.ndim == 0 and not value.is_floating_point() and not value.is_complex()
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_entry(entry: Any, i: int, path: Path, n_labels: int, n_images: int) -> int:
    """Validate one dataset entry; returns its channel count."""
    import torch

    if not isinstance(entry, dict):
        raise ValueError(f"{path}: dataset[{i}] is a {type(entry).__name__}, expected a dict")
    missing = [key for key in ("eeg", "label", "image", "subject") if key not in entry]
    if missing:
        raise ValueError(
            f"{path}: dataset[{i}] lacks key(s) {missing}; each trial needs eeg, label, image, "
            "subject"
        )
    eeg = entry["eeg"]
    if not isinstance(eeg, torch.Tensor) or eeg.ndim != 2 or not eeg.is_floating_point():
        shape = tuple(eeg.shape) if isinstance(eeg, torch.Tensor) else type(eeg).__name__
        raise ValueError(
            f"{path}: dataset[{i}]['eeg'] is {shape}, expected a 2-D float tensor [channels, time]"
        )
    for key, limit in (("label", n_labels), ("image", n_images)):
        value = entry[key]
        if not _is_int(value) or not 0 <= int(value) < limit:
            raise ValueError(
                f"{path}: dataset[{i}]['{key}'] is {value!r}, expected an int index into the "
                f"{limit} {key}s"
            )
    if not _is_int(entry["subject"]):
        raise ValueError(f"{path}: dataset[{i}]['subject'] is {entry['subject']!r}, not an int")
    return int(eeg.shape[0])


def _read_splits(path: Path, split_index: int) -> dict[int, str]:
    """Map dataset index -> "train"/"val"/"test" for one of the file's splits."""
    content = _torch_load(path, "an ImageNet-EEG splits file")
    splits = content.get("splits") if isinstance(content, dict) else content
    if not isinstance(splits, (list, tuple)) or not splits:
        raise ValueError(
            f"{path}: expected a non-empty list of splits, or a dict {{'splits': [...]}}, got "
            f"{type(content).__name__}"
            + (f" with keys {sorted(map(str, content))}" if isinstance(content, dict) else "")
        )
    if not 0 <= split_index < len(splits):
        raise ValueError(
            f"split_index={split_index} but {path} holds {len(splits)} split(s); choose 0.."
            f"{len(splits) - 1}"
        )
    split = splits[split_index]
    if not isinstance(split, dict) or not split or set(split) - set(SPLIT_NAMES):
        keys = sorted(map(str, split)) if isinstance(split, dict) else type(split).__name__
        raise ValueError(
            f"{path}: split {split_index} is {keys}, expected a dict with keys among "
            f"{', '.join(SPLIT_NAMES)}"
        )
    split_of: dict[int, str] = {}
    for name in SPLIT_NAMES:
        for index in _indices(split.get(name, []), path, split_index, name):
            if index in split_of and split_of[index] != name:
                raise ValueError(
                    f"{path}: trial {index} is in both {split_of[index]!r} and {name!r} of split "
                    f"{split_index}"
                )
            split_of[index] = name
    return split_of


def _indices(values: Any, path: Path, split_index: int, name: str) -> list[int]:
    import torch

    if isinstance(values, torch.Tensor):
        if values.ndim != 1 or values.is_floating_point():
            raise ValueError(f"{path}: split {split_index} {name!r} is not a 1-D integer tensor")
        values = values.tolist()
    if not isinstance(values, Sequence) or not all(_is_int(v) and v >= 0 for v in values):
        raise ValueError(
            f"{path}: split {split_index} {name!r} must be a list of non-negative trial indices"
        )
    return [int(v) for v in values]


def _read_channels(path: Path) -> list[str]:
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"channels file {path} is empty; give one channel name per line")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"channels file {path} repeats channel name(s) {duplicates}")
    return names
