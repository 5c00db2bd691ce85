"""Reading the toy world's attributes back from a picture, with no model: background colour (the border pixels),
the object (the pixels far from the background), its colour (their median), its shape (its mask against rendered
templates of the five shapes, in its bounding box) and how much it looks like the subject (its pink).

Then the three scores of a personalised toy model, computed from pictures and the prompts that made them:

* **subject fidelity**: mean subject-look score of the pictures whose prompt names the subject (``sks``);
  **subject closeness** the same pictures' mean closeness to the subject's colour, a continuous score with no threshold;
* **prompt fidelity**: how often those pictures have the background their prompt asks for;
* **class accuracy** and **class look rate**: for the plain class prompt, how often each asked-for attribute is
  drawn, and how often the plain class is drawn with the subject's look (prior drift: compare base and adapted).
"""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass, field

import numpy as np

from .scenes import COLOURS, IDENTIFIER, SHAPES, SIZE, SUBJECT_RGB, shape_mask

_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
_NAMES = list(COLOURS)
_OBJECT_DISTANCE = 60.0  # RGB distance from the background beyond which a pixel is the object's
_MIN_OBJECT = 12  # pixels: fewer, and there is no object
_LOOK_DISTANCE = 80.0  # RGB distance within which a pixel has the subject's colour (every named one is >= 120 away)
_FAR = 200.0  # RGB distance from the subject's colour that counts as none of it (closeness 0)
_TEMPLATE = 16  # templates and masks compared at 16x16, in their bounding boxes


def nearest_colour(rgb) -> str:
    return _NAMES[int(np.argmin(((_PALETTE - np.asarray(rgb, dtype=np.float32)) ** 2).sum(axis=1)))]


def _resize(mask: np.ndarray, size: int = _TEMPLATE) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(mask.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR))


def _crop(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask > 0.5)
    return mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


@functools.cache
def _templates() -> dict[str, np.ndarray]:
    """Each shape's mask at a canonical size, cropped to its bounding box, at 16x16."""
    return {shape: _resize(_crop(shape_mask(shape, SIZE / 2, SIZE / 2, 20.0))) for shape in SHAPES}


@dataclass
class Reading:
    background: str
    colour: str | None  # None: no object found
    shape: str | None
    look: float  # subject-look score in [0, 1]: the share of the object's pixels in the subject's colour
    closeness: float  # in [0, 1]: how near the object's pixels are to the subject's colour, without a threshold


def read(image) -> Reading:
    """The attributes of one picture (a PIL image or an HxWx3 uint8 array; resized to 64x64)."""
    from PIL import Image

    if not isinstance(image, np.ndarray):
        image = np.asarray(image.convert("RGB"))
    if image.shape[:2] != (SIZE, SIZE):
        image = np.asarray(Image.fromarray(image).resize((SIZE, SIZE), Image.BILINEAR))
    pixels = image.astype(np.float32)
    border = np.concatenate(
        [
            pixels[:2].reshape(-1, 3),
            pixels[-2:].reshape(-1, 3),
            pixels[:, :2].reshape(-1, 3),
            pixels[:, -2:].reshape(-1, 3),
        ]
    )
    background_rgb = np.median(border, axis=0)
    mask = np.linalg.norm(pixels - background_rgb, axis=2) > _OBJECT_DISTANCE
    mask[:2], mask[-2:], mask[:, :2], mask[:, -2:] = False, False, False, False
    background = nearest_colour(background_rgb)
    if mask.sum() < _MIN_OBJECT:
        return Reading(background, None, None, 0.0, 0.0)
    colour = nearest_colour(np.median(pixels[mask], axis=0))
    crop = _resize(_crop(mask.astype(np.float32)))
    scores = {s: np.minimum(crop, t).sum() / np.maximum(crop, t).sum() for s, t in _templates().items()}
    distance = np.linalg.norm(pixels[mask] - np.array(SUBJECT_RGB, dtype=np.float32), axis=1)  # to the subject's
    return Reading(background, colour, max(scores, key=scores.get), _look(distance), _closeness(distance))


def _look(distance: np.ndarray) -> float:
    """How much the object has the subject's look: the share of its pixels near the subject's colour (`distance`:
    each pixel's RGB distance to it). A plain object of any named colour scores 0."""
    return float((distance < _LOOK_DISTANCE).mean())


def _closeness(distance: np.ndarray) -> float:
    """How near the object is to the subject's colour, as a continuous score: 1 − the mean over its pixels of their
    RGB distance to the subject's pink, each capped at _FAR, over _FAR. Unlike `_look` it has no threshold, so a
    nearly-pink object scores nearly 1 and a picture moves it by a little where `_look` jumps: fewer pictures tell
    two runs apart (the study's lower-noise measure)."""
    return float(1.0 - np.minimum(distance, _FAR).mean() / _FAR)


@dataclass
class Asked:
    """What a prompt asks of the world: any of background, object colour, shape; whether it names the subject."""

    background: str | None
    colour: str | None
    shape: str | None
    subject: bool


_COLOUR = "|".join(COLOURS)
_SHAPE = "|".join(SHAPES)


def parse(prompt: str, identifier: str = IDENTIFIER) -> Asked:
    """ "a photo of a red ring on a blue background" -> Asked("blue", "red", "ring", False); "a photo of sks square
    on a white background" -> Asked("white", None, "square", True)."""
    text = prompt.lower()
    background = re.search(rf"(?:on|in front of) (?:a |an )?({_COLOUR})\b", text)
    subject = re.search(rf"\b{re.escape(identifier.lower())}\b", text) is not None
    thing = re.search(rf"(?:\b({_COLOUR}) )?\b({_SHAPE})\b", text)
    return Asked(
        background.group(1) if background else None,
        thing.group(1) if thing and not subject else None,
        thing.group(2) if thing else None,
        subject,
    )


@dataclass
class ToyScores:
    subject_fidelity: float | None  # mean look score over pictures of the subject
    prompt_fidelity: float | None  # background accuracy over pictures of the subject that ask for one
    class_accuracy: float | None  # mean over class pictures of the share of asked attributes drawn
    class_background: float | None
    class_colour: float | None
    class_shape: float | None
    class_look_rate: float | None  # share of class pictures drawn with the subject's look (look > 0.5)
    subject_images: int
    class_images: int
    per_image: list[dict] = field(default_factory=list)
    subject_closeness: float | None = None  # mean closeness over pictures of the subject (`_closeness`)

    def to_dict(self) -> dict:
        return asdict(self)


def _mean(values: list) -> float | None:
    return float(np.mean(values)) if values else None


def score(images, prompts, identifier: str = IDENTIFIER) -> ToyScores:
    """The toy scores of pictures (PIL images or arrays) made from ``prompts`` (one per picture)."""
    subject_look, subject_near, subject_bg, bg, colour, shape, look, per_image = [], [], [], [], [], [], [], []
    for image, prompt in zip(images, prompts):
        got, asked = read(image), parse(prompt or "", identifier)
        row = {"prompt": prompt} | {f"read_{k}": v for k, v in asdict(got).items()}
        if asked.subject:
            subject_look.append(got.look)
            subject_near.append(got.closeness)
            if asked.background:
                subject_bg.append(got.background == asked.background)
        else:
            for wanted, found, into in (
                (asked.background, got.background, bg),
                (asked.colour, got.colour, colour),
                (asked.shape, got.shape, shape),
            ):
                if wanted:
                    into.append(found == wanted)
            look.append(got.look > 0.5)
        per_image.append(row)
    attributes = bg + colour + shape
    return ToyScores(
        _mean(subject_look),
        _mean(subject_bg),
        _mean(attributes),
        _mean(bg),
        _mean(colour),
        _mean(shape),
        _mean(look),
        len(subject_look),
        len(look),
        per_image,
        _mean(subject_near),
    )
