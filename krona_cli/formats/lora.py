"""LoRA files: read (diffusers/peft, older diffusers, kohya) and written (a Kronecker adapter turned into a LoRA by
truncated SVD, for tools that load LoRA but not LoKr).

A LoRA layer holds down (r × d_in) and up (d_out × r) with ΔW = multiplier · up @ down. Key formats read:

* diffusers / peft, as `StableDiffusionXLPipeline.save_lora_weights` and diffusers' DreamBooth LoRA scripts write them
  today: `unet.<module>.lora_A.weight` (down) / `.lora_B.weight` (up), and the same under `text_encoder.` and
  `text_encoder_2.`. Text-encoder modules are spelled with or without `text_model.` (diffusers 0.42 under
  transformers 5 writes `text_encoder.encoder.layers.N...`). Keys without a component prefix
  (`UNet2DConditionModel.save_lora_adapter`) are the UNet's. The multiplier is 1 (diffusers' convention: alpha = r)
  unless the file carries diffusers' `lora_adapter_metadata` (the peft LoraConfig per component, e.g.
  `unet.lora_alpha`), which gives alpha / r per module (`alpha_pattern`, `rank_pattern`, alpha / √r with
  `use_rslora`), exactly as peft builds the layers when diffusers loads the file.
* older diffusers: `unet.<module>.lora.down.weight` / `.lora.up.weight`, with text encoders as
  `text_encoder.<module>.lora_linear_layer.down.weight` / `.up.weight`. The processor naming
  (`...processor.to_q_lora.down.weight`) is not read here: official DiffuseKronA checkpoints use it (official.py).
  A file holding only `lora_linear_layer` keys is not recognised by `is_lora` for the same reason.
* kohya: `<lora name>.lora_down.weight` / `.lora_up.weight` / `.alpha` (multiplier alpha / r, 1 without alpha), lora
  names as in kohya_names.py: `lora_unet_` + the diffusers module path with `_`, `lora_te1_` / `lora_te2_` for SDXL's
  text encoders and `lora_te_` for SD 1.x's, and the SGM-named UNet layers of kohya's SDXL files
  (`lora_unet_input_blocks_4_1_...`, key_format `kohya-sgm`).

Conv LoRA (4-D weights), DoRA (`dora_scale`, `lora_magnitude_vector`), biases, LoCon/LoHa/LoKr keys and anything else
are refused with a KronaError naming the key. Everything is read into float32. The keys, shapes, multipliers and
settings are read without torch by lora_outline.py; here its outline is filled with the tensors.

LoRA files are written by lora_export.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .adapter import LoraLayer, Make, row_ranges, torch_tensor
from .lora_outline import is_lora, lora_outline
from .native import tensor_value
from .outline import Adapter, LoraOutline, tensor_infos
from .safetensors_file import float32

__all__ = ["fill_lora", "from_lora", "is_lora"]


def fill_lora(outline: Adapter, tensors: Mapping[str, Any], make: Make = torch_tensor) -> Adapter:
    """A LoRA file's outline (lora_outline.py) filled with its tensors: down and up in float32, handed to `make`; a
    part of a fused layer (FLUX.1's kohya names) takes its rows of up and the whole down."""

    def layer(found: LoraOutline) -> LoraLayer:
        down, up = float32(tensors[found.keys["down"]]), row_ranges(float32(tensors[found.keys["up"]]), found.rows)
        return LoraLayer(make(down), make(up), found.multiplier)

    return outline.with_layers(layer)


def from_lora(
    tensors: Mapping[str, Any], metadata: dict[str, str], source: str, unet_config: Mapping | None = None
) -> Adapter:
    """The Adapter of LoraLayers held by a LoRA file's tensors (numpy or torch) and metadata (formats: see the module
    docstring; the keys, multipliers and settings are read by lora_outline.py), down and up in float32 torch
    tensors."""
    outline = lora_outline(tensor_infos(tensors), metadata, source, unet_config, tensor_value(tensors))
    return fill_lora(outline, tensors)
