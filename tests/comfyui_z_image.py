"""ComfyUI's rules for Z-Image LoRA and LoKr keys, written down as a test oracle: which lora names ComfyUI accepts for
a Z-Image model (ComfyUI runs it as Lumina 2, its weights in the original layout under `diffusion_model.`), and the
weight each one patches, with the rows.

Written from ComfyUI's source, read at these commits (Comfy-Org/ComfyUI):

- `comfy/utils.py` @ 09708eae709a992a5684bed3595ce4d07e705b4e, `z_image_to_diffusers(mmdit_config, output_prefix)`:
  for `layers.N` (n_layers), `context_refiner.N` and `noise_refiner.N` (n_refiner_layers each), diffusers'
  `attention.to_q/to_k/to_v` -> rows (0, dim·i, dim) of `attention.qkv`, `attention.to_out.0` -> `attention.out`,
  `feed_forward.w1/w2/w3` and (not in the context refiner) `adaLN_modulation.0` under their own names; top level
  `all_final_layer.2-1.*` -> `final_layer.*`, `all_x_embedder.2-1` -> `x_embedder`, `cap_embedder.*` and
  `t_embedder.mlp.*` under their own names.
- `comfy/lora.py` @ ec93dcacb96b922f7cb1417b3ba22bccb082df32, `model_lora_keys_unet`, the Lumina 2 branch (Z-Image):
  every `.weight` entry of that map as `diffusion_model.<diffusers name>`, `transformer.<diffusers name>`,
  `lycoris_<diffusers name, . -> _>` and the bare `<diffusers name>`.

Nothing here is ComfyUI's code: it is the behaviour, restated for Z-Image, to test krona's files and names against.
"""

from __future__ import annotations

SPELLINGS = {"diffusion_model.": False, "transformer.": False, "lycoris_": True, "": False}
_SAME = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0")
_TOP = {
    "all_final_layer.2-1.linear": "final_layer.linear",
    "all_final_layer.2-1.adaLN_modulation.1": "final_layer.adaLN_modulation.1",
    "all_x_embedder.2-1": "x_embedder",
    "cap_embedder.1": "cap_embedder.1",
    "t_embedder.mlp.0": "t_embedder.mlp.0",
    "t_embedder.mlp.2": "t_embedder.mlp.2",
}


def comfyui_z_image_key_map(layers: int, refiners: int, dim: int) -> dict[str, tuple[str, tuple[int, int, int] | None]]:
    """lora name -> (ComfyUI weight key, (dim, start, size) or None) for a Z-Image transformer."""
    diffusers: dict[str, tuple[str, tuple[int, int, int] | None]] = {}
    blocks = [f"layers.{i}" for i in range(layers)]
    blocks += [f"{kind}.{i}" for kind in ("context_refiner", "noise_refiner") for i in range(refiners)]
    for block in blocks:
        for j, name in enumerate(("to_q", "to_k", "to_v")):
            diffusers[f"{block}.attention.{name}"] = (
                f"diffusion_model.{block}.attention.qkv.weight",
                (0, dim * j, dim),
            )
        diffusers[f"{block}.attention.to_out.0"] = (f"diffusion_model.{block}.attention.out.weight", None)
        for module in _SAME if not block.startswith("context_refiner") else _SAME[:3]:
            diffusers[f"{block}.{module}"] = (f"diffusion_model.{block}.{module}.weight", None)
    diffusers |= {module: (f"diffusion_model.{native}.weight", None) for module, native in _TOP.items()}
    found = {}
    for module, target in diffusers.items():
        for prefix, underscores in SPELLINGS.items():
            found[prefix + (module.replace(".", "_") if underscores else module)] = target
    return found


def lumina_linear_shapes(layers: int, refiners: int, dim: int, ffn: int) -> dict[str, tuple[int, int]]:
    """The shapes of the attention and feed-forward weights ComfyUI's Lumina 2 model holds (`diffusion_model.`)."""
    blocks = [f"layers.{i}" for i in range(layers)]
    blocks += [f"{kind}.{i}" for kind in ("context_refiner", "noise_refiner") for i in range(refiners)]
    shapes = {}
    for block in blocks:
        p = f"diffusion_model.{block}"
        shapes |= {
            f"{p}.attention.qkv.weight": (3 * dim, dim),
            f"{p}.attention.out.weight": (dim, dim),
            f"{p}.feed_forward.w1.weight": (ffn, dim),
            f"{p}.feed_forward.w2.weight": (dim, ffn),
            f"{p}.feed_forward.w3.weight": (ffn, dim),
        }
    return shapes
