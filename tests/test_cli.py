"""The CLI's entry points and its handling of failures: one line, an exit code, no traceback."""

import os
import subprocess
import sys

import pytest

from krona_cli import __version__
from krona_cli.cli import main


@pytest.mark.subprocess
def test_python_dash_m_and_version():
    done = subprocess.run([sys.executable, "-m", "krona_cli", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and __version__ in done.stdout


def test_make_tiny_command_writes_a_pipeline_folder(tmp_path, capsys):
    target = tmp_path / "tiny sd15 ünïcode"
    assert main(["make-tiny", str(target), "--arch", "sd15"]) == 0
    assert (target / "model_index.json").is_file() and (target / "unet").is_dir()
    assert "written to" in capsys.readouterr().out


def test_make_tiny_bad_arch_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["make-tiny", str(tmp_path / "x"), "--arch", "flux9"]) == 2
    err = capsys.readouterr().err
    assert "sdxl" in err and "flux-schnell" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_unknown_option_is_a_usage_error(capsys):
    assert main(["plan", "--no-such-flag"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_internal_error_is_exit_1_with_a_hint(monkeypatch, capsys):
    import krona_cli.inference.plan

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(krona_cli.inference.plan, "plan", boom)
    assert main(["plan"]) == 1
    err = capsys.readouterr().err
    assert "internal error" in err and "--debug" in err and "Traceback" not in err
    assert main(["--debug", "plan"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_interrupt_exits_130(monkeypatch, capsys):
    import krona_cli.inference.plan

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(krona_cli.inference.plan, "plan", interrupted)
    assert main(["plan"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_a_wrapped_library_error_is_one_line_and_its_cause_with_debug(tmp_path, capsys):
    bad = tmp_path / "model.safetensors"  # a base model: read by the safetensors library (inspect reads its header)
    bad.write_bytes(b"this is not a safetensors file")
    sample = ["sample", "--pretrained-model", str(bad), "--prompt", "x", "--output-dir", str(tmp_path / "s")]
    assert main(sample) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "not a readable .safetensors file" in err
    assert main([*sample, "--debug"]) == 2  # --debug anywhere on the line, here at its end
    err = capsys.readouterr().err
    assert "Traceback" in err and "SafetensorError" in err  # the safetensors error krona's line wraps
    assert err.strip().splitlines()[-1].startswith("error: ") and "not a readable .safetensors file" in err


@pytest.mark.subprocess
def test_piped_output_is_never_wrapped(tmp_path):
    """Redirected to a file, a long path stays on one line (it was cut at ~160 columns), and `krona presets` shows
    each preset's whole summary line."""
    from krona_cli.architectures import CONFIGS_DIR
    from krona_cli.training.config import CONFIG_PRESETS

    deep = tmp_path.joinpath(*[f"a-rather-long-folder-name-{i}" for i in range(8)], "tiny")
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    code = "import sys; from krona_cli.cli import main; sys.exit(main(sys.argv[1:]))"
    krona = [sys.executable, "-c", code]
    done = subprocess.run([*krona, "make-tiny", str(deep), "--arch", "sd15"], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and len(str(deep)) > 200 and f"written to {deep}" in done.stdout, done.stderr
    done = subprocess.run([*krona, "presets"], capture_output=True, text=True, env=env)
    for preset in CONFIG_PRESETS:
        summary = (CONFIGS_DIR / f"{preset}.yaml").read_text().splitlines()[0].lstrip("# ")
        assert summary.endswith(".") and f"{preset:6} {summary}" in done.stdout.splitlines()


def test_help_lists_what_the_library_offers(capsys):
    """Help texts come from the lists they describe: every preset in train's help, every format in inspect's and
    export's, the right flag in --rank's."""
    from krona_cli.choices import EXPORT_FORMATS, READ_FORMATS
    from krona_cli.training.config import CONFIG_PRESETS

    helps = {}
    for command in ("train", "inspect", "export"):
        assert main([command, "--help"]) == 0
        helps[command] = " ".join(capsys.readouterr().out.split())
    assert all(p in helps["train"] for p in CONFIG_PRESETS) and "(with --adapter-type lora)" in helps["train"]
    assert all(" ".join(text.split()) in helps["inspect"] for text in READ_FORMATS.values())
    assert all(name in helps["export"] for name in EXPORT_FORMATS)


@pytest.mark.subprocess
def test_library_loggers_are_quiet_by_hierarchy_unless_debug():
    """A warning from any logger under a library's name (kernels' publisher-trust notice, bitsandbytes' CPU kernel)
    stays out of krona's output; --debug shows it."""
    code = (
        "import logging, sys; from krona_cli.cli.quiet import quiet_libraries; "
        "quiet_libraries(sys.argv[1] == 'debug'); "
        "[logging.getLogger(n).warning('chatter from %s', n) for n in "
        "('kernels._internals.hf_hub', 'bitsandbytes.backends.cpu.ops', 'huggingface_hub.utils', 'krona_test')]"
    )
    for mode in ("quiet", "debug"):
        done = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=60)
        said = [line.removeprefix("chatter from ") for line in done.stderr.splitlines()]
        if mode == "quiet":
            assert said == ["krona_test"], done.stderr  # a logger outside the libraries still speaks
        else:
            assert said == [
                "kernels._internals.hf_hub",
                "bitsandbytes.backends.cpu.ops",
                "huggingface_hub.utils",
                "krona_test",
            ]
