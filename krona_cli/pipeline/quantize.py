"""The frozen base model in less memory: `--base-precision fp32|fp16|bf16|int8|nf4`.

int8 and nf4 replace every nn.Linear of a model with a bitsandbytes layer (LLM.int8 or 4-bit NormalFloat) holding
the same weights, quantized when the model moves to its device; convolutions and norms stay in the compute dtype.
Kronecker adapters then run beside the quantized layer (`KronLinear`: base(x) + s·(A ⊗ B)x, the update in the
compute dtype) and never touch its weights, so an adapter trained on a quantized base merges into the
full-precision base like any other.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .. import late_imports
from ..errors import KronaError
from .models import cast

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "nf4")
QUANTIZED = ("int8", "nf4")


def import_bitsandbytes(flag: str, instead: str = ""):
    """The bitsandbytes module, quietened; a KronaError saying how to install it for `flag` (or to use `instead`)
    when it is missing."""
    # bitsandbytes' CPU backend logs a warning at import when the optional `kernels` package is absent (its own
    # fallback runs instead), and int8 layers log at every call that inputs are quantized through fp16, which is how
    # LLM.int8 works: neither says anything a user should act on
    for name in ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions"):
        logging.getLogger(name).setLevel(logging.ERROR)
    late_imports.release("bitsandbytes")  # the CLI holds it back until now
    try:
        import bitsandbytes
    except ImportError as e:
        raise KronaError(
            f"{flag} needs bitsandbytes: pip install bitsandbytes" + (f" (or use {instead})" if instead else "")
        ) from e
    return bitsandbytes


def _quantized_linear(linear: nn.Linear, precision: str, compute_dtype: torch.dtype) -> nn.Linear:
    """A bitsandbytes layer holding `linear`'s weights (on the CPU, not yet quantized) and bias."""
    bnb = import_bitsandbytes(f"--base-precision {precision}", instead="--base-precision bf16")
    weight = linear.weight.data.to("cpu", compute_dtype)
    if precision == "int8":
        layer = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            has_fp16_weights=False,
            threshold=6.0,
            device="meta",
        )
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=compute_dtype,
            quant_type="nf4",
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        # on CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights in place at the first no-grad call (sample
        # grids) into a layout that its training path then fails on; keep the one layout that does both
        layer.support_avx512bf16_for_cpu = False
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.to("cpu", compute_dtype), requires_grad=False)
    return layer


def quantizable(module: nn.Module, precision: str) -> bool:
    """Whether `quantize` replaces this module: a plain nn.Linear (nf4: with both sides multiples of 64, since
    bitsandbytes' 4-bit CPU kernels fail on others; only tiny test models have such layers: every linear layer of SDXL,
    SD, FLUX.1 and their text encoders is a multiple of 64 on both sides)."""
    return type(module) is nn.Linear and (
        precision == "int8" or module.in_features % 64 == module.out_features % 64 == 0
    )


def quantize(model: nn.Module, precision: str, compute_dtype: torch.dtype, device: torch.device | str) -> int:
    """Hold `model` on `device` in `precision`: every nn.Linear quantized (int8, nf4), the rest in `compute_dtype`.
    Returns how many layers were quantized (nf4: those whose sides are multiples of 64). A KronaError says so
    when bitsandbytes cannot run that mode there."""
    if precision not in QUANTIZED:
        raise KronaError(f"quantize() takes one of {', '.join(QUANTIZED)}, not '{precision}'")
    check_device(precision, compute_dtype, device)
    cast(model, "cpu", compute_dtype)
    names = [name for name, module in model.named_modules() if quantizable(module, precision)]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, _quantized_linear(getattr(owner, child), precision, compute_dtype))
    model.to(device)  # bitsandbytes quantizes the weights as they move
    model.requires_grad_(False)
    return len(names)


def check_device(precision: str, compute_dtype: torch.dtype, device: torch.device | str) -> None:
    """Run one small quantized layer forward and backward on `device`; a KronaError if bitsandbytes cannot."""
    torch_device = torch.device(device)
    try:
        # the probe draws nothing from the seeded global generator (its init on a forked copy, its input fixed): a
        # run's adapter init and noise, drawn after this, stay those of the same seed on a full-precision base
        with torch.random.fork_rng(devices=[]):
            probe = nn.Linear(64, 64)
        layer = _quantized_linear(probe, precision, compute_dtype).to(torch_device)
        x = torch.linspace(-1, 1, 128).view(2, 64).to(torch_device, compute_dtype).requires_grad_()
        layer(x).float().sum().backward()
    except KronaError:
        raise
    except Exception as e:  # whatever bitsandbytes raises for an unsupported device or build
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KronaError(
            f"bitsandbytes cannot run --base-precision {precision} on {torch_device.type} ({reason}); "
            "use --base-precision bf16, fp16 or fp32"
        ) from e


def weight_bytes(model: nn.Module) -> int:
    """Bytes that a model's weights take: parameters and buffers as stored, plus bitsandbytes' quantization
    statistics (int8 row scales, 4-bit block maxima)."""
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        total += tensor.numel() * tensor.element_size()
        scales = getattr(tensor, "SCB", None)
        if isinstance(scales, torch.Tensor):
            total += scales.numel() * scales.element_size()
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            for part in (state.absmax, getattr(state, "state2", None) and state.state2.absmax, state.code):
                if isinstance(part, torch.Tensor):
                    total += part.numel() * part.element_size()
    return total


def memory_estimate(models: list[nn.Module], trainable: int, state_bytes: int, ema: bool) -> str:
    """What a run holds on its device besides activations: the frozen weights of `models` as stored, and per
    trainable parameter its fp32 weight and gradient, the optimizer's `state_bytes` and the EMA copy."""
    weights = sum(weight_bytes(m) for m in models)
    per_param = 4 + 4 + state_bytes + (4 if ema else 0)
    return (
        f"{_size(weights)} frozen weights + {_size(trainable * per_param)} adapter, gradients and optimizer; "
        "activations come on top"
    )


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
