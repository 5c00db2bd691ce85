"""FLUX.1's lora names: the spellings other tools write and ComfyUI maps for a FLUX model (comfy/lora.py,
`model_lora_keys_unet` for `comfy.model_base.Flux` and `model_lora_keys_clip` for its `clip_l`), read by
kohya_names.py's `NameReader`, and `FluxNaming`, how krona's LoKr and LoRA files name a FLUX adapter's layers
(naming.py).

The transformer (diffusers' FluxTransformer2DModel module names; `.` spelled `_` after a prefix):

* `lycoris_<module>`: SimpleTuner's LyCORIS files (LyCORIS's own wrapper prefix). krona's LoKr files use it.
* `lora_transformer_<module>`: OneTrainer's (and ai-toolkit's kohya-style) files.
* `transformer.<module>.lora_A.weight` / `.lora_B.weight`: diffusers / peft (`FluxPipeline.save_lora_weights`,
  ai-toolkit, SimpleTuner's LoRA), read by lora_outline.py. krona's LoRA files use it by default.
* `lora_unet_<BFL module>`: kohya's sd-scripts (and Forge): Black Forest Labs' layout (bfl_layout.py), where a double
  block's q, k, v are one `img_attn.qkv` (`txt_attn.qkv`) and a single block's q, k, v and MLP input one `linear1`.
  Read as the diffusers modules it stacks (each one's rows: `bfl_layout.bfl_parts`); written (`--lora-layout kohya`)
  by stacking them, exactly: the fused LoRA's down stacks the parts' downs, its up holds each part's up in that part's
  rows and columns (rank: the parts' ranks added).

ComfyUI slices the fused weight itself for the diffusers names (`to_q` is rows 0..h of `img_attn.qkv`, ...) and swaps
the halves of a diffusers-named `norm_out.linear` update, so diffusers-named files need no BFL arithmetic.

The CLIP-L text encoder: `lora_te1_text_model_encoder_layers_N_...` (kohya's FLUX scripts, OneTrainer; ComfyUI maps
`lora_te_` and `lora_te1_` to FLUX's clip_l) and diffusers' `text_encoder.text_model.encoder.layers.N...`. FLUX's T5
(`lora_te2_` in OneTrainer's files, `lora_te3_` in kohya's) is never adapted by krona, and such files are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .. import families
from ..errors import KronaError
from ..families import linear_names
from .bfl_layout import bfl_module, bfl_parts, bfl_slices, fused_rows, is_linear, module_from_underscores
from .native_outline import canonical_name

LYCORIS_PREFIX = "lycoris_"
ONETRAINER_PREFIX = "lora_transformer_"
BFL_PREFIX = "lora_unet_"
CLIP_PREFIX = "lora_te1_"
# The key format (`Adapter.key_format`) of each transformer spelling.
KEY_FORMATS = {LYCORIS_PREFIX: "simpletuner", ONETRAINER_PREFIX: "onetrainer", BFL_PREFIX: "kohya"}
TRANSFORMER = "transformer"
TRANSFORMER_TITLES = families.titles(lambda family: family.denoiser == TRANSFORMER, "or")  # in messages

Written = list[tuple[str, str, np.ndarray, np.ndarray]]  # (component, module, up, down) per layer


def transformer_module(prefix: str, rest: str) -> tuple[str, str] | None:
    """(module, key format) of a lora name's part after `prefix` when it names a transformer linear: a diffusers
    module of any transformer family's real model after `lycoris_` / `lora_transformer_` (linear_names.py), a FLUX.1
    BFL module (kept in BFL's names, see `parts`) after `lora_unet_`; None otherwise."""
    if prefix not in KEY_FORMATS:
        return None
    bfl = prefix == BFL_PREFIX
    module = module_from_underscores(rest, bfl=bfl)
    if module is None and not bfl:
        module = linear_names.module_from_underscores(TRANSFORMER, rest)
    return None if module is None else (module, KEY_FORMATS[prefix])


def check_module(module: str, key: str, source: str) -> str:
    """A diffusers-named transformer module of a file, refused unless it is a linear layer of a transformer family's
    model (any transformer family's)."""
    if not (is_linear(module, bfl=False) or linear_names.families_with(TRANSFORMER, module)):
        raise KronaError(
            f"'{source}' holds '{key}', whose module '{module}' is not a linear layer of a {TRANSFORMER_TITLES} "
            "transformer in diffusers' names; the file is for another model or damaged"
        )
    return module


def parts(module: str, rows: int, in_features: int) -> list[tuple[str, tuple[tuple[int, int], ...] | None]]:
    """The krona layers one file layer of the transformer makes: a BFL-named one (kohya) the diffusers modules it
    stacks, with their rows' ranges (bfl_layout.bfl_parts); any other itself, whole (None)."""
    if is_linear(module, bfl=True):
        return list(bfl_parts(module, rows, in_features))
    return [(module, None)]


def check_components(components, source: str, architecture: str | None = None) -> None:
    """A transformer file adapts the transformer and the text encoders its family trains (FLUX.1: CLIP-L, never T5),
    never a UNet besides. The family is the `architecture` recorded, else the first whose transformer has every
    adapted module."""
    if TRANSFORMER not in components:
        return
    if "unet" in components:
        raise KronaError(f"'{source}' holds both UNet and transformer layers; a file adapts one model")
    family = families.find(architecture or linear_names.family_of(TRANSFORMER, components[TRANSFORMER]))
    if family is None:
        return
    trained = family.trained_text()
    for component in components:
        if component != TRANSFORMER and component not in trained:
            raise KronaError(
                f"'{source}' holds layers of {family.title}'s {component}, a text encoder krona does not adapt or read "
                f"(it adapts {', '.join(trained)})"
            )


# --- writing ------------------------------------------------------------------------------------------------------


def _fused(group: list[tuple[str, np.ndarray, np.ndarray]], fused: str) -> tuple[np.ndarray, np.ndarray]:
    """One BFL weight's LoRA (up, down) from its diffusers parts' (module, up, down): down stacks the parts' downs,
    up holds each part's up in its rows (bfl_parts) and its own columns; up @ down is every part's update in place."""
    hidden = group[0][2].shape[1]
    if bfl_slices(group[0][0], hidden) is None:
        rows = group[0][1].shape[0]  # renamed (or swapped) one to one: the part's own rows
    else:
        mlp = next((up.shape[0] for m, up, _ in group if m.endswith(".proj_mlp")), None)
        rows = fused_rows(fused, hidden, mlp)
    where = dict(bfl_parts(fused, rows, hidden))
    up_all = np.zeros((rows, sum(down.shape[0] for _, _, down in group)), dtype=np.float32)
    column = 0
    for module, up, down in group:
        row = 0
        for start, stop in where[module]:
            up_all[start:stop, column : column + down.shape[0]] = up[row : row + stop - start]
            row += stop - start
        column += down.shape[0]
    return up_all, np.concatenate([down for _, _, down in group], axis=0)


@dataclass(frozen=True)
class DiffusersNaming:
    """A transformer family's names in krona's files (naming.py): LoKr `lycoris_<module>` for the transformer
    (SimpleTuner's LyCORIS names, which ComfyUI maps for the transformer families), kohya's prefix of each trained text
    encoder (`lora_te1_`, `lora_te2_`); LoRA in diffusers' `<component>.<module>` names."""

    prefixes: Mapping[str, str]  # text encoder -> its kohya prefix
    lora_layouts: tuple[str, ...] = ("peft",)

    @classmethod
    def of(cls, adapter) -> DiffusersNaming:
        return cls(families.get(adapter.architecture).kohya_prefixes())

    def lokr_name(self, component: str, module: str) -> str:
        if component == TRANSFORMER:
            return LYCORIS_PREFIX + module.replace(".", "_")
        if component in self.prefixes:
            return self.prefixes[component] + canonical_name(component, module).replace(".", "_")
        raise KronaError(
            f"the adapter holds '{component}' layers, which krona does not write for its model; it is damaged"
        )

    def lokr_alpha(self, w1_shape: tuple[int, ...], w2_shape: tuple[int, ...]) -> float | None:
        """The alpha of a LoKr layer stored as two full matrices, chosen so that every loader scales it by 1: ComfyUI
        ignores it (up to at least comfyanonymous/ComfyUI 179c2d35 and again today) or divides it by w2's rows // w1's
        (Comfy-Org/ComfyUI 839df9f2, tests/comfyui_flux.py), LyCORIS sets alpha = its dim for full matrices (scale 1).
        That quotient when it is at least 1; where it is 0 no alpha at all (every ComfyUI then uses 1; alpha over 0
        would raise)."""
        quotient = w2_shape[0] // w1_shape[0]
        return float(quotient) if quotient >= 1 else None

    def lora_layers(self, written: Written, layout: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """(lora name, up, down) per file layer in diffusers' `<component>.<module>` names."""
        return [(f"{c}.{canonical_name(c, m)}", up, down) for c, m, up, down in written]


@dataclass(frozen=True)
class FluxNaming(DiffusersNaming):
    """FLUX.1's names in krona's files (see the module docstring and naming.py): DiffusersNaming's, CLIP-L as
    `lora_te1_`, and LoRA also in kohya's BFL names."""

    prefixes: Mapping[str, str] = field(default_factory=lambda: {"text_encoder": CLIP_PREFIX})
    lora_layouts: tuple[str, ...] = ("peft", "kohya")

    def lora_layers(self, written: Written, layout: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """(lora name, up, down) per file layer: diffusers' `<component>.<module>` (peft), or kohya's names, where the
        transformer's parts of one BFL weight are stacked into one layer (`_fused`)."""
        if layout == "peft":
            return super().lora_layers(written, layout)
        out, groups = [], {}
        for component, module, up, down in written:
            if component == TRANSFORMER:
                groups.setdefault(bfl_module(module), []).append((module, up, down))
            else:
                out.append((self.lokr_name(component, module), up, down))
        for fused, group in groups.items():
            out.append((BFL_PREFIX + fused.replace(".", "_"), *_fused(group, fused)))
        return out
