"""Stop requests, SIGINT and SIGTERM alike, wherever a command stands: while the model loads, while class images are
drawn, in a validation grid, in a study. Each ends the command at once (loading) or within one sampler step or
training step, with exit code 130, one line on stderr naming what was kept and the command that continues, and no
lock file left. Counted in steps, not seconds: the signal is sent from inside the k-th scheduler step (or training
step), and at most one more may follow it."""

import json
import os
import shlex
import signal
from pathlib import Path

import pytest
import torch
from diffusers import EulerDiscreteScheduler
from helpers import tiny_train_args as train_args
from safetensors.torch import load_file

from krona_cli.cli import main
from krona_cli.evaluation import study
from krona_cli.lock import lock_path
from krona_cli.pipeline import models
from krona_cli.training.run import Run

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SIGNALS = pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])


class Killed(Exception):
    """A SIGTERM nobody answered (it would have killed the process)."""


@pytest.fixture(autouse=True)
def sigterm_raises():
    """Outside krona's own handling a SIGTERM raises Killed instead of ending the test run."""

    def kill(signum, frame):
        raise Killed

    previous = signal.signal(signal.SIGTERM, kill)
    yield
    signal.signal(signal.SIGTERM, previous)


class Signal:
    """Counts the calls of `owner.name` and sends `sig` to this process from inside call number `at`."""

    def __init__(self, monkeypatch, owner, name: str, sig: int, at: int):
        self.calls, self.at = 0, at
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            self.calls += 1
            if self.calls == at:
                os.kill(os.getpid(), sig)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)

    @property
    def after(self) -> int:
        """Calls begun after the one the signal came in."""
        return self.calls - self.at


def stopped(capsys, argv: list[str]) -> str:
    """Run krona; check it stopped with exit code 130 and one line on stderr; return the line."""
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 130, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def says(err: str, *texts: str) -> None:
    for text in texts:
        assert text in err, (text, err)


def test_a_second_ctrl_c_stops_at_once_and_the_handlers_come_back():
    from krona_cli import stopping

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with stopping.handling(["sample", "--prompt", "a cat"]), stopping.deferred():
        os.kill(os.getpid(), signal.SIGTERM)  # step-wise work: a flag, answered at the next check
        assert stopping.requested() and stopping.signal_name() == "SIGTERM"
        assert stopping.rerun("--overwrite") == "krona sample --prompt 'a cat' --overwrite"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(stopping.StopRequest):
            stopping.check()
        with pytest.raises(stopping.StopRequest), stopping.immediate("while loading"):
            pass  # work that writes nothing stops on entry
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert not stopping.requested() and stopping.rerun() == "the same command"


@SIGNALS
def test_a_stop_while_the_model_loads_stops_at_once(tiny_sdxl_dir, tmp_path, monkeypatch, capsys, sig):
    out, loaded = tmp_path / "run", []
    original = models.load_pipeline

    def load(*args, **kwargs):
        os.kill(os.getpid(), sig)
        loaded.append(True)  # not reached: the request stops the command where it stands
        return original(*args, **kwargs)

    monkeypatch.setattr(models, "load_pipeline", load)
    argv = train_args(tiny_sdxl_dir, out, "--steps", 2)
    err = stopped(capsys, argv)
    assert not loaded and not lock_path(out).exists() and not (out / "config.yaml").exists()
    says(err, f"stopped by {signal.Signals(sig).name} while loading the base model", "nothing was written")
    says(err, "run the same command again: krona " + shlex.join(argv))


@SIGNALS
def test_a_stop_in_the_class_images_keeps_those_drawn(tiny_sdxl_dir, tmp_path, monkeypatch, capsys, sig):
    out = tmp_path / "run"
    steps = Signal(monkeypatch, EulerDiscreteScheduler, "step", sig, at=6)  # 4 sampler steps an image: the 2nd one
    trained = Signal(monkeypatch, Run, "step", sig, at=0)
    more = ("--class-prompt", "a photo of a cat", "--num-class-images", 3, "--class-batch-size", 1, "--steps", 2)
    argv = train_args(tiny_sdxl_dir, out, *more)
    err = stopped(capsys, argv)
    assert steps.after <= 1 and trained.calls == 0
    assert len(list((out / "class-images").glob("*.png"))) == 1 and not lock_path(out).exists()
    says(err, f"class images: 1 of 3 are in '{out / 'class-images'}'", "continue with: krona " + shlex.join(argv))


@SIGNALS
def test_a_stop_in_a_validation_grid_checkpoints_its_step(tiny_sdxl_dir, tmp_path, monkeypatch, capsys, sig):
    out = tmp_path / "run"
    # the grid of step 0 is sampler steps 1-4, the grid of step 2 steps 5-8
    steps = Signal(monkeypatch, EulerDiscreteScheduler, "step", sig, at=6)
    trained = Signal(monkeypatch, Run, "step", sig, at=0)
    argv = train_args(tiny_sdxl_dir, out, "--steps", 4, "--validate-every", 2, "--scorer", "toy", "--sample-every", 0)
    err = stopped(capsys, argv)
    assert steps.after <= 1 and trained.calls == 2
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    assert [p["step"] for p in json.loads((out / "validation.json").read_text())["steps"]] == [0]
    assert not lock_path(out).exists() and not (out / "adapter.safetensors").exists()
    says(err, "at step 2 of 4", "step-000002 kept (the validation of that step is made when it resumes)")
    says(err, f"Resume with: krona train --config {out / 'config.yaml'} --resume latest")


def test_a_run_stopped_in_a_validation_grid_resumes_to_the_same_record(tiny_sdxl_dir, tmp_path, monkeypatch, capsys):
    more = ("--steps", 4, "--validate-every", 2, "--scorer", "toy", "--sample-every", 0, "--checkpoint-every", 0)
    assert main(train_args(tiny_sdxl_dir, tmp_path / "whole", *more)) == 0
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        Signal(patch, EulerDiscreteScheduler, "step", signal.SIGTERM, at=7)
        err = stopped(capsys, train_args(tiny_sdxl_dir, out, *more))
    assert [p["step"] for p in json.loads((out / "validation.json").read_text())["steps"]] == [0]  # cut short
    assert main(shlex.split(err.split("Resume with: krona ")[1])) == 0  # the command it says
    assert (out / "validation.json").read_text() == (tmp_path / "whole" / "validation.json").read_text()
    a, b = load_file(out / "adapter.safetensors"), load_file(tmp_path / "whole" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def study_args(pipeline: Path, out: Path) -> list[str]:
    return [
        "compare",
        "--study",
        "--output-dir",
        str(out),
        "--config",
        "tiny",
        "--pretrained-model",
        str(pipeline),
        "--instance-dir",
        str(EXAMPLES / "toy-subject"),
        "--steps",
        "2",
        "--lrs",
        "1e-3",
        "--factors",
        "4x4",
        "--ranks",
        "4",
        "--seeds",
        "1",
        "--num-images",
        "1",
    ]


@SIGNALS
def test_a_stop_in_a_study_keeps_its_runs(tiny_sdxl_dir, tmp_path, monkeypatch, capsys, sig):
    """Stopped in the base model's scores (a sampler step), then continued and stopped in its second run's
    training (a training step): the first run is kept, and the same command continues."""
    out, argv = tmp_path / "study", study_args(tiny_sdxl_dir, tmp_path / "study")
    again = "continue with: krona " + shlex.join(argv)  # 3 runs: krona and LoRA at the lr, then LoKr at krona's
    with monkeypatch.context() as patch:
        steps = Signal(patch, EulerDiscreteScheduler, "step", sig, at=3)
        err = stopped(capsys, argv)
    assert steps.after <= 1 and not (out / "results.json").exists()
    says(err, "during the base model's scores: 0 of 3 runs are kept", again)

    real = study._run
    monkeypatch.setattr(study, "_run", lambda *a: {"fake": True} if a[-1].method == "kron" else real(*a))
    trained = Signal(monkeypatch, Run, "step", sig, at=1)
    err = stopped(capsys, argv)
    results = json.loads((out / "results.json").read_text())
    assert trained.after <= 1 and "base" in results and list(results["runs"]) == ["kron-4x4-lr0.001-seed0"]
    says(err, "during run lora-4-lr0.001-seed0, which starts over: 1 of 3 runs are kept", again)


@pytest.mark.subprocess
def test_a_sigterm_to_a_real_process_exits_130_and_frees_the_lock(tiny_sd15_dir, tmp_path):
    """The same from outside: a SIGTERM as soon as `krona train` holds its lock (it is loading) ends it with the
    line, not a kill (exit -15, the lock left behind)."""
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    command = [sys.executable, "-m", "krona_cli", *train_args(tiny_sd15_dir, out, "--steps", 100000)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not lock_path(out).exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr and not lock_path(out).exists()
