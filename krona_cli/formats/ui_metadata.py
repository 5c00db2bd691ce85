"""The metadata other tools read from an adapter file's header, written beside krona's own `krona` JSON (which krona's
readers alone read): Stability's modelspec keys (ModelSpec 1.0.0) and kohya's `ss_` keys.

* modelspec: `sai_model_spec`, `architecture` (`stable-diffusion-xl-v1-base/lora`, `stable-diffusion-v1/lora`: the
  base's id and the adapter kind, as kohya's sd-scripts writes it for every network it trains, LyCORIS LoKr included,
  and as SwarmUI registers it; krona's own files say `/krona`, since no LoRA loader reads them), `implementation`,
  `title`, `description`, `date`, `resolution` (the trained one, else the base's default), `trigger_phrase` (the
  instance prompt) and `prediction_type` where the training settings record them. SwarmUI sorts and describes models
  by these; UIs may put the trigger phrase into prompts.
* kohya: `ss_base_model_version` (A1111/Forge take a file for SDXL when it starts with `sdxl_`, and show the version),
  `ss_v2`, `ss_network_module` / `_dim` / `_alpha` / `_args`, `ss_resolution`, `ss_output_name`, `ss_sd_model_name`,
  `ss_learning_rate`, `ss_max_train_steps`, `ss_seed`, `ss_training_comment`, which A1111/Forge's metadata view and
  civitai show.

Every value is a string; a key whose value is not known is left out. `guess_architecture` reads
`ss_base_model_version` back from files made by other trainers.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import PurePosixPath, PureWindowsPath

from .. import __version__, families

SPEC_VERSION = "1.0.0"
# modelspec architecture ids of the bases krona knows (SD 2.x's depends on its prediction type)
_ARCH_IDS = {"sdxl": "stable-diffusion-xl-v1-base", "sd15": "stable-diffusion-v1", "flux": "flux-1-dev"}
_SCHNELL_ID = "flux-1-schnell"  # FLUX.1's id when the base model's name says schnell (kohya's sd-scripts' rule too)
_SD2_IDS = {"v": "stable-diffusion-v2-768-v", "epsilon": "stable-diffusion-v2-512"}
_DEFAULT_RESOLUTION = {"sdxl": 1024, "sd15": 512, "flux": 1024}
# the adapter kind after the base's id
_KIND_SUFFIX = {"lora": "lora", "lycoris": "lora", "native": "krona"}
# what the tensor names follow: diffusers' module paths for the kohya-named files, krona's own keys otherwise
_IMPLEMENTATION = {"lora": "diffusers", "lycoris": "diffusers", "native": "krona"}
# kohya's `ss_base_model_version`
BASE_MODEL_VERSIONS = {"sdxl": "sdxl_base_v1-0", "sd15": "sd_v1", "sd2": "sd_v2", "flux": "flux1"}
# how training settings and schedulers spell the prediction type -> modelspec's spelling
_PREDICTION_TYPES = {"epsilon": "epsilon", "v_prediction": "v", "v": "v"}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _file_name(base_model: str) -> str:
    """The last part of a base model's path or hub id, as kohya's `ss_sd_model_name` records it."""
    name = PureWindowsPath(base_model).name if "\\" in base_model else PurePosixPath(base_model.rstrip("/")).name
    return name or base_model


def ui_metadata(
    kind: str,
    title: str,
    architecture: str | None,
    base_model: str | None,
    training: dict | None,
    description: str,
    network: dict[str, str] | None = None,
) -> dict[str, str]:
    """The modelspec and `ss_` keys of a file of `kind` (native, lycoris, lora) holding an adapter made for
    `architecture` on `base_model` with `training` settings (krona's: prompt, resolution, lr, steps, seed, and
    prediction_type when recorded); `network` gives kohya's `ss_network_*` keys (module, dim, alpha, args)."""
    training = training if isinstance(training, dict) else {}
    prediction = _PREDICTION_TYPES.get(str(training.get("prediction_type")))
    resolution = training.get("resolution")
    resolution = resolution if _whole(resolution) else None
    prompt = training.get("prompt")
    prompt = prompt.strip() if isinstance(prompt, str) and prompt.strip() else None

    base_id = _ARCH_IDS.get(architecture) or (_SD2_IDS.get(prediction) if architecture == "sd2" else None)
    if architecture == "flux" and base_model and "schnell" in base_model.lower():
        base_id = _SCHNELL_ID
    default = _DEFAULT_RESOLUTION.get(architecture)
    if architecture == "sd2" and prediction is not None:
        default = 768 if prediction == "v" else 512
    side = resolution or default

    out = {
        "modelspec.sai_model_spec": SPEC_VERSION,
        "modelspec.architecture": f"{base_id}/{_KIND_SUFFIX[kind]}" if base_id else None,
        "modelspec.implementation": _IMPLEMENTATION[kind],
        "modelspec.title": title,
        "modelspec.description": description,
        "modelspec.date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "modelspec.resolution": f"{side}x{side}" if side else None,
        "modelspec.trigger_phrase": prompt,
        "modelspec.prediction_type": prediction,
        "ss_base_model_version": BASE_MODEL_VERSIONS.get(architecture),
        "ss_v2": {"sd2": "True", "sdxl": "False", "sd15": "False"}.get(architecture),
        "ss_output_name": title,
        "ss_sd_model_name": _file_name(base_model) if base_model else None,
        "ss_resolution": f"({resolution}, {resolution})" if resolution else None,
        "ss_learning_rate": str(training["lr"]) if _number(training.get("lr")) else None,
        "ss_max_train_steps": str(training["steps"]) if _whole(training.get("steps")) else None,
        "ss_seed": str(training["seed"]) if isinstance(training.get("seed"), int) else None,
        "ss_training_comment": description,
        **{f"ss_network_{k}": v for k, v in (network or {}).items()},
    }
    return {k: v for k, v in out.items() if v is not None}


def describe_adapter(base_model: str | None, training: dict | None, how: str) -> str:
    """One sentence for `modelspec.description` and `ss_training_comment`: what the file holds and how it was made."""
    text = f"Kronecker-product adapter (DiffuseKronA) made with krona {__version__}"
    if base_model:
        text += f" for {_file_name(base_model)}"
    training = training if isinstance(training, dict) else {}
    if _whole(training.get("steps")):
        text += f", trained {training['steps']} steps"
        if isinstance(training.get("prompt"), str) and training["prompt"].strip():
            text += f" on '{training['prompt'].strip()}'"
    return f"{text}; {how}."


def denoiser_family(components) -> str | None:
    """The family whose denoiser one of these components is, where only one family has that denoiser (FLUX.1's
    `transformer`; a `unet` is SD 1.x's, 2.x's and SDXL's alike, so it tells none)."""
    owners: dict[str, list[str]] = {}
    for family in families.FAMILIES:
        owners.setdefault(family.denoiser, []).append(family.name)
    found = {owners[c][0] for c in components if len(owners.get(c, ())) == 1}
    return found.pop() if len(found) == 1 else None


def guess_architecture(
    metadata: dict[str, str], sdxl_text_encoders: bool, single_text_encoder: bool, layers: dict
) -> str | None:
    """The architecture of a file without krona's metadata (`layers`: the adapter's layer records by component and
    module): the one family whose denoiser it adapts (FLUX.1's transformer), else kohya's `ss_base_model_version`
    when present (None for a base model other than SDXL, SD 1.x or FLUX.1), else SDXL's two text encoders, else one
    text encoder (SD 1.x) when the caller counts that, else the width of the text the UNet's cross-attention reads."""
    owner = denoiser_family(layers)
    if owner is not None:
        return owner
    version = metadata.get("ss_base_model_version")
    if version:
        if version.startswith("sdxl_"):
            return "sdxl"
        if version.startswith("flux"):
            return "flux"
        return "sd15" if version.startswith("sd_v1") else None
    if sdxl_text_encoders:
        return "sdxl"
    if single_text_encoder:
        return "sd15"
    widths = {  # input width of cross-attention k/v
        layer.shape[1]
        for module, layer in layers.get("unet", {}).items()
        if module.endswith((".attn2.to_k", ".attn2.to_v"))
    }
    return families.by_context_width(widths)
