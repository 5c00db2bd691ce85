"""The toy world: 64x64 scenes of one coloured shape on a plain background, and their captions.

Everything is drawn by this module from a seed, so every attribute of every picture is known exactly: the toy
pipelines are pretrained on these scenes (scripts/pretrain_toy.py) and the scorers (scorers.py) read the same
attributes back from generated pictures.

* 8 named colours, 5 shapes, an object of another colour than its background at a random position and size.
* Some (object colour, shape) pairs are held out of pretraining (:data:`HELD_OUT`), to test prompt following on
  combinations the model never saw.
* The subject: a pink square (:data:`SUBJECT_RGB`), a colour no pretraining scene has: the world's objects and
  backgrounds are only ever in the named colours. ``examples/toy-subject/`` holds its five instance photos
  (:func:`subject_photos`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

SIZE = 64  # pixels, square
_SUPERSAMPLE = 4  # coverage per pixel from a 4x4 grid of points: anti-aliased edges

#: Named colours (sRGB), far enough apart that a blurry generated picture still reads as one of them.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 140, 25),
    "yellow": (240, 220, 40),
    "green": (35, 165, 55),
    "blue": (35, 70, 215),
    "purple": (140, 50, 190),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "ring", "cross")

#: (object colour, shape) pairs no pretraining scene shows.
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("red", "ring"),
    ("green", "cross"),
    ("blue", "triangle"),
    ("yellow", "circle"),
    ("white", "square"),
    ("purple", "cross"),
)


@dataclass(frozen=True)
class Scene:
    """One picture's content: colours are names from :data:`COLOURS`, or :data:`SUBJECT_COLOUR` for the object
    (the subject's look)."""

    background: str
    colour: str
    shape: str
    x: float  # centre, pixels
    y: float
    size: float  # half the object's extent, pixels


#: The subject: its class (a shape) and its look, a pink no pretraining scene has (at least 120 RGB levels from
#: every named colour); the identifier that names it in prompts.
SUBJECT_CLASS = "square"
SUBJECT_COLOUR, SUBJECT_RGB = "pink", (250, 110, 190)
IDENTIFIER = "sks"
#: Backgrounds of the five instance photos; prompt fidelity asks for all the others.
SUBJECT_BACKGROUNDS = ("red", "green", "black", "green", "red")
NEW_BACKGROUNDS = tuple(c for c in COLOURS if c not in SUBJECT_BACKGROUNDS)
#: Plain class members the prior-drift score asks for: (object colour, background), none of them the subject's look.
CLASS_SCENES = (("red", "white"), ("green", "black"), ("orange", "blue"), ("purple", "yellow"), ("black", "white"))


def seen_pairs() -> list[tuple[str, str]]:
    """Every (object colour, shape) pair pretraining shows."""
    return [pair for pair in itertools.product(COLOURS, SHAPES) if pair not in HELD_OUT]


def _grid(size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Sample points: (size*S, size*S) arrays of x and y in pixel units, S points per pixel along each axis."""
    n = size * _SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / _SUPERSAMPLE
    return np.meshgrid(coords, coords)


def shape_mask(shape: str, x: float, y: float, size: float, grid=None) -> np.ndarray:
    """Coverage in [0, 1] of each pixel by ``shape`` centred at (x, y) with half-extent ``size``."""
    gx, gy = grid if grid is not None else _grid()
    dx, dy = gx - x, gy - y
    r = np.hypot(dx, dy)
    if shape == "circle":
        inside = r <= size
    elif shape == "square":
        inside = np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * size
    elif shape == "triangle":  # pointing up, base at the bottom
        top, bottom = -size, 0.75 * size
        half_width = size * (dy - top) / (bottom - top)
        inside = (dy >= top) & (dy <= bottom) & (np.abs(dx) <= half_width)
    elif shape == "ring":
        inside = (r <= size) & (r >= 0.55 * size)
    elif shape == "cross":
        arm = 0.32 * size
        inside = ((np.abs(dx) <= arm) & (np.abs(dy) <= size)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= size))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    n = inside.shape[0] // _SUPERSAMPLE
    return inside.reshape(n, _SUPERSAMPLE, n, _SUPERSAMPLE).mean(axis=(1, 3))


def render(scene: Scene, rng: np.random.Generator | None = None) -> np.ndarray:
    """The scene as a (64, 64, 3) uint8 RGB array. With ``rng``, each colour is jittered by a few levels, as a
    photo's would be."""
    grid = _grid()

    def colour(rgb) -> np.ndarray:
        base = np.array(rgb, dtype=np.float32)
        return base if rng is None else np.clip(base + rng.normal(0, 6, 3), 0, 255)

    image = np.broadcast_to(colour(COLOURS[scene.background]), (SIZE, SIZE, 3)).copy()
    mask = shape_mask(scene.shape, scene.x, scene.y, scene.size, grid)[..., None]
    image = image * (1 - mask) + colour(SUBJECT_RGB if scene.colour == SUBJECT_COLOUR else COLOURS[scene.colour]) * mask
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def random_scene(
    rng: np.random.Generator,
    pairs: list[tuple[str, str]] | None = None,
    background: str | None = None,
) -> Scene:
    """A scene drawn from ``rng``: an (object colour, shape) pair from ``pairs`` (default: the seen ones), a
    background of another colour (or ``background``), a size (half the extent) of 11 to 22 px and a position that
    keeps the object in the picture."""
    pairs = pairs or seen_pairs()
    colour, shape = pairs[rng.integers(len(pairs))]
    choices = [c for c in COLOURS if c != colour]
    background = background or choices[rng.integers(len(choices))]
    size = float(rng.uniform(11, 22))
    margin = size + 2
    x, y = (float(v) for v in rng.uniform(margin, SIZE - margin, 2))
    return Scene(background, colour, shape, x, y, size)


_PHOTO = ("a photo of", "a picture of", "an image of", "a photo of", "")


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption with varied wording; the object's colour or the background is sometimes left out (each 15%)."""
    opening = _PHOTO[rng.integers(len(_PHOTO))]
    drop = rng.random()
    text = f"a {scene.shape}" if drop < 0.15 else f"{article(scene.colour)} {scene.colour} {scene.shape}"
    if not 0.15 <= drop < 0.30:
        on = ("on {} {} background", "on {1}", "on {} {} background", "in front of {} {} background")
        text += " " + on[rng.integers(len(on))].format(article(scene.background), scene.background)
    return f"{opening} {text}".strip()


def prompt(shape: str, colour: str | None = None, background: str | None = None, identifier: str | None = None) -> str:
    """The canonical prompt for evaluation: "a photo of a red ring on a blue background", with the identifier
    before the class for the subject ("a photo of sks square on a white background")."""
    thing = f"{identifier} {shape}" if identifier else f"{article(colour)} {colour} {shape}" if colour else f"a {shape}"
    return f"a photo of {thing}" + (f" on {article(background)} {background} background" if background else "")


def article(word: str | None) -> str:
    return "an" if word and word[0] in "aeiou" else "a"


def subject_photos() -> list[tuple[np.ndarray, str]]:
    """The subject's five instance photos and their captions, always the same: the pink square on
    :data:`SUBJECT_BACKGROUNDS`, at varied positions and sizes."""
    rng = np.random.default_rng(2026)
    photos = []
    for background in SUBJECT_BACKGROUNDS:
        scene = random_scene(rng, [(SUBJECT_COLOUR, SUBJECT_CLASS)], background=background)
        photos.append((render(scene, rng), prompt(SUBJECT_CLASS, background=background, identifier=IDENTIFIER)))
    return photos


def eval_prompts(identifier: str = IDENTIFIER) -> list[str]:
    """The toy world's evaluation prompts: the subject on each new background (subject and prompt fidelity), then
    plain class members (prior drift)."""
    subject = [prompt(SUBJECT_CLASS, background=b, identifier=identifier) for b in NEW_BACKGROUNDS]
    return subject + [prompt(SUBJECT_CLASS, colour, background) for colour, background in CLASS_SCENES]


def dead_leaves(rng: np.random.Generator, shapes: int = 6) -> np.ndarray:
    """A picture of a few random shapes in random (not only named) colours, two-tone ones included, overlapping on
    a random background: what the toy VAE also learns to code, so that it can draw looks the world does not show
    (such as the subject's colour)."""
    grid = _grid()
    image = np.broadcast_to(rng.uniform(0, 255, 3), (SIZE, SIZE, 3)).copy()
    rows = (np.arange(SIZE) + 0.5)[:, None, None]
    for _ in range(int(rng.integers(1, shapes + 1))):
        shape = SHAPES[rng.integers(len(SHAPES))]
        size = float(rng.uniform(4, 26))
        x, y = (float(v) for v in rng.uniform(0, SIZE, 2))
        mask = shape_mask(shape, x, y, size, grid)[..., None]
        fill = rng.uniform(0, 255, 3)
        if rng.random() < 0.4:
            top = np.clip((y - rows) + 0.5, 0, 1)
            fill = top * fill + (1 - top) * rng.uniform(0, 255, 3)
        image = image * (1 - mask) + fill * mask
    return np.clip(np.round(image), 0, 255).astype(np.uint8)
