"""The FLUX.1 transformer's Black Forest Labs layout <-> diffusers' names (krona_cli/formats/bfl_layout.py), checked
against diffusers' own single-file converter and loader, on a tiny random model and on the real model's shapes (on
the meta device)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders import single_file_utils
from helpers import TorchAtTinyWidth
from safetensors.torch import save_file

import krona_cli
from krona_cli.errors import KronaError
from krona_cli.formats.bfl_layout import BFL_PREFIX, bfl_module, bfl_slices, bfl_to_diffusers, diffusers_to_bfl

MODEL_CONFIGS = Path(krona_cli.__file__).resolve().parent / "configs" / "models"
TINY = {
    "patch_size": 1,
    "in_channels": 8,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "guidance_embeds": True,
    "axes_dims_rope": [4, 6, 6],
}
TINY_HIDDEN = 32  # heads × head dim


def shipped_config(name: str) -> dict:
    config = json.loads((MODEL_CONFIGS / name).read_text())
    config.pop("_comment", None)
    return config


def meta_model(name: str) -> FluxTransformer2DModel:
    with torch.device("meta"):
        return FluxTransformer2DModel.from_config(shipped_config(name))


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def same_shapes(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(tuple(a[k].shape) == tuple(b[k].shape) for k in a)


@pytest.fixture(scope="module")
def tiny_state() -> dict:
    torch.manual_seed(0)
    return FluxTransformer2DModel(**TINY).state_dict()


@pytest.fixture()
def diffusers_at_tiny_width(monkeypatch):
    monkeypatch.setattr(single_file_utils, "torch", TorchAtTinyWidth())


@pytest.mark.parametrize("prefix", ["", BFL_PREFIX])
def test_round_trip_tiny(tiny_state, prefix):
    bfl = diffusers_to_bfl(tiny_state, prefix=prefix)
    assert all(key.startswith(prefix) and not key[len(prefix) :].startswith("model.") for key in bfl)
    assert f"{prefix}double_blocks.1.txt_attn.qkv.weight" in bfl and f"{prefix}single_blocks.1.linear1.bias" in bfl
    assert same_tensors(bfl_to_diffusers(bfl), tiny_state)


def test_round_trip_numpy(tiny_state):
    arrays = {key: value.numpy() for key, value in tiny_state.items()}
    bfl = diffusers_to_bfl(arrays)
    assert all(isinstance(value, np.ndarray) for value in bfl.values())
    back = bfl_to_diffusers(bfl)
    assert back.keys() == arrays.keys() and all(np.array_equal(back[k], arrays[k]) for k in arrays)


@pytest.mark.parametrize("prefix", ["", BFL_PREFIX])
def test_diffusers_converter_reads_our_bfl(tiny_state, diffusers_at_tiny_width, prefix):
    bfl = diffusers_to_bfl(tiny_state, prefix=prefix)
    converted = single_file_utils.convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert same_tensors(converted, tiny_state)


def test_from_single_file_loads_our_bfl_file(tiny_state, diffusers_at_tiny_width, tmp_path):
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**TINY)
    model.save_config(tmp_path)
    path = tmp_path / "flux1-tiny.safetensors"
    save_file(diffusers_to_bfl(model.state_dict(), prefix=BFL_PREFIX), str(path))
    loaded = FluxTransformer2DModel.from_single_file(str(path), config=str(tmp_path), local_files_only=True)
    assert same_tensors(loaded.state_dict(), model.state_dict())


def test_final_modulation_halves_swapped(tiny_state):
    bfl = diffusers_to_bfl(tiny_state)
    h = TINY_HIDDEN
    ours, theirs = bfl["final_layer.adaLN_modulation.1.weight"], tiny_state["norm_out.linear.weight"]
    assert torch.equal(ours[:h], theirs[h:]) and torch.equal(ours[h:], theirs[:h])


@pytest.mark.parametrize("name", ["flux_dev_transformer.json", "flux_schnell_transformer.json"])
def test_real_size_keys_and_shapes(name):
    state = meta_model(name).state_dict()
    bfl = diffusers_to_bfl(state)
    assert tuple(bfl["double_blocks.0.img_attn.qkv.weight"].shape) == (9216, 3072)
    assert tuple(bfl["double_blocks.18.txt_attn.qkv.bias"].shape) == (9216,)
    assert tuple(bfl["single_blocks.0.linear1.weight"].shape) == (21504, 3072)
    assert tuple(bfl["single_blocks.37.linear2.weight"].shape) == (3072, 15360)
    assert tuple(bfl["final_layer.adaLN_modulation.1.weight"].shape) == (6144, 3072)
    assert ("guidance_in.in_layer.weight" in bfl) == ("dev" in name)
    assert same_shapes(bfl_to_diffusers(bfl), state)
    # diffusers' own converter, unpatched (it is written for this width), reads the same BFL names and shapes
    converted = single_file_utils.convert_flux_transformer_checkpoint_to_diffusers(
        {BFL_PREFIX + k: v for k, v in bfl.items()}
    )
    assert same_shapes(converted, state)


def test_bfl_slices_and_modules():
    assert bfl_slices("transformer_blocks.3.attn.to_k", 3072) == ("double_blocks.3.img_attn.qkv", 3072, 6144)
    assert bfl_slices("transformer_blocks.3.attn.add_v_proj", 3072) == ("double_blocks.3.txt_attn.qkv", 6144, 9216)
    assert bfl_slices("single_transformer_blocks.7.attn.to_q", 3072) == ("single_blocks.7.linear1", 0, 3072)
    assert bfl_slices("single_transformer_blocks.7.proj_mlp", 3072) == ("single_blocks.7.linear1", 9216, 21504)
    assert bfl_slices("single_transformer_blocks.7.proj_mlp", 32, 64) == ("single_blocks.7.linear1", 96, 160)
    assert bfl_slices("single_transformer_blocks.7.proj_out", 3072) is None
    assert bfl_slices("transformer_blocks.0.ff.net.2", 3072) is None
    assert bfl_module("single_transformer_blocks.7.proj_out") == "single_blocks.7.linear2"
    assert bfl_module("transformer_blocks.2.ff_context.net.0.proj") == "double_blocks.2.txt_mlp.0"
    assert bfl_module("transformer_blocks.2.attn.norm_added_k") == "double_blocks.2.txt_attn.norm.key_norm"
    assert bfl_module("norm_out.linear") == "final_layer.adaLN_modulation.1"
    with pytest.raises(KronaError):
        bfl_slices("down_blocks.0.attentions.0.proj_in", 3072)
    with pytest.raises(KronaError):
        bfl_module("transformer_blocks.0.attn.to_qkv")


def test_slices_match_the_tiny_model(tiny_state):
    """Every fused part's rows, as bfl_slices tells them, hold that diffusers weight's rows, and together they tile
    the fused weight."""
    bfl = diffusers_to_bfl(tiny_state)
    tiles: dict[str, list[tuple[int, int]]] = {}
    for key, value in tiny_state.items():
        module, _, param = key.rpartition(".")
        where = bfl_slices(module, TINY_HIDDEN) if param in ("weight", "bias") else None
        if where is None:
            continue
        fused, start, stop = where
        assert torch.equal(bfl[f"{fused}.{param}"][start:stop], value)
        tiles.setdefault(f"{fused}.{param}", []).append((start, stop))
    assert len(tiles) == 2 * 2 * 2 + 2 * 2  # qkv × 2 per double block, linear1 per single block; weight and bias
    for key, ranges in tiles.items():
        ranges.sort()
        assert ranges[0][0] == 0 and ranges[-1][1] == bfl[key].shape[0]
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_bad_input_refused(tiny_state):
    with pytest.raises(KronaError, match="not a weight"):
        diffusers_to_bfl({"transformer_blocks.0.attn.to_qkv.weight": torch.zeros(3)})
    with pytest.raises(KronaError, match="not a weight"):
        bfl_to_diffusers({"double_blocks.0.img_attn.qkvx.weight": torch.zeros(3)})
    partial = {k: v for k, v in tiny_state.items() if k != "transformer_blocks.0.attn.to_v.weight"}
    with pytest.raises(KronaError, match="missing"):
        diffusers_to_bfl(partial)
    with pytest.raises(KronaError, match="do not split"):
        bfl_to_diffusers({"double_blocks.0.img_attn.qkv.weight": torch.zeros(10, 4)})
    with pytest.raises(KronaError, match="hidden size"):
        bfl_to_diffusers({"single_blocks.0.linear1.bias": torch.zeros(14)})
    assert set(bfl_to_diffusers({"single_blocks.0.linear1.bias": torch.zeros(14)}, hidden_size=2)) == {
        f"single_transformer_blocks.0.{m}.bias" for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    }


@pytest.mark.subprocess
def test_imports_without_torch():
    code = "import sys, krona_cli.formats.bfl_layout; assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_shipped_flux_configs_load():
    """The FLUX.1 configs krona ships build their classes (the big ones on the meta device) with the public facts."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import T5Config, T5EncoderModel

    for name, guidance in (("flux_dev_transformer.json", True), ("flux_schnell_transformer.json", False)):
        config = meta_model(name).config
        assert (config.num_layers, config.num_single_layers, config.guidance_embeds) == (19, 38, guidance)
        assert config.num_attention_heads * config.attention_head_dim == 3072
        assert tuple(config.axes_dims_rope) == (16, 56, 56) and sum(config.axes_dims_rope) == config.attention_head_dim
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(shipped_config("flux_vae.json"))
        t5 = T5EncoderModel(T5Config(**shipped_config("t5_xxl_text.json")))
    assert vae.config.latent_channels == 16 and vae.quant_conv is None and vae.post_quant_conv is None
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (0.3611, 0.1159)
    assert t5.config.is_gated_act and t5.config.dense_act_fn == "gelu_new"
    assert tuple(t5.encoder.block[0].layer[1].DenseReluDense.wi_0.weight.shape) == (10240, 4096)
    assert len(t5.encoder.block) == 24 and t5.shared.weight.shape[0] == 32128
    dev = FlowMatchEulerDiscreteScheduler.from_config(shipped_config("flux_dev_scheduler.json"))
    schnell = FlowMatchEulerDiscreteScheduler.from_config(shipped_config("flux_schnell_scheduler.json"))
    assert (dev.config.shift, dev.config.use_dynamic_shifting, dev.config.max_shift) == (3.0, True, 1.15)
    assert (schnell.config.shift, schnell.config.use_dynamic_shifting) == (1.0, False)
