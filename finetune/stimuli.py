"""What each stimulus id in the shards is: its image file, its concept and its captions.

EEG windows carry only a `stimulus_id` (and a label); the generation heads need the picture
and words behind it. The id's form says which dataset it came from (shards/sources/*.py):

    synthetic:c{k:02d}:i{i:02d}          synthetic source, class k, instance i: images are
                                         rendered here (`render_synthetic`), no data needed
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

import numpy as np
from PIL import Image, ImageDraw

from shards import storage

SOURCE_KINDS = ("synthetic", "things-eeg2", "imagenet-eeg")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPEG", ".JPG", ".PNG")
_MAX_LISTED = 10  # ids named in an error message

_SYNTHETIC_ID = re.compile(r"^synthetic:c(\d+):i(\d+)$")
_THINGS_INDEX_ID = re.compile(r"^things-eeg2:(training|test):(\d+)$")
_IMAGENET_ID = re.compile(r"^(n\d{8})_\d+$")
_CONCEPT_PREFIX = re.compile(r"^\d+_")  # THINGS concept folders are "00001_aardvark"
_THINGS_SPLIT_DIRS = {"training": "training_images", "test": "test_images"}
_THINGS_PER_CONCEPT = {"training": 10, "test": 1}


def concept_prompt(concept: str) -> str:
    """The caption a stimulus gets when none is given, and the zero-shot text of a concept."""
    return f"an image of {_article(concept)} {concept}"


def _article(word: str) -> str:
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


# ------------------------------------------------------------------------------ synthetic

# Class k -> shape SHAPES[k % 8] in colour k % 7, drawn in style STYLES[k // 8]; instance i ->
# position i % 5 and size i // 5. The class sets what covers most pixels (colour and shape), so
# images of one class sit together in any image embedding -- even a random-weight CLIP's --
# as a concept's images do in a real one, and held-out images of a known class are retrievable
# from EEG that mostly carries the class. Instances differ in where and how big, less.
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon")
STYLES = ("", "striped", "checked")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 150, 50),
    "blue": (40, 70, 220),
    "yellow": (235, 200, 20),
    "orange": (245, 130, 20),
    "purple": (130, 50, 170),
    "black": (20, 20, 20),
}
POSITIONS = {  # centre as a fraction of the image side
    "on the left": (0.3, 0.5),
    "on the right": (0.7, 0.5),
    "at the top": (0.5, 0.3),
    "at the bottom": (0.5, 0.7),
    "in the centre": (0.5, 0.5),
}
SIZES = {"small": 0.15, "large": 0.24}  # radius as a fraction of the image side
BACKGROUND = (235, 235, 235)
MAX_CLASSES = len(SHAPES) * len(STYLES)
MAX_INSTANCES = len(POSITIONS) * len(SIZES)
_SUPERSAMPLE = 4  # drawn at 4x and averaged down: smooth edges, still deterministic


def parse_synthetic_id(stimulus_id: str) -> tuple[int, int]:
    """(class, instance) of a ``synthetic:cKK:iII`` id."""
    match = _SYNTHETIC_ID.match(stimulus_id)
    if not match:
        raise ValueError(
            f"{stimulus_id!r} is not a synthetic stimulus id (expected synthetic:c<class>:i<inst>)"
        )
    return int(match.group(1)), int(match.group(2))


def synthetic_appearance(k: int, i: int) -> dict[str, str]:
    """The words for what class k, instance i shows: concept, colour, position, size."""
    if k >= MAX_CLASSES or i >= MAX_INSTANCES:
        raise ValueError(
            f"synthetic stimulus class {k}, instance {i}: the renderer tells apart "
            f"{MAX_CLASSES} classes and {MAX_INSTANCES} instances per class; build the "
            "synthetic shards with fewer classes/instances"
        )
    style = STYLES[k // len(SHAPES)]
    shape = SHAPES[k % len(SHAPES)]
    return {
        "shape": shape,
        "style": style,
        "concept": f"{style} {shape}".strip(),
        "colour": list(COLOURS)[k % len(COLOURS)],
        "position": list(POSITIONS)[i % len(POSITIONS)],
        "size": list(SIZES)[i // len(POSITIONS)],
    }


def synthetic_captions(k: int, i: int) -> list[str]:
    a = synthetic_appearance(k, i)
    concept, colour, position, size = a["concept"], a["colour"], a["position"], a["size"]
    return [
        f"a {size} {colour} {concept} {position}",
        f"{_article(colour)} {colour} {concept}",
        f"a picture of a {size} {colour} {concept} {position} on a grey background",
    ]


def _outline(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple]:
    """Polygon vertices of `shape` (not for circle/ring), rotated by `angle` radians."""
    if shape == "square":
        pts = [(r * np.cos(a), r * np.sin(a)) for a in np.pi / 4 + np.arange(4) * np.pi / 2]
    elif shape == "triangle":
        pts = [(r * np.cos(a), r * np.sin(a)) for a in -np.pi / 2 + np.arange(3) * 2 * np.pi / 3]
    elif shape == "star":
        pts = [
            (
                (r if j % 2 == 0 else 0.45 * r) * np.cos(a),
                (r if j % 2 == 0 else 0.45 * r) * np.sin(a),
            )
            for j, a in enumerate(-np.pi / 2 + np.arange(10) * np.pi / 5)
        ]
    elif shape == "cross":
        w = 0.32 * r
        pts = [
            (-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w),
            (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w),
        ]  # fmt: skip
    elif shape == "diamond":
        pts = [(0, -r), (0.6 * r, 0), (0, r), (-0.6 * r, 0)]
    elif shape == "hexagon":
        pts = [(r * np.cos(a), r * np.sin(a)) for a in np.arange(6) * np.pi / 3]
    else:
        raise AssertionError(shape)
    c, s = np.cos(angle), np.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def render_synthetic_image(k: int, i: int, size: int = 64, seed: int = 0) -> Image.Image:
    """The picture of synthetic class k, instance i: a coloured shape on a plain background.

    `seed` adds a small fixed jitter of position and rotation per stimulus (the same for a
    given seed), so images are not perfectly axis-aligned templates.
    """
    a = synthetic_appearance(k, i)
    rng = np.random.default_rng(np.random.SeedSequence([seed, k, i]))
    big = size * _SUPERSAMPLE
    fx, fy = POSITIONS[a["position"]]
    jx, jy = rng.uniform(-0.03, 0.03, 2)
    cx, cy, r = (fx + jx) * big, (fy + jy) * big, SIZES[a["size"]] * big
    angle = float(rng.uniform(-0.25, 0.25))  # radians, about +-15 degrees

    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    if a["shape"] in ("circle", "ring"):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        if a["shape"] == "ring":
            q = 0.6 * r
            draw.ellipse((cx - q, cy - q, cx + q, cy + q), fill=0)
    else:
        draw.polygon(_outline(a["shape"], cx, cy, r, angle), fill=255)
    inside = np.asarray(mask) > 0  # [H, W]
    if a["style"]:
        period = big // 8
        yy, xx = np.mgrid[0:big, 0:big]
        band = (yy // (period // 2)) % 2 == 0
        if a["style"] == "checked":
            band = band ^ ((xx // (period // 2)) % 2 == 0)
        inside &= band
    pixels = np.empty((big, big, 3), dtype=np.float64)
    pixels[:] = BACKGROUND
    pixels[inside] = COLOURS[a["colour"]]
    small = pixels.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    return Image.fromarray(np.round(small).astype(np.uint8), "RGB")


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)  # no metadata: same pixels -> same bytes
    return buf.getvalue()


def render_synthetic(
    ids: Iterable[str], out_dir: str | Path, size: int = 64, seed: int = 0
) -> StimulusSet:
    """Write one PNG per synthetic id to `out_dir` (a folder or an s3:// URL) and return the
    stimuli with captions.

    Same ids, size and seed give byte-identical files; a file that already holds those bytes
    is not rewritten, so its modification time (and anything keyed on it) stays put.
    """
    if size < 16:
        raise ValueError(f"size={size} is too small to draw a recognisable shape; use >= 16")
    if not storage.is_uri(out_dir):
        out_dir = Path(out_dir).resolve()
    storage.makedirs(out_dir)
    present = storage.list_sizes(out_dir)  # one listing, not a request per image
    stimuli = []
    for stimulus_id in sorted(set(ids)):
        k, i = parse_synthetic_id(stimulus_id)
        name = f"c{k:02d}_i{i:02d}.png"
        path = storage.join(out_dir, name)
        data = _png_bytes(render_synthetic_image(k, i, size=size, seed=seed))
        if present.get(name) != len(data) or storage.read_bytes(path) != data:
            storage.write_bytes(path, data)
        concept = synthetic_appearance(k, i)["concept"]
        stimuli.append(Stimulus(stimulus_id, path, concept, synthetic_captions(k, i)))
    return StimulusSet(stimuli)


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
