"""The synthetic source's stimuli, drawn here: one image and its captions per class and instance.

The synthetic EEG source (shards/sources/synthetic.py) plants class patterns in its windows and
tags them ``synthetic:cKK:iII``; these images and captions stand behind those ids, so the demo
and the tests train and score the image, text and retrieval heads with no dataset downloaded.
Drawing is deterministic (same id, size and seed -> byte-identical PNG).
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from finetune.stimuli import Stimulus, StimulusSet, article
from shards import storage

_SYNTHETIC_ID = re.compile(r"^synthetic:c(\d+):i(\d+)$")

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
        f"{article(colour)} {colour} {concept}",
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
