"""A .safetensors file read and written without torch, with numpy: pickles refused before anything is read
(`refuse_unsafe`), the header (`read_header`: each tensor's dtype and shape, where its bytes lie, the metadata), the
first number of one small tensor (`first_value`), every tensor (`read_tensors`), float32 copies of numpy arrays or
torch tensors (`float32`), a file's bytes in fp32, fp16 or bf16 (`safetensors_bytes`, rounding as torch does; the
numbers as stored: `rounded`), and the file's hash. numpy has no bfloat16 or float8: their numbers are decoded by
hand into float32 (or float16), and bf16 is encoded by hand.

The layout (safetensors' specification): 8 bytes, the header's length n (little-endian); n bytes of JSON,
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}; then the tensors' bytes, each at
its offsets counted from the end of the header, filling that part of the file exactly. A header is held to the rules
safetensors' own reader checks, so that a file `read_header` accepts is one torch's reader reads.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import TensorSpec, serialize

from ..errors import KronaError
from .outline import TensorInfo

# safetensors' dtype -> (torch's name for it, bytes per number)
DTYPES = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U64": ("uint64", 8),
    "U32": ("uint32", 4),
    "U16": ("uint16", 2),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "C64": ("complex64", 8),
}
# How numpy reads each dtype's bytes (little-endian); the two needing more than a view are decoded in `_numbers`.
_NUMPY = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "F8_E4M3": "u1", "F8_E5M2": "u1",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1",
    "BOOL": "?", "C64": "<c8",
}  # fmt: skip
# what `safetensors_bytes` writes for each of krona's dtype names: safetensors' name for it in `save` and in a header
_WRITTEN = {"fp32": ("float32", "F32"), "fp16": ("float16", "F16"), "bf16": ("bfloat16", "BF16")}
_MAX_HEADER = 100_000_000  # safetensors' own limit on the header's length


@dataclass(frozen=True)
class Header:
    """A .safetensors file's header: each tensor's `TensorInfo` and its raw dtype and byte range in the file, and the
    metadata."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    raw_dtypes: dict[str, str]
    spans: dict[str, tuple[int, int]]  # key -> (first byte in the file, byte after the last)


def refuse_unsafe(path: Path) -> None:
    """KronaError for a path that is missing, a folder or a pickle (PyTorch .bin/.pt/.ckpt), before anything is read."""
    if not path.exists():
        raise KronaError(f"adapter file '{path}' does not exist; check the path")
    if path.is_dir():
        raise KronaError(f"'{path}' is a folder; give the adapter's .safetensors file")
    with path.open("rb") as f:
        head = f.read(9)
    # a safetensors file starts with its header's length (8 bytes, little-endian, so the first byte can be
    # anything, 0x80 included) followed by the JSON header's "{"
    looks_safetensors = len(head) == 9 and head[8:9] == b"{"
    zip_archive = head[:4] == b"PK\x03\x04"  # torch.save's default format
    legacy_pickle = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    if not looks_safetensors and (zip_archive or legacy_pickle):
        raise KronaError(
            f"'{path}' is a pickle (a PyTorch .bin/.pt/.ckpt file); krona never loads pickles, which can run code. "
            "Convert it to .safetensors with a tool you trust"
        )


def unreadable(path: str | Path, why: str) -> KronaError:
    """The error for a file that is not a readable .safetensors file, saying `why`."""
    return KronaError(f"'{path}' is not a readable .safetensors file (truncated or corrupt?): {why}")


def _entry(path: Path, key: str, entry) -> tuple[str, tuple[int, ...], int, int]:
    """(raw dtype, shape, begin, end) of one tensor's header entry; KronaError where it breaks the format's rules."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise unreadable(path, f"the header entry of '{key}' is not {{dtype, shape, data_offsets}}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise unreadable(path, f"tensor '{key}' has dtype {dtype!r}, which krona does not know")
    lists = isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
    if not lists or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in [*shape, *offsets]):
        raise unreadable(path, f"the shape or offsets of '{key}' are not whole numbers")
    begin, end = offsets
    if end - begin != math.prod(shape) * DTYPES[dtype][1]:
        raise unreadable(path, f"the offsets of '{key}' do not fit its shape {tuple(shape)} and dtype {dtype}")
    return dtype, tuple(shape), begin, end


def read_header(path: str | Path) -> Header:
    """The header of a .safetensors file, checked as safetensors checks it; KronaError for pickles, truncated or
    corrupt files."""
    path = Path(path)
    refuse_unsafe(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if length < 0 or length > min(_MAX_HEADER, size - 8):
            raise unreadable(path, "the header is longer than the file")
        text = f.read(length)
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise unreadable(path, f"its header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise unreadable(path, "its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise unreadable(path, "its metadata is not a map of strings")
    tensors, raw, spans = {}, {}, {}
    start = 8 + length
    for key, entry in header.items():
        dtype, shape, begin, end = _entry(path, key, entry)
        tensors[key], raw[key], spans[key] = TensorInfo(DTYPES[dtype][0], shape), dtype, (start + begin, start + end)
    position = start
    for begin, end in sorted(spans.values()):
        if begin != position:
            raise unreadable(path, "its tensors' bytes overlap or leave gaps")
        position = end
    if position != size:
        raise unreadable(path, f"the header describes {position} bytes, the file has {size}")
    return Header(tensors, metadata, raw, spans)


def _numbers(data: bytes, dtype: str) -> np.ndarray:
    """The numbers of a tensor's bytes as numpy reads them; bf16 and fp8 decoded into float32 by hand."""
    values = np.frombuffer(data, dtype=_NUMPY[dtype])
    if dtype == "BF16":  # the high half of a float32
        return (values.astype(np.uint32) << 16).view(np.float32)
    if dtype == "F8_E5M2":  # the high byte of a float16
        return (values.astype(np.uint16) << 8).view(np.float16)
    if dtype == "F8_E4M3":  # sign, 4 exponent bits (bias 7), 3 mantissa bits; all ones is NaN, there is no inf
        sign = np.where(values & 0x80, -1.0, 1.0)
        exponent, mantissa = (values >> 3) & 0xF, (values & 0x7).astype(np.float64)
        normal = np.ldexp(1.0 + mantissa / 8, exponent.astype(np.int64) - 7)
        out = sign * np.where(exponent == 0, np.ldexp(mantissa / 8, -6), normal)
        return np.where((values & 0x7F) == 0x7F, np.nan, out)
    return values


def first_value(path: str | Path, header: Header, key: str) -> float:
    """The first number of tensor `key` as torch's readers take it (`float(t.float().reshape(-1)[0])`: through
    float32), read from its bytes in the file."""
    begin, end = header.spans[key]
    if begin == end:
        raise KronaError(f"'{path}': '{key}' holds no number; the file is damaged")
    dtype = header.raw_dtypes[key]
    with Path(path).open("rb") as f:
        f.seek(begin)
        data = f.read(DTYPES[dtype][1])
    number = _numbers(data, dtype)[0]
    return float(np.float32(number.real if np.iscomplexobj(number) else number))


def read_tensors(path: str | Path, header: Header) -> dict[str, np.ndarray]:
    """Every tensor of a file whose header has been read, as numpy holds its numbers (bf16 as float32, fp8 as float16
    or float64: exactly; see `_numbers`), in its shape; read-only views of the file's bytes where no decoding was
    needed."""
    data = Path(path).read_bytes()
    if len(data) < max((end for _, end in header.spans.values()), default=0):
        raise unreadable(path, "it became shorter while it was read")
    return {
        key: _numbers(data[begin:end], header.raw_dtypes[key]).reshape(header.tensors[key].shape)
        for key, (begin, end) in header.spans.items()
    }


def float32(tensor: Any) -> np.ndarray:
    """A fresh, writable float32 copy of a numpy array or a torch tensor (of a complex one its real part, as torch's
    `.float()` takes it)."""
    if not isinstance(tensor, np.ndarray):  # a torch tensor: torch converts its own dtypes (bf16, fp8) exactly
        tensor = tensor.detach().cpu().float().numpy()
    if np.iscomplexobj(tensor):
        tensor = tensor.real
    return np.array(tensor, dtype=np.float32, order="C", copy=True)


def _encoded(numbers: np.ndarray, dtype: str) -> np.ndarray:
    """float32 `numbers` rounded to `dtype` (fp32, fp16 or bf16) to the nearest, ties to even, as torch rounds; bf16 as
    its bits (uint16). A NaN stays a NaN (bf16: the quiet NaN 0x7FC0)."""
    if dtype == "fp16":
        with np.errstate(over="ignore"):  # beyond float16's range is ±inf, as in torch
            return numbers.astype(np.float16)
    if dtype == "bf16":  # the high half of the float32, rounded on the low half
        bits = numbers.view(np.uint32)
        rounded = ((bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
        return np.where(np.isnan(numbers), np.uint16(0x7FC0), rounded)
    return numbers


def rounded(numbers: np.ndarray, dtype: str) -> np.ndarray:
    """float32 copies of `numbers` (any float dtype: through float32 first, as torch converts) as a file in `dtype`
    (fp32, fp16 or bf16) holds them, read back."""
    stored = _encoded(float32(numbers), _check_dtype(dtype))
    return _numbers(stored.tobytes(), _WRITTEN[dtype][1]).astype(np.float32).reshape(stored.shape)


def _check_dtype(dtype: str) -> str:
    if dtype not in _WRITTEN:
        raise KronaError(f"unknown dtype '{dtype}'; use one of {', '.join(_WRITTEN)}")
    return dtype


def safetensors_bytes(
    tensors: Mapping[str, Any], dtype: str, metadata: Mapping[str, str], float32_keys: Collection[str] = ()
) -> bytes:
    """The bytes of a .safetensors file holding `tensors` (numpy arrays or torch tensors, any float dtype) in `dtype`
    (fp32, fp16 or bf16), those named in `float32_keys` in fp32 whatever `dtype`, with `metadata`: the bytes
    safetensors' own `save` writes for the same tensors converted by torch."""
    _check_dtype(dtype)
    kinds = {key: "fp32" if key in float32_keys else dtype for key in tensors}
    arrays = {key: _encoded(float32(tensor), kinds[key]) for key, tensor in tensors.items()}
    specs = {
        key: TensorSpec(dtype=_WRITTEN[kinds[key]][0], shape=a.shape, data_ptr=a.ctypes.data, data_len=a.nbytes)
        for key, a in arrays.items()
    }
    return bytes(serialize(specs, metadata=dict(metadata)))  # `arrays` holds the memory the specs point to


def file_sha256(path: str | Path) -> str:
    """The file's SHA-256, hex (used to name an adapter in logs and image metadata)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
