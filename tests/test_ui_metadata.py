"""The metadata other tools read from krona's files (Stability's modelspec keys, kohya's `ss_` keys): present with the
right values where the adapter's training settings say them, left out where nothing says them, and no obstacle to
krona reading its own files back."""

import dataclasses
import json
from datetime import datetime, timezone

import pytest
import torch
from helpers import factor_tensors, random_adapter, read_torch

from krona_cli.formats import load_adapter, save_adapter, save_lora, save_lycoris

TRAINING = {
    "steps": 500,
    "lr": 5e-4,
    "prompt": "a photo of sks dog",
    "class_prompt": "a photo of a dog",
    "ema": False,
    "seed": 3,
    "resolution": 1024,
    "adapter": "kron",
}


@pytest.fixture(scope="module")
def sdxl():
    return random_adapter("sdxl", scale=0.5, seed=2, training=TRAINING)


def _write(kind, adapter, folder, name):
    path = folder / f"{name}.safetensors"
    if kind == "native":
        save_adapter(path, adapter)
    elif kind == "lycoris":
        save_lycoris(path, adapter)
    else:
        save_lora(path, adapter, rank=4)
    return path, read_torch(path)[1]


@pytest.mark.parametrize("kind", ["native", "lycoris", "lora"])
def test_modelspec_and_kohya_keys_from_the_training_settings(sdxl, kind, tmp_path):
    before = datetime.now(timezone.utc).replace(microsecond=0)
    path, meta = _write(kind, sdxl, tmp_path, f"dog-{kind}")
    assert all(isinstance(v, str) for v in meta.values())
    suffix = {"native": "krona", "lycoris": "lora", "lora": "lora"}[kind]
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == f"stable-diffusion-xl-v1-base/{suffix}"
    assert meta["modelspec.implementation"] == ("krona" if kind == "native" else "diffusers")
    assert meta["modelspec.title"] == meta["ss_output_name"] == f"dog-{kind}"
    assert meta["modelspec.resolution"] == "1024x1024" and meta["ss_resolution"] == "(1024, 1024)"
    assert meta["modelspec.trigger_phrase"] == "a photo of sks dog"
    assert "modelspec.prediction_type" not in meta  # the settings do not say it
    written = datetime.strptime(meta["modelspec.date"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert before <= written <= datetime.now(timezone.utc)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["ss_sd_model_name"] == "tiny-sdxl"
    assert meta["ss_learning_rate"] == "0.0005" and meta["ss_max_train_steps"] == "500" and meta["ss_seed"] == "3"
    assert "a photo of sks dog" in meta["ss_training_comment"] and "500 steps" in meta["ss_training_comment"]
    assert meta["modelspec.description"] == meta["ss_training_comment"]
    network = {k: v for k, v in meta.items() if k.startswith("ss_network_")}
    if kind == "lora":
        rank = {t.shape[0] for k, t in read_torch(path)[0].items() if k.endswith(".lora_down.weight")}
        assert rank == {4}
        assert network == {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "4"}
        assert "rank-4 LoRA" in meta["ss_training_comment"]
    elif kind == "lycoris":
        assert network == {
            "ss_network_module": "lycoris.kohya",
            "ss_network_dim": "1",
            "ss_network_alpha": "1",
            "ss_network_args": json.dumps({"algo": "lokr", "full_matrix": "True"}),
        }
    else:
        assert network == {}
    # krona reads its own file back whatever else the header holds
    back = load_adapter(path)
    if kind != "lora":
        assert back.training == TRAINING and back.scale == 0.5
        back_tensors = factor_tensors(back)
        for key, t in factor_tensors(sdxl).items():
            assert torch.equal(back_tensors[key], t)
    else:
        assert back.base_model == "tiny-sdxl" and back.architecture == "sdxl"


def test_prediction_type_and_sd_versions(tmp_path):
    sd15 = random_adapter(
        "sd15", training={"steps": 30, "lr": 1e-4, "prompt": "sks cat", "resolution": 512, "prediction_type": "epsilon"}
    )
    _, meta = _write("lora", sd15, tmp_path, "cat")
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.prediction_type"] == "epsilon" and meta["modelspec.resolution"] == "512x512"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    # an SD 2.x v-prediction adapter: its own architecture id and default resolution
    sd2 = dataclasses.replace(sd15, architecture="sd2", training={"prediction_type": "v_prediction"})
    _, meta = _write("lycoris", sd2, tmp_path, "sd2")
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert meta["modelspec.prediction_type"] == "v" and meta["modelspec.resolution"] == "768x768"
    assert meta["ss_base_model_version"] == "sd_v2" and meta["ss_v2"] == "True"


def test_unknown_settings_are_left_out(tmp_path):
    bare = dataclasses.replace(random_adapter("sd15"), base_model=None, training=None)
    _, meta = _write("native", bare, tmp_path, "bare")
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/krona"
    assert meta["modelspec.resolution"] == "512x512"  # SD 1.x's own, as kohya writes it without a training size
    for key in (
        "modelspec.trigger_phrase",
        "modelspec.prediction_type",
        "ss_resolution",
        "ss_sd_model_name",
        "ss_learning_rate",
        "ss_max_train_steps",
        "ss_seed",
    ):
        assert key not in meta, key
    # an adapter for an unknown base, with settings of the wrong types: nothing is made up
    unknown = dataclasses.replace(
        bare, architecture=None, training={"prompt": "  ", "resolution": "big", "lr": "fast", "steps": -1}
    )
    _, meta = _write("lora", unknown, tmp_path, "unknown")
    for key in (
        "modelspec.architecture",
        "modelspec.resolution",
        "modelspec.trigger_phrase",
        "ss_base_model_version",
        "ss_v2",
        "ss_resolution",
        "ss_learning_rate",
        "ss_max_train_steps",
    ):
        assert key not in meta, key
    assert meta["modelspec.sai_model_spec"] == "1.0.0" and meta["modelspec.title"] == "unknown"
    assert load_adapter(tmp_path / "unknown.safetensors").architecture is None
