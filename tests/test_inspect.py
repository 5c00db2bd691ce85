"""`krona inspect` reads an adapter file's header alone, without torch: for files of every format and key naming it
describes exactly what the torch readers load (the expected values are computed here from `read_adapter`'s adapter
and tensors), refuses the files they refuse with the same message, reads single numbers of every dtype as torch does,
and `krona inspect` imports no model library."""

import hashlib
import json
import math
import pkgutil
import subprocess
import sys
import types
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import lycoris_torch, random_adapter, read_torch, relayout
from safetensors.torch import save_file
from torch import nn

import krona_cli.formats as formats
from krona_cli.architectures import load_model_config
from krona_cli.errors import KronaError
from krona_cli.formats import (
    DiffuseKronALayer,
    LoraLayer,
    canonical_name,
    describe,
    load_adapter,
    read_adapter,
    save_adapter,
    save_lora,
    save_lycoris,
)
from krona_cli.formats.detect import detect_format
from krona_cli.formats.kohya_names import encode_path
from krona_cli.formats.lora import from_lora
from krona_cli.formats.lycoris import from_lycoris
from krona_cli.formats.native import from_native
from krona_cli.formats.official import from_official
from krona_cli.formats.outline import tensor_infos
from krona_cli.formats.safetensors_file import first_value, float32, read_header, read_tensors
from krona_cli.formats.unet_paths import unet_path_to_sgm
from krona_cli.inference.merge import pipeline_components
from krona_cli.pipeline.tiny import build_tiny_pipeline

Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
K2 = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
TE_Q = "text_model.encoder.layers.0.self_attn.q_proj"
TRAINING = {"steps": 100, "lr": 1e-3, "prompt": "a photo of sks dog"}
MODEL_LIBRARIES = ("torch", "diffusers", "transformers", "peft", "bitsandbytes")


def _label(layer) -> str:
    """What inspect counts a layer by, from its tensors: A's shape (`OxI`) or the LoRA rank."""
    if isinstance(layer, LoraLayer):
        return f"rank {layer.down.shape[0]}"
    return f"{layer.a.shape[0]}x{layer.a.shape[1]}"


def _params(layer) -> int:
    return layer.down.numel() + layer.up.numel() if isinstance(layer, LoraLayer) else layer.a.numel() + layer.b.numel()


# format -> the reader of a file's tensors in memory
IN_MEMORY = {"native": from_native, "lycoris": from_lycoris, "lora": from_lora, "diffusekrona": from_official}


def torch_description(path) -> dict:
    """What `describe` gave when it read the file with torch: from the adapter the in-memory readers make of the
    tensors torch's own reader reads (not from the header), which `load_adapter` also gives, tensor for tensor."""
    tensors, metadata = read_torch(path)
    fmt = detect_format(tensors, metadata, str(path))
    adapter = IN_MEMORY[fmt](tensors, metadata, str(path))
    loaded, loaded_fmt = read_adapter(path)
    assert loaded_fmt == fmt and loaded.layers.keys() == adapter.layers.keys()
    for component, layers in adapter.layers.items():
        assert loaded.layers[component].keys() == layers.keys()
        for module, layer in layers.items():
            for name, t in vars(layer).items():
                if isinstance(t, torch.Tensor):
                    got = getattr(loaded.layers[component][module], name)
                    assert got.dtype == t.dtype == torch.float32 and torch.equal(got, t), (module, name)
    return {
        "file": str(path),
        "format": fmt,
        "key_format": adapter.key_format,
        "base_model": adapter.base_model,
        "architecture": adapter.architecture,
        "scale": adapter.scale,
        "format_version": adapter.format_version,
        "layout": adapter.layout,
        "targets": adapter.targets,
        "training": adapter.training,
        "layers": {c: len(mods) for c, mods in adapter.layers.items()},
        "factors": {c: dict(Counter(_label(layer) for layer in mods.values())) for c, mods in adapter.layers.items()},
        "parameters": sum(_params(layer) for mods in adapter.layers.values() for layer in mods.values()),
        "dtype": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
        "size_bytes": path.stat().st_size,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }


# --- files of every format and key naming ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl():
    return random_adapter("sdxl", scale=0.8, training=TRAINING)


@pytest.fixture(scope="module")
def sd15():
    return random_adapter("sd15", scale=0.5, unet_targets="attn")


@pytest.fixture(scope="module")
def linears():
    """{component: {module (as files spell it): (d_out, d_in)}} of the tiny SDXL pipeline's attention linears."""
    found = {}
    for component, model in pipeline_components(build_tiny_pipeline("sdxl")).items():
        found[component] = {
            canonical_name(component, name): (m.out_features, m.in_features)
            for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.endswith(("to_q", "to_k", "to_v", "to_out.0", "q_proj", "v_proj"))
        }
    return found


def _native(tmp_path, sdxl, sd15):
    return save_adapter(tmp_path / "native.safetensors", sdxl)


def _native_bf16_sd15(tmp_path, sdxl, sd15):
    return save_adapter(tmp_path / "native-bf16.safetensors", sd15, dtype="bf16")


def _native_diffusekrona_fp16(tmp_path, sdxl, sd15):
    return save_adapter(tmp_path / "native-dk.safetensors", relayout(sdxl, DiffuseKronALayer), dtype="fp16")


def _lokr(tmp_path, sdxl, sd15):
    return save_lycoris(tmp_path / "lokr.safetensors", sdxl, dtype="bf16")


def _lokr_sd15(tmp_path, sdxl, sd15):
    return save_lycoris(tmp_path / "lokr-sd15.safetensors", sd15)


def _lokr_without_krona_metadata(tmp_path, sdxl, sd15):
    """A LoKr file as another trainer writes it: no krona settings, so architecture and targets are inferred."""
    tensors, _ = lycoris_torch(sd15)
    path = tmp_path / "lokr-trainer.safetensors"
    save_file(tensors, str(path))
    return path


def _lokr_decomposed(tmp_path, sdxl, sd15):
    """Decomposed factors (w1_a/w1_b, w2_a/w2_b) with fp16, bf16 and fp8 alphas, kohya's SDXL version key."""
    q, k = f"lora_unet_{encode_path(Q)}", f"lora_unet_{encode_path(K2)}"
    te = f"lora_te1_{encode_path(TE_Q)}"
    tensors = {
        f"{q}.lokr_w1": torch.randn(4, 4).half(),
        f"{q}.lokr_w2_a": torch.randn(8, 2).half(),
        f"{q}.lokr_w2_b": torch.randn(2, 8).half(),
        f"{q}.alpha": torch.tensor(3.0).half(),
        f"{k}.lokr_w1_a": torch.randn(4, 1),
        f"{k}.lokr_w1_b": torch.randn(1, 8),
        f"{k}.lokr_w2": torch.randn(8, 10),
        f"{k}.alpha": torch.tensor(0.5, dtype=torch.bfloat16),
        f"{te}.lokr_w1_a": torch.randn(2, 1),
        f"{te}.lokr_w1_b": torch.randn(1, 2),
        f"{te}.lokr_w2_a": torch.randn(16, 3),
        f"{te}.lokr_w2_b": torch.randn(3, 16),
        f"{te}.alpha": torch.tensor([1.5]).to(torch.float8_e4m3fn),
    }
    path = tmp_path / "lokr-decomposed.safetensors"
    save_file(tensors, str(path), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    return path


def _sgm_names(modules):
    config = load_model_config("sdxl_unet.json")
    return ["lora_unet_" + encode_path(unet_path_to_sgm(m, config)) for m in modules]


SGM_MODULES = [Q, K2, "mid_block.attentions.0.transformer_blocks.0.attn2.to_v", "up_blocks.0.resnets.1.time_emb_proj"]


def _lokr_sgm(tmp_path, sdxl, sd15):
    """kohya's SDXL LoKr file: SGM-named UNet layers (real SDXL numbering) and both text encoders."""
    tensors = {}
    for i, name in enumerate([*_sgm_names(SGM_MODULES), f"lora_te2_{encode_path(TE_Q)}"]):
        tensors[f"{name}.lokr_w1"] = torch.randn(2, i + 1)
        tensors[f"{name}.lokr_w2"] = torch.randn(4, 4)
        tensors[f"{name}.alpha"] = torch.tensor(1.0)
    path = tmp_path / "lokr-sgm.safetensors"
    save_file(tensors, str(path), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    return path


def _lora_kohya(tmp_path, sdxl, sd15):
    save_lora(tmp_path / "lora-kohya.safetensors", sdxl, rank=4, dtype="fp16")
    return tmp_path / "lora-kohya.safetensors"


def _lora_peft(tmp_path, sdxl, sd15):
    save_lora(tmp_path / "lora-peft.safetensors", sd15, rank=3, layout="peft")
    return tmp_path / "lora-peft.safetensors"


def _kohya_lora_tensors(linears, alpha_dtype):
    """A kohya LoRA as trainers write it (no krona metadata), ranks 2 and 4, alphas of `alpha_dtype` (None: none)."""
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    tensors = {}
    for component, modules in linears.items():
        for i, (module, (d_out, d_in)) in enumerate(sorted(modules.items())):
            name, rank = prefixes[component] + encode_path(module), 2 + 2 * (i % 2)
            tensors[f"{name}.lora_down.weight"] = torch.randn(rank, d_in)
            tensors[f"{name}.lora_up.weight"] = torch.randn(d_out, rank)
            if alpha_dtype is not None:
                tensors[f"{name}.alpha"] = torch.tensor(float(i % 3 + 1)).to(alpha_dtype)
    return tensors


def _lora_kohya_trainer(tmp_path, sdxl, sd15, linears):
    path = tmp_path / "lora-trainer.safetensors"
    save_file(_kohya_lora_tensors(linears, torch.bfloat16), str(path))
    return path


def _lora_kohya_int_alpha_no_alpha(tmp_path, sdxl, sd15, linears):
    tensors = _kohya_lora_tensors(linears, torch.int64)
    tensors.update(_kohya_lora_tensors({"text_encoder_2": linears["text_encoder_2"]}, None))
    path = tmp_path / "lora-int-alpha.safetensors"
    save_file(tensors, str(path))
    return path


def _lora_sgm(tmp_path, sdxl, sd15):
    tensors = {}
    for i, name in enumerate([*_sgm_names(SGM_MODULES), f"lora_te1_{encode_path(TE_Q)}"]):
        tensors[f"{name}.lora_down.weight"] = torch.randn(i + 1, 8)
        tensors[f"{name}.lora_up.weight"] = torch.randn(8, i + 1)
        tensors[f"{name}.alpha"] = torch.tensor(2.0, dtype=torch.float64)
    path = tmp_path / "lora-sgm.safetensors"
    save_file(tensors, str(path))
    return path


def _lora_diffusers_with_peft_config(tmp_path, sdxl, sd15, linears):
    """diffusers' own naming (`unet.<module>.lora_A.weight`, text encoders without `text_model.`) and its peft
    LoraConfig per component in `lora_adapter_metadata`."""
    tensors = {}
    for component, modules in linears.items():
        for module, (d_out, d_in) in modules.items():
            rank = 2 if module.endswith("to_k") else 4
            name = module.removeprefix("text_model.")
            tensors[f"{component}.{name}.lora_A.weight"] = torch.randn(rank, d_in)
            tensors[f"{component}.{name}.lora_B.weight"] = torch.randn(d_out, rank)
    configs = {
        "unet.r": 4,
        "unet.lora_alpha": 8,
        "unet.rank_pattern": {"to_k": 2},
        "unet.alpha_pattern": {"to_v": 3},
        "text_encoder.r": 4,
        "text_encoder.lora_alpha": 2,
        "text_encoder.use_rslora": True,
    }
    path = tmp_path / "lora-diffusers.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(configs)})
    return path


def _lora_old_diffusers_and_unprefixed(tmp_path, sdxl, sd15, linears):
    """Older diffusers naming: UNet keys without a component prefix (`...lora.down.weight`) and text encoders'
    `lora_linear_layer` keys."""
    tensors = {}
    for module, (d_out, d_in) in linears["unet"].items():
        tensors[f"{module}.lora.down.weight"] = torch.randn(4, d_in)
        tensors[f"{module}.lora.up.weight"] = torch.randn(d_out, 4)
    for module, (d_out, d_in) in linears["text_encoder"].items():
        tensors[f"text_encoder.{module}.lora_linear_layer.down.weight"] = torch.randn(2, d_in)
        tensors[f"text_encoder.{module}.lora_linear_layer.up.weight"] = torch.randn(d_out, 2)
    path = tmp_path / "lora-old.safetensors"
    save_file(tensors, str(path))
    return path


def _official(tmp_path, sdxl, sd15, linears):
    """An official DiffuseKronA checkpoint: down (a2 × a1) and up (d_out/a1 × d_in/a2) of every UNet attention
    projection (no `unet.` prefix on some) and of the first text encoder's q/v projections."""
    tensors = {}
    for i, (module, (d_out, d_in)) in enumerate(linears["unet"].items()):
        attention, _, proj = module.removesuffix(".0").rpartition(".")
        a1, a2 = (2, 4) if i % 2 else (4, 2)
        prefix = ("unet." if i % 3 else "") + f"{attention}.processor.{proj}_lora"
        tensors[f"{prefix}.down.weight"] = torch.randn(a2, a1)
        tensors[f"{prefix}.up.weight"] = torch.randn(d_out // a1, d_in // a2)
    for module, (d_out, d_in) in linears["text_encoder"].items():
        prefix = f"text_encoder.{module}.lora_linear_layer"
        tensors[f"{prefix}.down.weight"] = torch.randn(2, 4).half()
        tensors[f"{prefix}.up.weight"] = torch.randn(d_out // 4, d_in // 2).half()
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


MAKERS = [
    _native,
    _native_bf16_sd15,
    _native_diffusekrona_fp16,
    _lokr,
    _lokr_sd15,
    _lokr_without_krona_metadata,
    _lokr_decomposed,
    _lokr_sgm,
    _lora_kohya,
    _lora_peft,
    _lora_kohya_trainer,
    _lora_kohya_int_alpha_no_alpha,
    _lora_sgm,
    _lora_diffusers_with_peft_config,
    _lora_old_diffusers_and_unprefixed,
    _official,
]
# what each file is read as: (format, key_format), so that every naming is known to be covered
KINDS = {
    "_native": ("native", "krona"),
    "_native_bf16_sd15": ("native", "krona"),
    "_native_diffusekrona_fp16": ("native", "krona"),
    "_lokr": ("lycoris", "kohya"),
    "_lokr_sd15": ("lycoris", "kohya"),
    "_lokr_without_krona_metadata": ("lycoris", "kohya"),
    "_lokr_decomposed": ("lycoris", "kohya"),
    "_lokr_sgm": ("lycoris", "kohya-sgm"),
    "_lora_kohya": ("lora", "kohya"),
    "_lora_peft": ("lora", "diffusers"),
    "_lora_kohya_trainer": ("lora", "kohya"),
    "_lora_kohya_int_alpha_no_alpha": ("lora", "kohya"),
    "_lora_sgm": ("lora", "kohya-sgm"),
    "_lora_diffusers_with_peft_config": ("lora", "diffusers"),
    "_lora_old_diffusers_and_unprefixed": ("lora", "diffusers-old"),
    "_official": ("diffusekrona", "diffusers-processor"),
}


def _make(maker, tmp_path, sdxl, sd15, linears):
    torch.manual_seed(0)
    if "linears" in maker.__code__.co_varnames[: maker.__code__.co_argcount]:
        return maker(tmp_path, sdxl, sd15, linears)
    return maker(tmp_path, sdxl, sd15)


@pytest.mark.parametrize("maker", MAKERS, ids=lambda m: m.__name__.strip("_"))
def test_describe_reads_the_header_as_the_torch_readers_read_the_file(maker, tmp_path, sdxl, sd15, linears):
    path = _make(maker, tmp_path, sdxl, sd15, linears)
    expected = torch_description(path)
    assert (expected["format"], expected["key_format"]) == KINDS[maker.__name__]
    assert describe(path) == expected
    assert describe(str(path)) == {**expected, "file": str(path)}


def test_the_header_gives_every_tensor_as_torch_reads_it(tmp_path, sdxl):
    path = _lokr_decomposed(tmp_path, sdxl, None)
    tensors, metadata = read_torch(path)
    header = read_header(path)
    assert header.tensors == tensor_infos(tensors) and header.metadata == metadata


# --- single numbers -------------------------------------------------------------------------------------------------


def _numbers():
    """One-number tensors of every dtype safetensors stores, with awkward values: every float8 bit pattern, bf16 bit
    patterns (±inf, nan, a subnormal, -0), numbers float32 rounds, the extremes of every integer type."""
    out = {f"e4m3_{i}": torch.tensor([i], dtype=torch.uint8).view(torch.float8_e4m3fn) for i in range(256)}
    out |= {f"e5m2_{i}": torch.tensor([i], dtype=torch.uint8).view(torch.float8_e5m2) for i in range(256)}
    for bits in (0x3F80, 0x7F80, 0xFF80, 0x7FC0, 0x0001, 0x8000, 0x4049, 0xC2F7):
        out[f"bf16_{bits:x}"] = torch.tensor([bits], dtype=torch.uint16).view(torch.bfloat16)
    for dtype in (torch.float64, torch.float32, torch.float16):
        out |= {f"{dtype}_{i}": torch.tensor([v], dtype=dtype) for i, v in enumerate([0.1, -0.0, 3.0, 1e-7, -65504.0])}
    for dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32):
        out[f"{dtype}_max"] = torch.tensor([torch.iinfo(dtype).max], dtype=dtype)
        out[f"{dtype}_min"] = torch.tensor([torch.iinfo(dtype).min], dtype=dtype)
    out["bool"] = torch.tensor([True])
    out["matrix"] = torch.tensor([[2.5, 1.0], [3.0, 4.0]], dtype=torch.bfloat16)
    out["scalar"] = torch.tensor(7.25, dtype=torch.float16)
    out["complex"] = torch.tensor([1.5 + 2j], dtype=torch.complex64)
    return out


def test_first_value_is_the_number_torch_reads(tmp_path):
    numbers = _numbers()
    path = tmp_path / "numbers.safetensors"
    save_file(numbers, str(path))
    header = read_header(path)
    assert header.tensors == tensor_infos(numbers)
    for key, t in numbers.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # complex -> real drops the imaginary part, as LoKr does
            want = float(t.float().reshape(-1)[0])
        got = first_value(path, header, key)
        assert math.isnan(got) if math.isnan(want) else (got, math.copysign(1, got)) == (want, math.copysign(1, want))


def test_read_tensors_gives_the_numbers_torch_reads(tmp_path):
    numbers = _numbers() | {"matrix32": torch.randn(3, 5), "bf16_matrix": torch.randn(4, 6).bfloat16()}
    path = tmp_path / "numbers.safetensors"
    save_file(numbers, str(path))
    arrays = read_tensors(path, read_header(path))
    assert arrays.keys() == numbers.keys()
    for key, t in numbers.items():
        assert arrays[key].shape == tuple(t.shape), key
        if t.is_floating_point() or t.is_complex():  # as the readers take them: float32, complex to its real part
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                want = t.float().numpy()
            got = float32(arrays[key])
            assert got.dtype == np.float32 and np.array_equal(got, want, equal_nan=True), key
            numbers = ~np.isnan(want)
            assert np.array_equal(np.signbit(got[numbers]), np.signbit(want[numbers])), key  # -0.0 stays -0.0
        else:
            assert np.array_equal(arrays[key], t.numpy()), key


# --- damaged files: refused as the torch readers refuse them --------------------------------------------------------


KQ = f"lora_unet_{encode_path(Q)}"  # Q's kohya lora name


def _kohya_pair(alpha=None, **replaced):
    """A kohya LoRA layer on Q (rank 2, with `alpha` when given), some of its tensors `replaced` by suffix."""
    tensors = {f"{KQ}.lora_down.weight": torch.randn(2, 32), f"{KQ}.lora_up.weight": torch.randn(32, 2)}
    if alpha is not None:
        tensors[f"{KQ}.alpha"] = alpha
    return tensors | {f"{KQ}.{suffix.replace('_weight', '.weight')}": t for suffix, t in replaced.items()}


def _native_file(factors: str, a_shape):
    meta = {"format": "krona", "format_version": 1, "factors": {"unet": {Q: factors}}}
    tensors = {f"unet.{Q}.kron_a": torch.ones(*a_shape), f"unet.{Q}.kron_b": torch.ones(8, 8)}
    return tensors, {"krona": json.dumps(meta)}


DAMAGED = {
    "lora alpha nan": (_kohya_pair(alpha=torch.tensor(float("nan"), dtype=torch.bfloat16)), {}),
    "lora alpha inf": (_kohya_pair(alpha=torch.tensor([0x7C], dtype=torch.uint8).view(torch.float8_e5m2)), {}),
    "lora alpha of two numbers": (_kohya_pair(alpha=torch.ones(2)), {}),
    "lora complex alpha": (_kohya_pair(alpha=torch.tensor(1j, dtype=torch.complex64)), {}),
    "lora integer factor": (_kohya_pair(lora_down_weight=torch.ones(2, 32).long()), {}),
    "lora conv factor": (_kohya_pair(lora_up_weight=torch.ones(32, 2, 1, 1)), {}),
    "lora ranks differ": (_kohya_pair(lora_up_weight=torch.ones(32, 3)), {}),
    "lora peft rank differs": (
        {f"unet.{Q}.lora_A.weight": torch.ones(2, 32), f"unet.{Q}.lora_B.weight": torch.ones(32, 2)},
        {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 4})},
    ),
    "lokr lacks w2": ({f"{KQ}.lokr_w1": torch.ones(2, 2)}, {}),
    "lokr halves do not multiply": (
        {f"{KQ}.lokr_w1": torch.ones(2, 2), f"{KQ}.lokr_w2_a": torch.ones(16, 2), f"{KQ}.lokr_w2_b": torch.ones(3, 16)},
        {},
    ),
    "lokr sgm name the sdxl unet lacks": (
        {"lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lokr_w1": torch.ones(2, 2)},
        {"ss_base_model_version": "sdxl_base_v1-0"},
    ),
    "native factors differ from the tensor": _native_file("4x4", (2, 2)),
    "native newer version": ({}, {"krona": json.dumps({"format_version": 99})}),
    "official down without up": (
        {f"unet.{Q.rpartition('.')[0]}.processor.to_q_lora.down.weight": torch.ones(4, 4)},
        {},
    ),
    "foreign": ({"w": torch.zeros(2)}, {}),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_damaged_files_are_refused_with_the_torch_readers_message(case, tmp_path):
    tensors, metadata = DAMAGED[case]
    path = tmp_path / "damaged.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(KronaError) as loading:
        load_adapter(path)
    with pytest.raises(KronaError) as describing:
        describe(path)
    tensors, metadata = read_torch(path)
    with pytest.raises(KronaError) as in_memory:  # the same tensors as torch reads them, through the in-memory readers
        IN_MEMORY[detect_format(tensors, metadata, str(path))](tensors, metadata, str(path))
    assert str(describing.value) == str(loading.value) == str(in_memory.value)


def test_unreadable_files_are_refused_before_reading(tmp_path, sdxl):
    good = save_adapter(tmp_path / "good.safetensors", sdxl)
    data = good.read_bytes()
    pickle = tmp_path / "adapter.ckpt"
    torch.save({"x": torch.zeros(2)}, pickle)
    for path in (pickle, tmp_path / "missing.safetensors", tmp_path):
        with pytest.raises(KronaError) as loading:
            load_adapter(path)
        with pytest.raises(KronaError) as describing:
            describe(path)
        assert str(describing.value) == str(loading.value)
    broken = {"truncated": data[: len(data) // 2], "trailing bytes": data + b"\0" * 8, "short": data[:5]}
    broken["header not json"] = data[:8] + b"{" + b"x" * (len(data) - 9)
    for name, entry in {"shape not a list": '"shape":7', "unknown dtype": '"dtype":"F7"'}.items():
        header = json.dumps({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
        header = header.replace(b'"shape": [2]' if "shape" in name else b'"dtype": "F32"', entry.encode())
        broken[name] = len(header).to_bytes(8, "little") + header + b"\0" * 8
    for name, content in broken.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        with pytest.raises(KronaError, match="truncated or corrupt"):
            load_adapter(path)
        with pytest.raises(KronaError, match="truncated or corrupt"):
            describe(path)


# --- no model library -----------------------------------------------------------------------------------------------


@pytest.mark.subprocess
def test_inspect_imports_no_model_library(tmp_path, sdxl, sd15, linears):
    files = [
        str(_make(maker, tmp_path, sdxl, sd15, linears))
        for maker in (_native, _lokr_decomposed, _lokr_sgm, _lora_kohya_trainer, _lora_diffusers_with_peft_config)
    ] + [str(_make(_official, tmp_path, sdxl, sd15, linears))]
    code = f"import sys; from krona_cli.cli import main; codes = [main(['inspect', f, '--json']) for f in {files!r}]; "
    code += f"print(codes, sorted(m for m in {MODEL_LIBRARIES!r} if sys.modules.get(m) is not None))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == f"{[0] * len(files)} []"


@pytest.mark.subprocess
def test_export_imports_no_model_library(tmp_path, sdxl, sd15, linears):
    """`krona export` reads, computes and writes with numpy; its files equal those written from torch tensors."""
    jobs = []
    for maker in (_native, _native_bf16_sd15, _lokr_decomposed, _lokr_sgm, _official):
        source = _make(maker, tmp_path, sdxl, sd15, linears)
        for to, dtype in (("lycoris", "fp32"), ("native", "bf16"), ("lycoris", "fp16"), ("lora", "bf16")):
            if to == "lycoris" and maker is _official:
                continue  # a DiffuseKronA layout is no plain LoKr (refused, tested in test_format_lycoris)
            jobs.append((str(source), to, dtype, str(tmp_path / f"{source.stem}-{to}-{dtype}.safetensors")))
    args = [
        ["export", "--adapter", s, "--to", to, "--dtype", d, "--output", o] + (["--rank", "3"] if to == "lora" else [])
        for s, to, d, o in jobs
    ]
    code = f"import sys; from krona_cli.cli import main; codes = [main(a) for a in {args!r}]; "
    code += f"print(codes, sorted(m for m in {MODEL_LIBRARIES!r} if sys.modules.get(m) is not None))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == f"{[0] * len(jobs)} []"
    for source, to, dtype, output in jobs:  # the same file written from torch tensors
        again = Path(output).with_suffix(".torch")
        adapter = load_adapter(source)
        assert all(isinstance(layer.a, torch.Tensor) for mods in adapter.layers.values() for layer in mods.values())
        if to == "lora":
            save_lora(again, adapter, rank=3, dtype=dtype, title=Path(output).stem)
        else:
            (save_lycoris if to == "lycoris" else save_adapter)(again, adapter, dtype=dtype, title=Path(output).stem)
        assert _contents(again) == _contents(output), output


def _contents(path) -> tuple:
    """A file's tensors (header entries and bytes) and its metadata but the time it was written."""
    header = read_header(path)
    data = Path(path).read_bytes()[min(begin for begin, _ in header.spans.values()) :]
    metadata = {k: v for k, v in header.metadata.items() if k != "modelspec.date"}
    return header.tensors, header.spans, metadata, data


@pytest.mark.subprocess
def test_the_check_sees_torch_when_it_is_imported():
    """The check itself: the same code after importing torch reports it (so an empty list above means something)."""
    code = f"import sys, torch; print(sorted(m for m in {MODEL_LIBRARIES!r} if sys.modules.get(m) is not None))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "['torch']"


# the names `krona_cli.formats` exports
EXPORTED = {
    "LAYOUT_DIFFUSEKRONA", "LAYOUT_LORA", "LAYOUT_STANDARD", "Adapter", "DiffuseKronALayer", "KronLayer", "LoraLayer",
    "attach", "canonical_name", "collect_adapter", "describe", "detect_format", "file_sha256", "fill_lora",
    "fill_lycoris", "fill_native", "fill_official", "from_lora", "from_lycoris", "from_native", "from_official",
    "load_adapter", "module_name", "numpy_array", "read_adapter", "save_adapter", "save_lora",
    "save_lycoris", "to_lora", "to_lycoris", "torch_tensor",
}  # fmt: skip


def test_the_formats_names_load_lazily_and_none_is_a_submodule():
    assert set(formats.__all__) == EXPORTED
    submodules = {m.name for m in pkgutil.iter_modules(formats.__path__)}
    assert not set(formats.__all__) & submodules
    for name in formats.__all__:
        value = getattr(formats, name)
        assert not isinstance(value, types.ModuleType), name
    with pytest.raises(AttributeError):
        formats.no_such_name  # noqa: B018
