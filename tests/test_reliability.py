"""Nothing lost under kills and faults: SIGKILL at random moments and during checkpoint writes, non-finite losses,
running out of memory, changed photos, incomplete checkpoints left by a killed run."""

import multiprocessing
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from krona_cli.cli import main
from krona_cli.errors import KronaError
from krona_cli.families.ddpm import DDPM
from krona_cli.training.checkpoint import incomplete_leftovers
from krona_cli.training.config import load_config
from krona_cli.training.train import Reporter, train

pytestmark = pytest.mark.subprocess  # every test here starts krona or Python processes

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "cat"
PROMPT = "a photo of sks cat"


def _child(settings: dict, kill_at_file: int | None, steps) -> None:
    """A training run in a child process that reports each step on ``steps`` (a pipe) and, if asked, kills itself
    with SIGKILL in the middle of writing a checkpoint (after its k-th file, while the checkpoint is still a staging
    folder)."""
    from krona_cli.training import checkpoint

    written, original = 0, checkpoint.write_bytes_atomic

    def write(path, data):
        nonlocal written
        result = original(path, data)
        written += 1
        if written == kill_at_file:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    checkpoint.write_bytes_atomic = write

    class Steps(Reporter):
        def step(self, step, total, loss, lr):
            steps.send(step)

    train(load_config("tiny", settings), Steps())


# Children are forked from a server process that has imported krona, torch and diffusers once (multiprocessing's
# forkserver), so each of the ten starts takes a fraction of a second instead of a fresh interpreter's imports; each
# is still a process of its own, killed with SIGKILL.
_FORKS = multiprocessing.get_context("forkserver")
_FORKS.set_forkserver_preload(
    ["krona_cli.training.train", "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion", "accelerate"]
)


def settings(pipeline_dir, out, classes, **extra):
    return (
        dict(
            pretrained_model=str(pipeline_dir),
            instance_dir=str(EXAMPLES),
            prompt=PROMPT,
            output_dir=str(out),
            class_prompt="a photo of a cat",
            class_dir=str(classes),
            num_class_images=4,
            steps=40,
            checkpoint_every=2,
            keep_checkpoints=2,
            sample_every=0,
            random_flip=True,
            ema=True,
        )
        | extra
    )


def run_child(values: dict, kill_at_file: int | None, kill_after_step: int | None, delay: float) -> str:
    """Run _child; SIGKILL it `delay` s after its `kill_after_step`-th step. Returns how it ended."""
    receive, send = _FORKS.Pipe(duplex=False)
    process = _FORKS.Process(target=_child, args=(values, kill_at_file, send))
    process.start()
    send.close()
    steps = 0
    while steps != kill_after_step:
        try:
            receive.recv()
        except EOFError:  # the child ended (finished, or killed itself inside a checkpoint write)
            break
        steps += 1
    if steps == kill_after_step:
        time.sleep(delay)
        process.kill()
    process.join(timeout=300)
    receive.close()
    if process.exitcode not in (0, -signal.SIGKILL):
        raise AssertionError(f"the training child ended with {process.exitcode} (its traceback is above)")
    return "completed" if process.exitcode == 0 else "killed"


@pytest.mark.slow
def test_killed_ten_times_and_resumed_gives_the_same_adapter_bit_for_bit(tiny_sd15_dir, tmp_path):
    classes = tmp_path / "classes"
    straight = train(load_config("tiny", settings(tiny_sd15_dir, tmp_path / "straight", classes)))
    rng = random.Random(0)
    out = tmp_path / "killed"
    endings = []
    for kill in range(10):
        values = settings(tiny_sd15_dir, out, classes, resume="latest")
        if kill % 2:  # during a checkpoint write: after one of the first 12 checkpoint files (5 per checkpoint)
            endings.append(run_child(values, kill_at_file=rng.randint(1, 12), kill_after_step=None, delay=0))
        else:  # at a random moment between steps or inside one
            endings.append(run_child(values, None, kill_after_step=rng.randint(1, 4), delay=rng.uniform(0, 0.03)))
    assert endings.count("killed") >= 8, endings  # a run may finish before its kill comes
    assert incomplete_leftovers(out), "no kill landed inside a checkpoint write"
    if endings[-1] == "killed" or not (out / "adapter.safetensors").exists():
        assert run_child(settings(tiny_sd15_dir, out, classes, resume="latest"), None, None, 0) == "completed"
    a, b = load_file(straight.adapter), load_file(out / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_steps_are_skipped_and_counted(tiny_sd15_dir, tmp_path, monkeypatch):
    original, calls = DDPM.per_sample_loss, []

    def sometimes_nan(*args, **kwargs):
        calls.append(1)
        loss = original(*args, **kwargs)
        return loss * float("nan") if len(calls) in (2, 3) else loss

    monkeypatch.setattr(DDPM, "per_sample_loss", sometimes_nan)
    warnings = []

    class Warnings(Reporter):
        def warn(self, message):
            warnings.append(message)

    cfg = load_config(
        "tiny",
        dict(
            pretrained_model=str(tiny_sd15_dir),
            instance_dir=str(EXAMPLES),
            prompt=PROMPT,
            output_dir=str(tmp_path / "run"),
            steps=6,
            sample_every=0,
        ),
    )
    result = train(cfg, Warnings())
    assert result.bad_steps == 2 and result.step == 6
    assert sum("not finite; step skipped" in w for w in warnings) == 2
    saved = load_file(result.adapter)
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_too_many_non_finite_steps_stop_the_run_without_saving_nan(tiny_sd15_dir, tmp_path, monkeypatch, capsys):
    def nan_loss(objective, prediction, *args):
        return prediction.float().flatten(1).mean(1) * float("nan")

    monkeypatch.setattr(DDPM, "per_sample_loss", nan_loss)
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--config",
            "tiny",
            "--pretrained-model",
            str(tiny_sd15_dir),
            "--instance-dir",
            str(EXAMPLES),
            "--prompt",
            PROMPT,
            "--output-dir",
            str(out),
            "--steps",
            "20",
            "--max-bad-steps",
            "3",
            "--sample-every",
            "0",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "not finite for 3 steps in a row" in err and "--mixed-precision" in err and "--lr" in err
    assert "Traceback" not in err and not (out / "adapter.safetensors").exists()


def test_out_of_memory_is_one_message_with_the_flags_that_help(tiny_sd15_dir, tmp_path, monkeypatch, capsys):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setattr(DDPM, "per_sample_loss", out_of_memory)
    code = main(
        [
            "train",
            "--config",
            "tiny",
            "--pretrained-model",
            str(tiny_sd15_dir),
            "--instance-dir",
            str(EXAMPLES),
            "--prompt",
            PROMPT,
            "--output-dir",
            str(tmp_path / "run"),
            "--steps",
            "2",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for flag in ("--gradient-checkpointing", "--optimizer adamw8bit", "--resolution", "--batch-size"):
        assert flag in err


def test_resume_refuses_changed_photos_and_warns_about_incomplete_checkpoints(tiny_sd15_dir, tmp_path):
    photos = tmp_path / "photos"
    shutil.copytree(EXAMPLES, photos)
    values = dict(
        pretrained_model=str(tiny_sd15_dir),
        instance_dir=str(photos),
        prompt=PROMPT,
        output_dir=str(tmp_path / "run"),
        sample_every=0,
        checkpoint_every=2,
    )
    train(load_config("tiny", values | {"steps": 2}))
    leftover = tmp_path / "run" / "checkpoints" / ".step-000004.tmp-0123abcd"
    leftover.mkdir()
    (leftover / "params.safetensors").write_bytes(b"half")
    warnings = []

    class Warnings(Reporter):
        def warn(self, message):
            warnings.append(message)

    resumed = train(load_config("tiny", values | {"steps": 4, "resume": "latest"}), Warnings())
    assert resumed.step == 4 and any("incomplete checkpoint" in w and leftover.name in w for w in warnings)
    shutil.copy(photos / "cat-05.jpg", photos / "cat-06.jpg")
    with pytest.raises(KronaError, match="instance images changed.*added cat-06.jpg"):
        train(load_config("tiny", values | {"steps": 6, "resume": "latest"}))
