"""What the best-step rule chooses where the scores mean something: on the toy SDXL, a run driven to overfit picks a
step before its end that still draws the backgrounds asked for (the toy preset's run, which does not overfit, keeps
a step near its end: personalise.py)."""

import shutil
from pathlib import Path

import pytest

from krona_cli.training.config import load_config
from krona_cli.training.train import train

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "toy-subject"


@pytest.mark.slow
def test_an_overfitting_run_picks_a_step_before_its_end_that_keeps_to_the_prompt(toy_sdxl_dir, tmp_path):
    # The photos without their captions, as most DreamBooth runs train: each is only "a photo of sks square", so a
    # learning rate 20 times the preset's, without prior preservation, soon draws the photos' backgrounds for it.
    photos = tmp_path / "photos"
    photos.mkdir()
    for png in EXAMPLES.glob("*.png"):
        shutil.copy(png, photos)
    settings = dict(
        pretrained_model=str(toy_sdxl_dir),
        instance_dir=str(photos),
        prompt="a photo of sks square",
        output_dir=str(tmp_path / "run"),
        lr=1e-2,
        steps=400,
        validate_every=100,
        sample_every=0,
        checkpoint_every=0,
    )
    result = train(load_config("toy", settings))
    points = {p["step"]: p for p in result.validation}
    print({s: (p["subject_fidelity"], p["prompt_fidelity"]) for s, p in points.items()}, result.best)
    chosen, last = points[result.best.step], points[400]
    assert result.best.step < 400
    assert chosen["prompt_fidelity"] >= last["prompt_fidelity"] + 0.25  # 4 of the 16 pictures
    assert chosen["subject_fidelity"] >= last["subject_fidelity"] - 0.1
