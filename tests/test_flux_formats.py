"""FLUX.1 adapters in other tools' files: krona's LoKr and LoRA exports against ComfyUI's FLUX key and alpha rules
(tests/comfyui_flux.py) on the full real FLUX.1 [dev] layer list, the LoRA export against diffusers' own
`FluxPipeline.load_lora_weights` on the tiny FLUX pipeline, and files in SimpleTuner's, OneTrainer's, diffusers' and
kohya's namings (written here as those tools lay them out) read back to the adapter they hold."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from comfyui_flux import comfyui_flux_key_map, comfyui_lokr_scale, comfyui_lora_scale, comfyui_swapped_targets
from diffusers import FluxPipeline, FluxTransformer2DModel
from helpers import read_torch
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from krona_cli.architectures import load_model_config
from krona_cli.errors import KronaError
from krona_cli.formats import Adapter, KronLayer, LoraLayer, canonical_name, load_adapter, save_adapter
from krona_cli.formats.bfl_layout import diffusers_to_bfl
from krona_cli.formats.description import describe
from krona_cli.formats.lora_export import save_lora, to_lora
from krona_cli.formats.lycoris import to_lycoris
from krona_cli.inference.export import export_adapter
from krona_cli.kron import fit_factors, parse_factors
from krona_cli.pipeline.tiny_flux import make_tiny_flux

# comfy/lora.py LORA_CLIP_MAP: the CLIP linears ComfyUI has lora names for, module path -> its part of the name
CLIP_MAP = {
    "mlp.fc1": "mlp_fc1",
    "mlp.fc2": "mlp_fc2",
    "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.q_proj": "self_attn_q_proj",
    "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
}
SUFFIXES = (
    ".lora_A.weight",
    ".lora_B.weight",
    ".lora_down.weight",
    ".lora_up.weight",
    ".alpha",
    ".lokr_w1",
    ".lokr_w2",
)


def comfyui_clip_key_map(layers: int = 12) -> dict[str, str]:
    """comfy/lora.py `model_lora_keys_clip` for FLUX's text encoders (clip_l and t5xxl, no clip_g): for every CLIP-L
    layer and each linear of CLIP_MAP, `lora_te_...`, `lora_te1_...` (kohya's names) and diffusers'
    `text_encoder.text_model.encoder.layers.N.<module>` -> `clip_l.transformer.text_model.encoder.layers.N.<m>.weight`
    (Comfy-Org/ComfyUI comfy/lora.py @ 17358c8f)."""
    out = {}
    for b in range(layers):
        for module, part in CLIP_MAP.items():
            weight = f"clip_l.transformer.text_model.encoder.layers.{b}.{module}.weight"
            for name in (
                f"lora_te_text_model_encoder_layers_{b}_{part}",
                f"lora_te1_text_model_encoder_layers_{b}_{part}",
            ):
                out[name] = weight
            out[f"text_encoder.text_model.encoder.layers.{b}.{module}"] = weight
    return out


def lora_names(tensors) -> dict[str, dict[str, object]]:
    """{lora name: {suffix: tensor}} of a file's tensors."""
    out: dict[str, dict[str, object]] = {}
    for key, value in tensors.items():
        suffix = next(s for s in SUFFIXES if key.endswith(s))
        out.setdefault(key[: -len(suffix)], {})[suffix] = value
    return out


def _linears(model) -> dict[str, tuple[int, int]]:
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _kron(d_out: int, d_in: int, requested: str, rank_one_b: bool) -> KronLayer:
    f = fit_factors(parse_factors(requested), d_out, d_in)
    b_out, b_in = d_out // f.a_out, d_in // f.a_in
    b = torch.outer(torch.randn(b_out), torch.randn(b_in)) if rank_one_b else torch.randn(b_out, b_in)
    return KronLayer(torch.randn(f.a_out, f.a_in), b * 0.05)


# --- krona's exports on the real FLUX.1 [dev] layer list, against ComfyUI's rules --------------------------------


@pytest.fixture(scope="module")
def real():
    """An adapter on every linear of the real FLUX.1 [dev] transformer and the six linears of every CLIP-L layer,
    factors fitted from 64x4 as krona fits them, small random values, B of rank 1 (so a rank-4 LoRA is exact), and
    {(component, module): weight shape}; plus ComfyUI's shapes of the BFL model's weights."""
    torch.manual_seed(0)
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(load_model_config("flux_dev_transformer.json"))
        clip = CLIPTextModel(CLIPTextConfig(**load_model_config("clip_vit_l_text.json")))
    layers = {"transformer": {}, "text_encoder": {}}
    for name, (d_out, d_in) in _linears(transformer).items():
        layers["transformer"][name] = _kron(d_out, d_in, "64x4", rank_one_b=True)
    for name, (d_out, d_in) in _linears(clip).items():
        if name.split(".")[-2] in ("self_attn", "mlp"):
            layers["text_encoder"][canonical_name("text_encoder", name)] = _kron(d_out, d_in, "64x4", rank_one_b=True)
    adapter = Adapter(layers, scale=0.75, base_model="black-forest-labs/FLUX.1-dev", architecture="flux")
    bfl = {f"diffusion_model.{k}": tuple(v.shape) for k, v in diffusers_to_bfl(transformer.state_dict()).items()}
    clip_shapes = {
        f"clip_l.transformer.{canonical_name('text_encoder', n)}.weight": s for n, s in _linears(clip).items()
    }
    return adapter, bfl | clip_shapes


@pytest.fixture(scope="module")
def real_files(real):
    adapter, _ = real
    lokr, _ = to_lycoris(adapter)
    peft, _, _ = to_lora(adapter, rank=4)
    kohya, _, report = to_lora(adapter, rank=4, layout="kohya")
    assert report["error"] < 1e-5
    return {"lycoris": lokr, "peft": peft, "kohya": kohya}


def _comfyui_target(name: str, transformer_map: dict, clip_map: dict) -> tuple[str, tuple | None]:
    if name in clip_map:
        return clip_map[name], None
    return transformer_map[name]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lycoris", "peft", "kohya"])
def test_every_exported_key_is_mapped_by_comfyui(real, real_files, kind):
    adapter, shapes = real
    transformer_map, clip_map = comfyui_flux_key_map(), comfyui_clip_key_map()
    names = lora_names(real_files[kind])
    adapted = sum(len(mods) for mods in adapter.layers.values())
    if kind != "kohya":  # one name per layer; kohya's stacks the parts of a fused BFL weight
        assert len(names) == adapted
    for name, parts in names.items():
        assert name in transformer_map or name in clip_map, name
        key, offset = _comfyui_target(name, transformer_map, clip_map)
        rows, cols = shapes[key]
        if offset is not None:
            assert offset[0] == 0 and offset[1] + offset[2] <= rows
            rows = offset[2]
        if ".lokr_w1" in parts:
            w1, w2 = parts[".lokr_w1"], parts[".lokr_w2"]
            assert (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]) == (rows, cols), name
        else:
            up = parts.get(".lora_B.weight", parts.get(".lora_up.weight"))
            down = parts.get(".lora_A.weight", parts.get(".lora_down.weight"))
            assert (up.shape[0], down.shape[1]) == (rows, cols), name
    expected_prefixes = {"lycoris": ("lycoris_", "lora_te1_"), "peft": ("transformer.", "text_encoder.")}
    expected_prefixes["kohya"] = ("lora_unet_", "lora_te1_")
    assert {name.startswith(expected_prefixes[kind]) for name in names} == {True}


def _comfyui_delta(parts: dict, name: str, swapped: set) -> tuple[torch.Tensor, float, float]:
    """The update ComfyUI adds for one lora name (its strength 1), under both of its full-matrix LoKr alpha rules
    (tests/comfyui_flux.py): (ΔW, its factor by the earlier rule, by the later one)."""
    alpha = parts.get(".alpha")
    alpha = None if alpha is None else float(alpha)
    if ".lokr_w1" in parts:
        w1, w2 = (torch.from_numpy(np.asarray(parts[s])) for s in (".lokr_w1", ".lokr_w2"))
        delta = torch.kron(w1, w2)
        later = None if alpha is None else w2.shape[0] // w1.shape[0]
        factors = (comfyui_lokr_scale(alpha, True, True, 0), comfyui_lokr_scale(alpha, True, True, 0, later))
    else:
        up = torch.from_numpy(np.asarray(parts.get(".lora_B.weight", parts.get(".lora_up.weight"))))
        down = torch.from_numpy(np.asarray(parts.get(".lora_A.weight", parts.get(".lora_down.weight"))))
        delta = up @ down
        factors = (comfyui_lora_scale(alpha, down.shape[0]),) * 2
    if name in swapped:  # ComfyUI swaps a diffusers-named norm_out.linear update into BFL's (shift, scale) order
        half = delta.shape[0] // 2
        delta = torch.cat([delta[half:], delta[:half]])
    return delta, *factors


# The layers the update is compared on: one double and one single block (their modulations left out for size), the
# final modulation (its halves swapped in BFL's layout), the output and input projections.
SUBSET = ("transformer_blocks.0.", "single_transformer_blocks.0.", "norm_out.", "proj_out", "x_embedder")
BIG = (".norm1.linear", ".norm1_context.linear", ".norm.linear")


@pytest.fixture(scope="module")
def real_subset_deltas(real):
    """krona's ΔW of the SUBSET's layers in BFL's layout under ComfyUI's weight names, and of the first CLIP layer."""
    adapter, _ = real
    subset = {
        f"{m}.weight": layer.delta(adapter.scale)
        for m, layer in adapter.layers["transformer"].items()
        if m.startswith(SUBSET) and not m.endswith(BIG)
    }
    want = {f"diffusion_model.{k}": v for k, v in diffusers_to_bfl(subset).items()}
    for module, layer in adapter.layers["text_encoder"].items():
        if ".layers.0." in module:
            want[f"clip_l.transformer.{module}.weight"] = layer.delta(adapter.scale)
    return want


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lycoris", "peft", "kohya"])
def test_comfyui_applies_exactly_kronas_update(real_subset_deltas, real_files, kind):
    """On the SUBSET's layers and the first CLIP layer, what ComfyUI adds to each weight (the rows it patches, its
    alpha rule, both of its full-matrix LoKr rules) is krona's ΔW = s·(A ⊗ B) in BFL's layout, and every row of
    those weights is patched once."""
    want = real_subset_deltas
    transformer_map, clip_map = comfyui_flux_key_map(), comfyui_clip_key_map()
    swapped = comfyui_swapped_targets(transformer_map)
    covered: dict[str, list[tuple[int, int]]] = {}
    for name, parts in lora_names(real_files[kind]).items():
        key, offset = _comfyui_target(name, transformer_map, clip_map)
        if key not in want:
            continue
        delta, earlier, later = _comfyui_delta(parts, name, swapped)
        assert earlier == later == 1.0, name
        start, stop = (0, want[key].shape[0]) if offset is None else (offset[1], offset[1] + offset[2])
        expected = want[key][start:stop]
        assert delta.shape == expected.shape, name
        assert (delta - expected).abs().max() <= 1e-5 * expected.abs().max(), name  # float32 rounding only
        covered.setdefault(key, []).append((start, stop))
    assert covered.keys() == want.keys()
    for key, ranges in covered.items():
        ranges.sort()
        assert ranges[0][0] == 0 and ranges[-1][1] == want[key].shape[0], key
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), key


@pytest.mark.slow
def test_lokr_alpha_is_one_scale_under_every_rule(real_files):
    """A layer whose w2 has at least as many rows as w1 gets alpha = w2 rows // w1 rows (the later ComfyUI rule's
    divisor), any other no alpha; both rules then give 1 (the earlier one ignores alpha), as LyCORIS does."""
    names = lora_names(real_files["lycoris"])
    with_alpha = {n for n, parts in names.items() if ".alpha" in parts}
    assert with_alpha and with_alpha != set(names)
    for parts in names.values():
        w1, w2 = parts[".lokr_w1"], parts[".lokr_w2"]
        quotient = w2.shape[0] // w1.shape[0]
        assert (float(parts[".alpha"]) if ".alpha" in parts else None) == (float(quotient) if quotient else None)


# --- the LoRA export in diffusers' own loader -------------------------------------------------------------------


def _tiny_adapter(pipe, scale=0.6, seed=1):
    """Kronecker layers on every linear of the tiny transformer and the attention of every CLIP layer."""
    torch.manual_seed(seed)
    layers = {"transformer": {}, "text_encoder": {}}
    for name, (d_out, d_in) in _linears(pipe.transformer).items():
        layers["transformer"][name] = _kron(d_out, d_in, "4x4", rank_one_b=False)
    for name, (d_out, d_in) in _linears(pipe.text_encoder).items():
        if ".self_attn." in name:
            layers["text_encoder"][canonical_name("text_encoder", name)] = _kron(d_out, d_in, "2x2", rank_one_b=False)
    return Adapter(layers, scale=scale, base_model="tiny-flux", architecture="flux")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-flux")
    make_tiny_flux(folder)
    pipe = FluxPipeline.from_pretrained(folder)
    return folder, _tiny_adapter(pipe)


def test_diffusers_loads_the_lora_export_exactly(tiny, tmp_path):
    folder, adapter = tiny
    path = tmp_path / "flux-lora.safetensors"
    report = save_lora(path, adapter, rank=64)  # the family's default: diffusers' names
    assert report["error"] < 1e-5
    pipe = FluxPipeline.from_pretrained(folder)
    models = {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder}
    base = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in models.items()}
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(components=list(models))
    pipe.unload_lora_weights()
    changed = {}
    for c, m in models.items():
        for key, value in m.state_dict().items():
            if not torch.equal(value, base[c][key]):
                assert key.endswith(".weight"), key
                changed[(c, canonical_name(c, key.removesuffix(".weight")))] = value.double() - base[c][key].double()
    want = {
        (c, m): layer.delta(adapter.scale).double() for c, mods in adapter.layers.items() for m, layer in mods.items()
    }
    assert changed.keys() == want.keys()
    for where, delta in want.items():
        torch.testing.assert_close(changed[where], delta, rtol=1e-5, atol=2e-6, msg=str(where))


# --- krona's own files round trip, and `krona export` from a native FLUX file -----------------------------------


def _deltas(adapter) -> dict:
    return {(c, m): d.double() for c, m, d in adapter.deltas()}


def _same_deltas(got, want, tol=1e-6):
    assert got.keys() == want.keys()
    for where, delta in want.items():
        torch.testing.assert_close(got[where], delta, rtol=tol, atol=tol * 1e-2, msg=str(where))


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_lora_exports_read_back_exactly(tiny, tmp_path, layout):
    _, adapter = tiny
    path = tmp_path / f"{layout}.safetensors"
    save_lora(path, adapter, rank=64, layout=layout)
    back = load_adapter(path)
    assert back.architecture == "flux" and back.key_format == ("diffusers" if layout == "peft" else "kohya")
    _same_deltas(_deltas(back), _deltas(adapter), tol=1e-5)
    assert describe(path)["layers"] == adapter.num_layers()


def test_export_command_writes_comfyui_names(tiny, tmp_path):
    """`krona export` from a native FLUX file: LoKr (exact, scale restored) and LoRA, every name one ComfyUI maps on
    the tiny model's shapes."""
    _, adapter = tiny
    native = save_adapter(tmp_path / "adapter.safetensors", adapter)
    transformer_map, clip_map = comfyui_flux_key_map(depth=2, depth_single=2, hidden_size=32), comfyui_clip_key_map()
    for to, rank in (("lycoris", None), ("lora", 32)):
        out = tmp_path / f"{to}.safetensors"
        export_adapter(native, to, out, rank=rank)
        tensors = read_torch(out)[0]
        assert all(name in transformer_map or name in clip_map for name in lora_names(tensors)), to
        back = load_adapter(out)
        assert back.architecture == "flux"
        _same_deltas(_deltas(back), _deltas(adapter), tol=1e-5)
    assert load_adapter(tmp_path / "lycoris.safetensors").scale == adapter.scale


# --- files other tools write, read back -------------------------------------------------------------------------

H = 32  # the tiny transformer's width; its single blocks' MLP is 4H
FUSED = {  # BFL fused weight (block 0) -> its diffusers parts, in row order
    "double_blocks.0.img_attn.qkv": ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                     "transformer_blocks.0.attn.to_v"),
    "double_blocks.0.txt_attn.qkv": ("transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.add_k_proj",
                                     "transformer_blocks.0.attn.add_v_proj"),
    "single_blocks.0.linear1": ("single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
                                "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp"),
}  # fmt: skip
RENAMED = {  # BFL weight -> diffusers module, one to one (norm_out.linear's halves swapped)
    "double_blocks.0.img_attn.proj": "transformer_blocks.0.attn.to_out.0",
    "double_blocks.0.img_mlp.0": "transformer_blocks.0.ff.net.0.proj",
    "double_blocks.0.txt_mlp.2": "transformer_blocks.0.ff_context.net.2",
    "single_blocks.0.linear2": "single_transformer_blocks.0.proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
SHAPES = {  # diffusers module -> (d_out, d_in) in the tiny transformer
    **{m: (H, H) for parts in FUSED.values() for m in parts},
    "single_transformer_blocks.0.proj_mlp": (4 * H, H),
    "transformer_blocks.0.attn.to_out.0": (H, H),
    "transformer_blocks.0.ff.net.0.proj": (4 * H, H),
    "transformer_blocks.0.ff_context.net.2": (H, 4 * H),
    "single_transformer_blocks.0.proj_out": (H, 5 * H),
    "norm_out.linear": (2 * H, H),
}
TEXT_Q = "text_model.encoder.layers.0.self_attn.q_proj"


def _u(module: str) -> str:
    return module.replace(".", "_")


def _swap(t: torch.Tensor) -> torch.Tensor:
    half = t.shape[0] // 2
    return torch.cat([t[half:], t[:half]])


@pytest.fixture(scope="module")
def known_kron():
    """A Kronecker adapter whose parts of each fused BFL weight share B (A 4 rows per 32, B 8x8), so that kohya's
    fused LoKr can hold it too; norm_out.linear's A has an even number of rows (its halves are whole blocks)."""
    torch.manual_seed(7)
    layers = {}
    for parts in FUSED.values():
        b = torch.randn(8, 8)
        for m in parts:
            layers[m] = KronLayer(torch.randn(SHAPES[m][0] // 8, 4), b)
    for m in RENAMED.values():
        d_out, d_in = SHAPES[m]
        layers[m] = KronLayer(torch.randn(d_out // 8, 4), torch.randn(8, d_in // 4))
    text = {TEXT_Q: KronLayer(torch.randn(2, 2), torch.randn(16, 16))}
    return Adapter({"transformer": layers, "text_encoder": text}, architecture="flux")


@pytest.fixture(scope="module")
def known_lora():
    torch.manual_seed(8)
    layers = {m: LoraLayer(torch.randn(3, d_in), torch.randn(d_out, 3)) for m, (d_out, d_in) in SHAPES.items()}
    text = {TEXT_Q: LoraLayer(torch.randn(3, H), torch.randn(H, 3))}
    return Adapter({"transformer": layers, "text_encoder": text}, format_version=None)


def _kohya_lokr(k: Adapter) -> dict:
    """kohya's LyCORIS LoKr for FLUX (sd-scripts' BFL names): a fused weight's w1 stacks its parts' A, w2 is their B."""
    layers, out = k.layers["transformer"], {}
    for fused, parts in FUSED.items():
        out[f"lora_unet_{_u(fused)}.lokr_w1"] = torch.cat([layers[m].a for m in parts])
        out[f"lora_unet_{_u(fused)}.lokr_w2"] = layers[parts[0]].b
        out[f"lora_unet_{_u(fused)}.alpha"] = torch.tensor(1.0)
    for bfl, m in RENAMED.items():
        a = _swap(layers[m].a) if m == "norm_out.linear" else layers[m].a
        out[f"lora_unet_{_u(bfl)}.lokr_w1"], out[f"lora_unet_{_u(bfl)}.lokr_w2"] = a, layers[m].b
    text = k.layers["text_encoder"][TEXT_Q]
    out[f"lora_te1_{_u(TEXT_Q)}.lokr_w1"], out[f"lora_te1_{_u(TEXT_Q)}.lokr_w2"] = text.a, text.b
    return out


def _diffusers_named_lokr(k: Adapter, prefix: str, text: bool) -> dict:
    """SimpleTuner's (`lycoris_`, LyCORIS's full-matrix alpha = its dim, 10000) or OneTrainer's (`lora_transformer_`,
    alpha 1) LoKr; to_out.0 with w2 decomposed (w2_a @ w2_b, alpha 4 over rank 8: the loaders' 0.5, w1 doubled)."""
    out = {}
    for m, layer in k.layers["transformer"].items():
        name = prefix + _u(m)
        out[f"{name}.alpha"] = torch.tensor(10000.0 if prefix == "lycoris_" else 1.0)
        if m.endswith("to_out.0"):
            out[f"{name}.lokr_w1"], out[f"{name}.alpha"] = layer.a * 2, torch.tensor(4.0)
            out[f"{name}.lokr_w2_a"], out[f"{name}.lokr_w2_b"] = layer.b, torch.eye(8)
        else:
            out[f"{name}.lokr_w1"], out[f"{name}.lokr_w2"] = layer.a, layer.b
    if text:
        layer = k.layers["text_encoder"][TEXT_Q]
        out[f"lora_te1_{_u(TEXT_Q)}.lokr_w1"], out[f"lora_te1_{_u(TEXT_Q)}.lokr_w2"] = layer.a, layer.b
    return out


def _kohya_lora(lo: Adapter) -> dict:
    """kohya's FLUX LoRA: a fused weight's down stacks its parts' downs, its up holds each part's up in its rows and
    columns (block diagonal); alpha = half the stacked rank (multiplier 0.5, so the ups are doubled)."""
    layers, out = lo.layers["transformer"], {}
    groups = {**FUSED, **{bfl: (m,) for bfl, m in RENAMED.items()}}
    for bfl, parts in groups.items():
        up = torch.block_diag(*[layers[m].up for m in parts])
        up = _swap(up) if parts == ("norm_out.linear",) else up
        out[f"lora_unet_{_u(bfl)}.lora_down.weight"] = torch.cat([layers[m].down for m in parts])
        out[f"lora_unet_{_u(bfl)}.lora_up.weight"] = up * 2
        out[f"lora_unet_{_u(bfl)}.alpha"] = torch.tensor(1.5 * len(parts))
    text = lo.layers["text_encoder"][TEXT_Q]
    out[f"lora_te1_{_u(TEXT_Q)}.lora_down.weight"], out[f"lora_te1_{_u(TEXT_Q)}.lora_up.weight"] = text.down, text.up
    return out


def _onetrainer_lora(lo: Adapter) -> dict:
    """OneTrainer's FLUX LoRA: `lora_transformer_` + diffusers names, alpha 1.5 over rank 3 (ups doubled)."""
    out = {}
    for component, prefix in (("transformer", "lora_transformer_"), ("text_encoder", "lora_te1_")):
        for m, layer in lo.layers[component].items():
            out[f"{prefix}{_u(m)}.lora_down.weight"], out[f"{prefix}{_u(m)}.lora_up.weight"] = layer.down, layer.up * 2
            out[f"{prefix}{_u(m)}.alpha"] = torch.tensor(1.5)
    return out


def _diffusers_lora(lo: Adapter) -> tuple[dict, dict]:
    """diffusers' / peft's: `transformer.<module>.lora_A.weight`, `text_encoder.<module>...`, and the peft configs in
    `lora_adapter_metadata` (the transformer's lora_alpha 6 over rank 3: multiplier 2, ups halved)."""
    out = {}
    for component, mods in lo.layers.items():
        for m, layer in mods.items():
            out[f"{component}.{m}.lora_A.weight"] = layer.down
            out[f"{component}.{m}.lora_B.weight"] = layer.up / 2 if component == "transformer" else layer.up
    configs = {"transformer.r": 3, "transformer.lora_alpha": 6, "text_encoder.r": 3, "text_encoder.lora_alpha": 3}
    return out, {"lora_adapter_metadata": json.dumps(configs)}


def _written(kind: str, known_kron, known_lora) -> tuple[dict, dict, Adapter, str]:
    """(tensors, metadata, the adapter they hold, its key format) of each naming."""
    without_text = dataclasses.replace(known_kron, layers={"transformer": known_kron.layers["transformer"]})
    return {
        "simpletuner-lokr": (_diffusers_named_lokr(known_kron, "lycoris_", False), {}, without_text, "simpletuner"),
        "onetrainer-lokr": (_diffusers_named_lokr(known_kron, "lora_transformer_", True), {}, known_kron, "onetrainer"),
        "kohya-lokr": (_kohya_lokr(known_kron), {}, known_kron, "kohya"),
        "onetrainer-lora": (_onetrainer_lora(known_lora), {}, known_lora, "onetrainer"),
        "diffusers-lora": (*_diffusers_lora(known_lora), known_lora, "diffusers"),
        "kohya-lora": (_kohya_lora(known_lora), {}, known_lora, "kohya"),
    }[kind]


NAMINGS = ["simpletuner-lokr", "onetrainer-lokr", "kohya-lokr", "onetrainer-lora", "diffusers-lora", "kohya-lora"]


@pytest.mark.parametrize("kind", NAMINGS)
def test_other_tools_files_read_back_to_the_same_update(kind, known_kron, known_lora, tmp_path):
    tensors, metadata, known, key_format = _written(kind, known_kron, known_lora)
    path = tmp_path / f"{kind}.safetensors"
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(path), metadata)
    adapter = load_adapter(path)
    assert adapter.architecture == "flux" and adapter.key_format == key_format
    _same_deltas(_deltas(adapter), _deltas(known), tol=1e-5)
    described = describe(path)
    assert described["architecture"] == "flux" and described["layers"] == known.num_layers()
    assert described["format"] == ("lycoris" if kind.endswith("lokr") else "lora")


@pytest.mark.subprocess
def test_describe_reads_a_fused_file_without_torch(known_lora, tmp_path):
    path = tmp_path / "kohya.safetensors"
    save_file({k: v.contiguous() for k, v in _kohya_lora(known_lora).items()}, str(path))
    code = (
        "import sys; from krona_cli.formats.description import describe; "
        f"d = describe({str(path)!r}); assert d['layers'] == {{'transformer': {len(SHAPES)}, 'text_encoder': 1}}, d; "
        "assert not {'torch', 'diffusers', 'transformers'} & set(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _damaged(name: str) -> dict:
    z = torch.zeros
    return {
        # a fused LoKr whose parts' rows (32 each) are not whole blocks of w2's 3 rows
        "unsplittable-lokr": {"lora_unet_double_blocks_0_img_attn_qkv.lokr_w1": z(32, 4),
                              "lora_unet_double_blocks_0_img_attn_qkv.lokr_w2": z(3, 8)},
        # a fused qkv LoRA whose 95 rows are no three equal parts
        "unsplittable-lora": {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": z(2, 32),
                              "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": z(95, 2)},
        "not-a-flux-module-peft": {"transformer.transformer_blocks.0.attn.to_qkv.lora_A.weight": z(2, 32),
                                   "transformer.transformer_blocks.0.attn.to_qkv.lora_B.weight": z(96, 2)},
        "not-a-flux-module-lycoris": {"lycoris_transformer_blocks_0_attn_to_qkv.lokr_w1": z(4, 4),
                                      "lycoris_transformer_blocks_0_attn_to_qkv.lokr_w2": z(24, 8)},
        # the same module twice: fused (kohya) and on its own (SimpleTuner)
        "twice": {"lora_unet_double_blocks_0_img_attn_qkv.lokr_w1": z(12, 4),
                  "lora_unet_double_blocks_0_img_attn_qkv.lokr_w2": z(8, 8),
                  "lycoris_transformer_blocks_0_attn_to_q.lokr_w1": z(4, 4),
                  "lycoris_transformer_blocks_0_attn_to_q.lokr_w2": z(8, 8)},
        "t5": {"transformer.proj_out.lora_A.weight": z(2, 32), "transformer.proj_out.lora_B.weight": z(16, 2),
               "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": z(2, 32),
               "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight": z(32, 2)},
        "unet-and-transformer": {"lora_unet_double_blocks_0_img_mlp_0.lora_down.weight": z(2, 32),
                                 "lora_unet_double_blocks_0_img_mlp_0.lora_up.weight": z(128, 2),
                                 "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": z(2, 32),
                                 "lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight": z(32, 2)},
    }[name]  # fmt: skip


@pytest.mark.parametrize(
    "name, match",
    [
        ("unsplittable-lokr", "not whole multiples of its w2's 3 rows"),
        ("unsplittable-lora", "do not split"),
        ("not-a-flux-module-peft", "or Z-Image transformer in diffusers' names"),
        ("not-a-flux-module-lycoris", "or Z-Image transformer in diffusers' names"),
        ("twice", "two LoKr layers for 'transformer.transformer_blocks.0.attn.to_q'"),
        ("t5", "FLUX.1's text_encoder_2, a text encoder krona does not adapt or read"),
        ("unet-and-transformer", "both UNet and transformer layers"),
    ],
)
def test_damaged_or_ambiguous_files_get_one_line(name, match, tmp_path):
    path = tmp_path / f"{name}.safetensors"
    save_file(_damaged(name), str(path))
    for read in (load_adapter, describe):
        with pytest.raises(KronaError, match=match) as caught:
            read(path)
        assert "\n" not in str(caught.value)


@pytest.mark.parametrize("kind", NAMINGS)
def test_other_tools_files_merge_to_the_weights_krona_s_own_adapter_gives(kind, known_kron, known_lora, tiny, tmp_path):
    """`krona merge` of each tool's file onto the tiny FLUX gives the base weights plus the known adapter's ΔW, as
    merging krona's own file of that adapter does."""
    from krona_cli.cli import main

    folder, _ = tiny
    tensors, metadata, known, _ = _written(kind, known_kron, known_lora)
    path = tmp_path / f"{kind}.safetensors"
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(path), metadata)
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(path), "--pretrained-model", str(folder), "--output-dir", str(merged)]) == 0
    base, out = FluxPipeline.from_pretrained(folder), FluxPipeline.from_pretrained(merged)
    deltas = _deltas(known)
    for component in ("transformer", "text_encoder"):
        before, after = getattr(base, component).state_dict(), getattr(out, component).state_dict()
        for key, value in after.items():
            module = canonical_name(component, key.removesuffix(".weight"))
            delta = deltas.get((component, module)) if key.endswith(".weight") else None
            want = before[key] if delta is None else (before[key].double() + delta).float()
            torch.testing.assert_close(value, want, rtol=1e-6, atol=1e-6, msg=f"{kind}: {component}.{key}")
    assert all(delta.abs().max() > 1e-3 for delta in deltas.values())  # every merged layer really moved
