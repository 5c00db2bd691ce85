"""Base models: the public SDXL and SD 1.5 architectures (built without weights on the meta device) and loading a
base pipeline by every route a user has: a hub id (from the local Hugging Face cache when it is there), a diffusers
folder, or a single-file checkpoint. Paths and hub ids are told apart by what exists, never by their spelling."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from .. import families
from ..architectures import load_model_config
from ..errors import KronaError
from .hub import locate, offline


def build_component(arch: str, component: str, device: str | torch.device = "meta") -> nn.Module:
    """One component (unet, transformer, text_encoder, text_encoder_2) of a real architecture, random or meta weights.
    The class is the config's: a diffusers model by its `_class_name` (UNet2DConditionModel, FluxTransformer2DModel),
    else a transformers model by its `architectures` (CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel), on
    that class's own config class."""
    files = families.with_layer_list(arch).component_configs()
    if component not in files:
        raise KronaError(f"architecture '{arch}' has no component '{component}'; it has {', '.join(files)}")
    config = load_model_config(files[component])
    with torch.device(device):
        if "_class_name" in config:
            import diffusers

            return getattr(diffusers, config["_class_name"]).from_config(config)
        if "architectures" not in config:
            raise KronaError(f"configs/models/{files[component]} names no model class (_class_name or architectures)")
        import transformers

        (name,) = config.pop("architectures")
        cls = getattr(transformers, name)
        return cls(cls.config_class(**config))


def build_meta_components(arch: str) -> dict[str, nn.Module]:
    """Every adaptable component of a real architecture (the denoiser and the text encoders `--train-text-encoder`
    adapts, so not FLUX's T5), on the meta device (no memory, no download)."""
    family = families.with_layer_list(arch)
    return {c: build_component(arch, c) for c in (family.denoiser, *family.trained_text())}


def linear_layers_of(model: nn.Module) -> list[tuple[str, int, int]]:
    """(name, d_out, d_in) of every nn.Linear of a model, in module order: what Family.linear_layers holds."""
    return [(n, m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _header(path: Path) -> tuple[list[str], dict[str, str]]:
    """A .safetensors file's tensor names and metadata, without reading its tensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys()), f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise KronaError(f"'{path}' is not a readable .safetensors file (truncated or corrupt?): {e}") from e


def _refuse_adapter(path: Path, keys: list[str], metadata: dict[str, str], flag: str) -> None:
    """An adapter file given where a base model belongs gets one line naming it."""
    from ..formats.detect import detect_format

    try:
        kind = detect_format(keys, metadata, str(path))
    except KronaError:
        return
    names = {"native": "krona", "lycoris": "LyCORIS/kohya LoKr", "lora": "LoRA", "diffusekrona": "DiffuseKronA"}
    raise KronaError(
        f"'{path}' is a {names.get(kind, kind)} adapter, not a base model: pass it as --adapter, and give the base "
        f"model it was made for as {flag} (a hub id, a diffusers folder or a single-file checkpoint)"
    )


def _refuse_transformer_only(path: Path, keys: list[str]) -> None:
    """A transformer file given as the base model gets one line: krona reads no text encoders or VAE from it (a FLUX.1
    one can come as --transformer)."""
    from .flux_file import transformer_layout

    bare = {key.removeprefix("model.diffusion_model.") for key in keys}
    for family in families.FAMILIES:
        if family.single_file and bare & set(family.single_file.denoiser_marks):
            raise KronaError(
                f"'{path}' is a {family.title} single file (krona merge --output writes {family.single_file.holds}); "
                f"krona reads a {family.title} base only as a diffusers folder or hub id: give one in "
                "--pretrained-model"
            )
    if transformer_layout(keys) is not None:
        raise KronaError(
            f"'{path}' is a FLUX.1 transformer file, not a whole base model (no text encoders or VAE krona reads): "
            "pass it as --transformer, with a FLUX.1 base for the rest as --pretrained-model (a diffusers folder or a "
            "hub id such as black-forest-labs/FLUX.1-dev)"
        )


def _transformer_file(name: str) -> tuple[Path, list[str]]:
    """The path and tensor names of the file `--transformer` names, refused unless it is a FLUX.1 transformer."""
    from .flux_file import transformer_layout

    expected = "a FLUX.1 transformer .safetensors file"
    kind, where = locate(name, "--transformer", expected)
    if kind != "file" or where.suffix != ".safetensors":
        what = {"hub": "does not exist", "folder": "is a folder"}.get(kind, "is not a .safetensors file")
        raise KronaError(f"--transformer '{name}' {what}; give {expected} (krona never loads pickles)")
    keys, _ = _header(where)
    if transformer_layout(keys) is None:
        raise KronaError(
            f"--transformer '{name}' is not a FLUX.1 transformer (no img_in with double blocks, nor x_embedder with "
            "transformer_blocks); give one in Black Forest Labs', ComfyUI's or diffusers' layout"
        )
    return where, keys


def _replaced_transformer(
    transformer: str | None,
    pretrained: str,
    kind: str,
    where,
    index: dict,
    revision: str | None,
    dtype: torch.dtype,
    quantized: tuple[str, torch.dtype] | None = None,
) -> dict:
    """{"transformer": the model of the file `--transformer` names}, built on the base's transformer config, for
    `from_pretrained` to take instead of loading the base's own; {} without one. A base that has no FLUX.1
    transformer is one line."""
    if not transformer:
        return {}
    from .flux_file import TRANSFORMER_CLASS, load_transformer_file

    path, keys = _transformer_file(transformer)
    if (index.get("transformer") or [None])[-1] != TRANSFORMER_CLASS or kind == "file":
        family = families.by_pipeline_class(index.get("_class_name"))
        what = family.title if family else index.get("_class_name") or "another kind of model"
        raise KronaError(
            f"--transformer replaces a FLUX.1 base model's transformer, and '{pretrained}' is {what}, not FLUX.1; "
            "give a FLUX.1 diffusers folder or hub id as --pretrained-model"
        )
    if kind == "hub":
        config = _hub_json(where, "transformer/config.json", revision, "--pretrained-model")
    elif (where / "transformer" / "config.json").is_file():
        config = json.loads((where / "transformer" / "config.json").read_text())
    else:
        raise KronaError(f"'{pretrained}' has no transformer/config.json; give a whole FLUX.1 diffusers folder")
    if quantized:
        return {"transformer": load_transformer_file(path, keys, config, quantized[1], quantized[0])}
    return {"transformer": load_transformer_file(path, keys, config, dtype)}


def _hub_json(repo: str, filename: str, revision: str | None, flag: str) -> dict:
    """A JSON file of a hub pipeline (model_index.json, unet/config.json), from the local cache when it is there; one
    line for every way the hub can fail."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    why = offline()  # decided once, before any library retries an unreachable hub
    try:
        return json.loads(Path(hf_hub_download(repo, filename, revision=revision)).read_text())
    except GatedRepoError as e:
        raise KronaError(
            f"'{repo}' is gated on the Hugging Face hub: accept its licence on huggingface.co/{repo}, "
            "then log in with `hf auth login`"
        ) from e
    except RepositoryNotFoundError as e:
        raise KronaError(
            f"{flag} '{repo}' is neither a local path nor a model on the Hugging Face hub (a private "
            "one needs `hf auth login`); check the name"
        ) from e
    except RevisionNotFoundError as e:
        raise KronaError(f"'{repo}' has no revision '{revision}'; check --revision") from e
    except RemoteEntryNotFoundError as e:
        raise KronaError(f"'{repo}' is not a diffusers pipeline (no {filename}); give an SDXL or SD model") from e
    except LocalEntryNotFoundError as e:
        why = why or "the hub cannot be reached"
        raise KronaError(
            f"'{repo}' is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}: download it once "
            f"while online with `hf download {repo}`, or give a local diffusers folder or .safetensors file"
        ) from e
    except (HfHubHTTPError, OSError) as e:
        raise KronaError(
            f"could not fetch '{repo}' from the Hugging Face hub: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e


def load_pipeline(
    pretrained: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    vae: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    transformer: str | None = None,
    quantized: tuple[str, torch.dtype] | None = None,
    drop_t5: bool = False,
):
    """A diffusers pipeline of a family krona trains from a local folder, a single .safetensors checkpoint, or a hub
    id (from the local Hugging Face cache when it is there, so offline too).

    `vae` replaces the pipeline's VAE (a diffusers AutoencoderKL folder or hub id); `transformer` a FLUX.1 base's
    transformer (one .safetensors file in Black Forest Labs', ComfyUI's or diffusers' layout, flux_file.py; the base's
    own is then not loaded; with `quantized`, (int8 or nf4, the compute dtype), its linear layers are quantized as
    they are read); `revision` and `variant` (e.g. fp16) pick the files of a hub model or folder; `drop_t5` leaves
    out the text encoders the model can do without (Family.without_optional_text). Returns
    (pipeline, architecture). Local paths never touch the network; single-file checkpoints get their configs and
    tokenizers from krona (single_file.py).
    """
    from diffusers import DiffusionPipeline

    from .single_file import describe_file, load_single_file

    kind, where = locate(pretrained)
    choice = {k: v for k, v in (("revision", revision), ("variant", variant)) if v}
    # diffusers 0.42 renamed torch_dtype to dtype and warns on the old name; krona keeps the name older releases know
    warnings.filterwarnings("ignore", message=".*`torch_dtype` is deprecated", category=FutureWarning)
    if kind == "file":
        if where.suffix != ".safetensors":
            raise KronaError(
                f"'{pretrained}' is not a .safetensors checkpoint; krona never loads pickles "
                "(convert it to .safetensors with a tool you trust)"
            )
        keys, metadata = _header(where)
        _refuse_adapter(where, keys, metadata, "--pretrained-model")
        _refuse_transformer_only(where, keys)
        if drop_t5:
            raise KronaError("--drop-t5 applies to a pipeline folder or hub id; leave it out for a single file")
        index = {"_class_name": describe_file(where, keys, metadata)["class"]} if transformer else {}
    elif kind == "folder":
        if not (where / "model_index.json").is_file():
            raise KronaError(
                f"'{pretrained}' is a folder but not a diffusers pipeline (no model_index.json); "
                "give a pipeline folder, a single .safetensors checkpoint or a hub id"
            )
        index = json.loads((where / "model_index.json").read_text())
    else:
        index = _hub_json(where, "model_index.json", revision, "--pretrained-model")
    replaced = _replaced_transformer(transformer, pretrained, kind, where, index, revision, dtype, quantized)
    family = None if kind == "file" else families.by_pipeline_class(index.get("_class_name"))
    droppable = family is not None and not drop_t5 and bool(family.optional_text)
    try:
        if kind == "file":
            pipe = load_single_file(where, keys, metadata, dtype)
        else:
            extras = dict(family.load_extras) if family else {}
            if drop_t5 and family:
                extras |= family.without_optional_text()
            pipe = DiffusionPipeline.from_pretrained(where, torch_dtype=dtype, **extras, **choice, **replaced)
    except KronaError:
        raise
    except Exception as e:
        raise KronaError(
            f"could not load the base model '{pretrained}': {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}"
            + (
                "; the cached copy may be incomplete: download it again with `hf download " + pretrained + "`"
                if kind == "hub"
                else ""
            )
            + ("; if it was downloaded without its T5, add --drop-t5" if droppable else "")
        ) from e
    family = families.recognise_pipeline(pipe, pretrained)
    if vae:
        pipe.vae = load_vae(vae, dtype)
    return pipe.to(device), family.name


def base_unet_config(pretrained: str, revision: str | None = None) -> dict | None:
    """The UNet config of a base model, read without loading it (for numbering kohya's SGM-named adapter layers
    before the model loads); None for a pipeline without a UNet (FLUX.1)."""
    from .single_file import describe_file

    kind, where = locate(pretrained)
    if kind == "hub":
        index = _hub_json(where, "model_index.json", revision, "--pretrained-model")
        return _hub_json(where, "unet/config.json", revision, "--pretrained-model") if "unet" in index else None
    if kind == "folder":
        path = where / "unet" / "config.json"
        index = where / "model_index.json"
        if not path.is_file() and index.is_file() and "unet" not in json.loads(index.read_text()):
            return None
        if not path.is_file():
            raise KronaError(
                f"'{pretrained}' is a folder but not a diffusers pipeline with a UNet (no unet/config.json)"
            )
        return json.loads(path.read_text())
    keys, metadata = _header(where)
    _refuse_adapter(where, keys, metadata, "--pretrained-model")
    _refuse_transformer_only(where, keys)
    return describe_file(where, keys, metadata)["components"].get("unet")


def load_vae(name: str, dtype: torch.dtype = torch.float32):
    """A diffusers AutoencoderKL from a folder (with or without a `vae` sub-folder) or a hub id."""
    from diffusers import AutoencoderKL

    kind, where = locate(name, "--vae")
    if kind == "file":
        raise KronaError(f"--vae '{name}' is a file; give a diffusers VAE folder or a hub id")
    if kind == "folder" and (where / "vae" / "config.json").is_file():
        where = where / "vae"
    try:
        return AutoencoderKL.from_pretrained(where, torch_dtype=dtype)
    except Exception as e:
        raise KronaError(
            f"could not load the VAE '{name}': {type(e).__name__}; give a diffusers VAE folder or hub id"
        ) from e


def cast(model: nn.Module, device, dtype: torch.dtype) -> None:
    """Move and cast a model; diffusers' warning about modules to keep in float32 (none, in these models) is muted."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        model.to(device, dtype)
    finally:
        diffusers_logging.set_verbosity(level)
