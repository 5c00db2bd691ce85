"""The toy world's scores (world/scorers.py) of image files (what `krona eval --scorer toy` reports) and of a
pipeline over the evaluation prompts (the personalisation tests and `krona compare --study`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..world.scorers import ToyScores, score


def score_files(paths: Sequence[Path], prompts: Sequence[str | None], identifier: str = "sks") -> ToyScores:
    """Score each image file against the prompt that made it; per-image rows name their file."""
    from ..images import load_image

    images = [load_image(Path(p)) for p in paths]
    scores = score(images, prompts, identifier)
    for row, path in zip(scores.per_image, paths):
        row["file"] = str(path)
    return scores


def following_prompts(pairs, count: int, seed: int = 0) -> list[str]:
    """``count`` prompts "a photo of a <colour> <shape> on a <background> background" over (colour, shape)
    ``pairs`` in turn, each with a background of another colour drawn from ``seed``."""
    import numpy as np

    from ..world.scenes import COLOURS, prompt

    rng = np.random.default_rng(seed)
    prompts = []
    for i in range(count):
        colour, shape = pairs[i % len(pairs)]
        others = [c for c in COLOURS if c != colour]
        prompts.append(prompt(shape, colour, others[rng.integers(len(others))]))
    return prompts


def draw(
    pipe, prompts: Sequence[str], seed: int = 0, steps: int | None = None, guidance: float | None = None, batch_size=16
):
    """The pipeline's pictures of ``prompts`` (PIL images), picture i from a generator seeded ``seed + i``, at the
    pipeline's own scheduler and native size, as `krona sample` draws them: ``steps`` and ``guidance`` (None: the
    family's sampling defaults, SD 30 steps at 7.0, FLUX.1 [dev] 28 at 3.5)."""
    import torch

    from .. import families
    from ..inference.sampling import SampleConfig, image_size

    config = SampleConfig(steps=steps, guidance=guidance).for_model(pipe)
    width, height = image_size(pipe, config)
    settings = dict(num_inference_steps=config.steps, guidance_scale=config.guidance, width=width, height=height)
    settings |= families.recognise_pipeline(pipe, type(pipe).__name__).call_kwargs(pipe)
    images = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        generators = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(len(batch))]
        with torch.no_grad():
            images += pipe(batch, generator=generators, **settings).images
    return images


def pipeline_scores(pipe, per_prompt: int, subject_only: bool = False, identifier: str = "sks") -> ToyScores:
    """The toy scores of a pipeline over the evaluation prompts (world/scenes.py), ``per_prompt`` pictures each, the
    same seeds always; with ``subject_only``, only the subject's prompts (the same pictures of them: they come
    first), for what reads subject and prompt fidelity alone."""
    from ..world.scenes import NEW_BACKGROUNDS, eval_prompts

    pipe.set_progress_bar_config(disable=True)
    prompts = [p for p in eval_prompts(identifier) for _ in range(per_prompt)]
    if subject_only:
        prompts = prompts[: len(NEW_BACKGROUNDS) * per_prompt]
    return score(draw(pipe, prompts, seed=100), prompts, identifier)
