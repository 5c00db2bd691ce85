"""FLUX.1 single files (pipeline/flux_file.py): `krona merge --output X.safetensors` writes the merged transformer alone
in Black Forest Labs' layout, which diffusers' `from_single_file` and krona read back to the weights of `krona merge
--output-dir`; `load_pipeline(base, transformer=FILE)` puts a transformer file (BFL's layout, ComfyUI's prefixed one or
diffusers') into a base from a folder or the hub cache, offline, from any working directory."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from diffusers.loaders import single_file_utils
from helpers import TorchAtTinyWidth, put_in_hub_cache, read_torch
from safetensors.torch import save_file

from krona_cli import families
from krona_cli.cli import main
from krona_cli.errors import KronaError
from krona_cli.formats import collect_adapter, save_adapter
from krona_cli.formats.bfl_layout import BFL_PREFIX, diffusers_to_bfl
from krona_cli.kron import adapted_layers, inject
from krona_cli.pipeline.models import load_pipeline
from krona_cli.pipeline.single_file import _unloaded
from krona_cli.pipeline.tiny_flux import build_tiny_flux_pipeline

ROOT = Path(__file__).resolve().parent.parent


def flux_adapter(base: Path, path: Path, text: bool = False) -> Path:
    """A random (non-zero) Kronecker adapter on the tiny FLUX's transformer (attn-ff, 4x4), and CLIP-L with `text`."""
    pipe = build_tiny_flux_pipeline()
    family = families.get("flux")
    models = {"transformer": pipe.transformer, **({"text_encoder": pipe.text_encoder} if text else {})}
    torch.manual_seed(3)
    inject(pipe.transformer, targets="attn-ff", factors="4x4", presets=family.target_presets)
    if text:
        inject(pipe.text_encoder, targets="text", factors="2x2", presets=family.target_presets)
    for model in models.values():
        for layer in adapted_layers(model).values():
            with torch.no_grad():
                layer.kron_b.normal_(std=0.05)
    targets = {"transformer": "attn-ff", "text_encoder": "text"}
    adapter = collect_adapter(
        models, base_model=str(base), architecture="flux", targets={c: targets[c] for c in models}
    )
    return save_adapter(path, adapter)


def transformer_state(seed: int, guidance_embeds: bool = True) -> dict:
    """Another tiny FLUX transformer's weights (the tiny pipeline's shapes, other values)."""
    return build_tiny_flux_pipeline(seed=seed, guidance_embeds=guidance_embeds).transformer.state_dict()


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def merged(tiny_flux_dir, tmp_path_factory):
    """One adapter merged into the tiny FLUX both ways, in fp16: (base, adapter, folder, single file)."""
    root = tmp_path_factory.mktemp("flux-merge")
    adapter = flux_adapter(tiny_flux_dir, root / "adapter.safetensors")
    file, folder = root / "merged.safetensors", root / "merged"
    assert main(["merge", "--adapter", str(adapter), "--output", str(file)]) == 0
    assert main(["merge", "--adapter", str(adapter), "--output-dir", str(folder), "--dtype", "fp16"]) == 0
    return tiny_flux_dir, adapter, folder, file


def test_merged_single_file_is_the_transformer_in_bfl_layout(merged):
    base, adapter, folder, file = merged
    tensors, metadata = read_torch(file)
    reference = FluxTransformer2DModel.from_pretrained(folder / "transformer").state_dict()
    assert tensors.keys() == diffusers_to_bfl(reference).keys()  # the transformer alone, bare BFL names
    assert "double_blocks.1.img_attn.qkv.weight" in tensors and "single_blocks.1.linear1.weight" in tensors
    assert {t.dtype for t in tensors.values()} == {torch.float16}  # merge's single-file default
    assert not any(key.startswith(("model.", "transformer_blocks.")) for key in tensors)
    summary = json.loads(metadata["krona_merge"])
    assert summary["base_model"] == str(base) and summary["architecture"] == "flux" and summary["dtype"] == "fp16"
    assert [a["file"] for a in summary["adapters"]] == [str(adapter)] and summary["layers_changed"] > 0
    described = json.loads(metadata["krona_transformer"])
    assert described["layout"] == "bfl" and described["class"] == "FluxTransformer2DModel"
    assert described["config"]["num_single_layers"] == 2 and "_name_or_path" not in described["config"]
    assert not list(file.parent.glob(".merged.safetensors.*"))  # written atomically: no temp file left


def test_diffusers_and_krona_read_the_merged_weights(merged, monkeypatch):
    base, _, folder, file = merged
    reference = FluxTransformer2DModel.from_pretrained(folder / "transformer").state_dict()
    assert not same(reference, FluxTransformer2DModel.from_pretrained(base / "transformer").state_dict())
    monkeypatch.setattr(single_file_utils, "torch", TorchAtTinyWidth())
    theirs = FluxTransformer2DModel.from_single_file(
        str(file), config=str(base / "transformer"), local_files_only=True, torch_dtype=torch.float16
    )
    assert same(theirs.state_dict(), reference)
    monkeypatch.undo()
    pipe, arch = load_pipeline(str(base), dtype=torch.float16, transformer=str(file))
    assert arch == "flux" and same(pipe.transformer.state_dict(), reference) and not _unloaded(pipe)
    vae = AutoencoderKL.from_pretrained(base / "vae", torch_dtype=torch.float16)
    assert same(pipe.vae.state_dict(), vae.state_dict())  # the rest from the base


def test_merge_with_the_base_transformer_as_a_file_is_the_same(merged, tmp_path):
    """`--transformer` given the base's own transformer (in BFL's layout) merges to the same weights."""
    base, adapter, _, file = merged
    own = tmp_path / "flux1-tiny.safetensors"
    save_file(diffusers_to_bfl(FluxTransformer2DModel.from_pretrained(base / "transformer").state_dict()), str(own))
    from krona_cli.inference.merge import merge, merge_destination

    again = tmp_path / "again.safetensors"
    summary = merge([(str(adapter), 1.0)], merge_destination(None, again, None), transformer=str(own))
    assert summary["transformer"] == str(own) and summary["holds"].startswith("the FLUX.1 transformer alone")
    assert same(read_torch(again)[0], read_torch(file)[0])


@pytest.mark.parametrize("layout", ["bfl", "comfyui", "diffusers"])
def test_transformer_file_replaces_the_base_transformer(tiny_flux_dir, tmp_path, layout):
    state = transformer_state(seed=1)
    tensors = {
        "bfl": lambda: diffusers_to_bfl(state),
        # a whole ComfyUI checkpoint: the transformer under model.diffusion_model., other models beside it (not read)
        "comfyui": lambda: {**diffusers_to_bfl(state, prefix=BFL_PREFIX), "text_encoders.clip_l.x": torch.ones(2)},
        "diffusers": lambda: state,
    }[layout]()
    path = tmp_path / "transformer.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    pipe, arch = load_pipeline(str(tiny_flux_dir), dtype=torch.bfloat16, transformer=str(path))
    assert arch == "flux" and not _unloaded(pipe)
    loaded = pipe.transformer.state_dict()
    assert same(loaded, {k: v.to(torch.bfloat16) for k, v in state.items()})
    assert all(t.dtype == torch.bfloat16 for t in loaded.values())
    base = FluxTransformer2DModel.from_pretrained(tiny_flux_dir / "transformer").state_dict()
    assert not same({k: v.float() for k, v in loaded.items()}, base)


def test_schnell_transformer_on_a_dev_base(tiny_flux_dir, tmp_path):
    """The guidance embedding follows the file: a [schnell] transformer (none) loads on a [dev] base."""
    state = transformer_state(seed=2, guidance_embeds=False)
    path = tmp_path / "schnell.safetensors"
    save_file(diffusers_to_bfl(state), str(path))
    pipe, _ = load_pipeline(str(tiny_flux_dir), transformer=str(path))
    assert pipe.transformer.config.guidance_embeds is False and same(pipe.transformer.state_dict(), state)


def one_line_error(base, transformer) -> str:
    with pytest.raises(KronaError) as error:
        load_pipeline(str(base), transformer=str(transformer))
    message = str(error.value)
    assert "\n" not in message
    return message


def test_what_is_not_a_flux_transformer_or_base_is_one_line(tiny_flux_dir, tiny_sd15_dir, merged, tmp_path):
    _, adapter, _, file = merged
    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.ones(2)}, str(other))
    (tmp_path / "old.ckpt").write_bytes(b"x")
    for name, expected in [
        (str(adapter), "is not a FLUX.1 transformer"),
        (str(other), "is not a FLUX.1 transformer"),
        (str(tmp_path / "old.ckpt"), "is not a .safetensors file"),
        (str(tmp_path), "is a folder"),
        ("org/flux-transformer", "does not exist"),
    ]:
        assert expected in one_line_error(tiny_flux_dir, name)
    message = one_line_error(tiny_sd15_dir, file)
    assert "is SD 1.x, not FLUX.1" in message and "--pretrained-model" in message
    wider = tmp_path / "wider.safetensors"
    state = transformer_state(seed=1)
    state["x_embedder.weight"] = torch.ones(32, 16)
    save_file(state, str(wider))
    assert "does not fit the base model's FLUX.1 transformer" in one_line_error(tiny_flux_dir, wider)


def test_transformer_file_as_the_base_model_says_use_transformer(merged, tmp_path, capsys):
    _, adapter, _, file = merged
    out = str(tmp_path / "m.safetensors")
    for args in (
        ["sample", "--pretrained-model", str(file), "--prompt", "x", "--output-dir", str(tmp_path / "s")],
        ["merge", "--adapter", str(adapter), "--pretrained-model", str(file), "--output", out],
    ):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "is a FLUX.1 transformer file" in err and "--transformer" in err


def test_text_encoder_changes_are_not_dropped_from_a_transformer_file(tiny_flux_dir, tmp_path, capsys):
    adapter = flux_adapter(tiny_flux_dir, tmp_path / "with-text.safetensors", text=True)
    assert main(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "changes the text_encoder" in err and "--output-dir" in err
    assert not (tmp_path / "m.safetensors").exists()


CHILD = """
import sys, torch
from safetensors.torch import load_file
from krona_cli.formats.bfl_layout import bfl_to_diffusers
from krona_cli.pipeline.models import load_pipeline
expected = bfl_to_diffusers(load_file("../files/flux1-tiny.safetensors"))
for base in ("black-forest-labs/FLUX.1-dev", "../base"):
    pipe, arch = load_pipeline(base, transformer="../files/flux1-tiny.safetensors")
    state = pipe.transformer.state_dict()
    assert arch == "flux" and state.keys() == expected.keys(), base
    assert all(torch.equal(state[k], expected[k]) for k in state), base
print("ok")
"""


@pytest.mark.subprocess
def test_transformer_file_with_a_hub_cache_base_from_another_folder(tiny_flux_dir, tmp_path):
    """Offline, relative paths from another working directory; the hub cache lacks the base's transformer weights,
    which a transformer file makes unneeded."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_flux_dir, base)
    (base / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    put_in_hub_cache(base, "black-forest-labs/FLUX.1-dev", tmp_path / "cache")
    (tmp_path / "files").mkdir()
    (tmp_path / "work").mkdir()
    save_file(diffusers_to_bfl(transformer_state(seed=4)), str(tmp_path / "files" / "flux1-tiny.safetensors"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "DIFFUSERS_"))}
    env |= {"HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD)],
        cwd=tmp_path / "work",
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
