"""Single-file checkpoints (one .safetensors in the original layout, as A1111, Forge and ComfyUI keep models), loaded
without the network.

diffusers' `from_single_file` converts the weights; what it needs besides them is a diffusers config folder and the
tokenizers, which it would fetch from the hub. krona gives it both: a file krona wrote (`krona merge --format
single-file`) carries its pipeline's configs under the metadata key `krona_pipeline` (and its tokenizers when they
are not CLIP's), so it reads back exactly whatever its architecture; any other file is told SDXL, SD 1.x or SD 2.x by
its keys and gets the public configs shipped in configs/models/ with CLIP's tokenizer built from the shipped merges.
SD 2.x files are read as the 768 px v-prediction models (2.0-768, 2.1), the configs their single files are used with.

`krona merge --format single-file` writes what the family's single file is: the whole pipeline in the original layout
(SDXL, SD 1.x), or FLUX.1's transformer alone in Black Forest Labs' layout (flux_file.py), the file BFL release and
ComfyUI and Forge load as a diffusion model beside the text encoders and VAE they have (`DENOISER_FILES`).

SDXL's second text encoder is read by krona, from its own keys alone: diffusers' converter tells SDXL's two CLIP text
encoders apart by width (whichever is as wide as the first gets the first's weights), so where both are equally wide it
would give the second the first's weights and leave its `text_projection` unloaded, on the meta device.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from .. import families
from ..architectures import load_model_config
from ..errors import KronaError
from ..formats.original_layout import original_architecture, read_openclip_tensors
from .clip_tokenizer import EOS, clip_tokenizer, is_clip_tokenizer, tokenizer_from_merges

METADATA_KEY = "krona_pipeline"
# component -> config file in configs/models/, per architecture of an original-layout checkpoint
PIPELINES: dict[str, dict[str, str]] = {
    "sdxl": {
        "unet": "sdxl_unet.json",
        "vae": "sdxl_vae.json",
        "text_encoder": "clip_vit_l_text.json",
        "text_encoder_2": "clip_vit_bigg_text.json",
        "scheduler": "sdxl_scheduler.json",
    },
    "sd15": {
        "unet": "sd15_unet.json",
        "vae": "sd15_vae.json",
        "text_encoder": "clip_vit_l_text.json",
        "scheduler": "sd15_scheduler.json",
    },
    "sd2": {
        "unet": "sd2_unet.json",
        "vae": "sd15_vae.json",
        "text_encoder": "clip_vit_h_text.json",
        "scheduler": "sd2_scheduler.json",
    },
}
# pad token of each tokenizer: OpenCLIP-based encoders (SDXL's second, SD 2's) pad with "!"
PADS = {"sdxl": {"tokenizer": EOS, "tokenizer_2": "!"}, "sd15": {"tokenizer": EOS}, "sd2": {"tokenizer": "!"}}
_TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
# the families whose single file holds their denoiser alone, in its makers' layout, and what it holds in words
DENOISER_FILES = {"flux": "the FLUX.1 transformer alone, in Black Forest Labs' layout"}
WHOLE_FILE = "the whole pipeline in the original layout"


def _shipped(arch: str) -> dict:
    """The `krona_pipeline` description of a public architecture, from configs/models/."""
    components = {name: load_model_config(file) for name, file in PIPELINES[arch].items()}
    return {
        "class": families.get(arch).pipeline_class,
        "index": {
            name: ["transformers", config.pop("architectures")[0]]
            if name.startswith("text_encoder")
            else ["diffusers", config["_class_name"]]
            for name, config in components.items()
        },
        "components": components,
        "tokenizers": {name: {"pad": pad} for name, pad in PADS[arch].items()},
    }


def pipeline_description(pipe) -> dict:
    """What a single file written from `pipe` carries to be read back exactly: the pipeline class, every
    component's config and each tokenizer's pad token, with its merges where it is not CLIP's own."""
    parts = {name: getattr(pipe, name, None) for name in ("unet", "vae", "scheduler", *_TOKENIZERS)}
    parts = {name: part for name, part in parts.items() if part is not None}
    components = {
        name: {
            k: v
            for k, v in (part.config.to_dict() if name in _TOKENIZERS else part.config).items()
            if not k.startswith("_") or k == "_class_name"
        }  # no `_name_or_path`: it would point at this machine
        for name, part in parts.items()
    }
    index = {name: [type(part).__module__.split(".")[0], type(part).__name__] for name, part in parts.items()}
    tokenizers = {}
    for encoder, tokenizer_name in _TOKENIZERS.items():
        if encoder not in parts:
            continue
        tokenizer = getattr(pipe, tokenizer_name)
        tokenizers[tokenizer_name] = {"pad": tokenizer.pad_token}
        if not is_clip_tokenizer(tokenizer):
            tokenizers[tokenizer_name]["merges"] = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    return {"class": type(pipe).__name__, "index": index, "components": components, "tokenizers": tokenizers}


def _write_config_folder(folder: Path, description: dict) -> None:
    index = {"_class_name": description["class"], **description["index"]}
    for name, config in description["components"].items():
        (folder / name).mkdir()
        (folder / name / ("scheduler_config.json" if name == "scheduler" else "config.json")).write_text(
            json.dumps({k: v for k, v in config.items() if k != "_comment"})
        )
    for name in description["tokenizers"]:
        index[name] = ["transformers", "CLIPTokenizer"]
    (folder / "model_index.json").write_text(json.dumps(index))


def _tokenizers(description: dict) -> dict:
    return {
        name: tokenizer_from_merges([tuple(m) for m in t["merges"]], t["pad"])
        if "merges" in t
        else clip_tokenizer(t["pad"])
        for name, t in description["tokenizers"].items()
    }


def describe_file(path: Path, keys: list[str], metadata: dict[str, str]) -> dict:
    """The pipeline a single-file checkpoint holds: its carried description, or the shipped one its keys name."""
    if METADATA_KEY in metadata:
        try:
            return json.loads(metadata[METADATA_KEY])
        except json.JSONDecodeError as e:
            raise KronaError(f"'{path}' has unreadable '{METADATA_KEY}' metadata; the file is damaged") from e
    arch = original_architecture(keys)
    if arch is None:
        raise KronaError(
            f"'{path}' is not a model checkpoint krona knows: expected a single-file SDXL, SD 1.x or SD 2.x checkpoint "
            "(model.diffusion_model.… keys), a diffusers folder or a hub id"
        )
    return _shipped(arch)


def _second_text_encoder(path: Path, folder: str, description: dict, dtype: torch.dtype):
    """SDXL's second text encoder, converted by diffusers from a checkpoint of its own keys only (OpenCLIP's), so that
    diffusers cannot take the first encoder's weights for it (see the module docstring)."""
    import transformers
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    tensors = read_openclip_tensors(path)
    model_class = getattr(transformers, description["index"]["text_encoder_2"][1])
    try:
        return create_diffusers_clip_model_from_ldm(
            model_class, tensors, subfolder="text_encoder_2", config=folder, torch_dtype=dtype, local_files_only=True
        )
    except ValueError as e:  # no OpenCLIP keys, or not as wide as its config
        raise KronaError(f"'{path}' has no second text encoder that fits its SDXL config; the file is damaged") from e


def _unloaded(pipe) -> list[str]:
    """The weights of a pipeline left on the meta device (never loaded), as `component.name`."""
    return [
        f"{name}.{key}"
        for name, part in pipe.components.items()
        if isinstance(part, torch.nn.Module)
        for key, tensor in [*part.named_parameters(), *part.named_buffers()]
        if tensor.is_meta
    ]


def load_single_file(path: Path, keys: list[str], metadata: dict[str, str], dtype: torch.dtype):
    """A diffusers pipeline from a single-file checkpoint, offline (see the module docstring)."""
    import diffusers

    description = describe_file(path, keys, metadata)
    pipeline_class = getattr(diffusers, description["class"])
    family = families.by_pipeline_class(description["class"])
    extras = dict(family.load_extras) if family else {}
    with tempfile.TemporaryDirectory(prefix="krona-config-") as folder:
        _write_config_folder(Path(folder), description)
        if "text_encoder_2" in description["index"]:
            extras = {**extras, "text_encoder_2": _second_text_encoder(path, folder, description, dtype)}
        pipe = pipeline_class.from_single_file(
            str(path), config=folder, torch_dtype=dtype, local_files_only=True, **_tokenizers(description), **extras
        )
    if unloaded := _unloaded(pipe):
        raise KronaError(
            f"'{path}' lacks weights its pipeline needs (e.g. '{unloaded[0]}', {len(unloaded)} in all); the file is "
            "damaged or not a whole pipeline"
        )
    return pipe


def merged_file_components(architecture: str) -> tuple[str, ...] | None:
    """The pipeline components whose weights the family's single file holds: its denoiser alone, or None for all."""
    return (families.get(architecture).denoiser,) if architecture in DENOISER_FILES else None


def save_merged_file(pipe, architecture: str, path: Path, dtype: torch.dtype, summary: dict) -> str:
    """The single file of a merged pipeline of this family, written atomically with the merge summary
    (`krona_merge`) in its metadata; returns what it holds, in words."""
    from ..formats.original_layout import save_single_file
    from .flux_file import save_transformer_file

    if architecture in DENOISER_FILES:
        denoiser = getattr(pipe, families.get(architecture).denoiser)
        save_transformer_file(denoiser, path, dtype, {"krona_merge": json.dumps(summary)})
        return DENOISER_FILES[architecture]
    metadata = {METADATA_KEY: json.dumps(pipeline_description(pipe)), "krona_merge": json.dumps(summary)}
    save_single_file(pipe, path, dtype, metadata)
    return WHOLE_FILE
