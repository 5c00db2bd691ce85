"""The pretrained toy pipelines: written by make-toy in seconds, loaded by plain diffusers offline, and drawing what
they are asked for; `krona eval --scorer toy` scores their pictures."""

import json

import pytest
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from typer.testing import CliRunner

from krona_cli.cli import app
from krona_cli.errors import KronaError
from krona_cli.evaluation.toy import draw, following_prompts
from krona_cli.pipeline.toy import make_toy
from krona_cli.world.scenes import CLASS_SCENES, HELD_OUT, NEW_BACKGROUNDS, eval_prompts, seen_pairs
from krona_cli.world.scorers import score

CLASSES = {"sdxl": StableDiffusionXLPipeline, "sd15": StableDiffusionPipeline}


@pytest.fixture(params=["sdxl", "sd15"])
def toy(request):
    return request.param, request.getfixturevalue(f"toy_{request.param}_dir")


def test_make_toy_writes_a_pipeline_plain_diffusers_loads(toy, tmp_path):
    arch, folder = toy
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe) is CLASSES[arch] and pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size == 16
    if arch == "sdxl":
        assert pipe.unet.config.addition_embed_type == "text_time" and pipe.text_encoder_2 is not None
    with pytest.raises(KronaError, match="--overwrite"):
        make_toy(folder, arch)
    assert make_toy(folder, arch, overwrite=True) == folder


@pytest.mark.slow
def test_the_toy_pipelines_follow_prompts(toy):
    """At krona sample's defaults, on (colour, shape) pairs seen in pretraining: the issue's bar (background >= 90%,
    colour >= 80%, shape >= 70%; docs/toy.md: 100%, 99% and 96% for the toy SDXL, 100%, 96% and 96% for the toy
    SD 1.5 over 128 pictures); on held-out pairs, lower floors (there: shapes 98% and 81%)."""
    arch, folder = toy
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    prompts = following_prompts(seen_pairs(), 32, seed=1)
    seen = score(draw(pipe, prompts, seed=1), prompts)
    assert seen.class_background >= 0.9 and seen.class_colour >= 0.8 and seen.class_shape >= 0.7, seen
    prompts = following_prompts(list(HELD_OUT), 24, seed=2)
    held = score(draw(pipe, prompts, seed=2), prompts)
    assert held.class_background >= 0.8 and held.class_colour >= 0.7 and held.class_shape >= 0.5, held


def test_eval_scores_toy_pictures(toy_sdxl_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(eval_prompts()) + "\n")
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "sample",
            "--pretrained-model",
            str(toy_sdxl_dir),
            "--prompts-file",
            str(prompts),
            "-n",
            "1",
            "--sample-steps",
            "10",
            "--output-dir",
            str(tmp_path / "base"),
        ],
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "scores.json"
    result = runner.invoke(app, ["eval", "--scorer", "toy", "--images", str(tmp_path / "base"), "--output", str(out)])
    assert result.exit_code == 0, result.output
    scores = json.loads(out.read_text())
    assert scores["subject_images"] == len(NEW_BACKGROUNDS) and scores["class_images"] == len(CLASS_SCENES)
    assert scores["scorer"] == "toy"
    assert len(scores["per_image"]) == len(eval_prompts()) and all(
        row["file"].endswith(".png") for row in scores["per_image"]
    )
    assert "subject fidelity" in result.output and "class accuracy" in result.output
    result = runner.invoke(app, ["eval", "--images", str(tmp_path / "base")])  # --scorer clip, the default
    assert isinstance(result.exception, KronaError) and "--reference" in str(result.exception)
