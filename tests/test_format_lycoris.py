"""The LyCORIS / kohya LoKr format: round trips with the native format, what LyCORIS itself and the UIs' scale rule
rebuild from an exported file, decomposed factors written by other trainers, module-path decoding, clear errors."""

import dataclasses
import json

import pytest
import torch
from helpers import factor_tensors, factors_of, lycoris_torch, random_adapter, read_torch, relayout
from safetensors.torch import load_file
from torch import nn

from krona_cli.errors import KronaError
from krona_cli.formats import DiffuseKronALayer, attach, canonical_name, load_adapter, save_adapter
from krona_cli.formats.kohya_names import decode_path, encode_path
from krona_cli.formats.lycoris import from_lycoris, is_lycoris, save_lycoris
from krona_cli.inference.merge import pipeline_components
from krona_cli.kron import adapted_layers, find_targets
from krona_cli.pipeline.models import build_meta_components
from krona_cli.pipeline.tiny import build_tiny_pipeline

TE_PREFIXES = {
    "sdxl": {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
    "sd15": {"unet": "lora_unet_", "text_encoder": "lora_te_"},
}
Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


def _trained(arch, scale=1.0):
    return random_adapter(arch, scale=scale, seed=5, training={"steps": 3, "lr": 1e-4})


@pytest.fixture(scope="module")
def sdxl_adapter():
    return _trained("sdxl")


@pytest.fixture(scope="module")
def sd15_adapter():
    return _trained("sd15")


def _krona_deltas(adapter, arch):
    """{lora name: s·(A ⊗ B)} from krona's own KronLinear.delta_weight, the adapter attached to a tiny model."""
    pipe = build_tiny_pipeline(arch)
    attach(pipeline_components(pipe), adapter)
    deltas = {}
    for component, model in pipeline_components(pipe).items():
        for name, layer in adapted_layers(model).items():
            lora_name = TE_PREFIXES[arch][component] + encode_path(canonical_name(component, name))
            deltas[lora_name] = layer.delta_weight().detach()
    return deltas


def _assert_same_adapter(got, want):
    assert set(got.layers) == set(want.layers)
    got_tensors, want_tensors = factor_tensors(got), factor_tensors(want)
    assert set(got_tensors) == set(want_tensors)
    for key, t in want_tensors.items():
        assert got_tensors[key].dtype == torch.float32
        assert torch.equal(got_tensors[key], t), key
    assert factors_of(got) == factors_of(want)
    assert got.scale == want.scale and got.layout == "standard"
    assert (got.base_model, got.architecture, got.targets, got.training) == (
        want.base_model,
        want.architecture,
        want.targets,
        want.training,
    )


# --- round trips --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 0.5, 0.25])
def test_sdxl_native_lycoris_native_is_bit_exact(sdxl_adapter, scale, tmp_path):
    adapter = dataclasses.replace(sdxl_adapter, scale=scale)
    native = load_adapter(save_adapter(tmp_path / "native.safetensors", adapter))
    tensors, metadata = lycoris_torch(native)
    assert is_lycoris(tensors)
    assert f"lora_unet_{encode_path(Q)}.lokr_w1" in tensors
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lokr_w2" in tensors
    assert "lora_te2_text_model_encoder_layers_1_self_attn_out_proj.alpha" in tensors
    assert not any(k.startswith("lora_te_") for k in tensors)
    assert all(tensors[k].dim() == 0 and tensors[k].item() == 1.0 for k in tensors if k.endswith(".alpha"))
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"]) == {"algo": "lokr", "full_matrix": "True"}
    assert metadata["ss_base_model_version"].startswith("sdxl_")
    _assert_same_adapter(from_lycoris(tensors, metadata, "memory"), native)


def test_sd15_round_trip_uses_lora_te(sd15_adapter):
    adapter = dataclasses.replace(sd15_adapter, scale=0.5)
    tensors, metadata = lycoris_torch(adapter)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lokr_w1" in tensors
    assert not any(k.startswith(("lora_te1_", "lora_te2_")) for k in tensors)
    assert metadata["ss_base_model_version"] == "sd_v1"
    _assert_same_adapter(from_lycoris(tensors, metadata, "memory"), adapter)


def test_round_trip_through_a_file(sdxl_adapter, tmp_path):
    adapter = dataclasses.replace(sdxl_adapter, scale=0.5)
    path = save_lycoris(tmp_path / "lokr.safetensors", adapter)
    assert [p.name for p in tmp_path.iterdir()] == ["lokr.safetensors"]
    tensors, metadata = read_torch(path)
    _assert_same_adapter(from_lycoris(tensors, metadata, str(path)), adapter)
    # a scale that is not a power of two comes back up to rounding; half precision files come back as float32
    odd = dataclasses.replace(sdxl_adapter, scale=0.8)
    back = from_lycoris(*lycoris_torch(odd), "memory")
    assert back.scale == 0.8
    back_tensors = factor_tensors(back)
    for key, t in factor_tensors(odd).items():
        torch.testing.assert_close(back_tensors[key], t, rtol=1e-6, atol=0)
    half = save_lycoris(tmp_path / "half.safetensors", adapter, dtype="fp16")
    tensors, metadata = read_torch(half)
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    back = from_lycoris(tensors, metadata, str(half))
    assert {t.dtype for t in factor_tensors(back).values()} == {torch.float32}
    with pytest.raises(KronaError, match="dtype"):
        save_lycoris(tmp_path / "x.safetensors", adapter, dtype="int8")


# --- what other tools rebuild from krona's file -------------------------------------------------------------------


class _Transformers4Names(nn.Module):
    """A CLIP text model seen with transformers 4's module names (`text_model.encoder...`), as LoKr files use them."""

    def __init__(self, model):
        super().__init__()
        self.text_model = model


def _text_encoders(pipe):
    # transformers 5 spells CLIPTextModel's layers `encoder.layers...`; CLIPTextModelWithProjection keeps text_model
    encoders = [pipe.text_encoder, getattr(pipe, "text_encoder_2", None)]
    return [
        te if any(n.startswith("text_model.") for n, _ in te.named_modules()) else _Transformers4Names(te)
        for te in encoders
        if te is not None
    ]


def _relative_error(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def test_lycoris_rebuilds_krona_delta_sdxl(sdxl_adapter, tmp_path, monkeypatch):
    """LyCORIS's kohya loader (`lycoris.kohya.create_network_from_weights`, what sd-scripts calls for
    `--network_module lycoris.kohya` weights) builds LokrModules from the file through `make_module_from_state_dict`;
    each is merged with `merge_to(1.0)`, the call LyCORIS's own merge tool makes, into a zeroed base weight, so the
    merged weight is the ΔW LyCORIS builds. Its merge path applies the module's scale twice (peers.md §2.2), which is
    harmless only because alpha = 1 with full factors gives scale 1: checked too."""
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

    adapter = dataclasses.replace(sdxl_adapter, scale=0.8)
    path = save_lycoris(tmp_path / "lokr.safetensors", adapter)
    want = _krona_deltas(adapter, "sdxl")
    pipe = build_tiny_pipeline("sdxl")
    # LyCORIS 4.1.3 targets diffusers' TimestepEmbedding both by class and by name, and its constructor then fails
    # on a diffusers UNet with "duplicated lora name: lora_unet_time_embedding_linear_1"; drop the name targets.
    monkeypatch.setattr(LycorisNetworkKohya, "UNET_TARGET_REPLACE_NAME", [])
    network, _ = create_network_from_weights(1.0, str(path), None, _text_encoders(pipe), pipe.unet)
    modules = network.unet_loras + network.text_encoder_loras
    assert {m.lora_name for m in modules} == set(want)
    worst = 0.0
    for module in modules:
        assert type(module).__name__ == "LokrModule" and module.use_w1 and module.use_w2
        assert module.scale == 1.0
        weight = module.org_module[0].weight
        with torch.no_grad():
            weight.zero_()
        module.merge_to(1.0)
        worst = max(worst, _relative_error(weight.detach(), want[module.lora_name]))
    assert worst < 1e-6, worst


def test_lycoris_merge_tool_rebuilds_krona_delta_sd15(sd15_adapter, tmp_path):
    """`lycoris.utils.merge`, the function behind LyCORIS's tools/merge.py, on the SD 1.5 file (for SDXL it renames
    UNet keys to kohya's SGM names first, so it only merges into sd-scripts' own SDXL UNet, not diffusers')."""
    from lycoris.utils import merge

    adapter = dataclasses.replace(sd15_adapter, scale=0.3)
    path = save_lycoris(tmp_path / "lokr.safetensors", adapter)
    want = _krona_deltas(adapter, "sd15")
    pipe = build_tiny_pipeline("sd15")
    (te,) = _text_encoders(pipe)
    targets = {}
    for prefix, root in (("lora_te", te), ("lora_unet", pipe.unet)):
        for name, module in root.named_modules():
            lora_name = f"{prefix}_{name}".replace(".", "_")
            if lora_name in want:
                targets[lora_name] = module.weight
    assert set(targets) == set(want)
    with torch.no_grad():
        for weight in targets.values():
            weight.zero_()
    merge([te], pipe.unet, load_file(str(path)), scale=1.0)
    worst = max(_relative_error(targets[n].detach(), want[n]) for n in want)
    assert worst < 1e-6, worst


def _ui_delta(tensors, name, strength=1.0):
    """ΔW as ComfyUI and A1111 build it (peers.md §2.4): strength · (alpha / r) · kron(w1, w2), where r is the inner
    rank of the decomposed factor (w2's when both are) and the factor is 1 when neither is decomposed."""
    t = {k.partition(".")[2]: v.float() for k, v in tensors.items() if k.partition(".")[0] == name}
    rank = None
    w1 = t.get("lokr_w1")
    if w1 is None:
        w1, rank = t["lokr_w1_a"] @ t["lokr_w1_b"], t["lokr_w1_b"].shape[0]
    w2 = t.get("lokr_w2")
    if w2 is None:
        w2, rank = t["lokr_w2_a"] @ t["lokr_w2_b"], t["lokr_w2_b"].shape[0]
    factor = t["alpha"].item() / rank if rank is not None and "alpha" in t else 1.0
    return strength * factor * torch.kron(w1, w2)


def test_ui_scale_rule_and_functional_lokr_give_krona_delta(sdxl_adapter):
    """The UIs' rule (alpha ignored: nothing is decomposed) and LyCORIS's functional `diff_weight(..., gamma=alpha)`,
    whose scale is gamma / rank with rank = gamma when nothing is decomposed."""
    from lycoris.functional.lokr import diff_weight

    adapter = dataclasses.replace(sdxl_adapter, scale=0.8)
    tensors, _ = lycoris_torch(adapter)
    want = _krona_deltas(adapter, "sdxl")
    assert {k.partition(".")[0] for k in tensors} == set(want)
    for name, delta in want.items():
        for strength in (1.0, 0.7):
            torch.testing.assert_close(_ui_delta(tensors, name, strength), strength * delta, rtol=1e-6, atol=1e-9)
        w1, w2, alpha = tensors[f"{name}.lokr_w1"], tensors[f"{name}.lokr_w2"], tensors[f"{name}.alpha"]
        lyco = diff_weight(w1, None, None, w2, None, None, None, gamma=alpha.item())
        torch.testing.assert_close(lyco, delta, rtol=1e-6, atol=1e-9)


# --- files written by other trainers ------------------------------------------------------------------------------


def test_decomposed_factors_get_the_ui_scale():
    from lycoris.functional.lokr import diff_weight

    torch.manual_seed(0)
    k = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    q_name, k_name = f"lora_unet_{encode_path(Q)}", f"lora_unet_{encode_path(k)}"
    w1, w2_a, w2_b = torch.randn(4, 4), torch.randn(8, 2), torch.randn(2, 8)  # to_q: 32x32, w2 of rank 2
    v1_a, v1_b, v2 = torch.randn(4, 1), torch.randn(1, 8), torch.randn(8, 10)  # to_k: 32x80, w1 of rank 1
    tensors = {
        f"{q_name}.lokr_w1": w1.half(),
        f"{q_name}.lokr_w2_a": w2_a.half(),
        f"{q_name}.lokr_w2_b": w2_b.half(),
        f"{q_name}.alpha": torch.tensor(3.0).half(),
        f"{k_name}.lokr_w1_a": v1_a,
        f"{k_name}.lokr_w1_b": v1_b,
        f"{k_name}.lokr_w2": v2,
        f"{k_name}.alpha": torch.tensor(0.5),
    }
    assert is_lycoris(tensors)
    adapter = from_lycoris(tensors, {"ss_base_model_version": "sdxl_base_v1-0"}, "trainer.safetensors")
    assert adapter.scale == 1.0 and adapter.architecture == "sdxl" and adapter.base_model is None
    assert adapter.targets == {"unet": "attn"}
    assert factors_of(adapter) == {"unet": {Q: "4x4", k: "4x8"}}
    a, b = adapter.layers["unet"][Q].a, adapter.layers["unet"][Q].b
    assert a.dtype == b.dtype == torch.float32
    w1_, w2_ = w1.half().float(), w2_a.half().float() @ w2_b.half().float()
    torch.testing.assert_close(adapter.scale * torch.kron(a, b), (3.0 / 2) * torch.kron(w1_, w2_))
    torch.testing.assert_close(adapter.scale * torch.kron(a, b), _ui_delta(tensors, q_name))
    a, b = adapter.layers["unet"][k].a, adapter.layers["unet"][k].b
    torch.testing.assert_close(torch.kron(a, b), (0.5 / 1) * torch.kron(v1_a @ v1_b, v2))
    torch.testing.assert_close(torch.kron(a, b), _ui_delta(tensors, k_name))
    # LyCORIS's own functional rebuild (gamma / rank) agrees
    lyco = diff_weight(None, v1_a, v1_b, v2, None, None, None, gamma=0.5)
    torch.testing.assert_close(torch.kron(a, b), lyco)
    # and the adapter attaches to the tiny SDXL UNet like any other
    pipe = build_tiny_pipeline("sdxl")
    attach({"unet": pipe.unet}, adapter)
    layer = adapted_layers(pipe.unet)[Q]
    torch.testing.assert_close(layer.delta_weight(), 1.5 * torch.kron(w1_, w2_))


def test_architecture_and_targets_without_krona_metadata(sd15_adapter, sdxl_adapter):
    tensors, _ = lycoris_torch(sd15_adapter)
    adapter = from_lycoris(tensors, {}, "x")  # no metadata at all: lora_te_ means one text encoder, SD 1.x
    assert adapter.architecture == "sd15" and adapter.scale == 1.0 and adapter.training is None
    assert adapter.targets == {"unet": "attn-ff", "text_encoder": "text"}
    tensors, _ = lycoris_torch(sdxl_adapter)
    adapter = from_lycoris(tensors, {}, "x")
    assert adapter.architecture == "sdxl" and set(adapter.layers) == {"unet", "text_encoder", "text_encoder_2"}
    # UNet only, not all attention: no architecture to tell (tiny widths), targets a regex of exactly these layers
    only = {k: v for k, v in tensors.items() if k.startswith(f"lora_unet_{encode_path(Q)}.")}
    only["lora_unet_down_blocks_1_resnets_0_time_emb_proj.lokr_w1"] = torch.ones(2, 4)
    only["lora_unet_down_blocks_1_resnets_0_time_emb_proj.lokr_w2"] = torch.ones(16, 16)
    adapter = from_lycoris(only, {}, "x")
    assert adapter.architecture is None
    pipe = build_tiny_pipeline("sdxl")
    wanted = sorted([Q, "down_blocks.1.resnets.0.time_emb_proj"])
    assert sorted(find_targets(pipe.unet, adapter.targets["unet"])) == wanted
    assert sorted(attach({"unet": pipe.unet}, adapter)["unet"]) == wanted


# --- module names -------------------------------------------------------------------------------------------------


def _linear_names(models):
    return {
        (component, canonical_name(component, name))
        for component, model in models.items()
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    }


@pytest.fixture(scope="module")
def all_linear_names():
    names = set()
    for arch in ("sdxl", "sd15"):
        names |= _linear_names(build_meta_components(arch))
        names |= _linear_names(pipeline_components(build_tiny_pipeline(arch)))
    return names


def test_decoder_reads_every_linear_name(all_linear_names):
    paths = {path for _, path in all_linear_names}
    assert len(paths) > 1000  # the real SDXL UNet alone has 743 linears
    for path in paths:
        assert decode_path(encode_path(path)) == path
    # and through a whole file's keys, with the component prefixes
    tensors = {}
    for component, path in all_linear_names:
        prefix = TE_PREFIXES["sdxl"][component]
        tensors[f"{prefix}{encode_path(path)}.lokr_w1"] = torch.ones(1, 1)
        tensors[f"{prefix}{encode_path(path)}.lokr_w2"] = torch.ones(1, 1)
    adapter = from_lycoris(tensors, {}, "names")
    assert {(c, m) for c, layers in adapter.layers.items() for m in layers} == all_linear_names


# --- errors -------------------------------------------------------------------------------------------------------


def _one(key, suffix="lokr_w1", shape=(2, 2)):
    return {f"{key}.{suffix}": torch.ones(shape), f"{key}.lokr_w2": torch.ones(4, 4)}


@pytest.mark.parametrize(
    "tensors, message",
    [
        (_one("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"), r"SGM way.*input_blocks_1_1.*SDXL UNet"),
        (
            _one("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") | _one(f"lora_unet_{encode_path(Q)}"),
            r"both the SGM way.*and the diffusers way",
        ),
        (_one(f"lora_unet_{encode_path(Q)}", "lokr_t2"), rf"{encode_path(Q)}\.lokr_t2.*supports"),
        (_one(f"lora_unet_{encode_path(Q)}", "dora_scale"), r"dora_scale.*supports"),
        (_one(f"lora_unet_{encode_path(Q)}", "lora_down.weight"), r"lora_down\.weight.*supports"),
        ({"model.diffusion_model.out.weight": torch.ones(2)}, r"model\.diffusion_model\.out\.weight.*not a kohya"),
        (_one("lora_unet_down_blocks_1_foo_bar"), r"lora_unet_down_blocks_1_foo_bar\.lokr_w1"),
        ({f"lora_unet_{encode_path(Q)}.lokr_w1": torch.ones(2, 2, 1, 1)}, r"conv-shaped"),
        ({f"lora_unet_{encode_path(Q)}.lokr_w1": torch.ones(2, 2)}, r"lacks lokr_w2"),
        ({}, r"no tensors"),
    ],
)
def test_unreadable_files_are_clear_errors(tensors, message):
    with pytest.raises(KronaError, match=message):
        from_lycoris(tensors, {}, "bad.safetensors")


def test_other_layouts_and_zero_scale_are_not_exported(sdxl_adapter):
    with pytest.raises(KronaError, match="layout 'diffusekrona'"):
        lycoris_torch(relayout(sdxl_adapter, DiffuseKronALayer))
    with pytest.raises(KronaError, match="scale"):
        lycoris_torch(dataclasses.replace(sdxl_adapter, scale=0.0))


def test_is_lycoris(sdxl_adapter, tmp_path):
    tensors, _ = lycoris_torch(sdxl_adapter)
    assert is_lycoris(tensors) and is_lycoris(list(tensors))
    native, _ = read_torch(save_adapter(tmp_path / "n.safetensors", sdxl_adapter))
    assert not is_lycoris(native)
    assert not is_lycoris(["lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight"])
    assert not is_lycoris([])
