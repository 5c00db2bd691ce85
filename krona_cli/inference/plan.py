"""`krona plan`: adapter parameter counts and file sizes per block group, Kronecker factors beside LoRA ranks.

Counts come from the real architectures' layer lists (`Family.linear_layers`: data taken from the models
built on the meta device; no weights, no download, no model library), with the same target patterns and per-layer
factor fitting that training uses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .. import families
from ..kron.factors import fit_factors, parse_factors
from ..kron.targets import TARGET_PRESETS, target_pattern

LORA_RANKS = (4, 8, 16)
FP32_BYTES, FP16_BYTES = 4, 2

# The denoisers' top-level blocks: the UNet's down, mid and up blocks; a FLUX transformer's double-stream and
# single-stream blocks. Text encoders, and modules outside any block, count as their component.
_BLOCK = re.compile(
    r"(down_blocks\.\d+|up_blocks\.\d+|mid_block|transformer_blocks\.\d+|single_transformer_blocks\.\d+)\."
)


def block_group(component: str, name: str) -> str:
    """The block group a module belongs to: `down_blocks.1`, `mid_block`, `up_blocks.0` (UNet),
    `transformer_blocks.3`, `single_transformer_blocks.12` (FLUX), else the component (`unet`, `transformer`,
    `text_encoder`)."""
    match = _BLOCK.match(name)
    return match.group(1) if match else component


@dataclass
class GroupCount:
    """Parameter counts of one block group: layers, Kronecker parameters per factor setting, LoRA per rank, and the
    factors each setting really uses there (fitted per layer where the request does not divide it)."""

    layers: int = 0
    kron: dict[str, int] = field(default_factory=dict)
    lora: dict[int, int] = field(default_factory=dict)
    used: dict[str, set[str]] = field(default_factory=dict)

    def add(self, other: GroupCount) -> None:
        self.layers += other.layers
        for k, v in other.kron.items():
            self.kron[k] = self.kron.get(k, 0) + v
        for k, v in other.used.items():
            self.used.setdefault(k, set()).update(v)
        for r, v in other.lora.items():
            self.lora[r] = self.lora.get(r, 0) + v


def components_for_targets(targets: str, family: families.Family) -> list[str]:
    """The text preset adapts the text encoders `--train-text-encoder` adapts (FLUX: CLIP only, never T5); every other
    target (preset or regex) adapts the denoiser."""
    if targets == "text":
        return list(family.trained_text())
    return [family.denoiser]


def count_linears(
    linears: list[tuple[str, int, int]],
    factor_settings: list[str],
    strict_factors: bool = False,
    group_of=lambda name: name,
) -> dict[str, GroupCount]:
    """Group counts for (name, d_out, d_in) linears under each factor setting and each LoRA rank."""
    requests = [(str(s), parse_factors(s)) for s in factor_settings]
    groups: dict[str, GroupCount] = {}
    for name, d_out, d_in in linears:
        g = groups.setdefault(group_of(name), GroupCount())
        one = GroupCount(layers=1)
        for label, request in requests:
            fitted = fit_factors(request, d_out, d_in, strict_factors, name)
            one.kron[label] = fitted.num_params(d_out, d_in)
            one.used[label] = {str(fitted)}
        for r in LORA_RANKS:
            one.lora[r] = r * (d_in + d_out)
        g.add(one)
    return groups


def plan(
    arch: str, factor_settings: list[str], targets: str = "attn", strict_factors: bool = False
) -> dict[str, GroupCount]:
    """Counts per block group, plus a `total` entry, for `arch` with these targets and factor settings: the
    denoiser's layers by the family's presets, the text encoders' by the CLIP one, as training selects them."""
    family = families.with_layer_list(arch)
    components = family.linear_layers()
    linears = []
    for component in components_for_targets(targets, family):
        pattern = target_pattern(targets, family.target_presets if component == family.denoiser else TARGET_PRESETS)
        layers = components[component]
        unused = set(family.unused_denoiser_layers(n for n, _, _ in layers)) if component == family.denoiser else set()
        linears += [
            (f"{component}:{n}", d_out, d_in) for n, d_out, d_in in layers if pattern.search(n) and n not in unused
        ]
    groups = count_linears(linears, factor_settings, strict_factors, group_of=lambda n: block_group(*n.split(":", 1)))
    total = GroupCount()
    for g in groups.values():
        total.add(g)
    groups["total"] = total
    return groups


def file_size(params: int, bytes_per_param: int) -> int:
    """Tensor bytes of an adapter file (the safetensors header adds a few kB)."""
    return params * bytes_per_param
