"""KronLinear: a frozen nn.Linear plus a Kronecker-product update, W' = W + s · (A ⊗ B).

The update is applied with the reshape trick and never materialised in training: with x viewed as
X = x.reshape(N, a_in, b_in), (A ⊗ B) x = (A · X · Bᵀ).reshape(N, d_out). The frozen linear and the update run in
one autograd Function so that the update's result is added into the base output in place (and its input gradient
into the base's input gradient), without extra passes over the activations. Which factor is contracted first is
chosen from the shapes (the cheaper order, in FLOPs), and for shapes where one extra weight-sized GEMM is cheaper
than the reshape path (few tokens, GPUs) the merged form F.linear(x, W + s·A⊗B) is used instead; see `choose_path`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import KronaError
from .factors import INITS, INVARIANT_REFERENCE, Factors, parse_factors
from .functional import kron, kron_delta

PATHS = ("auto", "reshape", "merged")


@dataclass(frozen=True)
class _Device:
    """A rough cost model of a device: sustained GEMM FLOP/s, memory bytes/s, and each path's fixed cost per layer
    and training step (launching its kernels and running its autograd nodes on the host)."""

    flops: float
    bandwidth: float
    fixed: dict


# Orders of magnitude, not measurements of any one machine: they only have to rank two paths. The fixed costs on
# CUDA are measured (docs/benchmarks.md): in eager mode an SDXL training step on an H100 is bound by the host, and
# each adapted layer added about 0.55 ms per step on the reshape path (a Python autograd Function of ~28 kernels)
# against 0.44 ms on the merged path (~26 kernels through autograd's C++ nodes), on three machines.
_DEVICES = {
    "cpu": _Device(flops=5e10, bandwidth=1e10, fixed={"reshape": 56e-6, "merged": 52e-6}),
    "cuda": _Device(flops=3e14, bandwidth=2e12, fixed={"reshape": 550e-6, "merged": 440e-6}),
}
# Building A ⊗ B, adding it to W and reducing its gradient to the gradients of A and B: the reductions ran far below
# memory bandwidth on the H100, so all of it counts as this many passes over a weight-sized tensor.
_WEIGHT_PASSES = 20


def contraction_cost(d_out: int, d_in: int, a_out: int, a_in: int, b_first: bool) -> int:
    """Multiply-adds per token of (A ⊗ B)x by the reshape trick, contracting with B first or with A first."""
    b_out, b_in = d_out // a_out, d_in // a_in
    if b_first:  # T = X Bᵀ (a_in × b_out), then A T
        return d_in * b_out + d_out * a_in
    return a_out * d_in + d_out * b_in  # U = A X (a_out × b_in), then U Bᵀ


@lru_cache(maxsize=4096)
def choose_path(n_tokens: int, d_out: int, d_in: int, a_out: int, a_in: int, device_type: str, elem_size: int) -> str:
    """`reshape` or `merged`, whichever the device's cost model says is faster for one training forward+backward.

    Only the work that differs between the two paths is counted: the frozen layer's own GEMMs are the same in both.
    """
    dev = _DEVICES.get(device_type, _DEVICES["cuda"])
    macs = min(contraction_cost(d_out, d_in, a_out, a_in, True), contraction_cost(d_out, d_in, a_out, a_in, False))
    reshape = (
        3 * 2 * n_tokens * macs / dev.flops  # forward, input gradient, factor gradients
        + 8 * n_tokens * (d_in + d_out) * elem_size / dev.bandwidth  # passes over activations and gradients
        + dev.fixed["reshape"]
    )
    merged = (
        2 * n_tokens * d_in * d_out / dev.flops  # the weight-gradient GEMM the frozen layer does not need
        + _WEIGHT_PASSES * d_in * d_out * elem_size / dev.bandwidth
        + dev.fixed["merged"]
    )
    return "reshape" if reshape <= merged else "merged"


def da_by_gemm(n_tokens: int, d_out: int, a_in: int, b_out: int, device_type: str) -> bool:
    """Whether dA = Σ_n dY_n T_nᵀ is faster as one GEMM (which also computes the b_out² - b_out unneeded off-diagonal
    products) than as a batched product over tokens. Measured on CPU (docs/benchmarks.md): the batched product
    costs about 0.6 µs per token of fixed overhead; the GEMM wins at 640-wide SDXL layers with 64x4 factors
    (b_out = 10) and loses at 1280-wide ones (b_out = 20) and at few tokens.
    """
    return device_type == "cpu" and n_tokens >= 512 and d_out * a_in * b_out < 40_000


class _KronLinearFn(torch.autograd.Function):
    """y = x Wᵀ + bias + s · (A ⊗ B) x, with the Kronecker term computed by the reshape trick.

    W and bias are frozen (no gradient). x, W and bias arrive in the compute dtype, A and B in theirs. With W None (a
    quantized base, run by its own layer) it computes the update alone: y = s · (A ⊗ B) x.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a_param, b_param, scale: float, b_first: bool):
        # the factors arrive in their own dtype (fp32 master weights) and are cast here, not by autograd: two graph
        # nodes fewer per layer and step; their gradients are cast back in backward
        ctx.param_dtype = a_param.dtype
        a, b = a_param.to(x.dtype), b_param.to(x.dtype)
        a_out, a_in = a.shape
        b_out, b_in = b.shape
        lead = x.shape[:-1]
        x2 = x.reshape(-1, a_in * b_in).contiguous()  # the views below need rows laid out densely
        n = x2.shape[0]
        y = F.linear(x2, weight, bias) if weight is not None else x2.new_zeros(n, a_out * b_out)
        if b_first:
            # T_n = X_n Bᵀ for every token in one GEMM, then y_n += s · A T_n (batched, written into y)
            t = torch.mm(x2.view(n * a_in, b_in), b.t()).view(n, a_in, b_out)
            y.view(n, a_out, b_out).baddbmm_(a.expand(n, a_out, a_in), t, alpha=scale)
        else:
            # U_n = A X_n (batched), then y_n += s · U_n Bᵀ for every token in one GEMM
            t = torch.bmm(a.expand(n, a_out, a_in), x2.view(n, a_in, b_in))
            y.view(n * a_out, b_out).addmm_(t.view(n * a_out, b_in), b.t(), alpha=scale)
        ctx.save_for_backward(x2, weight, a, b, t)
        ctx.scale, ctx.b_first, ctx.lead = scale, b_first, lead
        ctx.da_by_gemm = b_first and da_by_gemm(n, a_out * b_out, a_in, b_out, x.device.type)
        return y.view(*lead, a_out * b_out)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, a, b, t = ctx.saved_tensors
        s = ctx.scale
        a_out, a_in = a.shape
        b_out, b_in = b.shape
        n = x2.shape[0]
        dy2 = dy.reshape(n, a_out * b_out).contiguous()  # a no-op unless upstream handed a strided gradient
        d_y = dy2.view(n, a_out, b_out)
        need_x, need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        dx = da = db = None
        if ctx.b_first:
            # G_n = Aᵀ dY_n; dx_n += s · G_n B; dB = s · Σ G_nᵀ X_n; dA = s · Σ dY_n T_nᵀ
            g = torch.bmm(a.t().expand(n, a_in, a_out), d_y) if (need_x or need_b) else None
            if need_x:
                dx = _base_grad(dy2, weight, n, a_in * b_in)
                dx.view(n * a_in, b_in).addmm_(g.view(n * a_in, b_out), b, alpha=s)
            if need_b:
                db = torch.mm(g.view(n * a_in, b_out).t(), x2.view(n * a_in, b_in)).mul_(s)
            if need_a:
                if ctx.da_by_gemm:
                    # one GEMM over all tokens gives Σ_n dY_n ⊗ T_n; dA is the sum of its diagonal blocks
                    dm = torch.mm(dy2.t(), t.view(n, a_in * b_out)).view(a_out, b_out, a_in, b_out)
                    da = dm.diagonal(dim1=1, dim2=3).sum(-1).mul_(s)
                else:
                    da = torch.bmm(d_y, t.transpose(1, 2)).sum(0).mul_(s)
        else:
            # dU_n = dY_n B; dx_n += s · Aᵀ dU_n; dB = s · Σ dY_nᵀ U_n; dA = s · Σ dU_n X_nᵀ
            du = torch.mm(d_y.reshape(n * a_out, b_out), b).view(n, a_out, b_in) if (need_x or need_a) else None
            if need_x:
                dx = _base_grad(dy2, weight, n, a_in * b_in)
                dx.view(n, a_in, b_in).baddbmm_(a.t().expand(n, a_in, a_out), du, alpha=s)
            if need_b:
                db = torch.mm(d_y.reshape(n * a_out, b_out).t(), t.view(n * a_out, b_in)).mul_(s)
            if need_a:
                da = torch.bmm(du, x2.view(n, a_in, b_in).transpose(1, 2)).sum(0).mul_(s)
        if dx is not None:
            dx = dx.view(*ctx.lead, a_in * b_in)
        da = None if da is None else da.to(ctx.param_dtype)
        db = None if db is None else db.to(ctx.param_dtype)
        return dx, None, None, da, db, None, None


def _base_grad(dy: torch.Tensor, weight: torch.Tensor | None, n: int, d_in: int) -> torch.Tensor:
    """The frozen layer's input gradient dy W, the buffer the update's input gradient is added into."""
    return torch.mm(dy, weight) if weight is not None else dy.new_zeros(n, d_in)


def _merge_dtype(weight: torch.Tensor) -> torch.dtype:
    """Merging adds in float32 at least (fp16/bf16 weights), in float64 for float64 weights."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def is_quantized(layer: nn.Module) -> bool:
    """Whether a linear layer's weight is held quantized (bitsandbytes int8 or packed 4-bit), on its device."""
    weight = getattr(layer, "weight", None)
    return weight is not None and not weight.dtype.is_floating_point


class KronLinear(nn.Module):
    """A frozen `nn.Linear` with a trainable Kronecker-product update: y = base(x) + scale · (A ⊗ B) x.

    `kron_a` is A (a_out × a_in), `kron_b` is B (d_out/a_out × d_in/a_in). B starts at zero, so a freshly made
    KronLinear computes exactly what its base does. The adapter's parameters stay in float32 by default while the
    base may be float16/bfloat16: the update runs in the compute dtype (the input's, or autocast's).

    `path` picks how the update is computed: `reshape` (never materialises A ⊗ B), `merged` (one F.linear with
    W + s·A⊗B), or `auto` (per call, from the shapes and the device; see `choose_path`). A quantized base
    (bitsandbytes, `quantize.py`) runs as its own layer and the update beside it by the reshape trick, whatever
    `path` says: its weights are never read or changed.
    """

    def __init__(
        self,
        base: nn.Linear,
        factors: str | tuple[int, int] | Factors = (64, 4),
        scale: float = 1.0,
        init: str = "normal",
        path: str = "auto",
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise KronaError(f"KronLinear adapts nn.Linear layers, not {type(base).__name__}")
        f = parse_factors(factors)
        d_out, d_in = base.out_features, base.in_features
        if d_out % f.a_out or d_in % f.a_in:
            raise KronaError(f"factors {f} do not divide a {d_out}x{d_in} (out x in) layer; use factors that divide it")
        if path not in PATHS:
            raise KronaError(f"unknown adapter path '{path}'; use one of {', '.join(PATHS)}")
        self.base = base
        base.requires_grad_(False)
        self.factors = f
        self.scale = float(scale)
        self.path = path
        self.merged = False
        device = base.weight.device
        b_out, b_in = f.b_shape(d_out, d_in)
        self.kron_a = nn.Parameter(torch.empty(f.a_out, f.a_in, device=device, dtype=dtype))
        self.kron_b = nn.Parameter(torch.zeros(b_out, b_in, device=device, dtype=dtype))
        # the cheaper contraction order for the reshape path, fixed by the shapes
        self.b_first = contraction_cost(d_out, d_in, f.a_out, f.a_in, True) <= contraction_cost(
            d_out, d_in, f.a_out, f.a_in, False
        )
        self.reset_parameters(init)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def reset_parameters(self, init: str = "normal") -> None:
        """B = 0 and A drawn by `init`: `normal` N(0, std 1/a_out) as in DiffuseKronA; `invariant` N(0, std
        sqrt(a_out·a_in)/16), whose first steps change the loss by the same amount at one learning rate whatever the
        factor shapes (docs/fidelity.md derives it; equal to `normal` at 4x4); `kaiming` (uniform) or `xavier`."""
        if init not in INITS:
            raise KronaError(f"unknown adapter init '{init}'; use one of {', '.join(INITS)}")
        if self.kron_a.is_meta:
            return
        with torch.no_grad():
            if init == "normal":
                nn.init.normal_(self.kron_a, std=1.0 / self.factors.a_out)
            elif init == "invariant":
                nn.init.normal_(
                    self.kron_a, std=math.sqrt(self.factors.a_out * self.factors.a_in) / INVARIANT_REFERENCE
                )
            elif init == "kaiming":
                nn.init.kaiming_uniform_(self.kron_a, a=math.sqrt(5))
            else:
                nn.init.xavier_normal_(self.kron_a)
            self.kron_b.zero_()

    def delta_weight(self) -> torch.Tensor:
        """The materialised update s · (A ⊗ B), shape (d_out, d_in), in the adapter's dtype (for merging)."""
        return kron_delta(self.kron_a, self.kron_b, self.scale)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into the base weight; forward then runs the base alone."""
        if is_quantized(self.base):
            raise KronaError(
                "cannot merge an adapter into a quantized layer; merge it into the full-precision base "
                "model (krona merge)"
            )
        if not self.merged:
            w = self.base.weight
            w.copy_((w.to(_merge_dtype(w)) + self.delta_weight().to(_merge_dtype(w))).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take a merged update back out of the base weight."""
        if self.merged:
            w = self.base.weight
            w.copy_((w.to(_merge_dtype(w)) - self.delta_weight().to(_merge_dtype(w))).to(w.dtype))
            self.merged = False

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return x.dtype

    def resolved_path(self, n_tokens: int, device_type: str, elem_size: int) -> str:
        """The path a forward over n_tokens rows would take."""
        if self.path != "auto":
            return self.path
        f = self.factors
        # under torch.compile the path is decided once, while tracing: the uncached function says the same
        choose = choose_path.__wrapped__ if torch.compiler.is_compiling() else choose_path
        return choose(n_tokens, self.out_features, self.in_features, f.a_out, f.a_in, device_type, elem_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.scale == 0.0:
            return self.base(x)
        x = x.to(self._compute_dtype(x))
        if is_quantized(self.base):
            return self.base(x) + self._update(x, None, None)
        weight = self.base.weight.to(x.dtype)
        bias = None if self.base.bias is None else self.base.bias.to(x.dtype)
        n_tokens = x.numel() // max(x.shape[-1], 1)
        if self.resolved_path(n_tokens, x.device.type, x.element_size()) == "merged":
            a, b = self.kron_a.to(x.dtype), self.kron_b.to(x.dtype)
            return F.linear(x, torch.add(weight, kron(a, b), alpha=self.scale), bias)
        return self._update(x, weight, bias)

    def _update(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        """The fused Function: x Wᵀ + bias + s·(A ⊗ B)x, or the update alone without W; in x's dtype."""
        args = (x, weight, bias, self.kron_a, self.kron_b, self.scale, self.b_first)
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return _KronLinearFn.apply(*args)
        return _KronLinearFn.apply(*args)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, factors={self.factors}, "
            f"scale={self.scale}, path={self.path}, merged={self.merged}"
        )
