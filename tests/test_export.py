"""`krona export`: one adapter written as native, LyCORIS LoKr or LoRA, and read back by `inspect` and
`load_adapter`."""

import json

import pytest
import torch
from helpers import read_torch

from krona_cli.cli import main
from krona_cli.formats import LAYOUT_LORA, collect_adapter, describe, load_adapter, save_adapter
from krona_cli.kron import adapted_layers, inject
from krona_cli.pipeline.tiny import build_tiny_pipeline


@pytest.fixture(scope="module")
def adapter_path(tmp_path_factory):
    pipe = build_tiny_pipeline("sdxl")
    torch.manual_seed(1)
    inject(pipe.unet, factors="4x4", scale=0.5)
    for layer in adapted_layers(pipe.unet).values():
        with torch.no_grad():
            layer.kron_b.normal_(std=0.05)
    adapter = collect_adapter({"unet": pipe.unet}, scale=0.5, base_model="tiny", architecture="sdxl")
    return save_adapter(tmp_path_factory.mktemp("export") / "dog.safetensors", adapter)


def _deltas(adapter):
    return {(c, m): d for c, m, d in adapter.deltas()}


def test_export_to_lycoris_and_back_to_native_is_exact(adapter_path, tmp_path):
    lokr, back = tmp_path / "dog-lokr.safetensors", tmp_path / "dog-native.safetensors"
    assert main(["export", "--adapter", str(adapter_path), "--to", "lycoris", "--output", str(lokr)]) == 0
    assert describe(lokr)["format"] == "lycoris"
    assert main(["export", "--adapter", str(lokr), "--to", "native", "--output", str(back)]) == 0
    original, again = load_adapter(adapter_path), load_adapter(back)
    assert describe(back)["format"] == "native" and again.scale == original.scale
    for module, layer in original.layers["unet"].items():
        other = again.layers["unet"][module]
        assert torch.equal(layer.a, other.a) and torch.equal(layer.b, other.b)


def test_export_to_lora_reports_the_error_it_makes(adapter_path, tmp_path, capsys):
    out, report = tmp_path / "dog-lora.safetensors", tmp_path / "dog-lora.json"
    assert (
        main(
            [
                "export",
                "--adapter",
                str(adapter_path),
                "--to",
                "lora",
                "--rank",
                "4",
                "--output",
                str(out),
                "--report",
                str(report),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "LoRA rank 4" in printed and "relative error" in printed
    lora = load_adapter(out)
    assert lora.layout == LAYOUT_LORA and describe(out)["format"] == "lora"
    exact, approx = _deltas(load_adapter(adapter_path)), _deltas(lora)
    assert exact.keys() == approx.keys()
    num = sum((exact[k] - approx[k]).square().sum() for k in exact)
    den = sum(exact[k].square().sum() for k in exact)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        reported = json.loads(f.metadata()["krona"])["relative_error"]
    assert (num / den).sqrt().item() == pytest.approx(reported, abs=1e-5)
    assert 0 < reported < 1
    per_layer = json.loads(report.read_text())
    assert per_layer["error"] == pytest.approx(reported)
    for (component, module), delta in exact.items():
        measured = ((delta - approx[(component, module)]).norm() / delta.norm()).item()
        assert per_layer["layers"][component][module]["error"] == pytest.approx(measured, abs=1e-5)
    assert main(["inspect", str(out)]) == 0 and "rank 4" in capsys.readouterr().out


def test_export_errors(adapter_path, tmp_path, capsys):
    lora = tmp_path / "l.safetensors"
    assert main(["export", "--adapter", str(adapter_path), "--to", "lora", "--output", str(lora)]) == 2
    assert "--rank" in capsys.readouterr().err
    assert (
        main(["export", "--adapter", str(adapter_path), "--to", "lycoris", "--rank", "4", "--output", str(lora)]) == 2
    )
    assert "only apply" in capsys.readouterr().err
    assert main(["export", "--adapter", str(adapter_path), "--to", "onnx", "--output", str(lora)]) == 2
    assert "native, lycoris, lora" in capsys.readouterr().err
    assert main(["export", "--adapter", str(adapter_path), "--to", "native", "--output", str(adapter_path)]) == 2
    assert "overwrite the input" in capsys.readouterr().err
    assert main(["export", "--adapter", str(adapter_path), "--to", "lora", "--rank", "2", "--output", str(lora)]) == 0
    assert main(["export", "--adapter", str(lora), "--to", "lycoris", "--output", str(tmp_path / "x.safetensors")]) == 2
    assert "not a Kronecker adapter" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_export_to_lora_writes_kohya_keys_unless_asked_for_peft(adapter_path, tmp_path):
    from krona_cli.errors import KronaError
    from krona_cli.inference.export import export_adapter

    q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    kohya, peft = tmp_path / "kohya.safetensors", tmp_path / "peft.safetensors"
    export_adapter(adapter_path, "lora", kohya, rank=2)
    export_adapter(adapter_path, "lora", peft, rank=2, lora_layout="peft")
    keys = set(read_torch(kohya)[0])
    assert {f"lora_unet_{q.replace('.', '_')}.{s}" for s in ("lora_down.weight", "lora_up.weight", "alpha")} <= keys
    assert {f"unet.{q}.lora_A.weight", f"unet.{q}.lora_B.weight"} <= set(read_torch(peft)[0])
    assert describe(kohya)["key_format"] == "kohya" and describe(peft)["key_format"] == "diffusers"
    exact = _deltas(load_adapter(adapter_path))
    from_kohya, from_peft = _deltas(load_adapter(kohya)), _deltas(load_adapter(peft))
    assert from_kohya.keys() == from_peft.keys() == exact.keys()
    for layer, delta in from_kohya.items():  # the same LoRA either way
        torch.testing.assert_close(delta, from_peft[layer])
    with pytest.raises(KronaError, match="unknown LoRA key layout 'comfy'"):
        export_adapter(adapter_path, "lora", tmp_path / "x.safetensors", rank=2, lora_layout="comfy")
    with pytest.raises(KronaError, match="--lora-layout only applies to --to lora"):
        export_adapter(adapter_path, "lycoris", tmp_path / "x.safetensors", lora_layout="peft")
    assert not (tmp_path / "x.safetensors").exists()


def test_a_lora_export_says_the_rank_it_wrote_and_keeps_the_training_settings(tmp_path, capsys):
    """--rank above the update's own rank writes (and says) the rank that is exact; the exported file keeps the
    source's targets and training settings, as inspect shows them."""
    pipe = build_tiny_pipeline("sdxl")
    inject(pipe.unet, factors="4x4")
    for layer in adapted_layers(pipe.unet).values():
        with torch.no_grad():
            layer.kron_b.normal_(std=0.05)
    training = {"lr": 0.001, "steps": 7}
    source = save_adapter(
        tmp_path / "dog.safetensors",
        collect_adapter({"unet": pipe.unet}, targets={"unet": "attn"}, training=training, architecture="sdxl"),
    )
    out = tmp_path / "dog-lora.safetensors"
    capsys.readouterr()
    assert main(["export", "--adapter", str(source), "--to", "lora", "--rank", "1000", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    written = describe(out)
    ranks = {label for counts in written["factors"].values() for label in counts}
    assert len(ranks) == 1 and "1000" not in ranks.pop()
    assert "--rank 1000 asked" in printed and "LoRA rank 1000" not in printed
    assert written["targets"] == {"unet": "attn"} and written["training"] == training
