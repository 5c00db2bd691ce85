"""krona's SD3 names (formats/flux_names.DiffusersNaming) against ComfyUI's rules for SD3 LoRA / LoKr keys
(tests/comfyui_sd3.py): on SD3.5 Medium's real layer list (configs/models/layers/sd3.json, held equal to the meta
model by tests/test_plan.py), every layer krona adapts is named as ComfyUI maps it, onto a weight its MMDiT has, with
the rows that layer is; and the files krona writes for the tiny SD3 use only such names."""

import re

import pytest
from comfyui_sd3 import SPELLINGS, comfyui_clip_key_map, comfyui_sd3_key_map, mmdit_linear_shapes
from safetensors import safe_open

from krona_cli import families
from krona_cli.formats.flux_names import DiffusersNaming
from krona_cli.formats.native_outline import canonical_name
from krona_cli.kron.targets import TARGET_PRESETS

SD3 = families.get("sd3")
DEPTH, DUAL = 24, 13  # SD3.5 Medium: 24 joint blocks, attn2 in the first 13


@pytest.fixture(scope="module")
def adapted():
    """(component -> [(module, d_out, d_in)]) of what `--targets attn-ff --train-text-encoder` adapts."""
    layers = SD3.linear_layers()
    denoiser = layers["transformer"]
    unused = set(SD3.unused_denoiser_layers(n for n, _, _ in denoiser))
    pattern = re.compile(SD3.target_presets["attn-ff"])
    chosen = {"transformer": [layer for layer in denoiser if pattern.search(layer[0]) and layer[0] not in unused]}
    text = re.compile(TARGET_PRESETS["text"])
    chosen |= {c: [layer for layer in layers[c] if text.search(layer[0])] for c in SD3.trained_text()}
    return chosen


def test_the_real_list_is_sd35_mediums(adapted):
    modules = [m for m, _, _ in adapted["transformer"]]
    # per block: image q k v out, text q k v out, ff and ff_context 2 each (12); the last block has no text output,
    # text query or ff_context (4 fewer); attn2 q k v out in 13 blocks
    assert len(modules) == DEPTH * 12 - 4 + DUAL * 4
    assert "transformer_blocks.23.attn.add_q_proj" not in modules and "transformer_blocks.22.attn.add_q_proj" in modules
    assert len(adapted["text_encoder"]) == 12 * 4 and len(adapted["text_encoder_2"]) == 32 * 4  # q k v out


def test_every_adapted_transformer_layer_is_named_as_comfyui_maps_it(adapted):
    key_map, shapes = comfyui_sd3_key_map(DEPTH), mmdit_linear_shapes(DEPTH, DUAL)
    naming = DiffusersNaming(SD3.kohya_prefixes())
    tiles: dict[str, list[tuple[int, int]]] = {}
    for module, d_out, d_in in adapted["transformer"]:
        lokr, lora = naming.lokr_name("transformer", module), f"transformer.{module}"
        assert lokr.startswith("lycoris_") and key_map[lokr] == key_map[lora], module
        weight, offset = key_map[lokr]
        rows, columns = shapes[weight]  # a weight ComfyUI's SD3 model has
        assert columns == d_in, module
        if offset is None:
            assert rows == d_out, module
        else:
            dim, start, size = offset
            assert dim == 0 and size == d_out and start + size <= rows, module
            tiles.setdefault(weight, []).append((start, start + size))
    for weight, spans in tiles.items():  # q, k, v: side by side, each once (the last block's text query left out)
        spans.sort()
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])) and spans[-1][1] == shapes[weight][0], weight


def test_every_adapted_text_layer_is_named_as_comfyui_maps_it(adapted):
    naming = DiffusersNaming(SD3.kohya_prefixes())
    for component, layers in (("text_encoder", 12), ("text_encoder_2", 32)):
        key_map = comfyui_clip_key_map(component, layers)
        for module, _, _ in adapted[component]:
            assert naming.lokr_name(component, module) in key_map
            assert f"{component}.{canonical_name(component, module)}" in key_map


def test_the_files_krona_writes_for_sd3_use_only_those_names(tiny_sd3_dir, tmp_path):
    from test_train import config

    from krona_cli.cli import main
    from krona_cli.training.train import train

    run = train(config(tiny_sd3_dir, tmp_path / "run", steps=1, train_text_encoder=True, targets="attn-ff"))
    known = set(comfyui_sd3_key_map(2)) | set(comfyui_clip_key_map("text_encoder", 2))
    known |= set(comfyui_clip_key_map("text_encoder_2", 2))
    for to, extra in (("lycoris", []), ("lora", ["--rank", "4"])):
        out = tmp_path / f"{to}.safetensors"
        assert main(["export", "--adapter", str(run.adapter), "--to", to, "--output", str(out), *extra]) == 0
        with safe_open(out, "np") as f:
            names = {re.sub(r"\.(lokr_w[12]|alpha|lora_[AB]\.weight)$", "", k) for k in f.keys()}
        assert names and names <= known, sorted(names - known)
        assert {n.split("_")[0] if n.startswith("l") else n.split(".")[0] for n in names} == (
            {"lycoris", "lora"} if to == "lycoris" else {"transformer", "text_encoder", "text_encoder_2"}
        )


def test_every_spelling_comfyui_reads_is_one_krona_reads_back():
    """The names other tools write for SD3 (OneTrainer's, diffusers', SimpleTuner's) decode to the module."""
    from krona_cli.formats.flux_names import transformer_module

    for prefix, underscores in SPELLINGS.items():
        if underscores:
            found = transformer_module(prefix, "transformer_blocks_5_attn2_to_out_0")
            assert found is not None and found[0] == "transformer_blocks.5.attn2.to_out.0"
