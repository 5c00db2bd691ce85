"""inject / remove / adapter state dicts on real module trees, and factor fitting."""

import re

import pytest
import torch
from torch import nn

from krona_cli.errors import KronaError
from krona_cli.kron import (
    Factors,
    KronLinear,
    adapted_layers,
    adapter_state_dict,
    find_targets,
    fit_factors,
    inject,
    layer_factors,
    load_adapter_state_dict,
    parse_factors,
    remove,
    set_scale,
)

ATTN = re.compile(r"\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)$")


@pytest.mark.parametrize("text,expected", [("64x4", (64, 4)), (" 8 X 64 ", (8, 64)), ((4, 2), (4, 2))])
def test_parse_factors(text, expected):
    assert parse_factors(text) == Factors(*expected)


@pytest.mark.parametrize("bad", ["64", "64x", "x4", "64x4x2", "0x4", "-1x4", "axb", "64*4"])
def test_parse_factors_rejects_malformed_text(bad):
    with pytest.raises(KronaError, match="OxI|positive"):
        parse_factors(bad)


def test_fit_factors_uses_nearest_divisor_not_above_and_strict_refuses():
    assert fit_factors(Factors(64, 4), 640, 2048) == Factors(64, 4)
    assert fit_factors(Factors(64, 4), 80, 30) == Factors(40, 3)
    assert fit_factors(Factors(7, 7), 13, 12) == Factors(1, 6)
    with pytest.raises(KronaError, match="do not divide layer 'x'"):
        fit_factors(Factors(64, 4), 80, 30, strict=True, name="x")


def _all_linears(model):
    return {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_default_preset_adapts_every_attention_projection_of_the_tiny_sdxl_unet_and_nothing_else(tiny_sdxl_unet):
    unet = tiny_sdxl_unet
    attention = {name for name in _all_linears(unet) if ATTN.search(name)}
    assert attention and len(attention) < len(_all_linears(unet))
    names = inject(unet, factors="4x4")
    assert set(names) == attention
    assert set(adapted_layers(unet)) == attention
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.kron_{p}" for n in attention for p in "ab"}


def test_presets_on_the_real_sdxl_architecture():
    from krona_cli.pipeline.models import build_component

    unet = build_component("sdxl", "unet")
    assert len(find_targets(unet, "attn")) == 560
    ff = set(find_targets(unet, "attn-ff")) - set(find_targets(unet, "attn"))
    assert len(ff) == 140 and all(n.endswith(("ff.net.0.proj", "ff.net.2")) for n in ff)
    te = build_component("sdxl", "text_encoder")
    names = find_targets(te, "text")
    assert len(names) == 48 and all(re.search(r"self_attn\.(q|k|v|out)_proj$", n) for n in names)


def test_regex_targets_and_errors(tiny_sdxl_unet):
    names = inject(tiny_sdxl_unet, targets=r"attn2\.to_k$", factors="2x2")
    assert names and all(n.endswith("attn2.to_k") for n in names)
    with pytest.raises(KronaError, match="match no linear"):
        inject(nn.Sequential(nn.Linear(4, 4)), targets="attn")
    with pytest.raises(KronaError, match="regular expression"):
        inject(tiny_sdxl_unet, targets="to_q(")


def test_freshly_injected_model_output_equals_base(tiny_sdxl_unet):
    unet = tiny_sdxl_unet.eval()
    torch.manual_seed(0)
    sample = torch.randn(1, 4, 16, 16)
    kwargs = dict(
        encoder_hidden_states=torch.randn(1, 7, unet.config.cross_attention_dim),
        added_cond_kwargs={
            "text_embeds": torch.randn(
                1, unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            ),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]),
        },
    )
    with torch.no_grad():
        before = unet(sample, 10, **kwargs).sample
        inject(unet, factors="4x4")
        after = unet(sample, 10, **kwargs).sample
    assert torch.equal(before, after)


def test_non_dividing_factors_are_fitted_per_layer_and_recorded():
    model = nn.Sequential()
    model.add_module("attn", nn.Module())
    model.attn.add_module("to_q", nn.Linear(30, 80))
    model.attn.add_module("to_k", nn.Linear(64, 64))
    inject(model, factors="64x4")
    assert layer_factors(model) == {"attn.to_q": "40x3", "attn.to_k": "64x4"}
    with pytest.raises(KronaError, match="do not divide"):
        inject(nn.Sequential(model.attn.to_q.base), targets=r"^0$", factors="64x4", strict_factors=True)


def test_remove_restores_linears_and_merge_bakes_the_update():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("blk", nn.Module())
    model.blk.add_module("to_v", nn.Linear(16, 32))
    original = model.blk.to_v.weight.detach().clone()
    inject(model, factors="4x4")
    with torch.no_grad():
        model.blk.to_v.kron_b.normal_()
    x = torch.randn(3, 16)
    y_adapter = model.blk.to_v(x)
    delta = model.blk.to_v.delta_weight().detach()
    remove(model, merge=True)
    assert type(model.blk.to_v) is nn.Linear
    assert torch.allclose(model.blk.to_v(x), y_adapter, atol=1e-6)
    assert torch.allclose(model.blk.to_v.weight, original + delta, atol=1e-6)
    inject(model, factors="4x4")
    remove(model)
    assert type(model.blk.to_v) is nn.Linear
    assert torch.allclose(model.blk.to_v.weight, original + delta)


def test_adapter_state_dict_round_trip_and_mismatch_errors(tiny_sdxl_unet):
    from krona_cli.pipeline.tiny import build_tiny_pipeline

    inject(tiny_sdxl_unet, factors="4x4")
    for layer in adapted_layers(tiny_sdxl_unet).values():
        with torch.no_grad():
            layer.kron_b.normal_()
    state = adapter_state_dict(tiny_sdxl_unet)
    assert all(k.endswith((".kron_a", ".kron_b")) for k in state)
    other = build_tiny_pipeline("sdxl", seed=1).unet
    inject(other, factors="4x4")
    load_adapter_state_dict(other, state)
    assert all(torch.equal(state[k], v) for k, v in adapter_state_dict(other).items())

    with pytest.raises(KronaError, match="do not match"):
        load_adapter_state_dict(other, {k: v for k, v in list(state.items())[1:]})
    wrong = dict(state)
    key = next(k for k in state if k.endswith("kron_a"))
    wrong[key] = torch.zeros(3, 3)
    with pytest.raises(KronaError, match="shape"):
        load_adapter_state_dict(other, wrong)


def test_set_scale():
    model = nn.Sequential()
    model.add_module("a", nn.Module())
    model.a.add_module("to_q", nn.Linear(8, 8))
    inject(model, factors="2x2", scale=0.5)
    set_scale(model, 2.0)
    assert isinstance(model.a.to_q, KronLinear) and model.a.to_q.scale == 2.0
