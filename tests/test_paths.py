"""Paths as a shell reads them (krona_cli/paths.py): `~` is the home folder, and `~name` of no known user stays a
folder of that name instead of raising RuntimeError out of every command that reads a path."""

from pathlib import Path

from krona_cli.paths import expand
from krona_cli.training.config import TrainConfig

UNKNOWN = "~krona-no-such-user"


def test_the_home_folder_is_expanded_and_an_unknown_users_is_left_as_written(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert expand("~/run") == tmp_path / "run"
    assert expand(Path("~")) == tmp_path
    assert expand(f"{UNKNOWN}/run") == Path(f"{UNKNOWN}/run")
    assert expand("run/~0") == Path("run/~0")


def test_a_training_config_with_an_unknown_users_folder_reads_it_as_a_folder_here(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(instance_dir="photos", prompt="a sks dog", output_dir=f"{UNKNOWN}/out").with_absolute_paths()
    assert cfg.output_dir == str(tmp_path / UNKNOWN / "out")
