"""Sampling images from a base model with adapters baked into its weights (`krona sample`).

Adapters are merged into the weights in memory (`merge.bake`), so sampling costs exactly what the base model costs.

Seeds: image i of every prompt uses seed `config.seed + i`, drawn from its own CPU `torch.Generator`
(`torch.Generator("cpu").manual_seed(seed)`, one per image, passed to the pipeline as a list). The starting noise of
an image, and the noise an ancestral scheduler adds at each step, therefore depend on its seed alone, not on the batch
it is in nor on the device: the same seed and settings give the same image. Plain diffusers gives the same image with
`pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), ...)` (an empty negative prompt is passed as None,
diffusers' default, which SDXL turns into zero embeddings). Different batch sizes run different matrix shapes, so they
agree up to floating-point rounding (at most one 8-bit level here and there), not bit for bit.

Library code: raises KronaError, never prints; progress is reported through a callback.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .. import __version__, families, stopping
from ..atomic import write_bytes_atomic
from ..dtypes import dtype_from_name
from ..errors import KronaError
from ..outputs import output_folder

# every sampler name some family has (families/*.py `schedulers`); which ones a model takes is its family's choice
SCHEDULERS: tuple[str, ...] = tuple(dict.fromkeys(name for f in families.FAMILIES for name in f.schedulers))

ProgressCallback = Callable[[float, int], None]  # (images done, fractional within a batch; images in total)


@dataclass
class SampleConfig:
    """How to sample. `width`/`height` None: the UNet's native size (sample_size × the VAE's scale factor)."""

    num_images: int = 4  # per prompt
    seed: int = 0  # image i of each prompt uses seed + i
    steps: int | None = None  # None: the model's (its family's sampler defaults)
    guidance: float | None = None  # None: the model's
    scheduler: str = "euler"
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    batch_size: int = 1

    def validate(self) -> SampleConfig:
        """Check the settings that need no model; KronaError naming the first bad one."""
        if self.scheduler not in SCHEDULERS:
            raise KronaError(f"unknown scheduler '{self.scheduler}'; use one of {', '.join(SCHEDULERS)}")
        for name, flag in (("num_images", "--num-images"), ("steps", "--sample-steps"), ("batch_size", "--batch-size")):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise KronaError(f"{flag} must be at least 1, got {getattr(self, name)}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and value < 8:
                raise KronaError(f"--{name} must be a positive multiple of 8, got {value}")
        if self.guidance is not None and self.guidance < 0:
            raise KronaError(f"--guidance must be 0 or more, got {self.guidance:g}")
        if self.seed < 0:
            raise KronaError(f"--seed must be 0 or more, got {self.seed}")
        return self

    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.num_images)]

    def for_model(self, pipe, preview: bool = False) -> SampleConfig:
        """The settings with unset steps and guidance taken from the model's family (`preview`: training's grids and
        class images, which take fewer steps)."""
        defaults = families.recognise_pipeline(pipe, type(pipe).__name__).sampler_defaults(pipe)
        steps = self.steps or (defaults.preview_steps if preview else defaults.steps)
        return replace(self, steps=steps, guidance=defaults.guidance if self.guidance is None else self.guidance)


@dataclass
class AdapterInfo:
    """One adapter as sampled: its file, the file's SHA-256, and the multiplier given (`FILE:SCALE`)."""

    file: str
    sha256: str
    scale: float


@dataclass
class ModelInfo:
    """What a prepared pipeline holds: its base model, architecture, adapters and the layers they changed."""

    base_model: str
    architecture: str
    adapters: list[AdapterInfo] = field(default_factory=list)
    layers_changed: int = 0
    dtype: str = "fp32"


@dataclass
class SampleResult:
    images: list[Path]  # in prompt order, then seed order
    grid: Path
    seeds: list[int]
    width: int
    height: int


def make_scheduler(name: str, pipe):
    """A fresh scheduler of the named kind for a pipeline, built from its own scheduler config; KronaError when its
    family samples with other schedulers."""
    import diffusers

    family = families.recognise_pipeline(pipe, type(pipe).__name__)
    if name not in family.schedulers:
        raise KronaError(
            f"scheduler '{name}' does not sample {family.title} models; use {' or '.join(family.schedulers)}"
        )
    return getattr(diffusers, family.schedulers[name]).from_config(pipe.scheduler.config)


def load_prompts(prompts: Sequence[str] = (), prompts_file: str | Path | None = None) -> list[str]:
    """The prompts given directly, then those of `prompts_file` (one per non-empty line); KronaError if none."""
    out = [p.strip() for p in prompts if p.strip()]
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise KronaError(f"prompts file '{path}' does not exist; give a text file with one prompt per line")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise KronaError(f"cannot read prompts file '{path}': {e}; give a UTF-8 text file") from e
        file_prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not file_prompts:
            raise KronaError(f"prompts file '{path}' has no prompts; write one prompt per line")
        out += file_prompts
    if not out:
        raise KronaError("no prompt given; pass --prompt TEXT (repeatable) or --prompts-file FILE")
    return out


def prepare_pipeline(
    adapters: Sequence[tuple[str | Path, float]],
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    dtype: str = "fp32",
    transformer: str | None = None,
    drop_t5: bool = False,
):
    """Load the base model (with `transformer`, a FLUX.1 transformer file, in place of its own; `drop_t5`: without the
    text encoders it can do without) and bake every
    (adapter file, multiplier) into its weights; return (pipe, ModelInfo).

    The base is `pretrained`, else the base model the first adapter records. With no adapter, `pretrained` is
    required and the pipeline is the base model alone. A multiplier of 0 changes nothing (the base's images).
    Adapter files are read and checked before the base model is loaded.
    """
    from ..formats import file_sha256
    from .merge import load_and_bake

    with stopping.immediate("while loading the base model"):  # nothing written yet: a stop request stops it at once
        baked = load_and_bake(
            adapters, pretrained, dtype_from_name(dtype), device, transformer=transformer, drop_t5=drop_t5
        )
    baked.pipe.set_progress_bar_config(disable=True)
    info = ModelInfo(
        base_model=baked.base_model,
        architecture=baked.architecture,
        adapters=[AdapterInfo(path, file_sha256(path), scale) for _, scale, path in baked.adapters],
        layers_changed=baked.layers_changed,
        dtype=dtype,
    )
    return baked.pipe, info


def png_bytes(image: Image.Image, text: dict[str, str]) -> bytes:
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


GRID_BAND, GRID_INK = (242, 242, 242), (40, 40, 40)  # the grid's label bands and their text


def _grid_font(height: int):
    """PIL's built-in font (nothing downloaded), sized to the images: a 40th of their height, 10 to 24 px."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=max(10, min(24, height // 40)))
    except (TypeError, OSError, ImportError):  # Pillow before 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _drawable(text: str, font) -> str:
    """`text` as `font` can draw it: PIL's bitmap font (no FreeType) takes Latin-1 only."""
    from PIL import ImageFont

    return text if isinstance(font, ImageFont.FreeTypeFont) else text.encode("latin-1", "replace").decode("latin-1")


_SUPERSAMPLE = 4


def _draw_text(canvas: Image.Image, xy: tuple[float, float], text: str, font) -> None:
    """Draw `text` on `canvas` at `xy` as laid out by `font`'s advances: rendered at 4x the size and scaled down, since
    at small sizes FreeType's hinting moves glyphs off their advances (a 2 px space vanished: "a photoofsks")."""
    from PIL import ImageDraw

    if not hasattr(font, "font_variant"):  # PIL's bitmap font: no sizes to render at
        ImageDraw.Draw(canvas).text(xy, text, fill=GRID_INK, font=font)
        return
    big = font.font_variant(size=font.size * _SUPERSAMPLE)
    box = big.getbbox(text)
    if box[2] <= 0 or box[3] <= 0:
        return
    layer = Image.new("L", (box[2], box[3]), 0)
    ImageDraw.Draw(layer).text((0, 0), text, fill=255, font=big)
    size = (max(1, round(box[2] / _SUPERSAMPLE)), max(1, round(box[3] / _SUPERSAMPLE)))
    mask = layer.resize(size, Image.LANCZOS)
    canvas.paste(Image.new("RGB", size, GRID_INK), (round(xy[0]), round(xy[1])), mask)


def _clip(text: str, font, width: float) -> str:
    """`text`, cut with "..." at the end when it is wider than `width` px."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text.rstrip() + "..."


def _wrap(text: str, font, width: float, max_lines: int) -> list[str]:
    """`text` in lines of at most `width` px (words kept whole where they fit), at most `max_lines` of them: the
    last line shown ends in "..." when the text goes on."""
    lines: list[str] = []
    for word in text.split():
        joined = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(joined) <= width:
            lines[-1] = joined
            continue
        while font.getlength(word) > width and len(word) > 1:  # a word wider than the band is cut over lines
            cut = next(n for n in range(len(word) - 1, 0, -1) if font.getlength(word[:n]) <= width or n == 1)
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    if len(lines) > max(1, max_lines):
        lines = lines[: max(1, max_lines)]
        lines[-1] = _clip(lines[-1] + " ...", font, width)  # always marked as cut, even when the line fits
    return lines


def _grid(
    rows: list[list[Image.Image]],
    prompts: Sequence[str],
    seeds: Sequence[int],
    title: str | None,
    width: int,
    height: int,
    column_labels: Sequence[str] | None = None,
) -> Image.Image:
    """The images in rows (one per prompt) and columns (one per seed), below a band with the seeds (or
    `column_labels`) and right of a band with the prompts; the top-left corner holds `title`. The images fill the
    bottom-right corner unchanged."""
    font = _grid_font(height)
    pad = max(2, font.size // 4) if hasattr(font, "size") else 2
    line = font.getbbox("Ayg|")[3] + max(1, pad // 2)
    titled = _drawable(title or "", font)
    longest = max([font.getlength(_drawable(p, font)) for p in prompts] + [font.getlength(titled)])
    left = int(min(longest, max(width // 2, 10 * line)) + 2 * pad)
    top = line + 2 * pad
    cols = max(len(r) for r in rows)
    canvas = Image.new("RGB", (left + cols * width, top + len(rows) * height), GRID_BAND)
    if titled:
        _draw_text(canvas, (pad, pad), _clip(titled, font, left - 2 * pad), font)
    for c, seed in enumerate(seeds[:cols]):
        label = f"seed {seed}" if font.getlength(f"seed {seed}") <= width - 2 * pad else str(seed)
        label = _clip(column_labels[c] if column_labels else label, font, width - 2 * pad)
        _draw_text(canvas, (left + c * width + (width - font.getlength(label)) / 2, pad), label, font)
    for r, prompt in enumerate(prompts[: len(rows)]):
        lines = _wrap(_drawable(prompt, font), font, left - 2 * pad, (height - 2 * pad) // line)
        for k, text in enumerate(lines):
            _draw_text(canvas, (pad, top + r * height + pad + k * line), text, font)
    for r, row in enumerate(rows):  # last: text that runs over a band's edge is covered, the images stay exact
        for c, image in enumerate(row):
            canvas.paste(image.convert("RGB"), (left + c * width, top + r * height))
    return canvas


def image_name(prompt_index: int, seed: int) -> str:
    return f"p{prompt_index:02d}-s{seed}.png"


def image_ids(name: str) -> tuple[int, int] | None:
    """(prompt index, seed) of a file name :func:`image_name` wrote; None for any other name."""
    found = re.fullmatch(r"p(\d+)-s(\d+)\.png", name)
    return (int(found[1]), int(found[2])) if found else None


def image_size(pipe, config: SampleConfig) -> tuple[int, int]:
    """(width, height) of the images a config asks for: its own, else the model's native size; multiples of what the
    family needs (the VAE's scale factor; twice that for FLUX's packed latents)."""
    family = families.recognise_pipeline(pipe, type(pipe).__name__)
    factor = family.size_multiple(pipe)
    width = config.width or family.native_size(pipe)
    height = config.height or family.native_size(pipe)
    for name, value in (("width", width), ("height", height)):
        if value % factor:
            raise KronaError(f"--{name} {value} is not a multiple of {factor} ({family.title} images); choose one")
    return width, height


def png_text(path: Path, key: str) -> str | None:
    """A text chunk of a PNG (None for other files or a missing key), without decoding the pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # nothing is decoded here
            with Image.open(path) as image:
                if image.format != "PNG":
                    return None
                value = image.info.get(key)  # chunks before the pixels, where krona sample writes them
                if value is None:
                    value = image.text.get(key)  # also those after the pixels
    except Exception as e:  # unreadable or not an image: the same message as data.load_image
        raise KronaError(f"cannot read image '{path}': {e}; remove or replace it") from e
    return None if value is None else str(value)


def is_krona_image(path: Path) -> bool:
    """A PNG krona wrote (an image or grid of `krona sample` or training: it carries krona's version)."""
    try:
        return path.suffix == ".png" and png_text(path, "krona_version") is not None
    except KronaError:
        return False


def sample_folder(output_dir: str | Path, overwrite: bool) -> list[Path]:
    """Check `krona sample`'s folder before the model loads; return the images of an earlier run there, which
    `--overwrite` replaces (outputs.output_folder: any other file is never touched)."""
    return output_folder(output_dir, "--output-dir", is_krona_image, overwrite)


def image_metadata(config: SampleConfig, info: ModelInfo, width: int, height: int) -> dict[str, str]:
    """The PNG text chunks every image of a run shares (prompt and seed are added per image)."""
    return {
        "negative_prompt": config.negative_prompt,
        "steps": str(config.steps),
        "guidance": repr(float(config.guidance)),
        "scheduler": config.scheduler,
        "width": str(width),
        "height": str(height),
        "base_model": info.base_model,
        "architecture": info.architecture,
        "dtype": info.dtype,
        "adapters": json.dumps([asdict(a) for a in info.adapters]),
        "krona_version": __version__,
    }


@torch.no_grad()
def render(
    pipe,
    config: SampleConfig,
    prompts: Sequence[str],
    progress: ProgressCallback | None = None,
    on_image: Callable[[int, int, Image.Image], None] | None = None,
    seeds: Sequence[int] | None = None,
) -> dict[tuple[int, int], Image.Image]:
    """Sample one image per seed for every prompt; return them by (prompt index, seed).

    The seeds are `seeds` if given, else `config.seeds()` (image i uses `config.seed + i`). `on_image(prompt_index,
    seed, image)` is called as each image is made; `progress(images_done, images_total)` during every denoising
    step and after every batch. A stop request (`stopping`) is answered after the denoising step it comes in.
    """
    config = config.validate().for_model(pipe)
    if not prompts:
        raise KronaError("no prompt given; pass --prompt TEXT (repeatable) or --prompts-file FILE")
    if config.negative_prompt and "negative_prompt" not in inspect.signature(pipe.__call__).parameters:
        raise KronaError(
            f"--negative-prompt: {type(pipe).__name__} takes none (it guides against the empty prompt); leave it out"
        )
    width, height = image_size(pipe, config)
    seeds = config.seeds() if seeds is None else list(seeds)
    jobs = [(j, seed) for j in range(len(prompts)) for seed in seeds]  # prompt-major: rows fill in order
    total = len(jobs)
    family = families.recognise_pipeline(pipe, type(pipe).__name__)
    call_kwargs = family.call_kwargs(pipe)
    original_scheduler = pipe.scheduler
    pipe.scheduler = make_scheduler(config.scheduler, pipe)
    images: dict[tuple[int, int], Image.Image] = {}
    done = 0
    try:
        for start in range(0, total, config.batch_size):
            batch = jobs[start : start + config.batch_size]
            size = len(batch)

            def on_step(p, step, timestep, kwargs, _done=done, _n=size):
                stopping.check()
                if progress is not None:
                    steps = getattr(p, "num_timesteps", None) or config.steps
                    progress(_done + _n * min(1.0, (step + 1) / steps), total)
                return kwargs

            negative = [config.negative_prompt] * len(batch) if config.negative_prompt else None
            result = pipe(
                prompt=[prompts[j] for j, _ in batch],
                **family.guidance_kwargs(config.guidance, negative, len(batch)),
                num_inference_steps=config.steps,
                width=width,
                height=height,
                generator=[torch.Generator("cpu").manual_seed(seed) for _, seed in batch],
                output_type="pil",
                callback_on_step_end=on_step,
                **call_kwargs,
            )
            for (j, seed), image in zip(batch, result.images):
                images[(j, seed)] = image
                if on_image is not None:
                    on_image(j, seed, image)
            done += len(batch)
            if progress is not None:
                progress(done, total)
    finally:
        pipe.scheduler = original_scheduler
    return images


@contextlib.contextmanager
def stop_checks(pipe):
    """Answer stop requests (`stopping.check`) before every denoiser call of `pipe`, one per sampler step, where the
    pipeline is called by code that passes no step callback."""
    denoiser = getattr(pipe, families.recognise_pipeline(pipe, type(pipe).__name__).denoiser)
    hook = denoiser.register_forward_pre_hook(lambda module, args: stopping.check())
    try:
        yield pipe
    finally:
        hook.remove()


def write_grid(
    path: str | Path,
    images: dict[tuple[int, int], Image.Image],
    prompts: Sequence[str],
    seeds: Sequence[int],
    metadata: dict[str, str],
) -> Path:
    """One PNG grid: a row per prompt, a column per seed, labelled in light bands (each row's prompt on the left,
    wrapped and cut to the row's height; each column's seed above; `step N` in the top-left corner when `metadata`
    has a "step"). The images are unchanged in the bottom-right corner: image (j, seed i) has its top-left pixel at
    (grid width - columns × image width + i × image width, grid height - rows × image height + j × image height).
    The metadata, with the prompts and seeds (JSON lists) added, goes into the PNG's text chunks."""
    width, height = next(iter(images.values())).size
    title = f"step {metadata['step']}" if "step" in metadata else None
    grid = _grid([[images[(j, s)] for s in seeds] for j in range(len(prompts))], prompts, seeds, title, width, height)
    meta = {"prompts": json.dumps(list(prompts)), "seeds": json.dumps(list(seeds)), **metadata}
    return write_bytes_atomic(Path(path), png_bytes(grid, meta))


def generate(
    pipe,
    config: SampleConfig,
    prompts: Sequence[str],
    info: ModelInfo,
    output_dir: str | Path,
    progress: ProgressCallback | None = None,
) -> SampleResult:
    """Sample `config.num_images` images per prompt and write them, and one grid, as PNG files with metadata.

    Image i of prompt j uses seed `config.seed + i` and is written to `output_dir/p{j:02d}-s{seed}.png`; the grid
    (`grid.png`: one row per prompt, one column per seed, labelled with both: `write_grid`) goes beside them. Every
    file carries PNG text chunks: prompt, negative_prompt, seed, steps, guidance, scheduler, width, height,
    base_model, architecture, dtype, adapters (JSON list of {file, sha256, scale}) and krona_version; the grid has
    prompts and seeds (JSON lists) instead of prompt and seed. Files are written atomically.
    `progress(images_done, images_total)` is called during every denoising step (images_done is fractional within a
    batch) and after every batch.
    """
    config = config.validate().for_model(pipe)
    width, height = image_size(pipe, config)
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KronaError(f"cannot create the output folder '{out}': {e.strerror or e}; choose another") from e
    common = image_metadata(config, info, width, height)
    paths: list[Path] = []

    def write(j: int, seed: int, image: Image.Image) -> None:
        path = out / image_name(j, seed)
        write_bytes_atomic(path, png_bytes(image, {"prompt": prompts[j], "seed": str(seed), **common}))
        paths.append(path)

    with stopping.deferred():
        try:
            images = render(pipe, config, prompts, progress, on_image=write)
        except stopping.StopRequest:
            raise stopping.Stopped(
                f"stopped by {stopping.signal_name()} after {len(paths)} of {len(prompts) * config.num_images} "
                f"images, which are kept in '{out}' (no grid.png); draw them all with: {stopping.rerun('--overwrite')}"
            ) from None
    grid_path = write_grid(out / "grid.png", images, prompts, config.seeds(), common)
    return SampleResult(images=paths, grid=grid_path, seeds=config.seeds(), width=width, height=height)


def before_after(before: str | Path, after: str | Path, path: str | Path, labels: Sequence[str] = ("base", "adapted")):
    """One labelled grid of two `krona sample` folders drawn with the same prompts and seeds (say, the base model's and
    the adapted model's): a row per prompt, each seed's image from `before` then the same seed's from `after`."""
    before, after = Path(before), Path(after)
    pairs = [image_ids(p.name) for p in before.glob("p*-s*.png") if (after / p.name).is_file() and is_krona_image(p)]
    pairs = sorted(ids for ids in pairs if ids)
    if not pairs:
        raise KronaError(f"'{before}' and '{after}' share no krona sample image; sample both with the same prompts")
    prompts, seeds = {}, set()
    for j, seed in pairs:
        prompts[j] = png_text(before / image_name(j, seed), "prompt") or ""
        seeds.add(seed)
    order, seeds = sorted(prompts), sorted(seeds)
    rows = [[Image.open(folder / image_name(j, s)) for s in seeds for folder in (before, after)] for j in order]
    width, height = rows[0][0].size
    columns = [f"{label} {s}" for s in seeds for label in labels]
    grid = _grid(rows, [prompts[j] for j in order], seeds * 2, None, width, height, column_labels=columns)
    return write_bytes_atomic(Path(path), png_bytes(grid, {"prompts": json.dumps([prompts[j] for j in order])}))


def ceil_batches(config: SampleConfig, num_prompts: int) -> int:
    """How many pipeline calls a run makes."""
    return math.ceil(num_prompts * config.num_images / config.batch_size)
