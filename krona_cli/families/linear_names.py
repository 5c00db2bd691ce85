"""A denoiser's module names as lora names spell them (`.` as `_`), read back against the real models' layer
lists (configs/models/layers/, families.Family.linear_layers): `transformer_blocks_3_attn2_to_q` is
`transformer_blocks.3.attn2.to_q` because the list has `transformer_blocks.N.attn2.to_q`. No grammar per family: a
family with a layer list is read as soon as it is registered. Numbers standing alone between separators (block
indices, `net.0`, `to_out.0`, `linear_1`) are matched as any number; the rest must be spelled as the list has it."""

from __future__ import annotations

import re
from functools import cache

_NUMBER_DOTTED = re.compile(r"(?<=[._])\d+(?=[._]|$)")
_NUMBER_ENCODED = re.compile(r"(?<=_)\d+(?=_|$)")


@cache
def _templates(component: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """{encoded template: (dotted template, the families that have it)} over every family whose `component` is a
    layer-listed denoiser; templates hold `{}` where a number stands."""
    found: dict[str, tuple[str, tuple[str, ...]]] = {}
    from . import FAMILIES

    for family in FAMILIES:
        if family.denoiser != component or not family.layer_list:
            continue
        for name, _, _ in family.linear_layers()[component]:
            dotted = _NUMBER_DOTTED.sub("{}", name)
            encoded = dotted.replace(".", "_")
            owners = found.get(encoded, (dotted, ()))[1]
            if family.name not in owners:
                found[encoded] = (dotted, (*owners, family.name))
    return found


def module_from_underscores(component: str, name: str) -> str | None:
    """The denoiser `component`'s linear module a lora name's part after its prefix spells, in diffusers' names; None
    when no family's real model has such a linear."""
    numbers = _NUMBER_ENCODED.findall(name)
    if any(str(int(n)) != n for n in numbers):
        return None
    found = _templates(component).get(_NUMBER_ENCODED.sub("{}", name))
    return None if found is None else found[0].format(*numbers)


def families_with(component: str, module: str) -> tuple[str, ...]:
    """The families whose denoiser `component` has a linear named like `module` (any block number)."""
    found = _templates(component).get(_NUMBER_DOTTED.sub("{}", module).replace(".", "_"))
    return () if found is None else found[1]


def family_of(component: str, modules) -> str | None:
    """The first family (registry order) whose denoiser `component` has every one of these modules (its name)."""
    from . import FAMILIES

    found = [set(families_with(component, module)) for module in modules]
    return next((f.name for f in FAMILIES if found and all(f.name in names for names in found)), None)
