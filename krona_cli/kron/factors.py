"""Kronecker factor choice: parsing `OxI`, fitting factors to a layer's size, counting parameters.

A layer W of shape (d_out, d_in) gets A of shape (a_out, a_in) and B of shape (d_out/a_out, d_in/a_in), so
ΔW = A ⊗ B has W's shape. Text form: `OxI` = a_out x a_in (e.g. `64x4`, the DiffuseKronA paper's best setting).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import KronaError

#: How factor A starts (B starts at zero; `KronLinear.reset_parameters`). `invariant`'s std is
#: sqrt(a_out·a_in) / INVARIANT_REFERENCE: DiffuseKronA's 1/a_out at 4x4.
INITS = ("normal", "invariant", "kaiming", "xavier")
INVARIANT_REFERENCE = 16

DEFAULT_FACTORS = "64x4"

_FACTOR_RE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


@dataclass(frozen=True)
class Factors:
    """The output-side and input-side sizes of the Kronecker factor A (B's sizes follow from the layer)."""

    a_out: int
    a_in: int

    def __str__(self) -> str:
        return f"{self.a_out}x{self.a_in}"

    def b_shape(self, d_out: int, d_in: int) -> tuple[int, int]:
        """Shape of B for a layer of shape (d_out, d_in); the factors must divide the layer."""
        return d_out // self.a_out, d_in // self.a_in

    def num_params(self, d_out: int, d_in: int) -> int:
        """Trainable parameters of A and B on a (d_out, d_in) layer."""
        b_out, b_in = self.b_shape(d_out, d_in)
        return self.a_out * self.a_in + b_out * b_in


def parse_factors(value: str | tuple[int, int] | Factors) -> Factors:
    """Read factors given as `OxI` text, an (a_out, a_in) pair or a Factors; raise KronaError when malformed."""
    if isinstance(value, Factors):
        return value
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise KronaError(f"factors {value!r} must be a pair (a_out, a_in), e.g. (64, 4)")
        a_out, a_in = value
    else:
        match = _FACTOR_RE.match(str(value))
        if not match:
            raise KronaError(
                f"factors '{value}' are not of the form OxI (two whole numbers, e.g. 64x4): "
                "O is A's output-side size, I its input-side size"
            )
        a_out, a_in = match.groups()
    try:
        whole = [int(v) for v in (a_out, a_in)]
        if any(isinstance(v, float) and v != w for v, w in zip((a_out, a_in), whole)) or any(
            isinstance(v, bool) for v in (a_out, a_in)
        ):
            raise ValueError
        a_out, a_in = whole
    except (TypeError, ValueError, OverflowError) as e:
        raise KronaError(f"factors {value!r} must be whole numbers, e.g. 64x4") from e
    if a_out < 1 or a_in < 1:
        raise KronaError(f"factors '{value}' must be positive whole numbers, e.g. 64x4")
    return Factors(a_out, a_in)


def largest_divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of n that is not above limit (at least 1)."""
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1


def fit_factors(requested: Factors, d_out: int, d_in: int, strict: bool = False, name: str = "") -> Factors:
    """Factors for a (d_out, d_in) layer: the request where it divides, else the nearest divisor not above it.

    With strict=True a request that does not divide the layer is a KronaError instead.
    """
    fitted = Factors(largest_divisor_at_most(d_out, requested.a_out), largest_divisor_at_most(d_in, requested.a_in))
    if strict and fitted != requested:
        where = f" layer '{name}'" if name else " a layer"
        raise KronaError(
            f"factors {requested} do not divide{where} of shape {d_out}x{d_in} (out x in); "
            f"choose factors that divide it (e.g. {fitted}) or drop --strict-factors to fit them per layer"
        )
    return fitted
