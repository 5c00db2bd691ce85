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
ComfyUI and Forge load as a diffusion model beside the text encoders and VAE they have (`SingleFile.denoiser_only`).
Which keys tell a family's file, the shipped configs it is read with and its tokenizers' pad tokens are the families'
data (krona_cli/families/).

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
from ..families.unet import WHOLE_FILE
from ..formats.original_layout import read_openclip_tensors
from .clip_tokenizer import EOS, clip_tokenizer, is_clip_tokenizer, tokenizer_from_merges

METADATA_KEY = "krona_pipeline"
# component -> config file in configs/models/, per family whose whole single files krona reads without its description
PIPELINES: dict[str, dict[str, str]] = {
    f.name: f.single_file_configs() for f in families.FAMILIES if f.single_file_configs()
}
# each text encoder's tokenizer, as diffusers' pipelines name them
_TOKENIZERS = {c.name: c.tokenizer for f in families.FAMILIES for c in f.components if c.tokenizer}


def _shipped(arch: str) -> dict:
    """The `krona_pipeline` description of a public architecture, from configs/models/; each tokenizer pads with its
    family's pad token (OpenCLIP-based encoders, SDXL's second and SD 2's, with "!"), else CLIP's EOS."""
    family = families.get(arch)
    components = {name: load_model_config(file) for name, file in PIPELINES[arch].items()}
    return {
        "class": family.pipeline_class,
        "index": {
            name: ["transformers", config.pop("architectures")[0]]
            if name.startswith("text_encoder")
            else ["diffusers", config["_class_name"]]
            for name, config in components.items()
        },
        "components": components,
        "tokenizers": {c.tokenizer: {"pad": c.pad or EOS} for c in family.components if c.tokenizer},
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
    family = families.recognise_keys(keys)
    if family is None:
        titles = [f.title for f in families.FAMILIES if f.name in PIPELINES]
        raise KronaError(
            f"'{path}' is not a model checkpoint krona knows: expected a single-file {', '.join(titles[:-1])} or "
            f"{titles[-1]} checkpoint (model.diffusion_model.… keys), a diffusers folder or a hub id"
        )
    return _shipped(family.name)


def _text_encoder_alone(path: Path, folder: str, description: dict, dtype: torch.dtype, component: families.Component):
    """A text encoder its family reads from its own keys (SDXL's second), converted by diffusers from a checkpoint of
    those keys only (OpenCLIP's), so that diffusers cannot take the first encoder's weights for it (see the module
    docstring)."""
    import transformers
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    tensors = read_openclip_tensors(path, component.single_file_prefix)
    model_class = getattr(transformers, description["index"][component.name][1])
    try:
        return create_diffusers_clip_model_from_ldm(
            model_class, tensors, subfolder=component.name, config=folder, torch_dtype=dtype, local_files_only=True
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
    alone = [c for c in family.components if c.read_alone and c.name in description["index"]] if family else []
    with tempfile.TemporaryDirectory(prefix="krona-config-") as folder:
        _write_config_folder(Path(folder), description)
        for component in alone:
            extras[component.name] = _text_encoder_alone(path, folder, description, dtype, component)
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
    family = families.find(architecture)
    return (family.denoiser,) if family and family.single_file and family.single_file.denoiser_only else None


def save_merged_file(pipe, architecture: str, path: Path, dtype: torch.dtype, summary: dict) -> str:
    """The single file of a merged pipeline of this family, written atomically with the merge summary
    (`krona_merge`) in its metadata; returns what it holds, in words."""
    from ..formats.original_layout import save_single_file
    from .flux_file import save_transformer_file

    family = families.find(architecture)
    if merged_file_components(architecture) is not None:
        denoiser = getattr(pipe, family.denoiser)
        save_transformer_file(denoiser, path, dtype, {"krona_merge": json.dumps(summary)}, family.single_file.layout)
        return family.single_file.holds
    metadata = {METADATA_KEY: json.dumps(pipeline_description(pipe)), "krona_merge": json.dumps(summary)}
    save_single_file(pipe, path, dtype, metadata)
    return WHOLE_FILE
