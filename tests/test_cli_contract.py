"""What the CLI promises whatever the user does: one run per folder, mistakes caught in one line before any model
loads with nothing lost, files others can read, no library chatter however krona was installed, and help that reads at
80 columns."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import tiny_train_args as train_args

from krona_cli.cli import app, main
from krona_cli.pipeline import models

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "cat"
KRONA = Path(sys.executable).parent / "krona"
PROMPT = "a photo of sks cat"


def clean_env(**extra) -> dict:
    """A new terminal: none of scripts/setup.sh's variables (the CLI must quiet the libraries itself)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "DIFFUSERS_"))}
    return env | {"OMP_NUM_THREADS": "1", "HF_HOME": str(extra.pop("hf_home")), **extra}


def one_line(capsys, argv, *expected) -> None:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    for text in expected:
        assert text in err, (text, err)


@pytest.fixture()
def no_model_loads(monkeypatch):
    monkeypatch.setattr(models, "load_pipeline", lambda *a, **k: pytest.fail("a model loaded"))


# --- one run per folder --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.subprocess
def test_two_trains_into_one_folder_then_a_kill_and_a_resume(tiny_sd15_dir, tmp_path):
    out = tmp_path / "run"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    slow = train_args(tiny_sd15_dir, out, "--steps", "400", "--checkpoint-every", "2", "--sample-every", "0")
    first = subprocess.Popen([str(KRONA), *slow], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock = out.parent / ".run.krona-lock"
        for _ in range(600):
            if (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("step-*")):
                break
            time.sleep(0.2)
        assert lock.is_file()
        second = subprocess.run([str(KRONA), *slow], env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        assert len(second.stderr.strip().splitlines()) == 1 and "is in use by `krona train`" in second.stderr
        assert first.poll() is None  # the first one trains on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    reached = max(int(p.name.removeprefix("step-")) for p in (out / "checkpoints").glob("step-*"))
    resumed = subprocess.run(
        [
            str(KRONA),
            *train_args(
                tiny_sd15_dir,
                out,
                "--steps",
                reached + 2,
                "--checkpoint-every",
                "2",
                "--sample-every",
                "0",
                "--resume",
                "latest",
            ),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "took over the lock" in resumed.stderr and "resumed" in resumed.stdout
    assert (out / "adapter.safetensors").is_file() and not lock.exists()


# --- mistakes: exit 2, one line, before any model loads, nothing lost ------------------------------------------------


def test_unwritable_and_file_outputs_are_caught_before_loading(tiny_sd15_dir, tmp_path, capsys, no_model_loads):
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    for flags in ([], ["--dry-run"]):
        one_line(capsys, train_args(tiny_sd15_dir, "/sys/krona-run", *flags), "cannot be written")
        one_line(capsys, train_args(tiny_sd15_dir, a_file, *flags), "is a file")
    one_line(capsys, ["merge", "--adapter", EXAMPLES / "cat-01.jpg", "--output-dir", a_file], "is a file")
    one_line(
        capsys, ["merge", "--adapter", EXAMPLES / "cat-01.jpg", "--output-dir", "/sys/merged"], "cannot be written"
    )
    assert a_file.read_text() == "mine"


def test_nothing_is_replaced_without_overwrite_or_that_krona_did_not_write(
    tiny_sd15_dir, tmp_path, capsys, no_model_loads
):
    from helpers import random_adapter

    from krona_cli.formats import save_adapter

    adapter = save_adapter(tmp_path / "a.safetensors", random_adapter("sd15"))
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep")
    one_line(capsys, ["merge", "--adapter", adapter, "--output-dir", theirs, "--overwrite"], "notes.txt")
    one_line(
        capsys, ["sample", "--adapter", adapter, "--prompt", "x", "--output-dir", theirs, "--overwrite"], "notes.txt"
    )
    one_line(capsys, ["make-tiny", theirs, "--overwrite"], "notes.txt")
    assert [p.name for p in theirs.iterdir()] == ["notes.txt"]
    existing = tmp_path / "lokr.safetensors"
    existing.write_bytes(b"old")
    one_line(capsys, ["export", "--adapter", adapter, "--to", "lycoris", "--output", existing], "--overwrite")
    one_line(
        capsys,
        ["export", "--adapter", adapter, "--to", "lycoris", "--output", tmp_path / "x.pt"],
        "must end in .safetensors",
    )
    assert existing.read_bytes() == b"old" and not (tmp_path / "x.pt").exists()


def test_sample_into_a_used_folder_replaces_only_with_overwrite(tiny_sd15_dir, tmp_path, capsys):
    out = tmp_path / "s"
    fast = ["sample", "--pretrained-model", tiny_sd15_dir, "--sample-steps", "1", "--output-dir", out]
    assert main([str(a) for a in [*fast, "--prompt", "a red cat", "-n", "3"]]) == 0
    before = sorted(p.name for p in out.iterdir())
    one_line(capsys, [*fast, "--prompt", "a blue cat", "-n", "1"], "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == before
    assert main([str(a) for a in [*fast, "--prompt", "a blue cat", "-n", "1", "--overwrite"]]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "p00-s0.png"]  # no image of the red cats is left


def test_files_are_written_with_the_users_umask(tiny_sd15_dir, tmp_path):
    from helpers import random_adapter

    from krona_cli.formats import save_adapter

    previous = os.umask(0o022)
    try:
        adapter = save_adapter(tmp_path / "a.safetensors", random_adapter("sd15"))
        assert (
            main(["export", "--adapter", str(adapter), "--to", "lycoris", "--output", str(tmp_path / "l.safetensors")])
            == 0
        )
        assert (
            main(
                [
                    "sample",
                    "--adapter",
                    str(adapter),
                    "--pretrained-model",
                    str(tiny_sd15_dir),
                    "--prompt",
                    "x",
                    "-n",
                    "1",
                    "--sample-steps",
                    "1",
                    "--output-dir",
                    str(tmp_path / "s"),
                ]
            )
            == 0
        )
    finally:
        os.umask(previous)
    for path in [adapter, tmp_path / "l.safetensors", *(tmp_path / "s").iterdir()]:
        assert path.stat().st_mode & 0o044 == 0o044, path  # group and others can read


def test_config_yaml_retrains_instead_of_resuming(tiny_sd15_dir, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(tiny_sd15_dir, out, "--steps", "2")) == 0
    again = tmp_path / "again"
    assert main(["train", "--config", str(out / "config.yaml"), "--output-dir", str(again)]) == 0
    assert not list((again / "checkpoints").glob("*")) or (again / "adapter.safetensors").is_file()
    from safetensors.torch import load_file

    first, second = load_file(out / "adapter.safetensors"), load_file(again / "adapter.safetensors")
    assert first.keys() == second.keys() and all((first[k] == second[k]).all() for k in first)  # the same run


# --- no library chatter ----------------------------------------------------------------------------------------------

CHATTER = re.compile(
    r"Warning|warnings\.warn|Retrying|it/s\]|Loading (pipeline components|weights)|Writing model "
    r"shards|Fetching|deprecated|huggingface\.co",
    re.IGNORECASE,
)


@pytest.mark.slow
@pytest.mark.subprocess
def test_no_library_chatter_in_a_clean_environment(tiny_sdxl_dir, tmp_path):
    env = clean_env(hf_home=tmp_path / "hf", HF_HUB_OFFLINE="1")
    run = subprocess.run(
        [
            str(KRONA),
            *train_args(
                tiny_sdxl_dir,
                tmp_path / "run",
                "--steps",
                "2",
                "--class-prompt",
                "a photo of a cat",
                "--num-class-images",
                "1",
                "--gradient-checkpointing",
                "--train-text-encoder",
            ),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    merge = subprocess.run(
        [
            str(KRONA),
            "merge",
            "--adapter",
            str(tmp_path / "run" / "adapter.safetensors"),
            "--output-dir",
            str(tmp_path / "merged"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    for done in (run, merge):
        assert done.returncode == 0, done.stderr
        assert not CHATTER.search(done.stdout + done.stderr), done.stdout + done.stderr


@pytest.mark.subprocess
def test_offline_eval_with_a_missing_scorer_fails_fast_and_quietly(tmp_path):
    env = clean_env(hf_home=tmp_path / "hf")  # not even HF_HUB_OFFLINE: the hub is simply not reachable here
    started = time.monotonic()
    done = subprocess.run(
        [
            str(KRONA),
            "eval",
            "--images",
            str(EXAMPLES),
            "--reference",
            str(EXAMPLES),
            "--prompt",
            "x",
            "--clip-model",
            "openai/clip-vit-base-patch32",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    took = time.monotonic() - started
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "hf download openai/clip-vit-base-patch32" in done.stderr and not CHATTER.search(done.stderr)
    assert took < 5, f"{took:.1f} s"


# --- help ------------------------------------------------------------------------------------------------------------


def _commands() -> list[str]:
    import typer

    return sorted(typer.main.get_command(app).commands)


@pytest.mark.parametrize("command", _commands())
def test_help_reads_at_80_columns(command, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    for flag in ("-h", "--help"):
        assert main([command, flag]) == 0
    text = capsys.readouterr().out
    assert all(len(line) <= 80 for line in text.splitlines()), max(text.splitlines(), key=len)
    assert "…" not in text and "(default:" not in text and "[default: (" not in text
    import typer

    click_command = typer.main.get_command(app).commands[command]
    for param in click_command.params:  # every visible flag's full name is in the help, uncut
        if not getattr(param, "hidden", False):
            assert all(name in text for name in (*param.opts, *param.secondary_opts) if name.startswith("--")), param


def test_unknown_flags_get_the_closest_one(capsys):
    one_line(capsys, ["train", "--learning-rate", "1e-4"], "did you mean --lr?")
    one_line(capsys, ["sample", "--num-image", "3"], "did you mean --num-images?")


def test_debug_anywhere_and_renamed_flags_still_work(tiny_sd15_dir, tmp_path, capsys):
    assert main(["plan", "--arch", "sd15", "--debug"]) == 0
    assert (
        main(
            [
                "sample",
                "--pretrained-model",
                str(tiny_sd15_dir),
                "--prompt",
                "x",
                "-n",
                "1",
                "--steps",
                "1",
                "--output-dir",
                str(tmp_path / "s"),
            ]
        )
        == 0
    )
    assert "--steps is now --sample-steps" in capsys.readouterr().err
