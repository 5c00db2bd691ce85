"""The adapter without its tensors' values, in plain Python (no torch): `Adapter` (its layers by component and module,
and the settings it was made with), what a layer's factor shapes tell (`KronShape`, `LoraShape`: its factors or rank,
the shape of the layer it changes, its parameters) and the outline of a layer as a file holds it (`KronOutline`,
`LoraOutline`: factor shapes as `TensorInfo`s, the keys of the tensors that make it, its multiplier).

Every reader first reads a file's keys, shapes and metadata into an `Adapter` of outlines (the `*_outline.py`
modules), which is all `krona inspect` needs, then fills each layer with its tensors (adapter.py's layers, which
compute their update ΔW)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import KronaError

if TYPE_CHECKING:
    import torch

LAYOUT_STANDARD = "standard"
LAYOUT_DIFFUSEKRONA = "diffusekrona"
LAYOUT_LORA = "lora"
# The layouts whose layers are Kronecker factors (which krona's own format stores and `export` writes).
KRON_LAYOUT_NAMES = (LAYOUT_STANDARD, LAYOUT_DIFFUSEKRONA)
# The version of krona's settings (the native format's metadata) an adapter made or read by this krona follows.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's dtype (as torch names it, without `torch.`: `float32`, `bfloat16`) and shape, read from a file's
    header or from the tensor itself (`of`)."""

    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def of(cls, tensor: Any) -> TensorInfo:
        """The dtype and shape of a torch tensor."""
        return cls(str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    def is_floating_point(self) -> bool:
        return self.dtype.startswith(("float", "bfloat"))

    def is_complex(self) -> bool:
        return self.dtype.startswith("complex")


def tensor_infos(tensors: Mapping[str, Any]) -> dict[str, TensorInfo]:
    """The `TensorInfo` of every tensor of a file read with torch, by key."""
    return {key: TensorInfo.of(t) for key, t in tensors.items()}


class KronShape:
    """What a Kronecker layer's factors tell by their shapes alone; `a` (A, a_out × a_in) and `b` (B, b_out × b_in)
    are tensors or `TensorInfo`s."""

    a: Any
    b: Any

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


class LoraShape:
    """What a LoRA layer's factors tell by their shapes alone; `down` (r × d_in) and `up` (d_out × r) are tensors or
    `TensorInfo`s."""

    down: Any
    up: Any

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


@dataclass(eq=False)
class KronOutline(KronShape):
    """A Kronecker layer as a file holds it: A's and B's shapes, the keys of the tensors that make it by their role in
    the format, its layout, the number the file's loaders multiply A by (LoKr: alpha / r of a decomposed factor), and
    `rows`: for a layer that is part of a file's fused layer (FLUX.1's kohya names), the ranges (start, stop) of the
    fused update's rows that make its rows, in order (A is then those rows' blocks of the file's A)."""

    a: TensorInfo
    b: TensorInfo
    keys: dict[str, str]
    layout: str = LAYOUT_STANDARD
    multiplier: float = 1.0
    rows: tuple[tuple[int, int], ...] | None = None


@dataclass(eq=False)
class LoraOutline(LoraShape):
    """A LoRA layer as a file holds it: down's and up's shapes, the keys of the tensors that make it, its
    multiplier alpha / r (1.0 without alpha), and `rows`: for a part of a file's fused layer, the ranges of the file's
    up rows that make its up, in order."""

    down: TensorInfo
    up: TensorInfo
    keys: dict[str, str]
    multiplier: float = 1.0
    rows: tuple[tuple[int, int], ...] | None = None
    layout: ClassVar[str] = LAYOUT_LORA


@dataclass
class Adapter:
    """An adapter: its layers by component (unet or transformer, text_encoder, text_encoder_2) and module, and the
    settings it was made with. `scale` multiplies every layer's update. Its layers are adapter.py's (with tensors) or,
    for an adapter read from a file's header alone, outlines (no tensors, so no `deltas`)."""

    layers: dict[str, dict[str, Any]]
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
        return self.layout in KRON_LAYOUT_NAMES

    def num_params(self) -> int:
        return sum(layer.num_params() for mods in self.layers.values() for layer in mods.values())

    def num_layers(self) -> dict[str, int]:
        return {component: len(mods) for component, mods in self.layers.items()}

    def with_layers(self, build: Callable[[Any], Any]) -> Adapter:
        """This adapter with every layer replaced by `build(layer)`: an outline's layers by the tensors they name."""
        layers = {component: {m: build(layer) for m, layer in mods.items()} for component, mods in self.layers.items()}
        return dataclasses.replace(self, layers=layers)

    def deltas(self) -> Iterator[tuple[str, str, torch.Tensor]]:
        """(component, module, ΔW in float32, the adapter's scale included) for every layer."""
        for component, mods in self.layers.items():
            for module, layer in mods.items():
                yield component, module, layer.delta(self.scale)
