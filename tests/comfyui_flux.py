"""ComfyUI's rules for FLUX.1 LoRA / LoKr files, written down as a test oracle: which lora names ComfyUI accepts for a
FLUX.1 model, the model weight each one patches (ComfyUI's FLUX model is Black Forest Labs' layout under
`diffusion_model.`) with the rows it patches, and how it scales a LoRA's or a LoKr's update by its alpha.

Written from ComfyUI's source, read at these commits (Comfy-Org/ComfyUI, formerly comfyanonymous/ComfyUI):

- `comfy/lora.py` @ ec93dcacb96b922f7cb1417b3ba22bccb082df32, `model_lora_keys_unet`: for every weight of the model
  (`diffusion_model.<BFL name>.weight`) the kohya name `lora_unet_<BFL name, . -> _>` and the bare
  `diffusion_model.<BFL name>`; no slice. Then, for `comfy.model_base.Flux`, every `.weight` entry of
  `comfy.utils.flux_to_diffusers(unet_config, output_prefix="diffusion_model.")` under four diffusers-named spellings:
  `transformer.<diffusers name>` (diffusers / peft, SimpleTuner's LoRA), `lycoris_<diffusers name, . -> _>`
  (SimpleTuner's LyCORIS), `lora_transformer_<diffusers name, . -> _>` (OneTrainer) and the bare `<diffusers name>`
  (DiffSynth, new at that commit); and `diffusion_model.single_blocks.N.linear1_qkv` -> the first 3·hidden rows of
  `linear1`. `unet_to_diffusers` gives nothing for FLUX (no `num_res_blocks`), so `lora_unet_` + a diffusers name is
  not accepted, nor is `base_model.model.` (SD3, PixArt and HunyuanDiT only).
- `comfy/utils.py` @ b3be02d6e766a8d3743dcf99cc967118f3ec8e3e, `flux_to_diffusers(mmdit_config, output_prefix)`,
  with `depth`, `depth_single_blocks`, `hidden_size` from the model's config: a diffusers key maps to a BFL key, or to
  (BFL key, (dim, start, size)) for a part of a fused weight (`to_q`/`to_k`/`to_v` at 0, h, 2h of `img_attn.qkv`,
  `add_*_proj` of `txt_attn.qkv`, and of a single block's `linear1` with `proj_mlp` at (0, 3h, 4h): the MLP width is
  assumed 4h), or to (BFL key, None, swap_scale_shift) for `norm_out.linear`, whose update ComfyUI swaps by halves.
  It also maps a few FLUX.2 / LyCORIS spellings onto FLUX.1 weights (`ff.linear_in` -> `img_mlp.0`, `ff.linear_out`
  -> `img_mlp.2`, their `ff_context` twins, `attn.to_qkv_mlp_proj` -> `linear1`, `attn.to_out` -> `linear2`). Its q/k
  norm targets are spelled `...query_norm.weight` (BFL: `.scale`); norms are not linears and are left out here.
- `comfy/lora.py` (comfyanonymous/ComfyUI @ 41444b5236c613ee5ff7d09aa620f94b702f30eb), `calculate_weight`: a patch
  with an offset patches `weight.narrow(dim, start, size)`, so the slice is (dim, start, size), not (start, stop).
- `comfy/weight_adapter/lora.py` @ 6f98b150e065f1ffc788558574a887835068bd40 and `comfy/weight_adapter/lokr.py`
  @ 839df9f213fb778adac2b36147cce73ace4321f6 (and comfyanonymous/ComfyUI @ 179c2d35c84beb3d9761fcd146ffcba77273413e,
  the earlier LoKr rule): `calculate_weight`, see `comfyui_lora_scale` and `comfyui_lokr_scale`.

Nothing here is ComfyUI's code: it is the behaviour, restated for FLUX.1, to test krona's files and names against.
"""

from __future__ import annotations

# diffusers module -> BFL module inside a double / single block, one to one (flux_to_diffusers' block_map, linears).
_DOUBLE_RENAMES = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
    # FLUX.2 / LyCORIS spellings ComfyUI maps onto the same FLUX.1 weights
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
}
_SINGLE_RENAMES = {
    "norm.linear": "modulation.lin",
    "proj_out": "linear2",
    "attn.to_qkv_mlp_proj": "linear1",  # FLUX.2 spelling: the whole fused weight
    "attn.to_out": "linear2",  # FLUX.2 spelling
}
_TOP_RENAMES = {
    "proj_out": "final_layer.linear",
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "norm_out.linear": "final_layer.adaLN_modulation.1",  # ComfyUI swaps the update's halves (swap_scale_shift)
}
# BFL's linear modules of FLUX.1 (comfy/ldm/flux/model.py follows BFL's reference model), per block and outside.
BFL_DOUBLE_LINEARS = (
    *("img_mod.lin", "img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2"),
    *("txt_mod.lin", "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2"),
)
BFL_SINGLE_LINEARS = ("linear1", "linear2", "modulation.lin")
BFL_TOP_LINEARS = (
    *("img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer"),
    *("final_layer.linear", "final_layer.adaLN_modulation.1"),
)
BFL_GUIDANCE_LINEARS = ("guidance_in.in_layer", "guidance_in.out_layer")

# The diffusers names ComfyUI is given in each spelling: prefix, and whether dots become underscores.
DIFFUSERS_SPELLINGS = {
    "diffusers": ("transformer.", False),
    "onetrainer": ("lora_transformer_", True),
    "simpletuner_lycoris": ("lycoris_", True),
    "diffsynth": ("", False),
}
Target = tuple  # (ComfyUI model key, (dim, start, size) or None)


def comfyui_flux_diffusers_map(depth: int, depth_single: int, hidden_size: int) -> dict[str, Target]:
    """ComfyUI's `flux_to_diffusers` restated for the linear weights: diffusers module name (no `.weight`) ->
    (`diffusion_model.<BFL>.weight`, (dim, start, size) for a part of a fused weight, else None)."""
    h = hidden_size
    out: dict[str, Target] = {}

    def add(diffusers: str, bfl: str, offset: tuple | None = None) -> None:
        out[diffusers] = (f"diffusion_model.{bfl}.weight", offset)

    for i in range(depth):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for n, (img, txt) in enumerate((("to_q", "add_q_proj"), ("to_k", "add_k_proj"), ("to_v", "add_v_proj"))):
            add(f"{d}attn.{img}", f"{b}img_attn.qkv", (0, n * h, h))
            add(f"{d}attn.{txt}", f"{b}txt_attn.qkv", (0, n * h, h))
        for diffusers, bfl in _DOUBLE_RENAMES.items():
            add(d + diffusers, b + bfl)
    for i in range(depth_single):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for n, part in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
            add(d + part, f"{b}linear1", (0, n * h, h))
        add(f"{d}proj_mlp", f"{b}linear1", (0, 3 * h, 4 * h))
        for diffusers, bfl in _SINGLE_RENAMES.items():
            add(d + diffusers, b + bfl)
    for diffusers, bfl in _TOP_RENAMES.items():
        add(diffusers, bfl)
    return out


def comfyui_bfl_linears(depth: int, depth_single: int, guidance: bool = True) -> list[str]:
    """The BFL names of a FLUX.1 model's linear modules, as ComfyUI's model holds them (without `diffusion_model.`)."""
    names = [*BFL_TOP_LINEARS, *(BFL_GUIDANCE_LINEARS if guidance else ())]
    names += [f"double_blocks.{i}.{m}" for i in range(depth) for m in BFL_DOUBLE_LINEARS]
    names += [f"single_blocks.{i}.{m}" for i in range(depth_single) for m in BFL_SINGLE_LINEARS]
    return names


def comfyui_flux_key_map(
    depth: int = 19, depth_single: int = 38, hidden_size: int = 3072, guidance: bool = True
) -> dict[str, Target]:
    """Every lora name ComfyUI accepts for a FLUX.1 model's linear weights -> (the model weight it patches,
    `diffusion_model.<BFL name>.weight`, and (dim, start, size) of the rows it patches, or None for the whole weight).

    Names: `lora_unet_<BFL, . -> _>` (kohya) and `diffusion_model.<BFL>` (generic), whole weights; the diffusers
    names in `DIFFUSERS_SPELLINGS` (peft/diffusers `transformer.`, OneTrainer `lora_transformer_`, SimpleTuner
    `lycoris_`, DiffSynth bare), sliced where diffusers splits a fused BFL weight; `diffusion_model.single_blocks.N.
    linear1_qkv` (the first 3·hidden rows of `linear1`). Where ComfyUI's later rules overwrite earlier ones for the
    same name, the later one is kept, as in `model_lora_keys_unet`. Guidance-embedder names need `guidance`."""
    out: dict[str, Target] = {}
    bfl = comfyui_bfl_linears(depth, depth_single, guidance)
    for name in bfl:
        key = f"diffusion_model.{name}.weight"
        out["lora_unet_" + name.replace(".", "_")] = (key, None)
        out[f"diffusion_model.{name}"] = (key, None)
    present = {f"diffusion_model.{name}.weight" for name in bfl}
    for diffusers, (key, offset) in comfyui_flux_diffusers_map(depth, depth_single, hidden_size).items():
        if key not in present:  # e.g. the guidance embedder of FLUX.1 [schnell]: ComfyUI maps it, nothing matches
            continue
        for prefix, underscores in DIFFUSERS_SPELLINGS.values():
            out[prefix + (diffusers.replace(".", "_") if underscores else diffusers)] = (key, offset)
    for i in range(depth_single):
        out[f"diffusion_model.single_blocks.{i}.linear1_qkv"] = (
            f"diffusion_model.single_blocks.{i}.linear1.weight",
            (0, 0, 3 * hidden_size),
        )
    return out


def comfyui_swapped_targets(key_map: dict[str, Target]) -> set[str]:
    """The lora names whose update ComfyUI swaps by halves before adding it (`norm_out.linear` in diffusers'
    spellings: its rows are (scale, shift) in diffusers and (shift, scale) in BFL's `final_layer.adaLN_modulation.1`).
    A BFL-named update of that weight (kohya, `diffusion_model.`) is added as it is."""
    return {
        name
        for name in key_map
        if any(
            name == prefix + ("norm_out_linear" if underscores else "norm_out.linear")
            for prefix, underscores in DIFFUSERS_SPELLINGS.values()
        )
    }


def comfyui_lora_scale(alpha: float | None, rank: int) -> float:
    """The factor ComfyUI multiplies a LoRA's `up @ down` by (before the user's strength): `alpha / rank`, where rank
    is `lora_down`'s rows (`mat2.shape[0]`), or 1 when the file has no `<name>.alpha`."""
    return 1.0 if alpha is None else alpha / rank


def comfyui_lokr_scale(
    alpha: float | None, w1_full: bool, w2_full: bool, dim: int, both_full_dim: int | None = None
) -> float:
    """The factor ComfyUI multiplies a LoKr's `kron(w1, w2)` by (before the user's strength).

    In words: alpha counts only when at least one factor is stored decomposed. ComfyUI divides alpha by the rank of
    the decomposed factor: `lokr_w2_b`'s rows when w2 is stored as `lokr_w2_a @ lokr_w2_b` (this wins when both are
    decomposed), else `lokr_w1_b`'s rows when only w1 is (`dim` is that rank). A file without `<name>.alpha` gets 1.
    When both `lokr_w1` and `lokr_w2` are stored as full matrices, ComfyUI up to at least comfyanonymous/ComfyUI
    179c2d35 ignores alpha (factor 1, as LyCORIS does at training: it stores alpha = its dim then, scale 1), while
    Comfy-Org/ComfyUI 839df9f2 divides alpha by `w2.shape[0] // w1.shape[0]` (the output rows of w2 over w1's; pass
    it as `both_full_dim` to get that version's factor; 0 there makes ComfyUI raise). A full-matrix LoKr whose alpha
    equals `w2.shape[0] // w1.shape[0]` (or has no alpha) therefore gets factor 1 from both; any other scale has to be
    baked into the factors. A LoRA is scaled by `comfyui_lora_scale`."""
    if alpha is None:
        return 1.0
    if w1_full and w2_full:
        return 1.0 if both_full_dim is None else alpha / both_full_dim
    return alpha / dim
