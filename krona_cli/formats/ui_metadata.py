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

Every value is a string; a key whose value is not known is left out. Each family's ids and versions are its
`UiNames` (krona_cli/families/); `families.recognise_adapter` reads `ss_base_model_version` back from files made by
other trainers.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import PurePosixPath, PureWindowsPath

from .. import __version__, families

SPEC_VERSION = "1.0.0"
# the adapter kind after the base's id
_KIND_SUFFIX = {"lora": "lora", "lycoris": "lora", "native": "krona"}
# what the tensor names follow: diffusers' module paths for the kohya-named files, krona's own keys otherwise
_IMPLEMENTATION = {"lora": "diffusers", "lycoris": "diffusers", "native": "krona"}
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

    family = families.find(architecture)
    names = family.ui if family is not None else families.UiNames()  # the family's ids and versions (none: unknown)
    base_id = names.base_id(prediction, base_model)
    side = resolution or names.default_resolution(prediction)

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
        "ss_base_model_version": names.base_model_version,
        "ss_v2": names.v2,
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
