"""Baking adapters into base weights: in memory for sampling, into a complete diffusers pipeline folder, or into one
single file: a checkpoint in the original layout (SDXL, SD 1.x) or, for FLUX.1, the transformer alone in Black Forest
Labs' layout (pipeline/single_file.py says which)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..atomic import write_folder_atomic
from ..dtypes import dtype_from_name
from ..errors import KronaError
from ..formats import Adapter, file_sha256, load_adapter, module_name
from ..formats.native_outline import COMPONENTS
from ..outputs import check_free_space, output_file, output_folder
from ..paths import expand


def parse_adapter_spec(spec: str) -> tuple[str, float]:
    """`PATH` or `PATH:SCALE` (e.g. `dog.safetensors:0.8`); the scale multiplies the adapter's own."""
    path, sep, tail = spec.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def _check_fits(components: Mapping[str, nn.Module], adapter: Adapter, architecture: str | None) -> None:
    """A KronaError naming the first layer of `adapter` that the base model lacks or whose shape differs."""
    made_for = adapter.architecture
    mismatch = None
    shapes = ((c, m, layer.shape) for c, mods in adapter.layers.items() for m, layer in mods.items())
    for component, module, shape in shapes:
        model = components.get(component)
        local = None if model is None else module_name(model, component, module)
        if local is None:
            mismatch = f"its layer '{component}.{module}' (shape {shape}) is not in the base model"
        elif tuple(model.get_submodule(local).weight.shape) != shape:
            base_shape = tuple(model.get_submodule(local).weight.shape)
            mismatch = f"layer '{component}.{module}': the adapter's update is {shape}, the base weight is {base_shape}"
        if mismatch:
            break
    other_arch = bool(architecture and made_for and made_for != architecture)
    if mismatch or other_arch:
        what = f"made for {made_for}, the base model is {architecture}" if other_arch else "made for another model"
        detail = f"; {mismatch}" if mismatch else ""
        raise KronaError(
            f"the adapter does not fit this base model ({what}){detail}; pass the matching --pretrained-model"
        )


@torch.no_grad()
def bake(
    components: Mapping[str, nn.Module], adapters: Sequence[tuple[Adapter, float]], architecture: str | None = None
) -> int:
    """Add multiplier · ΔW of every (adapter, multiplier) into the matching nn.Linear weights; return layers changed.

    Every adapter is checked against the base before any weight changes: one that records another architecture
    (given `architecture`, the base's), or has a layer the base lacks or shapes differently, is a KronaError naming
    the first such layer and both shapes.
    """
    for adapter, _ in adapters:
        _check_fits(components, adapter, architecture)
    changed = 0
    for adapter, multiplier in adapters:
        for component, module, delta in adapter.deltas():
            model = components[component]
            weight = model.get_submodule(module_name(model, component, module)).weight
            if multiplier:
                weight.copy_((weight.float() + multiplier * delta.to(weight.device)).to(weight.dtype))
            changed += 1
    return changed


def pipeline_components(pipe) -> dict[str, nn.Module]:
    """The adaptable components of a pipeline by name."""
    return {name: getattr(pipe, name) for name in COMPONENTS if getattr(pipe, name, None) is not None}


@dataclass
class BakedPipeline:
    """A base pipeline with adapters baked into its weights, and what went into it."""

    pipe: object
    base_model: str
    architecture: str
    adapters: list[tuple[Adapter, float, str]]  # (adapter, multiplier, file)
    layers_changed: int


def load_and_bake(
    adapters: Sequence[tuple[str | Path, float]],
    pretrained: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    transformer: str | None = None,
    drop_t5: bool = False,
) -> BakedPipeline:
    """Read every adapter file (all of them before the base model), load the base (`pretrained`, else the base the
    first adapter records; `transformer`, a FLUX.1 transformer file, in place of its own; `drop_t5`: without the text
    encoders it can do without) and bake the adapters into it. With no adapter the base alone is loaded."""
    from ..pipeline.hub import absolute
    from ..pipeline.models import base_unet_config, load_pipeline

    # kohya's SGM-named layers are numbered by the UNet's blocks: a given base's own numbering reads them
    unet_config = base_unet_config(pretrained) if pretrained else None
    loaded = [(load_adapter(path, unet_config), float(scale), absolute(str(path))) for path, scale in adapters]
    base = absolute(pretrained) or (loaded[0][0].base_model if loaded else None)
    if not base:
        if not loaded:
            raise KronaError("no adapter and no base model given; pass --adapter FILE[:SCALE] or --pretrained-model")
        raise KronaError(f"the adapter '{loaded[0][2]}' does not record its base model; pass --pretrained-model")
    pipe, arch = load_pipeline(str(base), dtype=dtype, device=device, transformer=transformer, drop_t5=drop_t5)
    changed = bake(pipeline_components(pipe), [(adapter, scale) for adapter, scale, _ in loaded], arch)
    return BakedPipeline(pipe, str(base), arch, loaded, changed)


def _bake_for_saving(
    adapters: Sequence[tuple[str, float]],
    pretrained: str | None,
    dtype: str,
    transformer: str | None = None,
    drop_t5: bool = False,
) -> tuple[BakedPipeline, dict]:
    """Bake adapters (path, multiplier) into the base model cast to `dtype`; the pipeline and the summary of it."""
    from ..pipeline.hub import absolute

    if not adapters:
        raise KronaError("no adapter given; pass --adapter FILE[:SCALE]")
    torch_dtype = dtype_from_name(dtype)
    baked = load_and_bake(adapters, pretrained, transformer=transformer, drop_t5=drop_t5)
    baked.pipe.to(torch_dtype)
    summary = {
        "base_model": baked.base_model,
        **({"transformer": absolute(transformer)} if transformer else {}),
        "architecture": baked.architecture,
        "dtype": dtype,
        "layers_changed": baked.layers_changed,
        "adapters": [{"file": p, "sha256": file_sha256(p), "scale": s} for _, s, p in baked.adapters],
    }
    return baked, summary


MERGE_SUMMARY = "krona_merge.json"


def _weight_bytes(pipe, models: Sequence[nn.Module] | None = None) -> int:
    """What a pipeline's weights (or these models' of it) take on disk, as they are now (cast to the saved dtype)."""
    models = [*pipeline_components(pipe).values(), pipe.vae] if models is None else models
    return sum(p.numel() * p.element_size() for m in models for p in m.parameters())


def merge_to_folder(
    adapters: Sequence[tuple[str, float]],
    output_dir: str | Path,
    pretrained: str | None = None,
    dtype: str = "fp32",
    overwrite: bool = False,
    transformer: str | None = None,
) -> dict:
    """Bake adapters (path, multiplier) into the base model and save a complete diffusers pipeline folder.

    The folder is written beside its final place and renamed into it, so it is complete or absent.
    Returns a summary (base, architecture, adapters with their hashes, layers changed, dtype, output).
    """
    out = expand(output_dir)
    ours = (out / MERGE_SUMMARY).is_file()  # a folder an earlier merge wrote: all of it is krona's
    output_folder(out, "--output-dir", lambda _file: ours, overwrite)
    baked, summary = _bake_for_saving(adapters, pretrained, dtype, transformer)
    check_free_space(out, _weight_bytes(baked.pipe), "--output-dir")

    def fill(folder: Path) -> None:
        baked.pipe.save_pretrained(folder)
        (folder / MERGE_SUMMARY).write_text(json.dumps(summary, indent=2))

    write_folder_atomic(out, fill)
    summary["output"] = str(out.absolute())
    return summary


def _check_held(baked: BakedPipeline, held: Sequence[str]) -> None:
    """A KronaError where an adapter changes a component the single file does not hold (FLUX.1's text encoders
    beside its transformer file): the file would silently lose that part of the adapter."""
    for adapter, scale, file in baked.adapters:
        lost = next((c for c, layers in adapter.layers.items() if layers and scale and c not in held), None)
        if lost is not None:
            raise KronaError(
                f"the adapter '{file}' changes the {lost}, and a {baked.architecture} single file holds the "
                f"{' and '.join(held)} alone; merge into a diffusers folder (--output-dir) to keep all of it"
            )


def merge_to_file(
    adapters: Sequence[tuple[str, float]],
    output: str | Path,
    pretrained: str | None = None,
    dtype: str = "fp16",
    overwrite: bool = False,
    transformer: str | None = None,
    drop_t5: bool = False,
) -> dict:
    """Bake adapters into the base model (`drop_t5`: loaded without the text encoders it can do without, which its
    transformer-only file does not hold) and save the single file its family has (pipeline/single_file.py): a
    checkpoint in the original (LDM/SGM) layout, the model file A1111, Forge and ComfyUI load, carrying the
    pipeline's configs (`krona_pipeline`) so krona reads it back exactly and offline; or FLUX.1's transformer alone in
    Black Forest Labs' layout, carrying its config (`krona_transformer`). Either carries the merge summary
    (`krona_merge`). Written atomically; returns the summary, with what the file `holds` in words."""
    from ..pipeline.single_file import merged_file_components, save_merged_file

    out = output_file(output, "--output", ".safetensors", overwrite)
    baked, summary = _bake_for_saving(adapters, pretrained, dtype, transformer, drop_t5)
    held = merged_file_components(baked.architecture)
    if held is not None:
        _check_held(baked, held)
    models = None if held is None else [getattr(baked.pipe, name) for name in held]
    check_free_space(out, _weight_bytes(baked.pipe, models), "--output")
    holds = save_merged_file(baked.pipe, baked.architecture, out, dtype_from_name(dtype), summary)
    summary["holds"] = holds
    summary["output"] = str(out.absolute())
    return summary


MERGE_FORMATS = ("diffusers", "single-file")


@dataclass(frozen=True)
class MergeDestination:
    """Where `krona merge` writes: the format, the path and the flag that named it."""

    format: str
    path: Path
    flag: str


def merge_destination(output_dir: str | Path | None, output: str | Path | None, format: str | None) -> MergeDestination:
    """A diffusers folder (`--output-dir`) or a single file (`--output`): exactly one of them, the format following
    from which is given unless named."""
    format = format or ("single-file" if output is not None else "diffusers")
    if format not in MERGE_FORMATS:
        raise KronaError(f"--format must be {' or '.join(MERGE_FORMATS)}; got '{format}'")
    if (output_dir is None) == (output is None):
        raise KronaError(
            "give --output-dir FOLDER for a diffusers pipeline or --output NAME.safetensors for a "
            "single-file checkpoint (one of them)"
        )
    if format == "diffusers" and output is not None or format == "single-file" and output_dir is not None:
        raise KronaError(f"--format {format} writes to --{'output-dir' if format == 'diffusers' else 'output'}")
    if format == "diffusers":
        return MergeDestination(format, Path(output_dir), "--output-dir")
    return MergeDestination(format, Path(output), "--output")


def merge(
    adapters: Sequence[tuple[str, float]],
    destination: MergeDestination,
    pretrained: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    transformer: str | None = None,
    drop_t5: bool = False,
) -> dict:
    """`krona merge`: dtype fp32 for a folder, fp16 for a single file unless named; `transformer` a FLUX.1 transformer
    file in place of the base's own; `drop_t5` for a single file of the transformer alone."""
    if destination.format == "diffusers" and drop_t5:
        raise KronaError(
            "--drop-t5 applies to a single-file merge (--output): a merged folder holds every text encoder"
        )
    if destination.format == "diffusers":
        return merge_to_folder(adapters, destination.path, pretrained, dtype or "fp32", overwrite, transformer)
    return merge_to_file(adapters, destination.path, pretrained, dtype or "fp16", overwrite, transformer, drop_t5)
