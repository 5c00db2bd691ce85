"""`accelerate launch` with two real CPU processes (gloo): one set of outputs, identical adapters on both ranks, a
checkpoint and a resume, and the same adapter as one process with the same global batch."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from krona_cli.errors import KronaError
from krona_cli.training.config import load_config
from krona_cli.training.train import train

pytestmark = [pytest.mark.subprocess, pytest.mark.slow]  # two real processes per run, about a minute

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "cat"
PROMPT, CLASS_PROMPT = "a photo of sks cat", "a photo of a cat"
ACCELERATE = Path(sys.executable).parent / "accelerate"


def settings(pipeline_dir, out, classes, **extra):
    return (
        dict(
            pretrained_model=str(pipeline_dir),
            instance_dir=str(EXAMPLES),
            prompt=PROMPT,
            output_dir=str(out),
            class_prompt=CLASS_PROMPT,
            class_dir=str(classes),
            num_class_images=6,
            random_flip=True,
            train_text_encoder=True,
            text_encoder_factors="4x4",
        )
        | extra
    )


def flags(values: dict) -> list[str]:
    out = []
    for key, value in values.items():
        out += (
            [f"--{key.replace('_', '-')}", str(value)]
            if not isinstance(value, bool)
            else [f"--{key.replace('_', '-')}"]
        )
    return out


def launch(pipeline_dir, out, classes, **extra):
    command = [
        str(ACCELERATE),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
        "-m",
        "krona_cli",
        "train",
        "--config",
        "tiny",
    ] + flags(settings(pipeline_dir, out, classes, **extra))
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def validation_steps(run: Path) -> list[dict]:
    return json.loads((run / "validation.json").read_text())["steps"]


def relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    num = sum(float(((a[k] - b[k]) ** 2).sum()) for k in a) ** 0.5
    return num / sum(float((b[k] ** 2).sum()) for k in b) ** 0.5


@pytest.fixture(scope="module")
def two_process_runs(tiny_sdxl_dir, tmp_path_factory):
    """A: 2 processes x batch 1 x 2 accumulation steps, 6 steps (checkpoints at 3 and 6); then B: resumed on 2
    processes to 10 steps. Text encoders are trained too (DDP must not wait for gradients that never come)."""
    root = tmp_path_factory.mktemp("ddp")
    out, classes = root / "run", root / "classes"
    common = dict(
        batch_size=1, grad_accum=2, checkpoint_every=3, sample_every=3, validate_every=3, report_to="tensorboard"
    )
    first = launch(tiny_sdxl_dir, out, classes, steps=6, **common)
    assert first.returncode == 0, first.stderr[-3000:]
    snapshot = root / "after-6-steps"
    shutil.copytree(out, snapshot)
    second = launch(tiny_sdxl_dir, out, classes, steps=10, resume="latest", **common)
    assert second.returncode == 0, second.stderr[-3000:]
    return {"root": root, "out": out, "classes": classes, "snapshot": snapshot, "first": first, "second": second}


def test_two_processes_write_one_set_of_outputs(two_process_runs):
    runs = two_process_runs
    for result, validations in ((runs["first"], 3), (runs["second"], 2)):  # steps 0, 3, 6; then 9, 10
        assert "all 2 processes hold bit-identical adapter weights" in result.stdout
        assert result.stdout.count("krona train") == 1  # one summary table: only the main process reports
        assert result.stdout.count("validation at step") == validations
    assert sorted(p.name for p in runs["classes"].iterdir()) == [f"class-{i:05d}.png" for i in range(6)]
    snapshot = runs["snapshot"]
    assert sorted(p.name for p in (snapshot / "samples").iterdir()) == ["step-000003.png", "step-000006.png"]
    assert sorted(p.name for p in (snapshot / "checkpoints").iterdir()) == ["step-000003", "step-000006"]
    events = list((snapshot / "logs").rglob("events.out.tfevents.*"))  # <time>.<host>.<pid>.<n>; hparams get their own
    assert events and len({p.name.split(".")[-2] for p in events}) == 1  # written by one process only
    out = runs["out"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000006", "step-000009", "step-000010"]
    # validated by the main process alone, once per validation step, and carried across the resume
    assert [p["step"] for p in validation_steps(snapshot)] == [0, 3, 6]
    validations = validation_steps(out)
    assert [p["step"] for p in validations] == [0, 3, 6, 9, 10]
    assert all(math.isfinite(p["instance_loss"]) for p in validations)
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temp files left behind


def test_two_processes_match_one_process_with_the_same_global_batch(two_process_runs, tiny_sdxl_dir):
    runs = two_process_runs
    one = train(
        load_config(
            "tiny",
            settings(
                tiny_sdxl_dir,
                runs["root"] / "one",
                runs["classes"],
                steps=10,
                batch_size=4,
                checkpoint_every=3,
                sample_every=0,
            ),
        )
    )
    two = load_file(runs["out"] / "adapter.safetensors")
    assert relative_difference(two, load_file(one.adapter)) < 1e-5
    assert any(t.abs().sum() > 0 for k, t in two.items() if k.startswith("text_encoder_2."))


def test_a_two_process_checkpoint_resumes_on_one_process(two_process_runs, tiny_sdxl_dir):
    runs = two_process_runs
    resumed = train(
        load_config(
            "tiny",
            settings(
                tiny_sdxl_dir,
                runs["snapshot"],
                runs["classes"],
                steps=10,
                batch_size=4,
                resume="latest",
                checkpoint_every=3,
                sample_every=0,
            ),
        )
    )
    assert resumed.step == 10 and len(resumed.losses) == 4
    two = load_file(runs["out"] / "adapter.safetensors")
    assert relative_difference(load_file(resumed.adapter), two) < 1e-5
    with pytest.raises(KronaError, match="global batch of 4.*multiply to 4"):
        train(
            load_config(
                "tiny",
                settings(tiny_sdxl_dir, runs["snapshot"], runs["classes"], steps=12, batch_size=2, resume="latest"),
            )
        )
