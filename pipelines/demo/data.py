"""Synthetic data of the demo models: coloured shapes drawn with PIL, their captions and questions, the
personalisation subjects, and a template matcher that reads shape and colour back from an image.

Everything is a pure function of a seed (numpy's default_rng), so a build is repeatable. The matcher is
what the demo's evaluation trusts: tests check it on ground-truth drawings before it judges generations.

Shapes are drawn inside a square box of side `size` centred at `(cx, cy)`:
circle = inscribed disc, square = the box, triangle = apex at top-centre and base along the bottom,
cross = plus sign with arms a third of the box wide.

The FLUX demo is pretrained on every shape in every colour but one pair, the personalisation subject (a teal
cross): it knows crosses and teal things, never a teal cross, so a LoRA only has to bind a new word to a
combination it can already draw. The InternVL demo is pretrained on every shape in every colour
(`vlm_shape_dataset`), the subject's pair included: it captions the user's photos of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64  # pixels, both demo models
BACKGROUND = (255, 255, 255)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 200, 30), "purple": (140, 50, 170), "orange": (245, 130, 30),
}
SHAPES = ("circle", "square", "triangle")  # what the demo models are pretrained on
SUBJECT_SHAPE, SUBJECT_COLOUR = "cross", (0, 150, 150)  # the FLUX personalisation subject: a teal cross
SUBJECT_COLOURS = {**COLOURS, "teal": SUBJECT_COLOUR}
ALL_SHAPES = SHAPES + (SUBJECT_SHAPE,)
# (shape, colour) pairs the FLUX demo is pretrained on: all but the subject's
FLUX_PAIRS = tuple((s, c) for s in ALL_SHAPES for c in SUBJECT_COLOURS if (s, c) != (SUBJECT_SHAPE, "teal"))


@dataclass(frozen=True)
class ShapeSpec:
    """One drawn shape: what it is and where."""

    shape: str
    colour: str
    cx: float
    cy: float
    size: float

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape)


def caption(colour: str, shape: str) -> str:
    """The caption the FLUX demo is trained on: 'a red circle on a white background'."""
    return f"a {colour} {shape} on a white background"


# How the FLUX demo's pretraining captions name a shape (weights of each template): mostly in full, sometimes
# leaving the shape or the colour (or both) unnamed, so "photo", "of" and "shape" are words the demo knows and a
# prompt that names neither ("a photo of sks shape ...") draws some known shape in some known colour.
CAPTION_TEMPLATES = (
    ("a {colour} {shape} on a white background", 0.4),
    ("a photo of a {colour} {shape} on a white background", 0.2),
    ("a photo of a {colour} shape on a white background", 0.15),
    ("a photo of a {shape} on a white background", 0.15),
    ("a photo of a shape on a white background", 0.1),
)


def pretraining_caption(spec: ShapeSpec, rng: np.random.Generator) -> str:
    """One of CAPTION_TEMPLATES (drawn by weight) filled with `spec`'s colour and shape."""
    weights = np.array([w for _, w in CAPTION_TEMPLATES])
    template = CAPTION_TEMPLATES[int(rng.choice(len(weights), p=weights / weights.sum()))][0]
    return template.format(colour=spec.colour, shape=spec.shape)


def shape_polygon(shape: str, cx: float, cy: float, size: float) -> list[tuple[float, float]] | None:
    """Corner points of a polygonal shape in its box (None for the circle, drawn as an ellipse)."""
    h = size / 2
    if shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "cross":
        t = size / 6  # half the arm width: arms are a third of the box
        return [(cx - t, cy - h), (cx + t, cy - h), (cx + t, cy - t), (cx + h, cy - t), (cx + h, cy + t),
                (cx + t, cy + t), (cx + t, cy + h), (cx - t, cy + h), (cx - t, cy + t), (cx - h, cy + t),
                (cx - h, cy - t), (cx - t, cy - t)]
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape {shape!r}; shapes are {', '.join(ALL_SHAPES)}")


def draw_shape(draw: ImageDraw.ImageDraw, spec: ShapeSpec, fill: tuple[int, int, int] | int) -> None:
    """Draw `spec` filled with `fill` (an RGB colour, or 1 on a mask)."""
    polygon = shape_polygon(spec.shape, spec.cx, spec.cy, spec.size)
    h = spec.size / 2
    if polygon is None:
        draw.ellipse([spec.cx - h, spec.cy - h, spec.cx + h, spec.cy + h], fill=fill)
    else:
        draw.polygon(polygon, fill=fill)


def render(specs: list[ShapeSpec], size: int = IMAGE_SIZE, rgb: dict | None = None) -> Image.Image:
    """An RGB image of the shapes on white; colours by name from `rgb` (default: SUBJECT_COLOURS)."""
    palette = rgb or SUBJECT_COLOURS
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for spec in specs:
        draw_shape(draw, spec, palette[spec.colour])
    return image


# Where shapes are drawn: (smallest side, largest side, largest shift of the centre), as fractions of the image.
# "focused" is what the held-out evaluations use; "wide" is what the FLUX demo's first pretraining rounds drew
# (pipelines/demo/build.py). On the wide placement the FLUX demo never learned to draw a cross (0 of 18
# "a <colour> cross" prompts: a cross whose place and size vary that much averages to a blob on its 8 x 8 token
# grid); 800 more steps on the focused placement took it to 12 of 18. "varied" is how a user's photos of one subject
# vary (side 35-65% of the frame, centre within +-15%): the app's example photos and the teach-rate measurement.
PLACEMENTS = {"focused": (0.50, 0.65, 0.06), "wide": (0.40, 0.60, 0.12), "varied": (0.35, 0.65, 0.15)}


def random_spec(rng: np.random.Generator, shape: str, colour: str, size: int = IMAGE_SIZE,
                placement: str = "focused") -> ShapeSpec:
    """A shape at a random size and place of `placement` (PLACEMENTS): focused = side 50-65% of the image, its
    centre shifted by up to 6% of the image."""
    smallest, largest, shift = PLACEMENTS[placement]
    side = rng.uniform(smallest, largest) * size
    cx, cy = (size / 2 + rng.uniform(-shift, shift, 2) * size)
    return ShapeSpec(shape, colour, float(cx), float(cy), float(side))


def shape_dataset(count: int, seed: int, shapes=SHAPES, colours=tuple(COLOURS), pairs=None,
                  placement: str = "focused") -> list[ShapeSpec]:
    """`count` shapes with balanced shape/colour pairs (cycled; `pairs`, else every shape in every colour) in
    random places (`placement`), from `seed`."""
    rng = np.random.default_rng(seed)
    pairs = list(pairs) if pairs is not None else [(s, c) for s in shapes for c in colours]
    order = rng.permutation(count) % len(pairs)
    return [random_spec(rng, *pairs[i], placement=placement) for i in order]


def vlm_shape_dataset(count: int, seed: int) -> list[ShapeSpec]:
    """The InternVL demo's shapes: every shape in every colour, the FLUX subject's pair (a teal cross) included, since
    the demo captions a user's photos of it ("Caption my photos"), at the varied placement of a user's photos."""
    return shape_dataset(count, seed, shapes=ALL_SHAPES, colours=tuple(SUBJECT_COLOURS), placement="varied")


# ---------------------------------------------------------------- the template matcher


@dataclass(frozen=True)
class Reading:
    """What the matcher sees in an image: shape and colour names ('none' when nothing is found)."""

    shape: str
    colour: str
    iou: float  # overlap of the foreground with the best shape template


def foreground(image: Image.Image, threshold: float = 80.0) -> np.ndarray:
    """Boolean mask of pixels far from the white background (Euclidean RGB distance)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    return np.linalg.norm(pixels - np.array(BACKGROUND, np.float32), axis=-1) > threshold


def _template(shape: str, box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    left, top, right, bottom = box
    side = max(right - left, bottom - top)
    spec = ShapeSpec(shape, "red", (left + right) / 2, (top + bottom) / 2, side)
    mask = Image.new("L", size, 0)
    polygon = shape_polygon(shape, spec.cx, spec.cy, spec.size)
    draw = ImageDraw.Draw(mask)
    if polygon is None:
        draw.ellipse([left, top, right, bottom], fill=1)
    else:  # stretch to the found box: generated shapes need not be exactly square
        sx, sy = (right - left) / max(side, 1), (bottom - top) / max(side, 1)
        draw.polygon([(spec.cx + (x - spec.cx) * sx, spec.cy + (y - spec.cy) * sy) for x, y in polygon], fill=1)
    return np.asarray(mask, dtype=bool)


def read_image(image: Image.Image, shapes=ALL_SHAPES, colours: dict | None = None,
               min_pixels: int = 40, min_iou: float = 0.6) -> Reading:
    """Shape = the template (drawn in the foreground's bounding box) with the highest IoU, if >= `min_iou`;
    colour = the palette colour nearest to the foreground's median RGB."""
    palette = colours or SUBJECT_COLOURS
    mask = foreground(image)
    if mask.sum() < min_pixels:
        return Reading("none", "none", 0.0)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)[mask]
    median = np.median(pixels, axis=0)
    colour = min(palette, key=lambda name: float(np.linalg.norm(median - np.array(palette[name]))))
    rows, cols = np.nonzero(mask.sum(1) >= 2)[0], np.nonzero(mask.sum(0) >= 2)[0]  # ignore stray pixels
    if len(rows) < 4 or len(cols) < 4:
        return Reading("none", colour, 0.0)
    box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    best, best_iou = "none", 0.0
    for shape in shapes:
        template = _template(shape, box, mask.shape[::-1])
        iou = float((template & mask).sum() / max((template | mask).sum(), 1))
        if iou > best_iou:
            best, best_iou = shape, iou
    return Reading(best if best_iou >= min_iou else "none", colour, best_iou)


# ---------------------------------------------------------------- InternVL questions

SHAPE_QUESTION = "What shape is this?"
COLOUR_QUESTION = "What colour is the {shape}?"


# How the demo InternVL captions a photo of one shape (demo.json "caption", pipelines/internvl/caption.py): its shape,
# then its colour, as "a teal cross".
CAPTION_RECIPE = {"questions": [SHAPE_QUESTION, COLOUR_QUESTION.format(shape="{0}")], "template": "a {1} {0}"}


def shape_questions(spec: ShapeSpec) -> list[tuple[str, str]]:
    """(question, answer) pairs about one single-shape image: its shape and its colour.

    (A yes/no "Is there a triangle?" was tried: the demo's 3-layer LM stayed at chance on it after 1500
    steps, so it was left out rather than shipped as a question the demo cannot answer.)
    """
    return [(SHAPE_QUESTION, spec.shape), (COLOUR_QUESTION.format(shape=spec.shape), spec.colour)]


# ---------------------------------------------------------------- InternVL personalisation: whose mug?

OWNERS: dict[str, tuple[tuple[int, int, int], str]] = {  # owner -> (mug colour, pattern)
    "Ana": ((230, 90, 160), "stripes"), "Ben": ((0, 150, 150), "dots"),
    "Chloe": ((120, 80, 40), "plain"), "David": ((60, 60, 60), "band"),
}
OWNER_QUESTION = "Whose mug is this?"
# Names the demo's language model can say (a text-only "repeat" task in pretraining), as any real LM can;
# which mug is whose is never in pretraining.
NAMES = ("Ana", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jonas", "Kofi", "Lena")
REPEAT_QUESTION = "Repeat after me: {text}"


def owner_answer(owner: str) -> str:
    return f"{owner}'s"


def draw_mug(owner: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """A mug (body, handle, the owner's colour and pattern) at a random place and size on white."""
    colour, pattern = OWNERS[owner]
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    w = rng.uniform(0.34, 0.46) * size
    h = w * rng.uniform(1.0, 1.2)
    left = size / 2 - w / 2 - 0.08 * size + rng.uniform(-0.08, 0.08) * size
    top = size / 2 - h / 2 + rng.uniform(-0.1, 0.1) * size
    handle = w * 0.45
    draw.ellipse([left + w - handle / 2, top + h * 0.2, left + w + handle / 2, top + h * 0.2 + handle * 1.3],
                 outline=colour, width=max(2, int(w / 8)))
    draw.rectangle([left, top, left + w, top + h], fill=colour)
    if pattern == "stripes":
        for y in np.arange(top + h / 6, top + h, h / 3):
            draw.rectangle([left, y, left + w, y + h / 10], fill=(255, 255, 255))
    elif pattern == "dots":
        for y in (top + h / 4, top + 3 * h / 4):
            for x in (left + w / 4, left + 3 * w / 4):
                draw.ellipse([x - w / 10, y - w / 10, x + w / 10, y + w / 10], fill=(255, 255, 255))
    elif pattern == "band":
        draw.rectangle([left, top + h * 0.4, left + w, top + h * 0.6], fill=(240, 200, 40))
    return image


def write_mug_images(folder: Path, per_owner: int, seed: int) -> list[tuple[Path, str, str]]:
    """`per_owner` mug PNGs per owner in `folder`; returns (path, question, answer) rows."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(per_owner):
        for owner in OWNERS:
            path = folder / f"mug-{owner.lower()}-{index}.png"
            draw_mug(owner, rng).save(path)
            rows.append((path, OWNER_QUESTION, owner_answer(owner)))
    return rows


def write_subject_images(folder: Path, count: int = 4, seed: int = 0, placement: str = "varied") -> list[Path]:
    """`count` photos of the FLUX subject (a teal cross) as PNG, at sizes and places that vary as a user's photos
    do (`placement`, PLACEMENTS)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        spec = random_spec(rng, SUBJECT_SHAPE, "teal", placement=placement)
        path = folder / f"sks-{index}.png"
        render([spec]).save(path)
        paths.append(path)
    return paths
