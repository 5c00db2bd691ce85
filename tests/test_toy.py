"""The pretrained toy pipelines: written by make-toy in seconds, loaded by plain diffusers offline, and drawing what
they are asked for; `krona eval --scorer toy` scores their pictures."""

import json

import pytest
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from typer.testing import CliRunner

from krona_cli.cli import app
from krona_cli.errors import KronaError
from krona_cli.evaluation.toy import draw, following_prompts
from krona_cli.pipeline.toy import make_toy
from krona_cli.world.scenes import CLASS_SCENES, HELD_OUT, NEW_BACKGROUNDS, eval_prompts, seen_pairs
from krona_cli.world.scorers import score

CLASSES = {"sdxl": StableDiffusionXLPipeline, "sd15": StableDiffusionPipeline, "flux": FluxPipeline}


@pytest.fixture(params=list(CLASSES))
def toy(request):
    return request.param, request.getfixturevalue(f"toy_{request.param}_dir")


def test_make_toy_writes_a_pipeline_plain_diffusers_loads(toy, tmp_path):
    arch, folder = toy
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe) is CLASSES[arch] and pipe.vae_scale_factor == 4
    if arch == "flux":  # 16x16x4 latents in 64 tokens of 16; 32 T5 tokens per prompt; dev's guidance input
        assert pipe.transformer.config.in_channels == 16 and pipe.transformer.config.guidance_embeds
        assert pipe.tokenizer_2.model_max_length == 32 and pipe.vae.config.sample_size == 64
    else:
        assert pipe.unet.config.sample_size == 16
    if arch == "sdxl":
        assert pipe.unet.config.addition_embed_type == "text_time" and pipe.text_encoder_2 is not None
    with pytest.raises(KronaError, match="--overwrite"):
        make_toy(folder, arch)
    assert make_toy(folder, arch, overwrite=True) == folder


#: Seen pairs' floors (background, colour, shape), then held-out pairs'. The toy FLUX draws its objects as blobs
#: (docs/toy.md: shapes 23% over 128 pictures, a blob reads as a circle): no shape floor for it yet.
FLOORS = {
    "sdxl": ((0.9, 0.8, 0.7), (0.8, 0.7, 0.5)),
    "sd15": ((0.9, 0.8, 0.7), (0.8, 0.7, 0.5)),
    "flux": ((0.9, 0.8, None), (0.8, 0.7, None)),
}


@pytest.mark.slow
def test_the_toy_pipelines_follow_prompts(toy):
    """At krona sample's defaults, on (colour, shape) pairs seen in pretraining: the first issue's bar (background >=
    90%, colour >= 80%, shape >= 70%; docs/toy.md: 100%, 99% and 96% for the toy SDXL, 100%, 96% and 96% for the toy
    SD 1.5, 100%, 96% and 23% for the toy FLUX over 128 pictures); on held-out pairs, lower floors (there: shapes 98%
    and 81%)."""
    arch, folder = toy
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    for (pairs, count, seed), floors in zip(((seen_pairs(), 32, 1), (list(HELD_OUT), 24, 2)), FLOORS[arch]):
        prompts = following_prompts(pairs, count, seed=seed)
        scores = score(draw(pipe, prompts, seed=seed), prompts)
        read = (scores.class_background, scores.class_colour, scores.class_shape)
        assert all(floor is None or value >= floor for value, floor in zip(read, floors)), (arch, read, floors)


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
