"""What each stimulus id in the shards is: its image file, its concept and its captions.

EEG windows carry only a `stimulus_id` (and a label); the generation heads need the picture
and words behind it. The id's form says which dataset it came from (shards/sources/*.py):

    synthetic:c{k:02d}:i{i:02d}          synthetic source, class k, instance i: images are
                                         rendered by finetune/synthetic_stimuli.py, no data needed
    things-eeg2:{split}:{image:05d}      THINGS-EEG2 built without image metadata
    aardvark_01b.jpg                     THINGS-EEG2 built with it (the image's file name)
    n02951358_31190                      ImageNet-EEG (wnid _ image number)

Synthetic renders may live beside shards in object storage (an ``s3://`` image is then a
URL string, read through shards/storage.py). Real images are looked up in a local folder
the user downloaded, and every id is resolved before
any embedding or training starts, so a missing file fails in seconds with the ids and the
folder named rather than hours into a run.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shards import storage

SOURCE_KINDS = ("synthetic", "things-eeg2", "imagenet-eeg")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPEG", ".JPG", ".PNG")
_MAX_LISTED = 10  # ids named in an error message

_THINGS_INDEX_ID = re.compile(r"^things-eeg2:(training|test):(\d+)$")
_IMAGENET_ID = re.compile(r"^(n\d{8})_\d+$")
_CONCEPT_PREFIX = re.compile(r"^\d+_")  # THINGS concept folders are "00001_aardvark"
_THINGS_SPLIT_DIRS = {"training": "training_images", "test": "test_images"}
_THINGS_PER_CONCEPT = {"training": 10, "test": 1}


def concept_prompt(concept: str) -> str:
    """The caption a stimulus gets when none is given, and the zero-shot text of a concept."""
    return f"an image of {article(concept)} {concept}"


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


@dataclass
class Stimulus:
    id: str
    image: Path | str | None  # a local file, or a URL string (Path would mangle s3://)
    concept: str
    captions: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.image is not None and not storage.is_uri(self.image):
            self.image = Path(self.image)
        self.captions = [str(c) for c in self.captions] or [concept_prompt(self.concept)]


class StimulusSet(Mapping[str, Stimulus]):
    """Stimuli by id; iterates ids in sorted order, so row order is the same on every run."""

    def __init__(self, stimuli: Iterable[Stimulus]):
        self._by_id: dict[str, Stimulus] = {}
        for s in stimuli:
            if s.id in self._by_id:
                raise ValueError(f"stimulus id {s.id!r} is given twice")
            self._by_id[s.id] = s
        self._order = sorted(self._by_id)

    def __getitem__(self, stimulus_id: str) -> Stimulus:
        return self._by_id[stimulus_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    @property
    def ids(self) -> list[str]:
        return list(self._order)

    def concepts(self) -> list[str]:
        """The distinct concepts, sorted: the classes of zero-shot classification."""
        return sorted({s.concept for s in self._by_id.values()})

    def with_captions(self, captions: Mapping[str, str | list[str]]) -> StimulusSet:
        """A copy where the stimuli named in `captions` get those captions (others keep theirs).

        A captions file may cover a whole dataset, so extra ids are fine; one that names none
        of these stimuli is almost surely for other data, so that is an error.
        """
        if captions and not any(i in self._by_id for i in captions):
            raise ValueError(
                f"the captions name none of the {len(self)} stimuli (captions for e.g. "
                f"{sorted(captions)[:3]}, stimuli e.g. {self._order[:3]}); give captions keyed "
                "by the shards' stimulus ids"
            )
        out = []
        for i in self._order:
            s = self._by_id[i]
            given = captions.get(i)
            if given is not None:
                given = [given] if isinstance(given, str) else list(given)
            out.append(Stimulus(s.id, s.image, s.concept, given or list(s.captions)))
        return StimulusSet(out)

    def to_json(self) -> dict:
        return {
            "stimuli": [
                {
                    "id": s.id,
                    "image": None if s.image is None else str(s.image),
                    "concept": s.concept,
                    "captions": list(s.captions),
                }
                for s in (self._by_id[i] for i in self._order)
            ]
        }

    def save(self, path: str | Path) -> str | Path:
        path = path if storage.is_uri(path) else Path(path)
        if not storage.is_uri(path):
            path.parent.mkdir(parents=True, exist_ok=True)
        storage.write_text(path, json.dumps(self.to_json(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> StimulusSet:
        try:
            entries = storage.read_json(path)["stimuli"]
            return cls(Stimulus(e["id"], e["image"], e["concept"], e["captions"]) for e in entries)
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(
                f"{path} is not a stimulus set written by StimulusSet.save ({err!r})"
            ) from None


# ------------------------------------------------------------------------------ captions


def load_captions(path: str | Path) -> dict[str, list[str]]:
    """Captions by stimulus id from JSON ``{id: caption | [captions]}`` or CSV ``id,caption``
    (several rows per id allowed)."""
    suffix = Path(str(path)).suffix.lower()
    if not storage.isfile(path):
        raise ValueError(f"captions file {str(path)!r} does not exist")
    text = storage.read_bytes(path).decode("utf-8")
    out: dict[str, list[str]] = {}
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"captions file {path} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(
                f"captions file {path} holds a {type(data).__name__}; expected an object "
                '{"<stimulus id>": "caption" or ["caption", ...]}'
            )
        for key, value in data.items():
            values = [value] if isinstance(value, str) else value
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise ValueError(
                    f"captions file {path}: the entry for {key!r} is {value!r:.80}; give a "
                    "string or a list of strings"
                )
            out[str(key)] = [v.strip() for v in values if v.strip()]
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or not {"id", "caption"} <= set(reader.fieldnames):
            raise ValueError(
                f"captions file {path} has columns {reader.fieldnames}; it needs a header "
                "with the columns id,caption"
            )
        for row in reader:
            caption = (row["caption"] or "").strip()
            if row["id"] and caption:
                out.setdefault(row["id"].strip(), []).append(caption)
    else:
        raise ValueError(f"captions file {path} must end in .json or .csv")
    out = {k: v for k, v in out.items() if v}
    if not out:
        raise ValueError(f"captions file {path} holds no captions")
    return out


# ------------------------------------------------------------------------------ real datasets


def _missing_error(missing: list[str], where: str, hint: str) -> ValueError:
    listed = ", ".join(repr(m) for m in missing[:_MAX_LISTED])
    more = f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
    return ValueError(
        f"{len(missing)} stimulus image(s) not found in {where}: {listed}{more}. {hint}"
    )


def _concept_text(folder_name: str) -> str:
    """THINGS concept folder "00012_ice_cream" -> "ice cream"."""
    return _CONCEPT_PREFIX.sub("", folder_name).replace("_", " ").strip()


def things_eeg2_stimuli(ids: Iterable[str], image_root: str | Path) -> StimulusSet:
    """THINGS-EEG2 stimuli from the dataset's image set folder.

    Layout (the OSF image set): ``<root>/training_images/00001_aardvark/aardvark_01b.jpg`` and
    ``<root>/test_images/...``. Ids are image file names (shards built with metadata) or
    ``things-eeg2:<split>:<image index>``, where the index counts the images of the split in
    sorted concept-folder then file order, the order the dataset's metadata lists them in.
    """
    root = Path(image_root).expanduser()
    ids = sorted(set(ids))
    split_dirs = {s: root / d for s, d in _THINGS_SPLIT_DIRS.items() if (root / d).is_dir()}
    if not split_dirs:
        raise ValueError(
            f"THINGS-EEG2 image folder {str(root)!r} holds neither training_images/ nor "
            "test_images/; point --image-root at the unpacked image set (the folder holding "
            "training_images/00001_aardvark/aardvark_01b.jpg)"
        )
    by_name: dict[str, tuple[Path, str]] = {}
    ambiguous: set[str] = set()
    by_index: dict[tuple[str, int], tuple[Path, str]] = {}
    for split, folder in split_dirs.items():
        n = 0
        for concept_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            concept = _concept_text(concept_dir.name)
            for f in sorted(concept_dir.iterdir()):
                if f.suffix not in IMAGE_SUFFIXES or not f.is_file():
                    continue
                if f.name in by_name:
                    ambiguous.add(f.name)
                by_name[f.name] = (f, concept)
                by_index[(split, n)] = (f, concept)
                n += 1
    stimuli, missing = [], []
    for stimulus_id in ids:
        match = _THINGS_INDEX_ID.match(stimulus_id)
        found = (
            by_index.get((match.group(1), int(match.group(2))))
            if match
            else by_name.get(stimulus_id)
        )
        if found is None:
            missing.append(stimulus_id)
            continue
        if stimulus_id in ambiguous:
            raise ValueError(
                f"image {stimulus_id!r} occurs in more than one concept folder under {root}; "
                "remove the duplicate so the id names one image"
            )
        stimuli.append(Stimulus(stimulus_id, found[0].resolve(), found[1]))
    if missing:
        raise _missing_error(
            missing,
            f"{root} ({', '.join(d.name for d in split_dirs.values())}/<concept>/)",
            "Download the full THINGS-EEG2 image set, or point --image-root at it",
        )
    return StimulusSet(stimuli)


def imagenet_class_name(wnid: str) -> str:
    """ "n02389026" -> "sorrel" (first WordNet lemma, from timm's bundled synset table)."""
    from timm.data import ImageNetInfo  # a dependency of open_clip; its tables ship offline

    try:
        return ImageNetInfo("imagenet-22k").label_name_to_description(wnid).split(",")[0].strip()
    except KeyError:
        return wnid


def imagenet_eeg_stimuli(ids: Iterable[str], image_root: str | Path) -> StimulusSet:
    """ImageNet-EEG stimuli from ``<root>/<wnid>/<name>.JPEG`` or a flat ``<root>/<name>.JPEG``
    (``.jpg``/``.png`` also found); the concept is the class's WordNet name."""
    root = Path(image_root).expanduser()
    if not root.is_dir():
        raise ValueError(
            f"ImageNet image folder {str(root)!r} does not exist; point --image-root at the "
            "folder holding <wnid>/<image>.JPEG"
        )
    ids = sorted(set(ids))
    names: dict[str, str] = {}
    stimuli, missing = [], []
    for stimulus_id in ids:
        match = _IMAGENET_ID.match(stimulus_id)
        if not match:
            raise ValueError(
                f"{stimulus_id!r} is not an ImageNet image name (expected e.g. n02951358_31190)"
            )
        wnid = match.group(1)
        candidates = [
            folder / f"{stimulus_id}{suffix}"
            for folder in (root / wnid, root)
            for suffix in IMAGE_SUFFIXES
        ]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            missing.append(stimulus_id)
            continue
        if wnid not in names:
            names[wnid] = imagenet_class_name(wnid)
        stimuli.append(Stimulus(stimulus_id, path.resolve(), names[wnid]))
    if missing:
        raise _missing_error(
            missing,
            f"{root} (as <wnid>/<name>.JPEG or <name>.JPEG)",
            "Download the ImageNet-EEG stimulus images, or point --image-root at them",
        )
    return StimulusSet(stimuli)


# ------------------------------------------------------------------------------ dispatch


def id_kind(stimulus_id: str) -> str | None:
    """Which source an id's form belongs to (one of SOURCE_KINDS), or None if unknown."""
    if stimulus_id.startswith("synthetic:"):
        return "synthetic"
    if stimulus_id.startswith("things-eeg2:") or Path(stimulus_id).suffix in IMAGE_SUFFIXES:
        return "things-eeg2"
    if _IMAGENET_ID.match(stimulus_id):
        return "imagenet-eeg"
    return None


def stimuli_for(
    ids: Iterable[str],
    source_kind: str | None = None,
    image_root: str | Path | None = None,
    captions: str | Path | Mapping[str, str | list[str]] | None = None,
    render_dir: str | Path | None = None,
) -> StimulusSet:
    """The one entry point: resolve (or render) the stimuli of `ids`, then apply captions.

    `source_kind` (one of SOURCE_KINDS) may be left out: it is read off the ids' form. Ids of
    two different sources, or of a form no source writes, are an error.
    """
    ids = sorted({str(i) for i in ids if i is not None})
    if not ids:
        raise ValueError("no stimulus ids given; the shards' windows carry no stimulus_id")
    if source_kind is not None and source_kind not in SOURCE_KINDS:
        raise ValueError(f"source_kind={source_kind!r} is not one of {', '.join(SOURCE_KINDS)}")
    kinds: dict[str | None, list[str]] = {}
    for i in ids:
        kinds.setdefault(id_kind(i), []).append(i)
    if None in kinds:
        raise ValueError(
            f"stimulus id(s) {kinds[None][:_MAX_LISTED]} match no known source's id form "
            "(synthetic:cKK:iII, things-eeg2:<split>:<n>, <file>.jpg, nXXXXXXXX_<n>)"
        )
    if len(kinds) > 1:
        examples = {k: v[:3] for k, v in kinds.items()}
        raise ValueError(f"stimulus ids mix sources {examples}; embed one source at a time")
    kind = next(iter(kinds))
    if source_kind is not None and source_kind != kind:
        raise ValueError(
            f"source_kind={source_kind!r} but the ids look like {kind} ids (e.g. {ids[:3]})"
        )
    if kind == "synthetic":
        if render_dir is None:
            raise ValueError("synthetic stimuli are rendered: give render_dir, where to write them")
        from finetune.synthetic_stimuli import render_synthetic  # it builds on this module

        stimuli = render_synthetic(ids, render_dir)
    else:
        if image_root is None:
            raise ValueError(
                f"{kind} stimuli need the dataset's images: give image_root (--image-root)"
            )
        resolve = things_eeg2_stimuli if kind == "things-eeg2" else imagenet_eeg_stimuli
        stimuli = resolve(ids, image_root)
    if captions is not None:
        table = captions if isinstance(captions, Mapping) else load_captions(captions)
        stimuli = stimuli.with_captions(table)
    return stimuli
