"""Validation while training (`--validate-every`, `--scorer`): the best-step rule on hand-made histories, the
validation prompts, refused settings, and on the tiny SDXL the whole record (validation.json, the plot, TensorBoard
scalars, the model card, best/adapter.safetensors holding the chosen step's weights) and an exact resume.
What the rule chooses on pictures that mean something is in test_validation_toy.py."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from krona_cli.cli import main
from krona_cli.errors import KronaError
from krona_cli.training.checkpoint import checkpoint_dir, load_checkpoint
from krona_cli.training.config import load_config
from krona_cli.training.train import Reporter, TrainingInterrupted, train
from krona_cli.training.validation import DREAMBENCH_CONTEXTS, History, choose, validation_prompts

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "cat"
PROMPT, CLASS_PROMPT = "a photo of sks cat", "a photo of a cat"


def point(step, subject, prompt, se=None):
    return {"step": step, "subject_fidelity": subject, "prompt_fidelity": prompt, "subject_fidelity_se": se}


def test_the_best_step_is_the_most_faithful_one_that_keeps_to_the_prompt():
    history = [point(0, 0.0, 1.0), point(100, 0.3, 1.0), point(200, 0.5, 0.95), point(300, 0.7, 0.6)]
    choice = choose(history, 0.1)
    assert choice.step == 200  # 300 draws the subject best but lost the prompt: 0.6 < 0.9 x 1.0
    assert "0.500" in choice.why and "0.900" in choice.why
    assert choose(history, 0.5).step == 300  # a wider margin lets it in


def test_of_steps_about_as_faithful_the_latest_is_chosen_and_step_0_never():
    # 0.46 is within the standard error (0.05) of the highest, 0.5: as good as its grid can tell, and trained longer
    assert choose([point(0, 0.9, 1.0), point(50, 0.5, 1.0, 0.05), point(100, 0.46, 1.0)], 0.1).step == 100
    assert choose([point(0, 0.9, 1.0), point(50, 0.5, 1.0, 0.05), point(100, 0.44, 1.0)], 0.1).step == 50
    assert choose([point(0, 0.9, 1.0), point(50, 0.5, 1.0), point(100, 0.5, 1.0)], 0.1).step == 100  # a tie
    assert choose([point(0, 0.9, 1.0)], 0.1) is None  # the base model alone: nothing trained to choose
    assert choose([{"step": 0, "instance_loss": 0.1}, {"step": 10, "instance_loss": 0.05}], 0.1) is None  # no scores


def test_validation_begun_at_a_resume_starts_the_rule_at_its_first_step():
    assert choose([point(40, 0.1, 0.8), point(60, 0.3, 0.75), point(80, 0.5, 0.6)], 0.1).step == 60


def test_when_every_step_loses_the_prompt_the_most_faithful_to_it_is_chosen():
    choice = choose([point(0, 0.0, 1.0), point(100, 0.9, 0.5), point(200, 0.2, 0.7)], 0.1)
    assert choice.step == 200 and "no step kept" in choice.why


def test_history_keeps_the_weights_of_the_chosen_step_only():
    history = History(0.1)
    weights = {"w": torch.zeros(2)}
    for p, value in ((point(0, 0.0, 1.0), 0.0), (point(1, 0.5, 1.0), 1.0), (point(2, 0.3, 1.0), 2.0)):
        weights["w"].fill_(value)
        history.add(p, lambda: weights)
    assert history.choice().step == 1 and torch.equal(history.best["w"], torch.ones(2))


def test_validation_prompts_put_the_subject_in_new_contexts():
    toy = validation_prompts("a photo of sks square", "toy", ["a photo of sks square on a red background"])
    assert "a photo of sks square on an orange background" in toy
    assert not any("red" in p for p in toy) and len(toy) == 7  # the world's 8 colours but the photos' own
    assert validation_prompts("a photo of sks dog", "clip") == [f"a photo of sks dog {c}" for c in DREAMBENCH_CONTEXTS]


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"scorer": "toy"}, "--validate-every 0 turns them off"),
        ({"validate_every": 5, "keep": "best"}, "--keep best needs --scorer"),
        ({"validate_every": 5, "scorer": "toy", "identifier": "zwx"}, "--identifier 'zwx' is not a word of --prompt"),
        ({"validate_every": 5, "scorer": "dino"}, "--scorer must be one of none, toy, clip"),
    ],
)
def test_validation_settings_that_cannot_work_are_refused(settings, message, tmp_path):
    with pytest.raises(KronaError, match=message):
        load_config("tiny", {"instance_dir": str(EXAMPLES), "prompt": PROMPT} | settings)


def config(pipeline_dir, out, **overrides):
    settings = dict(
        pretrained_model=str(pipeline_dir),
        instance_dir=str(EXAMPLES),
        prompt=PROMPT,
        class_prompt=CLASS_PROMPT,
        num_class_images=2,
        output_dir=str(out),
        steps=6,
        validate_every=2,
        scorer="toy",
        sample_every=0,
        checkpoint_every=2,
        keep_checkpoints=0,
    )
    return load_config("tiny", settings | overrides)


def test_a_run_records_every_validation_and_keeps_the_chosen_steps_weights(tiny_sdxl_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--config", "tiny", "--pretrained-model", str(tiny_sdxl_dir), "--instance-dir", str(EXAMPLES)]
    args += ["--prompt", PROMPT, "--class-prompt", CLASS_PROMPT, "--num-class-images", "2", "--output-dir", str(out)]
    args += ["--steps", "6", "--validate-every", "2", "--scorer", "toy", "--checkpoint-every", "2"]
    args += ["--keep-checkpoints", "0", "--sample-every", "0", "--report-to", "tensorboard", "--best-margin", "0.99"]
    assert main(args) == 0
    record = json.loads((out / "validation.json").read_text())
    steps = record["steps"]
    assert [p["step"] for p in steps] == [0, 2, 4, 6]
    for p in steps:
        assert p["instance_loss"] > 0 and p["class_loss"] > 0 and p["subject_fidelity_se"] >= 0
        assert 0 <= p["subject_fidelity"] <= 1 and 0 <= p["prompt_fidelity"] <= 1 and (out / p["grid"]).is_file()
    assert steps[0]["grid"] == "samples/step-000000.png"  # the base model's pictures, where the rule starts
    choice = choose(steps, 0.99)
    assert record["best"] == {"step": choice.step, "why": choice.why}
    assert f"best step {choice.step}" in capsys.readouterr().out
    # the kept adapter holds the chosen step's weights, as that step's checkpoint does
    best = load_file(out / "best" / "adapter.safetensors")
    params = load_checkpoint(checkpoint_dir(out, choice.step)).params
    assert set(best) == set(params) and all(torch.equal(best[k], params[k]) for k in params)
    last = load_file(out / "adapter.safetensors")
    assert all(torch.equal(last[k], v) for k, v in load_checkpoint(checkpoint_dir(out, 6)).params.items())
    assert (out / "validation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"The best step is **{choice.step}** of 6" in (out / "README.md").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    logged = events.Scalars("validation/subject_fidelity")
    assert [(e.step, e.value) for e in logged] == [(p["step"], pytest.approx(p["subject_fidelity"])) for p in steps]


def test_keep_best_writes_the_chosen_step_as_the_adapter(tiny_sdxl_dir, tmp_path):
    both = train(config(tiny_sdxl_dir, tmp_path / "both", steps=4, best_margin=0.99))
    best = train(config(tiny_sdxl_dir, tmp_path / "best", steps=4, best_margin=0.99, keep="best"))
    assert best.best.step == both.best.step and best.adapter == best.best_adapter
    assert not (tmp_path / "best" / "best").exists()
    a, b = load_file(both.best_adapter), load_file(best.adapter)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_validation_without_a_scorer_records_losses_and_chooses_nothing(tiny_sdxl_dir, tmp_path):
    result = train(config(tiny_sdxl_dir, tmp_path / "run", scorer="none", class_prompt=None))
    record = json.loads((tmp_path / "run" / "validation.json").read_text())
    assert [p["step"] for p in record["steps"]] == [0, 2, 4, 6] and record["best"] is None
    assert all(p["class_loss"] is None and "grid" not in p for p in record["steps"])
    assert result.best is None and not (tmp_path / "run" / "best").exists()
    assert not (tmp_path / "run" / "samples" / "step-000000.png").exists()  # no scorer: no grid at step 0
    assert "No best step is chosen without `--scorer`" in (tmp_path / "run" / "README.md").read_text()


def test_a_resumed_run_ends_with_the_same_validation_and_choice(tiny_sdxl_dir, tmp_path):
    class StopAtStep3(Reporter):
        def step(self, step, total, loss, lr):
            if step == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    whole = train(config(tiny_sdxl_dir, tmp_path / "whole", best_margin=0.99))
    out = tmp_path / "resumed"
    with pytest.raises(TrainingInterrupted):
        train(config(tiny_sdxl_dir, out, best_margin=0.99), StopAtStep3())
    resumed = train(config(tiny_sdxl_dir, out, best_margin=0.99, resume="latest"))
    assert resumed.start_step == 3
    assert (out / "validation.json").read_text() == (tmp_path / "whole" / "validation.json").read_text()
    assert resumed.best == whole.best
    a, b = load_file(whole.best_adapter), load_file(resumed.best_adapter)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_clip_scorer_scores_with_dino_and_clip_t(tiny_sdxl_dir, tmp_path):
    from krona_cli.pipeline.tiny import make_tiny_clip, make_tiny_dino

    clip, dino = make_tiny_clip(tmp_path / "clip"), make_tiny_dino(tmp_path / "dino")
    scorers = dict(scorer="clip", clip_model=str(clip), dino_model=str(dino))
    result = train(config(tiny_sdxl_dir, tmp_path / "run", steps=2, class_prompt=None, keep="last", **scorers))
    assert [p["step"] for p in result.validation] == [0, 2] and result.best.step == 2
    assert result.best_adapter is None and not (tmp_path / "run" / "best").exists()  # --keep last
    for p in result.validation:
        assert all(-1 <= p[k] <= 1 for k in ("subject_fidelity", "prompt_fidelity", "clip_i"))
    with pytest.raises(KronaError, match="--dino-model"):  # a missing scorer model stops the run before it trains
        train(config(tiny_sdxl_dir, tmp_path / "missing", **scorers | {"dino_model": str(tmp_path / "no-dino")}))
    assert not (tmp_path / "missing" / "config.yaml").exists()


def test_turning_validation_off_drops_a_presets_scorer_but_not_a_typed_one(tmp_path):
    """The toy preset sets --scorer toy: --validate-every 0 alone turns validation off; typing both names the way."""
    data = {"instance_dir": str(EXAMPLES), "prompt": PROMPT}
    assert load_config("toy", data | {"validate_every": 0}).scorer == "none"
    with pytest.raises(KronaError, match="pass --scorer none to train without validation"):
        load_config("toy", data | {"validate_every": 0, "scorer": "toy"})


def test_validating_without_a_scorer_says_that_no_best_step_is_kept(tiny_sdxl_dir, tmp_path, capsys):
    args = ["train", "--config", "tiny", "--pretrained-model", str(tiny_sdxl_dir), "--instance-dir", str(EXAMPLES)]
    args += ["--prompt", PROMPT, "--output-dir", str(tmp_path / "run"), "--steps", "2", "--validate-every", "1"]
    assert main([*args, "--scorer", "none", "--sample-every", "0", "--checkpoint-every", "0"]) == 0
    assert "no best step is chosen (--scorer toy or clip" in " ".join(capsys.readouterr().out.split())
