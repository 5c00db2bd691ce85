"""The native adapter file: keys, metadata, atomic writes, round trips, refusal of pickles and damaged files."""

import json
import os

import pytest
import torch
from helpers import factors_of
from safetensors import safe_open

from krona_cli.cli import main
from krona_cli.errors import KronaError
from krona_cli.formats import attach, collect_adapter, describe, load_adapter, save_adapter
from krona_cli.kron import adapted_layers, inject, remove
from krona_cli.pipeline.tiny import build_tiny_pipeline


def _trained(pipe, factors="4x4"):
    """Adapters on the UNet and both text encoders, with non-zero random weights standing in for training."""
    torch.manual_seed(3)
    inject(pipe.unet, factors=factors, scale=0.8)
    inject(pipe.text_encoder, targets="text", factors="2x2", scale=0.8)
    inject(pipe.text_encoder_2, targets="text", factors="2x2", scale=0.8)
    for model in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        for layer in adapted_layers(model).values():
            with torch.no_grad():
                layer.kron_b.normal_(std=0.05)
    return collect_adapter(
        {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2},
        scale=0.8,
        base_model="tiny-sdxl",
        architecture="sdxl",
        targets={"unet": "attn", "text_encoder": "text", "text_encoder_2": "text"},
        training={"steps": 10, "lr": 5e-4},
    )


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("adapter") / "adapter.safetensors"
    save_adapter(path, _trained(build_tiny_pipeline("sdxl")))
    return path


def test_native_keys_and_metadata(adapter_file):
    with safe_open(str(adapter_file), framework="pt") as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()["krona"])
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.kron_a" in keys
    assert any(k.startswith("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.") for k in keys)
    assert any(k.startswith("text_encoder_2.") for k in keys)
    assert all(k.endswith((".kron_a", ".kron_b")) for k in keys)
    assert meta["format_version"] == 1 and meta["layout"] == "standard"
    assert meta["base_model"] == "tiny-sdxl" and meta["architecture"] == "sdxl" and meta["scale"] == 0.8
    assert meta["targets"]["unet"] == "attn" and meta["training"] == {"steps": 10, "lr": 5e-4}
    assert meta["factors"]["unet"]["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == "4x4"
    assert len(meta["factors"]["unet"]) * 2 + sum(len(v) * 2 for k, v in meta["factors"].items() if k != "unet") == len(
        keys
    )


def test_round_trip_gives_the_same_outputs(adapter_file):
    source = build_tiny_pipeline("sdxl")
    adapter = _trained(source)
    target = build_tiny_pipeline("sdxl")
    loaded = load_adapter(adapter_file)
    names = attach(
        {"unet": target.unet, "text_encoder": target.text_encoder, "text_encoder_2": target.text_encoder_2}, loaded
    )
    assert set(names["unet"]) == set(adapter.layers["unet"])
    ids = torch.tensor([[49, 50, 51, 52]]) % target.text_encoder.config.vocab_size
    with torch.no_grad():
        assert torch.equal(source.text_encoder(ids).last_hidden_state, target.text_encoder(ids).last_hidden_state)
    for name, layer in adapted_layers(target.unet).items():
        assert torch.equal(layer.kron_a, adapted_layers(source.unet)[name].kron_a)
        assert layer.scale == 0.8


def test_fp16_save_and_scale_override(tmp_path, adapter_file):
    adapter = load_adapter(adapter_file)
    path = save_adapter(tmp_path / "half.safetensors", adapter, dtype="fp16")
    assert describe(path)["dtype"] == ["float16"]
    pipe = build_tiny_pipeline("sdxl")
    attach(
        {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2},
        load_adapter(path),
        scale=0.0,
    )
    assert all(layer.scale == 0.0 for layer in adapted_layers(pipe.unet).values())
    with pytest.raises(KronaError, match="dtype"):
        save_adapter(tmp_path / "x.safetensors", adapter, dtype="int8")


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path, adapter_file, monkeypatch):
    target = tmp_path / "adapter.safetensors"
    target.write_bytes(adapter_file.read_bytes())
    before = target.read_bytes()
    adapter = load_adapter(adapter_file)

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(KronaError, match="no space left on the device.*previous version.*intact"):
        save_adapter(target, adapter)
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["adapter.safetensors"]


def test_attach_to_another_architecture_is_a_clear_error(adapter_file):
    sd15 = build_tiny_pipeline("sd15")
    with pytest.raises(KronaError, match="not in this model|does not have"):
        attach({"unet": sd15.unet, "text_encoder": sd15.text_encoder}, load_adapter(adapter_file))


def test_pickles_truncated_and_foreign_files_are_refused(tmp_path, adapter_file):
    pickle_path = tmp_path / "adapter.bin"
    torch.save({"x": torch.zeros(2)}, pickle_path)
    with pytest.raises(KronaError, match="pickle"):
        load_adapter(pickle_path)
    import pickle

    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(KronaError, match="pickle"):
        load_adapter(legacy)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(adapter_file.read_bytes()[: adapter_file.stat().st_size // 2])
    with pytest.raises(KronaError, match="truncated or corrupt"):
        load_adapter(truncated)
    from safetensors.torch import save_file

    foreign = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(KronaError, match="not an adapter krona reads"):
        load_adapter(foreign)
    with pytest.raises(KronaError, match="does not exist"):
        load_adapter(tmp_path / "missing.safetensors")


def test_collect_without_adapters_is_an_error():
    pipe = build_tiny_pipeline("sd15")
    with pytest.raises(KronaError, match="no Kronecker adapter"):
        collect_adapter({"unet": pipe.unet})
    inject(pipe.unet, factors="2x2")
    remove(pipe.unet)
    with pytest.raises(KronaError, match="no Kronecker adapter"):
        collect_adapter({"unet": pipe.unet})


def test_cli_inspect_table_and_json(adapter_file, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["inspect", str(adapter_file)]) == 0
    out = capsys.readouterr().out
    adapter = load_adapter(adapter_file)
    assert f"{adapter.num_params():,}" in out and "tiny-sdxl" in out and "4x4" in out and "float32" in out
    assert main(["inspect", str(adapter_file), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == adapter.num_params()
    assert info["layers"] == {c: len(f) for c, f in adapter.layers.items()}
    assert info["factors"]["unet"] == {"4x4": len(adapter.layers["unet"])}
    assert info["scale"] == 0.8 and info["base_model"] == "tiny-sdxl" and info["dtype"] == ["float32"]


def test_cli_inspect_refuses_a_pickle_in_one_line(tmp_path, capsys):
    path = tmp_path / "model.ckpt"
    torch.save({"x": 1}, path)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert "pickle" in err and "Traceback" not in err


def test_inspect_and_load_tell_the_formats_apart(tmp_path, adapter_file, capsys, monkeypatch):
    from krona_cli.formats import save_lycoris

    adapter = load_adapter(adapter_file)
    lokr = save_lycoris(tmp_path / "dog-lokr.safetensors", adapter)
    assert describe(adapter_file)["format"] == "native"
    info = describe(lokr)
    assert info["format"] == "lycoris" and info["parameters"] == adapter.num_params()
    again = load_adapter(lokr)
    assert factors_of(again) == factors_of(adapter) and again.scale == adapter.scale
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["inspect", str(lokr)]) == 0
    assert "lycoris (standard layout)" in capsys.readouterr().out


def test_inspect_an_official_diffusekrona_checkpoint(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "pytorch_lora_weights.safetensors"
    prefix = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora"
    save_file({f"{prefix}.down.weight": torch.randn(4, 4), f"{prefix}.up.weight": torch.randn(8, 8)}, str(path))
    info = describe(path)
    assert info["format"] == "diffusekrona" and info["layout"] == "diffusekrona"
    assert info["layers"] == {"unet": 1} and info["parameters"] == 16 + 64


def test_a_safetensors_header_length_ending_in_0x80_is_not_mistaken_for_a_pickle(tmp_path):
    import struct

    adapter = load_adapter(save_adapter(tmp_path / "probe.safetensors", _trained(build_tiny_pipeline("sdxl"))))
    for pad in range(256):  # pad the training settings until the header's length has 0x80 as its low byte
        adapter.training = {"note": "x" * pad}
        path = save_adapter(tmp_path / "a.safetensors", adapter)
        if struct.unpack("<Q", path.read_bytes()[:8])[0] % 256 == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert load_adapter(path).training == {"note": "x" * pad}
