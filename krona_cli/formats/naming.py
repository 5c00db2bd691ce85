"""How krona's LoKr and LoRA files name an adapter's layers, decided by the adapter's model family: one naming per
family, so the writers (lycoris.py, lora_export.py) never ask which family an adapter is for.

A naming has `lokr_name(component, module)` (a LoKr layer's lora name), `lokr_alpha(w1 shape, w2 shape)` (the alpha
a LoKr layer stored as two full matrices gets, None for none, chosen so that the loaders scale it by exactly 1),
`lora_layouts` (the LoRA key layouts it writes, the default first) and `lora_layers(written, layout)` (the LoRA
file's layers, (lora name, up, down)). The namings:

* SD 1.x/2.x and SDXL (kohya_names.KohyaNaming): kohya's `lora_unet_` / `lora_te_` / `lora_te1_` / `lora_te2_` names
  over diffusers' module paths, LoKr alpha 1, LoRA in kohya's layout by default or diffusers' (`peft`).
* FLUX.1 (flux_names.FluxNaming): LoKr `lycoris_` + diffusers' transformer names (SimpleTuner's) and `lora_te1_` for
  CLIP-L, LoRA in diffusers' `transformer.` / `text_encoder.` names by default or kohya's (BFL's fused names), the
  names ComfyUI maps for a FLUX model and diffusers' FluxPipeline loads.
* The other transformer families (flux_names.DiffusersNaming, which FluxNaming extends): LoKr `lycoris_` + diffusers'
  transformer names and kohya's prefix of each trained text encoder (`lora_te1_`, `lora_te2_`), LoRA in diffusers'
  names, which ComfyUI maps for the family's model and its diffusers pipeline loads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from .. import families
from .flux_names import DiffusersNaming, FluxNaming
from .kohya_names import KohyaNaming
from .outline import Adapter


class Naming(Protocol):
    lora_layouts: tuple[str, ...]

    def lokr_name(self, component: str, module: str) -> str: ...

    def lokr_alpha(self, w1_shape: tuple[int, ...], w2_shape: tuple[int, ...]) -> float | None: ...

    def lora_layers(
        self, written: list[tuple[str, str, np.ndarray, np.ndarray]], layout: str
    ) -> list[tuple[str, np.ndarray, np.ndarray]]: ...


# Each family names the module whose naming its files follow (`Family.file_naming`).
_NAMINGS: dict[str, Callable[[Adapter], Naming]] = {
    "kohya_names": KohyaNaming.of,
    "flux_names": lambda adapter: FluxNaming(),
    "diffusers_names": DiffusersNaming.of,
}


def naming_for(adapter: Adapter) -> Naming:
    """How the files krona writes name this adapter's layers: by the family it records, else by the denoiser it
    adapts where that tells one (a transformer: FLUX.1); kohya's names for an adapter of no family krona knows."""
    family = families.find(adapter.architecture or families.denoiser_owner(adapter.layers))
    return _NAMINGS[family.file_naming if family is not None else "kohya_names"](adapter)
