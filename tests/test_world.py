"""The toy world and its scorers, on rendered ground truth: every attribute read back, the subject told from its class,
prompts parsed, the shipped instance photos rendered by the project."""

from pathlib import Path

import numpy as np
from PIL import Image

from krona_cli.world.scenes import (
    COLOURS,
    HELD_OUT,
    NEW_BACKGROUNDS,
    SHAPES,
    SUBJECT_BACKGROUNDS,
    SUBJECT_CLASS,
    SUBJECT_COLOUR,
    SUBJECT_RGB,
    caption,
    eval_prompts,
    random_scene,
    render,
    seen_pairs,
    subject_photos,
)
from krona_cli.world.scorers import parse, read, score

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "toy-subject"
ALL_PAIRS = [(c, s) for c in COLOURS for s in SHAPES]


def roc_auc(positives, negatives) -> float:
    """P(a positive scores above a negative), ties counting half."""
    pos, neg = np.asarray(positives)[:, None], np.asarray(negatives)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def test_the_world_has_the_promised_size_and_holds_pairs_out():
    assert len(COLOURS) >= 6 and len(SHAPES) >= 5
    assert set(HELD_OUT).isdisjoint(seen_pairs()) and len(seen_pairs()) + len(HELD_OUT) == len(ALL_PAIRS)
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = random_scene(rng)
        assert (scene.colour, scene.shape) not in HELD_OUT and scene.colour != scene.background


def test_rendering_is_deterministic_in_the_seed():
    def draw(seed):
        rng = np.random.default_rng(seed)
        return [render(random_scene(rng), rng) for _ in range(5)]

    assert all((a == b).all() for a, b in zip(draw(3), draw(3)))
    assert any((a != b).any() for a, b in zip(draw(3), draw(4)))


def test_every_attribute_is_read_back_from_renders_at_least_98_percent():
    rng = np.random.default_rng(11)
    scenes = [random_scene(rng, ALL_PAIRS) for _ in range(400)]
    readings = [read(render(s, rng)) for s in scenes]
    for attribute in ("background", "colour", "shape"):
        right = np.mean([getattr(r, attribute) == getattr(s, attribute) for r, s in zip(readings, scenes)])
        assert right >= 0.98, (attribute, right)


def test_an_image_of_another_size_is_read_at_64_px():
    rng = np.random.default_rng(5)
    scene = random_scene(rng, [("red", "cross")], background="white")
    big = Image.fromarray(render(scene)).resize((128, 128), Image.NEAREST)
    assert (read(big).background, read(big).colour, read(big).shape) == ("white", "red", "cross")


def test_an_empty_picture_has_no_object():
    plain = np.full((64, 64, 3), COLOURS["blue"], dtype=np.uint8)
    reading = read(plain)
    assert (reading.background, reading.colour, reading.shape, reading.look) == ("blue", None, None, 0.0)


def test_the_subjects_colour_is_none_of_the_worlds():
    assert SUBJECT_COLOUR not in COLOURS
    distances = [np.linalg.norm(np.subtract(SUBJECT_RGB, rgb)) for rgb in COLOURS.values()]
    assert min(distances) >= 120, distances


def test_subject_fidelity_tells_the_subject_from_its_class():
    rng = np.random.default_rng(7)
    subject = [read(render(random_scene(rng, [(SUBJECT_COLOUR, SUBJECT_CLASS)]), rng)).look for _ in range(150)]
    plain = [read(render(random_scene(rng, [(c, SUBJECT_CLASS) for c in COLOURS]), rng)).look for _ in range(150)]
    others = [read(render(random_scene(rng, ALL_PAIRS), rng)).look for _ in range(150)]
    assert roc_auc(subject, plain) >= 0.95 and roc_auc(subject, others) >= 0.95


def test_subject_closeness_tells_the_subject_from_its_class_and_grades_the_colours_between():
    rng = np.random.default_rng(7)
    subject = [read(render(random_scene(rng, [(SUBJECT_COLOUR, SUBJECT_CLASS)]), rng)) for _ in range(100)]
    plain = [read(render(random_scene(rng, [(c, SUBJECT_CLASS) for c in COLOURS]), rng)) for _ in range(100)]
    assert roc_auc([r.closeness for r in subject], [r.closeness for r in plain]) >= 0.95
    assert min(r.closeness for r in subject) > 0.8 and max(r.closeness for r in plain) < 0.5

    def square_of(rgb) -> np.ndarray:  # a flat object of this colour on the blue background
        image = np.zeros((64, 64, 3), np.uint8) + np.array(COLOURS["blue"], np.uint8)
        image[20:44, 20:44] = np.round(rgb).astype(np.uint8)
        return image

    blends = [
        read(square_of((1 - t) * np.array(SUBJECT_RGB) + t * np.array(COLOURS["red"]))) for t in np.linspace(0, 1, 6)
    ]
    near = [r.closeness for r in blends]
    assert near[0] > 0.99 and all(a > b for a, b in zip(near, near[1:])), near  # graded all the way
    assert len({r.look for r in blends}) == 2  # where the look score only jumps once, at its threshold


def test_prompts_are_parsed_into_what_they_ask():
    assert parse("a photo of a red ring on a blue background").__dict__ == dict(
        background="blue", colour="red", shape="ring", subject=False
    )
    assert parse("an orange cross in front of a white background").colour == "orange"
    assert parse("a photo of sks square on a white background").__dict__ == dict(
        background="white", colour=None, shape="square", subject=True
    )
    assert parse("a picture of a triangle").__dict__ == dict(
        background=None, colour=None, shape="triangle", subject=False
    )
    rng = np.random.default_rng(1)
    for _ in range(200):  # every training caption asks for what its scene shows, or leaves it out
        scene = random_scene(rng)
        asked = parse(caption(scene, rng))
        assert asked.shape == scene.shape and asked.background in (None, scene.background)
        assert asked.colour in (None, scene.colour)


def test_scores_of_renders_of_the_evaluation_prompts_are_perfect():
    rng = np.random.default_rng(2)
    prompts = eval_prompts()
    images = []
    for p in prompts:
        asked = parse(p)
        if asked.subject:
            scene = random_scene(rng, [(SUBJECT_COLOUR, SUBJECT_CLASS)], background=asked.background)
        else:
            scene = random_scene(rng, [(asked.colour, asked.shape)], background=asked.background)
        images.append(render(scene, rng))
    scores = score(images, prompts)
    assert scores.subject_images == len(NEW_BACKGROUNDS) and scores.class_images == len(prompts) - len(NEW_BACKGROUNDS)
    assert scores.subject_fidelity > 0.7 and scores.prompt_fidelity == 1.0
    assert scores.class_accuracy == 1.0 and scores.class_look_rate == 0.0
    swapped = score(images[::-1], prompts)  # the class pictures read as the subject and the other way round
    assert swapped.subject_fidelity < 0.1 and swapped.class_look_rate > 0


def test_the_shipped_instance_photos_are_the_worlds_renders():
    photos = subject_photos()
    files = sorted(EXAMPLES.glob("*.png"))
    assert len(files) == len(photos) == 5
    for path, (pixels, text) in zip(files, photos):
        assert (np.asarray(Image.open(path).convert("RGB")) == pixels).all(), path
        assert path.with_suffix(".txt").read_text().strip() == text
        assert read(pixels).look > 0.7
    assert {parse(t).background for _, t in photos} == set(SUBJECT_BACKGROUNDS)
    assert set(NEW_BACKGROUNDS).isdisjoint(SUBJECT_BACKGROUNDS)
