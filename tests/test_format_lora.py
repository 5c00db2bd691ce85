"""LoRA files: export of Kronecker adapters by truncated SVD (loaded by diffusers' own `load_lora_weights`, errors as
reported), and reading diffusers/peft, older diffusers and kohya LoRA files, with clear errors for what is not read."""

import json
import logging
import math
import warnings
from contextlib import contextmanager

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from helpers import random_adapter, read_torch, relayout
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from krona_cli.errors import KronaError
from krona_cli.formats import canonical_name
from krona_cli.formats.adapter import DiffuseKronALayer, KronLayer
from krona_cli.formats.adapter import LoraLayer as KronaLoraLayer
from krona_cli.formats.kohya_names import encode_path
from krona_cli.formats.lora import from_lora, is_lora
from krona_cli.formats.lora_export import save_lora, to_lora
from krona_cli.formats.outline import LAYOUT_DIFFUSEKRONA, Adapter
from krona_cli.inference.merge import pipeline_components
from krona_cli.kron.functional import diffusekrona_delta
from krona_cli.pipeline.tiny import build_tiny_pipeline

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
TE_Q = "text_model.encoder.layers.0.self_attn.q_proj"


def _trained(arch, scale=0.8):
    return random_adapter(arch, scale=scale, seed=3)


@pytest.fixture(scope="module")
def sdxl_adapter():
    return _trained("sdxl")


@pytest.fixture(scope="module")
def sd15_adapter():
    return _trained("sd15")


def _kron_deltas(adapter):
    """{(component, module): ΔW} in float64, from the adapter's factors."""
    out = {}
    for component, mods in adapter.layers.items():
        for module, layer in mods.items():
            a, b = layer.a.double(), layer.b.double()
            if adapter.layout == LAYOUT_DIFFUSEKRONA:
                out[(component, module)] = diffusekrona_delta(a, b, adapter.scale)
            else:
                out[(component, module)] = adapter.scale * torch.kron(a, b)
    return out


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextmanager
def _captured_warnings():
    """Warnings logged by diffusers, transformers and peft (whose library loggers do not propagate, and which
    scripts/test.sh quiets to errors: their level is lowered to WARNING meanwhile), and Python warnings, collected in
    one list."""
    handler = _Records()
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "peft")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield handler.messages
        handler.messages.extend(str(w.message) for w in caught)
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)


def _fused_deltas(pipeline_cls, pipe_dir, lora_path):
    """Load the LoRA file with diffusers' own `load_lora_weights` into a fresh pipeline read from disk, fuse it, and
    return {(component, canonical module): W_fused − W_base} for every weight it changed, and the warnings logged."""
    pipe = pipeline_cls.from_pretrained(pipe_dir)
    models = pipeline_components(pipe)
    base = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in models.items()}
    with _captured_warnings() as messages:
        pipe.load_lora_weights(lora_path.parent, weight_name=lora_path.name)
        pipe.fuse_lora(components=list(models))
        pipe.unload_lora_weights()
    changed = {}
    for c, m in models.items():
        state = m.state_dict()
        assert set(state) == set(base[c]), "unload_lora_weights left LoRA modules behind"
        for key, value in state.items():
            if not torch.equal(value, base[c][key]):
                assert key.endswith(".weight"), f"diffusers changed {c}.{key}"
                changed[(c, canonical_name(c, key.removesuffix(".weight")))] = value.double() - base[c][key].double()
    return changed, messages


def _check_diffusers_load(adapter, pipeline_cls, pipe_dir, path, rank, layout):
    report = save_lora(path, adapter, rank=rank, layout=layout)
    changed, messages = _fused_deltas(pipeline_cls, pipe_dir, path)
    bad = [m for m in messages if any(w in m.lower() for w in ("unexpected", "missing", "no lora keys", "not "))]
    assert not bad, bad
    expected = _kron_deltas(adapter)
    # every adapted layer was changed by the load, and nothing else
    assert set(changed) == set(expected)
    # by exactly the file's up @ down (· alpha / rank: 1), read here from the raw tensors
    written = read_torch(path)[0]
    sdxl = "text_encoder_2" in adapter.layers
    for (component, module), delta in changed.items():
        if layout == "kohya":
            name = {
                "unet": "lora_unet_",
                "text_encoder": "lora_te1_" if sdxl else "lora_te_",
                "text_encoder_2": "lora_te2_",
            }[component] + encode_path(module)
            down, up = written[f"{name}.lora_down.weight"], written[f"{name}.lora_up.weight"]
            assert written[f"{name}.alpha"].item() == down.shape[0]
        else:
            down, up = written[f"{component}.{module}.lora_A.weight"], written[f"{component}.{module}.lora_B.weight"]
        torch.testing.assert_close(delta, up.double() @ down.double(), rtol=1e-5, atol=1e-6)
    err2 = norm2 = 0.0
    for (component, module), delta in expected.items():
        measured = (changed[(component, module)] - delta).norm() / delta.norm()
        reported = report["layers"][component][module]["error"]
        assert abs(measured.item() - reported) < 1e-4, (component, module, measured.item(), reported)
        err2 += (changed[(component, module)] - delta).norm().item() ** 2
        norm2 += delta.norm().item() ** 2
    assert abs(math.sqrt(err2 / norm2) - report["error"]) < 1e-4
    return report


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_sdxl_export_loads_in_diffusers_with_the_reported_error(sdxl_adapter, tiny_sdxl_dir, tmp_path, layout):
    report = _check_diffusers_load(
        sdxl_adapter, StableDiffusionXLPipeline, tiny_sdxl_dir, tmp_path / "lora.safetensors", rank=6, layout=layout
    )
    keys = set(read_torch(tmp_path / "lora.safetensors")[0])
    if layout == "kohya":
        assert f"lora_unet_{encode_path(Q)}.lora_down.weight" in keys and f"lora_unet_{encode_path(Q)}.alpha" in keys
        assert f"lora_te1_{encode_path(TE_Q)}.lora_up.weight" in keys and f"lora_te2_{encode_path(TE_Q)}.alpha" in keys
    else:
        assert f"unet.{Q}.lora_A.weight" in keys and f"text_encoder_2.{TE_Q}.lora_B.weight" in keys
        assert not any(k.endswith(".alpha") for k in keys)
    # rank 6 is below every layer's Kronecker rank, so every layer is approximated
    assert {v["rank"] for mods in report["layers"].values() for v in mods.values()} == {6}
    assert all(v["error"] > 1e-3 for mods in report["layers"].values() for v in mods.values())
    assert 0.05 < report["error"] < 1
    assert set(report["layers"]) == set(COMPONENTS)
    meta = json.loads(read_torch(tmp_path / "lora.safetensors")[1]["krona"])
    assert meta["format"] == "lora" and meta["rank"] == 6 and meta["relative_error"] == report["error"]
    assert meta["architecture"] == "sdxl" and meta["source"]["scale"] == 0.8
    assert meta["key_format"] == {"kohya": "kohya", "peft": "diffusers"}[layout]


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_sd15_export_with_mixed_ranks_loads_in_diffusers(sd15_adapter, tiny_sd15_dir, tmp_path, layout):
    # rank 20: exact on layers whose Kronecker rank is 16, approximate on those with 32 (per-layer ranks differ:
    # peft keys keep each layer's own, which diffusers' loader handles through peft's rank_pattern; kohya keys pad
    # every layer to 20 with zeros, alpha 20, because diffusers loses per-layer alphas of UNet attention layers)
    report = _check_diffusers_load(
        sd15_adapter, StableDiffusionPipeline, tiny_sd15_dir, tmp_path / "lora.safetensors", rank=20, layout=layout
    )
    if layout == "kohya":
        written = read_torch(tmp_path / "lora.safetensors")[0]
        assert f"lora_te_{encode_path(TE_Q)}.lora_down.weight" in written
        assert {t.shape[0] for k, t in written.items() if k.endswith(".lora_down.weight")} == {20}
        assert {t.item() for k, t in written.items() if k.endswith(".alpha")} == {20.0}
    ranks = {v["rank"] for mods in report["layers"].values() for v in mods.values()}
    assert ranks == {16, 20}
    for mods in report["layers"].values():
        for v in mods.values():
            assert (v["error"] < 1e-5) == (v["rank"] == 16)


def test_exact_rank_gives_no_error_and_truncation_is_optimal(sdxl_adapter):
    # 4x4 and 2x2 factors: rank(A ⊗ B) = rank(A)·rank(B) ≤ 4·min(B) (UNet) or 2·min(B) (text), at most 64 here
    tensors, _, report = to_lora(sdxl_adapter, rank=64)
    assert report["error"] < 1e-5
    deltas = _kron_deltas(sdxl_adapter)
    for component, mods in report["layers"].items():
        for module, v in mods.items():
            a, b = sdxl_adapter.layers[component][module].a, sdxl_adapter.layers[component][module].b
            assert v["rank"] == min(a.shape) * min(b.shape) <= min(deltas[(component, module)].shape)
            assert v["error"] < 1e-5
    lora = from_lora(tensors, {}, "memory")
    assert lora.key_format == "kohya"
    for component, module, delta in lora.deltas():
        expected = deltas[(component, module)]
        assert (delta.double() - expected).norm() / expected.norm() < 1e-5
    # below the exact rank the error is Eckart–Young's optimum, read off the singular values of ΔW itself
    _, _, report = to_lora(sdxl_adapter, rank=5)
    for (component, module), delta in list(deltas.items())[::7]:
        s = torch.linalg.svdvals(delta)
        optimum = (s[5:].pow(2).sum() / s.pow(2).sum()).sqrt().item()
        assert abs(report["layers"][component][module]["error"] - optimum) < 1e-6


def test_diffusekrona_layout_and_negative_scale_and_fp16(sdxl_adapter, tmp_path):
    official = relayout(sdxl_adapter, DiffuseKronALayer, scale=-1.5)
    tensors, _, report = to_lora(official, rank=64)
    assert report["error"] < 1e-5
    deltas = _kron_deltas(official)
    for component, module, delta in from_lora(tensors, {}, "memory").deltas():
        assert (delta.double() - deltas[(component, module)]).norm() / deltas[(component, module)].norm() < 1e-5
    _, _, truncated = to_lora(official, rank=3)
    _, _, standard = to_lora(relayout(official, KronLayer), rank=3)
    assert abs(truncated["error"] - standard["error"]) < 1e-9  # a row permutation keeps the singular values
    # fp16 factors: the report measures what was written, rounding included
    report = save_lora(tmp_path / "half.safetensors", official, rank=64, dtype="fp16")
    written, metadata = read_torch(tmp_path / "half.safetensors")
    assert {t.dtype for k, t in written.items() if not k.endswith(".alpha")} == {torch.float16}
    assert {t.dtype for k, t in written.items() if k.endswith(".alpha")} == {torch.float32}  # alpha = rank, exactly
    assert 1e-6 < report["error"] < 1e-2 and report["dtype"] == "fp16"
    lora = from_lora(written, metadata, "half")
    assert lora.architecture == "sdxl" and lora.base_model == "tiny-sdxl"
    err2 = norm2 = 0.0
    for component, module, delta in lora.deltas():
        err2 += (delta.double() - deltas[(component, module)]).norm().item() ** 2
        norm2 += deltas[(component, module)].norm().item() ** 2
    assert abs(math.sqrt(err2 / norm2) - report["error"]) < 1e-5


def _peft_lora(model, config):
    """Inject a peft LoRA into `model` with non-zero B; return {canonical module: B @ A · scaling}."""
    inject_adapter_in_model(config, model)
    deltas = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            with torch.no_grad():
                module.lora_B["default"].weight.normal_(std=0.1)
            deltas[name] = module.get_delta_weight("default").detach().clone()
    return deltas


def _sdxl_peft_loras():
    torch.manual_seed(7)
    pipe = build_tiny_pipeline("sdxl")
    unet_config = LoraConfig(
        r=4,
        lora_alpha=8,
        rank_pattern={"to_k": 2},
        alpha_pattern={"to_v": 3},
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        init_lora_weights="gaussian",
    )
    te_config = LoraConfig(
        r=4, lora_alpha=2, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]
    )
    te2_config = LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"])
    configs = {"unet": unet_config, "text_encoder": te_config, "text_encoder_2": te2_config}
    deltas = {c: _peft_lora(getattr(pipe, c), configs[c]) for c in COMPONENTS}
    return pipe, configs, deltas


def test_reads_diffusers_peft_lora_with_its_alphas(tmp_path):
    pipe, configs, deltas = _sdxl_peft_loras()
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        text_encoder_2_lora_layers=get_peft_model_state_dict(pipe.text_encoder_2),
        unet_lora_adapter_metadata=configs["unet"].to_dict(),
        text_encoder_lora_adapter_metadata=configs["text_encoder"].to_dict(),
        text_encoder_2_lora_adapter_metadata=configs["text_encoder_2"].to_dict(),
    )
    tensors, metadata = read_torch(tmp_path / "pytorch_lora_weights.safetensors")
    assert f"unet.{Q}.lora_A.weight" in tensors and is_lora(tensors)
    lora = from_lora(tensors, metadata, "peft")
    assert lora.key_format == "diffusers" and lora.architecture == "sdxl"
    assert lora.num_layers() == {c: len(d) for c, d in deltas.items()}
    assert TE_Q in lora.layers["text_encoder"]  # canonical spelling, whatever transformers calls it
    multipliers = {layer.multiplier for layer in lora.layers["unet"].values()}
    assert multipliers == {2.0, 4.0, 0.75}  # 8/4, 8/2 (to_k's rank 2), 3/4 (to_v's alpha 3)
    assert {layer.multiplier for layer in lora.layers["text_encoder"].values()} == {1.0}  # rsLoRA: 2/√4
    got = {(c, m): d for c, m, d in lora.deltas()}
    assert len(got) == sum(len(d) for d in deltas.values())
    for component, mods in deltas.items():
        for name, delta in mods.items():
            assert torch.allclose(got[(component, canonical_name(component, name))], delta, atol=1e-6, rtol=1e-5)
    assert lora.num_params() == sum(t.numel() for t in tensors.values())


def test_reads_old_diffusers_naming(tmp_path):
    from diffusers.utils import convert_state_dict_to_diffusers

    torch.manual_seed(8)
    pipe = build_tiny_pipeline("sd15")
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v", "q_proj", "out_proj"])
    deltas = {c: _peft_lora(getattr(pipe, c), config) for c in ("unet", "text_encoder")}
    flat = {}
    for c in deltas:
        for k, v in convert_state_dict_to_diffusers(get_peft_model_state_dict(getattr(pipe, c))).items():
            flat[f"{c}.{k}"] = v.contiguous()
    assert f"unet.{Q.replace('down_blocks.1', 'down_blocks.0')}.lora.down.weight" in flat
    assert any(k.endswith(".lora_linear_layer.up.weight") for k in flat)
    save_file(flat, str(tmp_path / "old.safetensors"))
    tensors, metadata = read_torch(tmp_path / "old.safetensors")
    assert is_lora(tensors)
    lora = from_lora(tensors, metadata, "old")
    assert lora.key_format == "diffusers-old"
    got = {(c, m): d for c, m, d in lora.deltas()}
    assert len(got) == sum(len(d) for d in deltas.values())
    for component, mods in deltas.items():
        for name, delta in mods.items():
            assert torch.allclose(got[(component, canonical_name(component, name))], delta, atol=1e-6)
    # the `lora_linear_layer` naming alone is shared with official DiffuseKronA files: not claimed by is_lora
    assert not is_lora([k for k in tensors if "lora_linear_layer" in k])
    assert not is_lora(["unet.mid_block.attentions.0.processor.to_q_lora.down.weight"])


def _kohya_file(arch, alpha):
    """A kohya LoRA on some attention linears of the tiny pipeline: random down/up, the given alpha (None: none).

    The text encoders' out_proj is included because diffusers 0.42 cannot load a kohya text-encoder LoRA without it
    (its converted keys are then not recognised: "Could not automatically infer state dict type")."""
    torch.manual_seed(9)
    pipe = build_tiny_pipeline(arch)
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    if arch == "sd15":
        prefixes["text_encoder"] = "lora_te_"
    tensors, expected = {}, {}
    for component, model in pipeline_components(pipe).items():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name.endswith(("to_q", "to_k", "to_out.0", "q_proj", "out_proj")):
                module_path = canonical_name(component, name)
                lora_name = prefixes[component] + encode_path(module_path)
                down, up = torch.randn(4, module.in_features) * 0.1, torch.randn(module.out_features, 4) * 0.1
                tensors[f"{lora_name}.lora_down.weight"], tensors[f"{lora_name}.lora_up.weight"] = down, up
                if alpha is not None:
                    tensors[f"{lora_name}.alpha"] = torch.tensor(float(alpha))
                expected[(component, module_path)] = (1.0 if alpha is None else alpha / 4) * up @ down
    return tensors, expected


def test_reads_kohya_lora_with_alpha_over_rank(tmp_path):
    tensors, expected = _kohya_file("sdxl", alpha=2)
    assert is_lora(tensors)
    lora = from_lora(tensors, {}, "kohya")
    assert lora.key_format == "kohya" and lora.architecture == "sdxl"
    assert {layer.multiplier for mods in lora.layers.values() for layer in mods.values()} == {0.5}
    assert TE_Q in lora.layers["text_encoder"] and f"{Q}" in lora.layers["unet"]
    got = {(c, m): d for c, m, d in lora.deltas()}
    assert set(got) == set(expected)
    for key, delta in expected.items():
        assert torch.allclose(got[key], delta, atol=1e-7)
    # diffusers' own kohya loader agrees on names and on alpha / r
    path = tmp_path / "kohya.safetensors"
    save_file(tensors, str(path))
    pipe = build_tiny_pipeline("sdxl")
    models = pipeline_components(pipe)
    base = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in models.items()}
    pipe.load_lora_weights(tmp_path, weight_name=path.name)
    pipe.fuse_lora(components=list(models))
    pipe.unload_lora_weights()
    for (component, module), delta in got.items():
        local = module if component != "text_encoder" else module.removeprefix("text_model.")
        key = f"{local}.weight"
        if key not in base[component]:
            key = f"{module}.weight"
        fused = models[component].state_dict()[key] - base[component][key]
        assert torch.allclose(fused, delta, atol=1e-6), (component, module)
    # no alpha: multiplier 1; SD 1.x's single text encoder is lora_te_
    tensors, expected = _kohya_file("sd15", alpha=None)
    lora = from_lora(tensors, {"ss_base_model_version": "sd_v1"}, "kohya15")
    assert lora.architecture == "sd15" and set(lora.layers) == {"unet", "text_encoder"}
    for component, module, delta in lora.deltas():
        assert torch.allclose(delta, expected[(component, module)], atol=1e-7)


KQ = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
UQ = f"unet.{Q}"


@pytest.mark.parametrize(
    "tensors, message",
    [
        (
            {
                "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.zeros(4, 16, 3, 3),
                "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.zeros(16, 4, 1, 1),
            },
            "conv LoRA weight",
        ),
        ({f"{UQ}.lora_A.weight": torch.zeros(4, 32, 1, 1), f"{UQ}.lora_B.weight": torch.zeros(32, 4, 1, 1)}, "conv"),
        (
            {
                f"{UQ}.lora_A.weight": torch.zeros(4, 32),
                f"{UQ}.lora_B.weight": torch.zeros(32, 4),
                f"{UQ}.lora_magnitude_vector": torch.ones(32),
            },
            "DoRA",
        ),
        (
            {
                f"{KQ}.lora_down.weight": torch.zeros(4, 32),
                f"{KQ}.lora_up.weight": torch.zeros(32, 4),
                f"{KQ}.dora_scale": torch.ones(1, 32),
            },
            "DoRA",
        ),
        (  # kohya's SDXL conv LoRA (LoCon), SGM-named: read as the resnet's conv1, refused as conv
            {
                "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight": torch.zeros(4, 320, 3, 3),
                "lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight": torch.zeros(320, 4, 1, 1),
            },
            "input_blocks_1_0_in_layers_2.lora_down.weight' of shape \\(4, 320, 3, 3\\), a conv LoRA weight",
        ),
        (  # SDXL's input_blocks.1 is a resnet alone: no attention there
            {"lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 32)},
            "SGM way \\('lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight'\\).*SDXL UNet",
        ),
        ({f"{UQ}.lora_A.weight": torch.zeros(4, 32)}, "no up weight"),
        ({f"{UQ}.lora_A.weight": torch.zeros(4, 32), f"{UQ}.lora_B.weight": torch.zeros(32, 3)}, "do not multiply"),
        (
            {
                f"{UQ}.lora_A.weight": torch.zeros(4, 32),
                f"{UQ}.lora_B.weight": torch.zeros(32, 4),
                f"{UQ}.lora_B.bias": torch.zeros(32),
            },
            f"'{UQ}.lora_B.bias', which krona does not read",
        ),
        ({f"{KQ}.lokr_w1": torch.zeros(4, 4)}, f"'{KQ}.lokr_w1', which krona does not read"),
        ({f"{KQ}.hada_w1_a": torch.zeros(4, 4)}, "hada_w1_a"),
        ({"text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)}, "component prefix"),
        ({"lora_unet_foo_bar.lora_down.weight": torch.zeros(4, 32)}, "module path of LoRA key 'lora_unet_foo_bar"),
        ({}, "holds no tensors"),
    ],
)
def test_unreadable_files_are_clear_errors(tensors, message):
    with pytest.raises(KronaError, match=message):
        from_lora(tensors, {}, "bad.safetensors")


def test_dora_in_diffusers_metadata_and_damaged_metadata_are_errors():
    tensors = {f"{UQ}.lora_A.weight": torch.zeros(4, 32), f"{UQ}.lora_B.weight": torch.zeros(32, 4)}
    dora = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 4, "unet.use_dora": True})}
    with pytest.raises(KronaError, match="DoRA"):
        from_lora(tensors, dora, "dora")
    wrong = {"lora_adapter_metadata": json.dumps({"unet.r": 8, "unet.lora_alpha": 8})}
    with pytest.raises(KronaError, match="rank 8, its tensors have rank 4"):
        from_lora(tensors, wrong, "wrong")
    with pytest.raises(KronaError, match="unreadable 'lora_adapter_metadata'"):
        from_lora(tensors, {"lora_adapter_metadata": "{"}, "broken")


def test_rank_and_layout_errors(sdxl_adapter, tmp_path):
    for rank in (0, -1, 1.5, True):
        with pytest.raises(KronaError, match="rank .* must be a whole number of at least 1"):
            save_lora(tmp_path / "x.safetensors", sdxl_adapter, rank=rank)
    with pytest.raises(KronaError, match="layout 'lora' cannot be exported as LoRA"):
        to_lora(Adapter({"unet": {Q: KronaLoraLayer(torch.ones(2, 320), torch.ones(320, 2))}}), rank=4)
    with pytest.raises(KronaError, match="dtype"):
        save_lora(tmp_path / "x.safetensors", sdxl_adapter, rank=4, dtype="int8")
    assert not (tmp_path / "x.safetensors").exists()


def test_lora_adapter_in_memory():
    down, up = torch.randn(2, 8), torch.randn(6, 2)
    lora = Adapter({"unet": {Q: KronaLoraLayer(down, up, 0.5)}}, scale=2.0)
    assert lora.num_params() == 28 and lora.num_layers() == {"unet": 1}
    ((component, module, delta),) = list(lora.deltas())
    assert (component, module) == ("unet", Q) and delta.dtype == torch.float32
    assert torch.allclose(delta, up @ down)
