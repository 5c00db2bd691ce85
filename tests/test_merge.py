"""Baking adapters into base weights: in memory and into a diffusers pipeline folder that plain diffusers loads."""

import json

import pytest
import torch

from krona_cli.cli import main
from krona_cli.errors import KronaError
from krona_cli.formats import collect_adapter, load_adapter, save_adapter, save_lycoris
from krona_cli.inference.merge import bake, parse_adapter_spec, pipeline_components
from krona_cli.kron import adapted_layers, inject, remove
from krona_cli.pipeline.tiny import build_tiny_pipeline


@pytest.fixture(scope="module")
def adapter_path(tiny_sdxl_dir, tmp_path_factory):
    """An adapter on the tiny SDXL UNet and first text encoder, random non-zero updates, base recorded."""
    pipe = build_tiny_pipeline("sdxl")
    torch.manual_seed(0)
    inject(pipe.unet, factors="4x4", scale=0.7)
    inject(pipe.text_encoder, targets="text", factors="2x2", scale=0.7)
    for model in (pipe.unet, pipe.text_encoder):
        for layer in adapted_layers(model).values():
            with torch.no_grad():
                layer.kron_b.normal_(std=0.05)
    adapter = collect_adapter(
        {"unet": pipe.unet, "text_encoder": pipe.text_encoder},
        scale=0.7,
        base_model=str(tiny_sdxl_dir),
        architecture="sdxl",
        targets={"unet": "attn", "text_encoder": "text"},
    )
    return save_adapter(tmp_path_factory.mktemp("merge") / "dog.safetensors", adapter)


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("dog.safetensors", ("dog.safetensors", 1.0)),
        ("dog.safetensors:0.8", ("dog.safetensors", 0.8)),
        ("/a:b/dog.safetensors:0", ("/a:b/dog.safetensors", 0.0)),
        ("C:/x.safetensors", ("C:/x.safetensors", 1.0)),
    ],
)
def test_parse_adapter_spec(spec, expected):
    assert parse_adapter_spec(spec) == expected


def test_bake_equals_injecting_and_merging(adapter_path):
    adapter = load_adapter(adapter_path)
    baked, injected = build_tiny_pipeline("sdxl"), build_tiny_pipeline("sdxl")
    assert bake(pipeline_components(baked), [(adapter, 1.0)]) == sum(len(f) for f in adapter.layers.values())
    from krona_cli.formats import attach

    attach({"unet": injected.unet, "text_encoder": injected.text_encoder}, adapter)
    remove(injected.unet, merge=True)
    remove(injected.text_encoder, merge=True)
    for a, b in zip(baked.unet.state_dict().values(), injected.unet.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)
    for a, b in zip(baked.text_encoder.state_dict().values(), injected.text_encoder.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)


def test_a_lycoris_export_bakes_the_same_weights(adapter_path, tmp_path):
    adapter = load_adapter(adapter_path)
    lokr = load_adapter(save_lycoris(tmp_path / "dog-lokr.safetensors", adapter))
    one, two = build_tiny_pipeline("sdxl"), build_tiny_pipeline("sdxl")
    bake(pipeline_components(one), [(adapter, 0.5)])
    bake(pipeline_components(two), [(lokr, 0.5)])
    for a, b in zip(one.unet.state_dict().values(), two.unet.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-7)


def test_merge_command_writes_a_folder_plain_diffusers_loads(adapter_path, tiny_sdxl_dir, tmp_path, capsys):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "merged"
    assert main(["merge", "--adapter", f"{adapter_path}:0.5", "--output-dir", str(out)]) == 0
    assert "merged 1 adapter into" in capsys.readouterr().out
    merged = StableDiffusionXLPipeline.from_pretrained(out)
    expected = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    bake(pipeline_components(expected), [(load_adapter(adapter_path), 0.5)])
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        ours, theirs = getattr(merged, name).state_dict(), getattr(expected, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours)
    info = json.loads((out / "krona_merge.json").read_text())
    assert info["adapters"][0]["scale"] == 0.5 and info["layers_changed"] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temp folder left behind


def test_merge_fp16_and_never_replacing_what_krona_did_not_write(adapter_path, tmp_path, capsys):
    """A folder holding someone's files is refused, --overwrite or not, and they stay; an earlier merge's folder is
    replaced only with --overwrite."""
    from diffusers import StableDiffusionXLPipeline

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("someone's data")
    for extra in ([], ["--overwrite"]):
        assert main(["merge", "--adapter", str(adapter_path), "--output-dir", str(theirs), *extra]) == 2
        assert "keep.txt" in capsys.readouterr().err and (theirs / "keep.txt").read_text() == "someone's data"
    out = tmp_path / "merged16"
    assert main(["merge", "--adapter", str(adapter_path), "--output-dir", str(out), "--dtype", "fp16"]) == 0
    assert main(["merge", "--adapter", str(adapter_path), "--output-dir", str(out), "--dtype", "fp16"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (
        main(["merge", "--adapter", str(adapter_path), "--output-dir", str(out), "--dtype", "fp16", "--overwrite"]) == 0
    )
    from safetensors import safe_open

    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert StableDiffusionXLPipeline.from_pretrained(out, torch_dtype=torch.float16).unet.dtype == torch.float16


def test_merging_into_another_architecture_names_the_layer(adapter_path, tiny_sd15_dir, tmp_path, capsys):
    code = main(
        [
            "merge",
            "--adapter",
            str(adapter_path),
            "--pretrained-model",
            str(tiny_sd15_dir),
            "--output-dir",
            str(tmp_path / "x"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "made for sdxl, the base model is sd15" in err and "Traceback" not in err
    assert "the adapter's update is" in err or "is not in the base model" in err
    assert not (tmp_path / "x").exists()


def test_shape_mismatch_names_both_shapes(adapter_path):
    adapter = load_adapter(adapter_path)
    pipe = build_tiny_pipeline("sdxl")
    module = next(iter(adapter.layers["unet"]))
    linear = pipe.unet.get_submodule(module)
    pipe.unet.set_submodule(module, torch.nn.Linear(linear.in_features * 2, linear.out_features))
    with pytest.raises(KronaError, match=r"update is \(\d+, \d+\), the base weight is \(\d+, \d+\)"):
        bake(pipeline_components(pipe), [(adapter, 1.0)])


def test_missing_base_model(tmp_path, capsys):
    pipe = build_tiny_pipeline("sd15")
    inject(pipe.unet, factors="2x2")
    path = save_adapter(tmp_path / "a.safetensors", collect_adapter({"unet": pipe.unet}))
    assert main(["merge", "--adapter", str(path), "--output-dir", str(tmp_path / "o")]) == 2
    assert "--pretrained-model" in capsys.readouterr().err
    assert (
        main(
            [
                "merge",
                "--adapter",
                str(path),
                "--pretrained-model",
                str(tmp_path / "nope"),
                "--output-dir",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
