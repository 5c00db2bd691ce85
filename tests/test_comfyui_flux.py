"""krona's FLUX.1 names (krona_cli/formats/bfl_layout.py) against ComfyUI's rules for FLUX LoRA / LoKr keys
(tests/comfyui_flux.py), on the real FLUX.1 transformers' shapes (built on the meta device from krona's configs)."""

import json
from pathlib import Path

import pytest
import torch
from comfyui_flux import (
    DIFFUSERS_SPELLINGS,
    comfyui_flux_key_map,
    comfyui_lokr_scale,
    comfyui_lora_scale,
    comfyui_swapped_targets,
)
from diffusers import FluxTransformer2DModel

import krona_cli
from krona_cli.formats.bfl_layout import bfl_module, bfl_slices, diffusers_to_bfl

MODEL_CONFIGS = Path(krona_cli.__file__).resolve().parent / "configs" / "models"
HIDDEN = 3072


def meta_model(name: str) -> FluxTransformer2DModel:
    config = json.loads((MODEL_CONFIGS / name).read_text())
    config.pop("_comment", None)
    with torch.device("meta"):
        return FluxTransformer2DModel.from_config(config)


@pytest.fixture(scope="module")
def dev():
    """(the meta FLUX.1 [dev] transformer, its BFL weights' shapes under ComfyUI's `diffusion_model.` names)."""
    model = meta_model("flux_dev_transformer.json")
    shapes = {f"diffusion_model.{k}": tuple(v.shape) for k, v in diffusers_to_bfl(model.state_dict()).items()}
    return model, shapes


@pytest.fixture(scope="module")
def key_map():
    return comfyui_flux_key_map(depth=19, depth_single=38, hidden_size=HIDDEN)


def block_linears(model):
    """The attention and feed-forward linears of the double and single blocks (what krona adapts)."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and name.startswith(("transformer_blocks.", "single_transformer_blocks."))
        and (".attn." in name or ".ff" in name or name.endswith((".proj_mlp", ".proj_out")))
    }


def test_every_block_linear_has_each_naming(dev, key_map):
    model, shapes = dev
    linears = block_linears(model)
    assert len(linears) == 19 * 12 + 38 * 5  # double: q k v out for each stream, ff 2 ×2; single: q k v mlp out
    for name, module in linears.items():
        whole = f"diffusion_model.{bfl_module(name)}.weight"
        where = bfl_slices(name, HIDDEN)
        assert whole in shapes
        for prefix, underscores in DIFFUSERS_SPELLINGS.values():
            lora_name = prefix + (name.replace(".", "_") if underscores else name)
            key, offset = key_map[lora_name]
            assert key == whole, lora_name
            if where is None:
                assert offset is None and shapes[key][0] == module.out_features
            else:
                assert offset == (0, where[1], module.out_features) and where[2] - where[1] == module.out_features
        # kohya's name is BFL's: the whole (maybe fused) weight, no slice
        assert key_map["lora_unet_" + bfl_module(name).replace(".", "_")] == (whole, None)
        assert key_map["diffusion_model." + bfl_module(name)] == (whole, None)


def test_slices_tile_each_fused_weight(dev, key_map):
    _, shapes = dev
    tiles: dict[str, set[tuple[int, int]]] = {}
    for lora_name, (key, offset) in key_map.items():
        if offset is not None and not lora_name.endswith("linear1_qkv"):
            dim, start, size = offset
            assert dim == 0 and size > 0
            tiles.setdefault(key, set()).add((start, start + size))
    assert len(tiles) == 19 * 2 + 38
    for key, ranges in tiles.items():
        ordered = sorted(ranges)
        assert ordered[0][0] == 0 and ordered[-1][1] == shapes[key][0], key
        assert all(a[1] == b[0] for a, b in zip(ordered, ordered[1:])), key  # no gap, no overlap


def test_every_target_is_a_weight_of_the_model(dev, key_map):
    _, shapes = dev
    assert {key for key, _ in key_map.values()} <= set(shapes)
    assert key_map["diffusion_model.single_blocks.5.linear1_qkv"] == (
        "diffusion_model.single_blocks.5.linear1.weight",
        (0, 0, 3 * HIDDEN),
    )
    # every linear weight of the BFL model has a kohya name
    weights = {key for key, shape in shapes.items() if key.endswith(".weight") and len(shape) == 2}
    kohya = {key for name, (key, _) in key_map.items() if name.startswith("lora_unet_")}
    assert kohya == weights


def test_schnell_has_no_guidance_names():
    shapes = {
        f"diffusion_model.{k}" for k in diffusers_to_bfl(meta_model("flux_schnell_transformer.json").state_dict())
    }
    schnell_map = comfyui_flux_key_map(guidance=False)
    assert {key for key, _ in schnell_map.values()} <= shapes
    assert not any("guidance" in name for name in schnell_map)


def test_final_modulation_is_swapped_only_in_diffusers_names(key_map):
    swapped = comfyui_swapped_targets(key_map)
    assert swapped == {
        "transformer.norm_out.linear",
        "lora_transformer_norm_out_linear",
        "lycoris_norm_out_linear",
        "norm_out.linear",
    }
    assert {key_map[name] for name in swapped} == {("diffusion_model.final_layer.adaLN_modulation.1.weight", None)}
    assert bfl_module("norm_out.linear") == "final_layer.adaLN_modulation.1"  # krona's converter swaps its halves too


def test_alpha_rules():
    assert comfyui_lora_scale(8.0, 16) == 0.5 and comfyui_lora_scale(None, 16) == 1.0
    # a decomposed factor: alpha over its rank (w2's when w2 is decomposed)
    assert comfyui_lokr_scale(4.0, w1_full=True, w2_full=False, dim=8) == 0.5
    assert comfyui_lokr_scale(4.0, w1_full=False, w2_full=True, dim=2) == 2.0
    assert comfyui_lokr_scale(None, w1_full=True, w2_full=False, dim=8) == 1.0
    # both full: ignored by the earlier rule, alpha / (w2 rows // w1 rows) by the later one
    assert comfyui_lokr_scale(1.0, w1_full=True, w2_full=True, dim=0) == 1.0
    assert comfyui_lokr_scale(1.0, w1_full=True, w2_full=True, dim=0, both_full_dim=48) == 1 / 48
    assert comfyui_lokr_scale(48.0, w1_full=True, w2_full=True, dim=0, both_full_dim=3072 // 64) == 1.0
