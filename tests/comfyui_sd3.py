"""ComfyUI's rules for SD3 / SD3.5 LoRA and LoKr keys, written down as a test oracle: which lora names ComfyUI accepts
for an SD3 model, and the model weight each one patches (ComfyUI's SD3 model is Stability's MMDiT layout under
`diffusion_model.`), with the rows it patches.

Written from ComfyUI's source, read at these commits (Comfy-Org/ComfyUI):

- `comfy/utils.py` @ b3be02d6e766a8d3743dcf99cc967118f3ec8e3e, `mmdit_to_diffusers(mmdit_config, output_prefix)`:
  for each of `depth` joint blocks, with `offset = depth * 64` (the hidden size: SD3's heads are 64 wide and its
  head count is its depth), diffusers' `transformer_blocks.N.attn.to_q/to_k/to_v` -> rows (0, offset·i, offset) of
  `joint_blocks.N.x_block.attn.qkv`, `attn.add_q_proj/add_k_proj/add_v_proj` -> the same of
  `context_block.attn.qkv`, `attn2.to_q/to_k/to_v` -> the same of `x_block.attn2.qkv` (SD3.5 Medium's second
  attention); one to one (MMDIT_MAP_BLOCK): `attn.to_out.0` -> `x_block.attn.proj`, `attn.to_add_out` ->
  `context_block.attn.proj`, `attn2.to_out.0` -> `x_block.attn2.proj`, `ff.net.0.proj` / `ff.net.2` ->
  `x_block.mlp.fc1` / `fc2`, `ff_context.*` -> `context_block.mlp.*`, `norm1.linear` -> `x_block.adaLN_modulation.1`,
  `norm1_context.linear` -> `context_block.adaLN_modulation.1` (the last block's swapped by halves); top level
  (MMDIT_MAP_BASIC): `context_embedder`, `time_text_embed.timestep_embedder.linear_1/2` -> `t_embedder.mlp.0/2`,
  `time_text_embed.text_embedder.linear_1/2` -> `y_embedder.mlp.0/2`, `proj_out` -> `final_layer.linear`,
  `norm_out.linear` -> `final_layer.adaLN_modulation.1` (swapped). The map is made for every block, whether or not the
  model has the weight (the last block has no text outputs: no `context_block.attn.proj` nor `context_block.mlp`).
- `comfy/lora.py` @ ec93dcacb96b922f7cb1417b3ba22bccb082df32, `model_lora_keys_unet`: for `comfy.model_base.SD3`,
  every `.weight` entry of that map under four spellings: `transformer.<diffusers name>` (diffusers),
  `base_model.model.<diffusers name>`, `lora_transformer_<diffusers name, . -> _>` (OneTrainer) and
  `lycoris_<diffusers name, . -> _>` (SimpleTuner's LyCORIS); `model_lora_keys_clip`: the CLIP-L and CLIP-G text
  encoders (`clip_l`, `clip_g`) under kohya's `lora_te1_` / `lora_te2_` + transformers' names with `_`, and
  diffusers' `text_encoder.` / `text_encoder_2.` + transformers' names.

Nothing here is ComfyUI's code: it is the behaviour, restated for SD3, to test krona's files and names against.
"""

from __future__ import annotations

_BLOCK_ONE_TO_ONE = {
    "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj",
    "attn2.to_out.0": "x_block.attn2.proj",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",
}
_FUSED = {"attn.": "x_block.attn.qkv", "attn.add_": "context_block.attn.qkv", "attn2.": "x_block.attn2.qkv"}
_TOP = {
    "context_embedder": "context_embedder",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
SPELLINGS = {"transformer.": False, "base_model.model.": False, "lora_transformer_": True, "lycoris_": True}
CLIP_PREFIXES = {"text_encoder": ("lora_te1_", "clip_l"), "text_encoder_2": ("lora_te2_", "clip_g")}

Target = tuple[str, "tuple[int, int, int] | None"]


def comfyui_sd3_diffusers_map(depth: int) -> dict[str, Target]:
    """diffusers module -> (ComfyUI weight key, (dim, start, size) or None), as `mmdit_to_diffusers` builds it."""
    offset = depth * 64
    found: dict[str, Target] = {}
    for i in range(depth):
        block, native = f"transformer_blocks.{i}", f"diffusion_model.joint_blocks.{i}"
        for start, fused in _FUSED.items():
            names = ("q_proj", "k_proj", "v_proj") if start.endswith("add_") else ("to_q", "to_k", "to_v")
            for j, name in enumerate(names):
                found[f"{block}.{start}{name}"] = (f"{native}.{fused}.weight", (0, offset * j, offset))
        for module, weight in _BLOCK_ONE_TO_ONE.items():
            found[f"{block}.{module}"] = (f"{native}.{weight}.weight", None)
    found |= {module: (f"diffusion_model.{weight}.weight", None) for module, weight in _TOP.items()}
    return found


def comfyui_sd3_key_map(depth: int) -> dict[str, Target]:
    """lora name -> what ComfyUI patches, for an SD3 transformer of `depth` joint blocks."""
    found: dict[str, Target] = {}
    for module, target in comfyui_sd3_diffusers_map(depth).items():
        for prefix, underscores in SPELLINGS.items():
            found[prefix + (module.replace(".", "_") if underscores else module)] = target
    return found


def comfyui_clip_key_map(component: str, layers: int) -> dict[str, str]:
    """lora name -> ComfyUI's CLIP weight (`clip_l.` / `clip_g.transformer.` + transformers' name) for a text
    encoder's attention and MLP linears (LORA_CLIP_MAP) in `layers` layers."""
    prefix, clip = CLIP_PREFIXES[component]
    found = {}
    for i in range(layers):
        for part in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.out_proj",
            "mlp.fc1",
            "mlp.fc2",
        ):
            module = f"text_model.encoder.layers.{i}.{part}"
            weight = f"{clip}.transformer.{module}.weight"
            found[prefix + module.replace(".", "_")] = weight
            found[f"{component}.{module}"] = weight
    return found


def mmdit_linear_shapes(depth: int, dual_blocks: int, mlp_ratio: int = 4) -> dict[str, tuple[int, int]]:
    """The shapes of Stability's MMDiT linear weights ComfyUI holds (under `diffusion_model.`): every block's image
    attention and MLP, the text stream's qkv and modulation, its output and MLP except in the last (pre-only) block,
    and the second image attention in the first `dual_blocks` blocks."""
    h = depth * 64
    shapes: dict[str, tuple[int, int]] = {}
    for i in range(depth):
        p = f"diffusion_model.joint_blocks.{i}"
        last = i == depth - 1
        shapes |= {
            f"{p}.x_block.attn.qkv.weight": (3 * h, h),
            f"{p}.x_block.attn.proj.weight": (h, h),
            f"{p}.x_block.mlp.fc1.weight": (mlp_ratio * h, h),
            f"{p}.x_block.mlp.fc2.weight": (h, mlp_ratio * h),
            f"{p}.x_block.adaLN_modulation.1.weight": ((9 if i < dual_blocks else 6) * h, h),
            f"{p}.context_block.attn.qkv.weight": (3 * h, h),
            f"{p}.context_block.adaLN_modulation.1.weight": ((2 if last else 6) * h, h),
        }
        if not last:
            shapes |= {
                f"{p}.context_block.attn.proj.weight": (h, h),
                f"{p}.context_block.mlp.fc1.weight": (mlp_ratio * h, h),
                f"{p}.context_block.mlp.fc2.weight": (h, mlp_ratio * h),
            }
        if i < dual_blocks:
            shapes |= {f"{p}.x_block.attn2.qkv.weight": (3 * h, h), f"{p}.x_block.attn2.proj.weight": (h, h)}
    return shapes
