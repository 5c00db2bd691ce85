"""Shared fixtures: tiny pipelines built locally (never downloaded), and an offline hub."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    from krona_cli.pipeline.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "sdxl", arch="sdxl")


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory):
    from krona_cli.pipeline.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "sd15", arch="sd15")


@pytest.fixture()
def tiny_sdxl_unet():
    from krona_cli.pipeline.tiny import build_tiny_pipeline

    return build_tiny_pipeline("sdxl", seed=0).unet


@pytest.fixture(scope="session")
def toy_sdxl_dir(tmp_path_factory):
    from krona_cli.pipeline.toy import make_toy

    return make_toy(tmp_path_factory.mktemp("toy") / "sdxl", arch="sdxl")


@pytest.fixture(scope="session")
def toy_sd15_dir(tmp_path_factory):
    from krona_cli.pipeline.toy import make_toy

    return make_toy(tmp_path_factory.mktemp("toy") / "sd15", arch="sd15")


@pytest.fixture(scope="session")
def toy_flux_dir(tmp_path_factory):
    from krona_cli.pipeline.toy import make_toy

    return make_toy(tmp_path_factory.mktemp("toy") / "flux", arch="flux")


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    from krona_cli.pipeline.tiny_flux import make_tiny_flux

    return make_tiny_flux(tmp_path_factory.mktemp("tiny") / "flux")


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    from krona_cli.pipeline.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "sd3", "sd3")


@pytest.fixture()
def captured_pipes(monkeypatch):
    """The pipelines `train` loads, kept for inspection."""
    from krona_cli.pipeline import models

    pipes = []
    original = models.load_pipeline

    def load(*args, **kwargs):
        pipe, arch = original(*args, **kwargs)
        pipes.append(pipe)
        return pipe, arch

    monkeypatch.setattr(models, "load_pipeline", load)
    return pipes


@pytest.fixture(scope="session")
def tiny_z_image_dir(tmp_path_factory):
    from krona_cli.pipeline.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "z-image", "z-image")


@pytest.fixture(scope="session")
def tiny_flux2_dir(tmp_path_factory):
    from krona_cli.pipeline.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "flux2", "flux2")


@pytest.fixture(scope="session")
def tiny_qwen_image_dir(tmp_path_factory):
    from krona_cli.pipeline.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "qwen-image", "qwen-image")
