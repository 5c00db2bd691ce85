"""The adapter in memory, whatever file it came from: per-layer records by component and module, each computing its
own update ΔW (peft-style), and the settings the adapter was made with. Every format is read into an `Adapter` and
written from one; merging bakes `Adapter.deltas()`.

Layers: `KronLayer(a, b)` (ΔW = s·(A ⊗ B), the `standard` layout), `DiffuseKronALayer(a, b)` (the official
DiffuseKronA layer's row permutation of it, layout `diffusekrona`) and `LoraLayer(down, up, multiplier)`
(ΔW = s·multiplier·up @ down, layout `lora`). One adapter holds layers of one layout. Module names are spelled as
krona's files spell them (text-encoder modules with `text_model.`, see native.canonical_name).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..errors import KronaError
from ..kron import diffusekrona_delta, diffusekrona_rows, kron_delta, kron_svd, kron_svd_error

LAYOUT_STANDARD = "standard"
LAYOUT_DIFFUSEKRONA = "diffusekrona"
LAYOUT_LORA = "lora"
# The version of krona's settings (the native format's metadata) an adapter made or read by this krona follows.
FORMAT_VERSION = 1


@dataclass(eq=False)
class KronLayer:
    """A Kronecker layer: A (a_out × a_in) and B (b_out × b_in), ΔW = s · (A ⊗ B) of shape (a_out·b_out, a_in·b_in)."""

    a: torch.Tensor
    b: torch.Tensor
    layout: ClassVar[str] = LAYOUT_STANDARD

    @property
    def factors(self) -> str:
        """A's shape as `OxI` text (a_out x a_in), as the native metadata records it."""
        return f"{self.a.shape[0]}x{self.a.shape[1]}"

    @property
    def label(self) -> str:
        """What `krona inspect` counts layers by: their factors."""
        return self.factors

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in) of the layer it changes."""
        return self.a.shape[0] * self.b.shape[0], self.a.shape[1] * self.b.shape[1]

    def num_params(self) -> int:
        return self.a.numel() + self.b.numel()

    def delta(self, scale: float = 1.0) -> torch.Tensor:
        """ΔW in float32, `scale` included."""
        return kron_delta(self.a.float(), self.b.float(), scale)

    def low_rank(self, scale: float, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """up (d_out × k) and down (k × d_in) in `dtype` with up @ down the best rank-k approximation of ΔW (k: see
        kron.kron_svd), and (‖ΔW − up@down‖_F², ‖ΔW‖_F²) of the factors as rounded to `dtype`."""
        up, down = kron_svd(self.a, self.b, scale, rank)
        up, down = up.to(dtype), down.to(dtype)
        err2, norm2 = kron_svd_error(self.a, self.b, scale, up, down)
        return up, down, err2, norm2


@dataclass(eq=False)
class DiffuseKronALayer(KronLayer):
    """An official DiffuseKronA layer's factors (A = down.weightᵀ, B = up.weight): its ΔW is s·(A ⊗ B) with the rows
    regrouped (kron.diffusekrona_delta), which is not a plain Kronecker product."""

    layout: ClassVar[str] = LAYOUT_DIFFUSEKRONA

    def delta(self, scale: float = 1.0) -> torch.Tensor:
        return diffusekrona_delta(self.a.float(), self.b.float(), scale)

    def low_rank(self, scale: float, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        # the standard delta's SVD with up's rows regrouped: a row permutation changes neither error nor norm
        up, down, err2, norm2 = super().low_rank(scale, rank, dtype)
        return diffusekrona_rows(up, self.a.shape[0], self.b.shape[0]), down, err2, norm2


@dataclass(eq=False)
class LoraLayer:
    """A LoRA layer: down (r × d_in), up (d_out × r) and its multiplier alpha / r already resolved (1.0 without
    alpha), ΔW = s · multiplier · up @ down."""

    down: torch.Tensor
    up: torch.Tensor
    multiplier: float = 1.0
    layout: ClassVar[str] = LAYOUT_LORA

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def label(self) -> str:
        """What `krona inspect` counts layers by: their rank."""
        return f"rank {self.rank}"

    @property
    def shape(self) -> tuple[int, int]:
        return self.up.shape[0], self.down.shape[1]

    def num_params(self) -> int:
        return self.down.numel() + self.up.numel()

    def delta(self, scale: float = 1.0) -> torch.Tensor:
        """ΔW in float32, `scale` and the multiplier included."""
        return (self.up.float() @ self.down.float()) * (float(scale) * float(self.multiplier))


Layer = KronLayer | DiffuseKronALayer | LoraLayer
# The Kronecker layer of each layout a native file may record.
KRON_LAYOUTS: dict[str, type[KronLayer]] = {LAYOUT_STANDARD: KronLayer, LAYOUT_DIFFUSEKRONA: DiffuseKronALayer}


@dataclass
class Adapter:
    """An adapter in memory: its layers by component (unet, text_encoder, text_encoder_2) and module, and the settings
    it was made with. `scale` multiplies every layer's update."""

    layers: dict[str, dict[str, Layer]]
    scale: float = 1.0
    base_model: str | None = None
    architecture: str | None = None
    targets: dict[str, str] = field(default_factory=dict)  # component -> target preset or regex
    training: dict | None = None
    key_format: str | None = None  # how the file it was read from names its tensors (krona, kohya, kohya-sgm, ...)
    format_version: int | None = FORMAT_VERSION  # of krona's settings; None for a LoRA, which has none

    def __post_init__(self) -> None:
        layouts = {layer.layout for mods in self.layers.values() for layer in mods.values()}
        if len(layouts) > 1:
            raise KronaError(f"an adapter holds layers of one layout, not of {', '.join(sorted(layouts))}")

    @property
    def layout(self) -> str:
        """The layout of its layers: standard, diffusekrona or lora (standard when it holds none)."""
        for mods in self.layers.values():
            for layer in mods.values():
                return layer.layout
        return LAYOUT_STANDARD

    @property
    def kronecker(self) -> bool:
        """Whether its layers are Kronecker factors (standard or DiffuseKronA), which can be exported."""
        return self.layout in KRON_LAYOUTS

    def num_params(self) -> int:
        return sum(layer.num_params() for mods in self.layers.values() for layer in mods.values())

    def num_layers(self) -> dict[str, int]:
        return {component: len(mods) for component, mods in self.layers.items()}

    def deltas(self) -> Iterator[tuple[str, str, torch.Tensor]]:
        """(component, module, ΔW in float32, the adapter's scale included) for every layer."""
        for component, mods in self.layers.items():
            for module, layer in mods.items():
                yield component, module, layer.delta(self.scale)
