"""Files written with numpy (`safetensors_bytes`, so krona's own and LoKr files) are the bytes torch would write: the
same rounding to fp16 and bf16 (to the nearest, ties to even, subnormals and overflow included) and the same layout as
safetensors' torch `save` (whose metadata comes in a different order at every call, so headers are compared as JSON).
The LoKr scale is applied and taken out as torch's float32 arithmetic does."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save as torch_save

from krona_cli.errors import KronaError
from krona_cli.formats import Adapter, KronLayer, from_lycoris, to_lycoris
from krona_cli.formats.safetensors_file import safetensors_bytes

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _awkward() -> np.ndarray:
    """float32 numbers every rounding rule meets: random ones at many scales, the halfway points between neighbouring
    fp16 and bf16 numbers (ties), their subnormals, the largest finite ones and beyond, ±0 and ±inf."""
    rng = np.random.default_rng(0)
    random = (rng.standard_normal(20_000) * 10.0 ** rng.integers(-9, 6, 20_000)).astype(np.float32)
    halves = np.arange(0, 1 << 16, 7, dtype=np.uint32)
    bf16_ties = ((halves << 16) | 0x8000).view(np.float32)  # exactly between two bf16 numbers
    fp16_ties = (np.arange(1, 2048, dtype=np.float32) + np.float32(0.5)) * np.float32(2.0**-24)  # fp16 subnormal ties
    edges = np.array([65504, 65519.99, 65520, -65520, 3.4e38, -3.4e38, 1e-45, -1e-45, 0.0, -0.0, np.inf, -np.inf])
    numbers = np.concatenate([random, bf16_ties, fp16_ties, edges.astype(np.float32)])
    return numbers[np.isfinite(numbers) | np.isinf(numbers)]  # no NaN: below


def _parts(data: bytes) -> tuple[dict, bytes]:
    """A .safetensors file's header, as JSON, and its tensors' bytes."""
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]), data[8 + length :]


@pytest.mark.parametrize("dtype", sorted(TORCH_DTYPES))
def test_written_bytes_are_the_bytes_torch_writes(dtype):
    numbers = _awkward()
    tensors = {"w": numbers.reshape(-1, 4)[:300], "flat": numbers, "scalar": np.array(1.0, dtype=np.float32)}
    metadata = {"krona": "{}", "title": "x"}
    want = torch_save({k: torch.from_numpy(v).to(TORCH_DTYPES[dtype]) for k, v in tensors.items()}, metadata=metadata)
    assert _parts(safetensors_bytes(tensors, dtype, metadata)) == _parts(want)
    # torch tensors in, of any float dtype, give the same file as their float32 numbers
    from_torch = {k: torch.from_numpy(v).double() for k, v in tensors.items()}
    assert _parts(safetensors_bytes(from_torch, dtype, metadata)) == _parts(want)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_a_nan_stays_a_nan(dtype):
    data = safetensors_bytes({"w": np.array([np.nan, -np.nan, 1.0], dtype=np.float32)}, dtype, {})
    back = torch.frombuffer(bytearray(data[-6:]), dtype=TORCH_DTYPES[dtype]).float()
    assert torch.isnan(back[:2]).all() and back[2] == 1.0


def test_an_unknown_dtype_is_refused():
    with pytest.raises(KronaError, match="unknown dtype 'int8'; use one of fp32, fp16, bf16"):
        safetensors_bytes({"w": np.zeros(2, np.float32)}, "int8", {})


@pytest.mark.parametrize("scale", [0.8, 1 / 3, 0.1, 7.77, 1e-3, -2.5])
def test_the_lokr_scale_is_float32_arithmetic_as_in_torch(scale):
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((8, 4)).astype(np.float32), rng.standard_normal((5, 6)).astype(np.float32)
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    adapter = Adapter({"unet": {module: KronLayer(a, b)}}, scale, None, "sdxl", {"unet": "attn"})
    tensors, metadata = to_lycoris(adapter)
    w1 = next(v for k, v in tensors.items() if k.endswith(".lokr_w1"))
    assert np.array_equal(w1, (torch.from_numpy(a) * scale).numpy())  # s·A as torch multiplies
    back = from_lycoris(tensors, metadata, "memory").layers["unet"][module]
    assert torch.equal(back.a, torch.from_numpy(w1) / scale)  # and A = w1 / s as torch divides
