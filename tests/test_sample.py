"""`krona sample`: seeds, scale 0, batch sizes, schedulers, PNG metadata, the grid, errors, and the same image as a
merged pipeline folder run by plain diffusers. Tiny pipelines, 64x64 images, 2 steps."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from krona_cli.cli import main
from krona_cli.errors import KronaError
from krona_cli.formats import collect_adapter, file_sha256, save_adapter
from krona_cli.inference.sampling import (
    SCHEDULERS,
    SampleConfig,
    before_after,
    generate,
    image_ids,
    load_prompts,
    prepare_pipeline,
    write_grid,
)
from krona_cli.kron import adapted_layers, inject
from krona_cli.pipeline.tiny import build_tiny_pipeline
from krona_cli.scoring.metrics import is_sample_grid

PROMPT = "a photo of a dog"
FAST = ["--sample-steps", "2", "--width", "64", "--height", "64", "--guidance", "7.0"]


def _adapter(arch: str, base_model: str | None, path):
    """An adapter on the tiny UNet's attention with random B (std 0.1) so that it changes the image visibly."""
    pipe = build_tiny_pipeline(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        inject(pipe.unet, factors="4x4")
        for layer in adapted_layers(pipe.unet).values():
            with torch.no_grad():
                layer.kron_b.normal_(std=0.1)
    return save_adapter(path, collect_adapter({"unet": pipe.unet}, base_model=base_model, architecture=arch))


@pytest.fixture(scope="module")
def sdxl_adapter(tiny_sdxl_dir, tmp_path_factory):
    return _adapter("sdxl", str(tiny_sdxl_dir), tmp_path_factory.mktemp("adapter") / "dog.safetensors")


def _sample(out, *args):
    code = main(["sample", *args, "--prompt", PROMPT, *FAST, "--output-dir", str(out)])
    assert code == 0
    return out


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0


def _bands(grid, rows: int, cols: int, size: int = 64) -> tuple[int, int]:
    """The widths of a grid's label bands (left: prompts, top: seeds): the images fill its bottom-right corner."""
    left, top = grid.width - cols * size, grid.height - rows * size
    assert left >= 0 and top >= 0
    return left, top


@pytest.fixture(scope="module")
def reference(sdxl_adapter, tmp_path_factory):
    """The adapter at scale 1, seeds 0 and 1, batch size 1."""
    return _sample(tmp_path_factory.mktemp("ref"), "--adapter", str(sdxl_adapter), "-n", "2")


def test_same_seed_same_image_different_seeds_differ(reference, sdxl_adapter, tmp_path):
    again = _sample(tmp_path, "--adapter", str(sdxl_adapter), "-n", "1")
    assert np.array_equal(_pixels(reference / "p00-s0.png"), _pixels(again / "p00-s0.png"))
    assert np.abs(_pixels(reference / "p00-s0.png") - _pixels(reference / "p00-s1.png")).mean() > 0.02
    # --seed 1 starts at seed 1: its first image is the reference's second
    shifted = _sample(tmp_path / "shifted", "--adapter", str(sdxl_adapter), "-n", "1", "--seed", "1")
    assert np.array_equal(_pixels(reference / "p00-s1.png"), _pixels(shifted / "p00-s1.png"))


def test_batch_size_does_not_change_the_images(reference, sdxl_adapter, tmp_path):
    batched = _sample(tmp_path, "--adapter", str(sdxl_adapter), "-n", "2", "--batch-size", "2")
    for name in ("p00-s0.png", "p00-s1.png"):
        diff = np.abs(_pixels(reference / name) - _pixels(batched / name))
        # other matrix shapes round differently: at most one 8-bit level here and there
        assert diff.max() <= 1 / 255 + 1e-9 and diff.mean() < 1e-3


def test_scale_0_is_the_base_model_and_scale_1_is_not(reference, sdxl_adapter, tiny_sdxl_dir, tmp_path):
    base = _sample(tmp_path / "base", "--pretrained-model", str(tiny_sdxl_dir), "-n", "1")
    zero = _sample(tmp_path / "zero", "--adapter", f"{sdxl_adapter}:0", "-n", "1")
    assert np.array_equal(_pixels(base / "p00-s0.png"), _pixels(zero / "p00-s0.png"))
    assert np.abs(_pixels(base / "p00-s0.png") - _pixels(reference / "p00-s0.png")).mean() > 0.01
    assert json.loads(Image.open(base / "p00-s0.png").text["adapters"]) == []


def test_png_metadata_and_grid(reference, sdxl_adapter, tiny_sdxl_dir):
    text = Image.open(reference / "p00-s1.png").text
    assert text["prompt"] == PROMPT and text["seed"] == "1" and text["negative_prompt"] == ""
    assert text["steps"] == "2" and float(text["guidance"]) == 7.0 and text["scheduler"] == "euler"
    assert text["width"] == "64" and text["height"] == "64" and text["base_model"] == str(tiny_sdxl_dir)
    [adapter] = json.loads(text["adapters"])
    assert adapter == {"file": str(sdxl_adapter), "sha256": file_sha256(sdxl_adapter), "scale": 1.0}
    grid = Image.open(reference / "grid.png")
    left, top = _bands(grid, rows=1, cols=2)
    assert left > 0 and top > 0  # the prompt's and the seeds' label bands
    assert json.loads(grid.text["seeds"]) == [0, 1] and json.loads(grid.text["prompts"]) == [PROMPT]
    assert "seed" not in grid.text and json.loads(grid.text["adapters"]) == [adapter]
    for i, name in enumerate(["p00-s0.png", "p00-s1.png"]):  # each image unchanged in its cell
        cell = np.asarray(grid.convert("RGB"))[top:, left + 64 * i : left + 64 * (i + 1)]
        assert np.array_equal(cell, np.asarray(Image.open(reference / name).convert("RGB")))
    assert is_sample_grid(reference / "grid.png") and not is_sample_grid(reference / "p00-s0.png")


def test_grid_rows_are_prompts_and_prompts_file(sdxl_adapter, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog\n\n  a cat on a mat  \n")
    out = tmp_path / "out"
    code = main(
        [
            "sample",
            "--adapter",
            str(sdxl_adapter),
            "--prompts-file",
            str(prompts),
            "--prompt",
            "a house",
            "-n",
            "2",
            "--batch-size",
            "3",
            *FAST,
            "--output-dir",
            str(out),
        ]
    )
    assert code == 0
    assert sorted(p.name for p in out.glob("p*.png")) == [f"p{j:02d}-s{s}.png" for j in range(3) for s in (0, 1)]
    grid = Image.open(out / "grid.png")
    left, top = _bands(grid, rows=3, cols=2)
    cell = np.asarray(grid.convert("RGB"))[top + 2 * 64 :, left + 64 :]  # the last row's second column
    assert np.array_equal(cell, np.asarray(Image.open(out / "p02-s1.png").convert("RGB")))
    assert Image.open(out / "p02-s1.png").text["prompt"] == "a cat on a mat"
    stdout = capsys.readouterr().out
    assert "6/6 images" in stdout and "grid.png" in stdout.replace("\n", "")  # a long path wraps at 80 columns


def test_merged_folder_in_plain_diffusers_gives_the_same_image(reference, sdxl_adapter, tmp_path, capsys):
    from diffusers import StableDiffusionXLPipeline

    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(sdxl_adapter), "--output-dir", str(merged)]) == 0
    pipe = StableDiffusionXLPipeline.from_pretrained(merged)
    image = pipe(
        PROMPT,
        generator=torch.Generator("cpu").manual_seed(0),
        num_inference_steps=2,
        guidance_scale=7.0,
        width=64,
        height=64,
    ).images[0]
    diff = np.abs(np.asarray(image, dtype=np.float64) / 255.0 - _pixels(reference / "p00-s0.png")).mean()
    assert diff <= 1e-4


def test_merged_sd15_folder_in_plain_diffusers_gives_the_same_image(tiny_sd15_dir, tmp_path, capsys):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    adapter = _adapter("sd15", str(tiny_sd15_dir), tmp_path / "sd15.safetensors")
    out = _sample(tmp_path / "out", "--adapter", f"{adapter}:0.7", "-n", "1", "--scheduler", "ddim")
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", f"{adapter}:0.7", "--output-dir", str(merged)]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(merged, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    image = pipe(
        PROMPT,
        generator=torch.Generator("cpu").manual_seed(0),
        num_inference_steps=2,
        guidance_scale=7.0,
        width=64,
        height=64,
    ).images[0]
    assert np.abs(np.asarray(image, dtype=np.float64) / 255.0 - _pixels(out / "p00-s0.png")).mean() <= 1e-4


@pytest.fixture(scope="module")
def prepared(sdxl_adapter):
    return prepare_pipeline([(sdxl_adapter, 1.0)])


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_scheduler_works_and_is_restored(prepared, name, tmp_path):
    pipe, info = prepared
    original = pipe.scheduler
    calls = []
    config = SampleConfig(num_images=1, steps=2, scheduler=name, width=64, height=64)
    result = generate(pipe, config, [PROMPT], info, tmp_path, progress=lambda done, total: calls.append((done, total)))
    assert Image.open(result.images[0]).text["scheduler"] == name
    assert pipe.scheduler is original
    assert calls[-1] == (1, 1) and all(0 < d <= 1 for d, _ in calls)


def test_library_defaults_and_native_size(prepared, tmp_path):
    pipe, info = prepared
    config = SampleConfig(num_images=1, steps=1)
    assert (config.steps, config.guidance, config.scheduler, config.seed, config.batch_size) == (1, None, "euler", 0, 1)
    assert SampleConfig().num_images == 4
    assert (SampleConfig().for_model(pipe).steps, config.for_model(pipe).guidance) == (30, 7.0)  # the SD families'
    assert SampleConfig().for_model(pipe, preview=True).steps == 25
    result = generate(pipe, config, [PROMPT], info, tmp_path)
    assert (result.width, result.height) == (64, 64)  # the tiny UNet's 8x8 latents through the 8x VAE


def test_unknown_scheduler_is_one_line_exit_2(sdxl_adapter, tmp_path, capsys):
    assert (
        main(
            [
                "sample",
                "--adapter",
                str(sdxl_adapter),
                "--prompt",
                "x",
                "--scheduler",
                "heun",
                "--output-dir",
                str(tmp_path),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error:")
    assert all(name in err for name in SCHEDULERS)
    with pytest.raises(KronaError, match="euler-a"):
        SampleConfig(scheduler="heun").validate()


def _error(args, capsys) -> str:
    assert main(["sample", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0].startswith("error:")
    return lines[0]


def test_cli_errors(sdxl_adapter, tmp_path, capsys):
    assert "does not exist" in _error(["--adapter", str(tmp_path / "nope.safetensors"), "--prompt", "x"], capsys)
    no_base = _adapter("sdxl", None, tmp_path / "nobase.safetensors")
    assert "--pretrained-model" in _error(["--adapter", str(no_base), "--prompt", "x"], capsys)
    assert "--prompt" in _error(["--adapter", str(sdxl_adapter)], capsys)
    assert "--pretrained-model" in _error(["--prompt", "x"], capsys)
    assert "--sample-steps" in _error(["--adapter", str(sdxl_adapter), "--prompt", "x", "--sample-steps", "0"], capsys)
    assert "does not exist" in _error(["--adapter", str(sdxl_adapter), "--prompts-file", str(tmp_path / "p")], capsys)
    assert "multiple of 8" in _error(
        [
            "--adapter",
            str(sdxl_adapter),
            "--prompt",
            "x",
            "--width",
            "60",
            "-n",
            "1",
            "--sample-steps",
            "1",
            "--output-dir",
            str(tmp_path / "o"),
        ],
        capsys,
    )


def test_load_prompts():
    assert load_prompts(["a", "  ", "b "]) == ["a", "b"]
    with pytest.raises(KronaError, match="no prompt"):
        load_prompts([])


def test_grid_labels_each_row_with_its_prompt_each_column_with_its_seed_and_the_corner_with_the_step(tmp_path):
    """Pure write_grid on made-up images: light bands with dark text left of every row and above every column, the
    step in the corner only when the metadata has one, long prompts kept inside their row, the images exact."""
    rng = np.random.default_rng(0)
    long = "a photo of sks dog on the moon, " * 12 + "unbreakablesupercalifragilisticexpialidociousword"
    prompts, seeds = ["a dog", long, "a dog"], [3, 17]
    images = {
        (j, s): Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for j in range(3) for s in seeds
    }
    grids = {}
    for name, meta in (("plain", {"krona_version": "x"}), ("step", {"krona_version": "x", "step": "30"})):
        path = write_grid(tmp_path / f"{name}.png", images, prompts, seeds, meta)
        assert json.loads(Image.open(path).text["prompts"]) == prompts and is_sample_grid(path)
        grids[name] = np.asarray(Image.open(path).convert("RGB")).astype(int)
    grid = grids["step"]
    left, top = _bands(Image.fromarray(grid.astype(np.uint8)), rows=3, cols=2)
    for (j, s), image in images.items():
        i = seeds.index(s)
        assert np.array_equal(grid[top + 64 * j : top + 64 * (j + 1), left + 64 * i : left + 64 * (i + 1)], image)

    def band(g, box):
        return g[box[1] : box[3], box[0] : box[2]]

    def ink(box):  # how many dark text pixels a band region holds
        return int((band(grid, box).max(axis=2) < 128).sum())

    rows = [(0, top + 64 * j, left, top + 64 * (j + 1)) for j in range(3)]
    cols = [(left + 64 * i, 0, left + 64 * (i + 1), top) for i in range(2)]
    assert all(ink(box) > 10 for box in rows + cols) and ink((0, 0, left, top)) > 10
    assert (grid[:top, :].min(axis=2) > 200).mean() > 0.7 and (grid[top:, :left].min(axis=2) > 200).mean() > 0.7
    assert np.array_equal(band(grid, rows[0]), band(grid, rows[2]))  # the same prompt, the same label
    assert not np.array_equal(band(grid, rows[0]), band(grid, rows[1]))
    assert not np.array_equal(band(grid, cols[0]), band(grid, cols[1]))
    assert ink(rows[1]) > 4 * ink(rows[0])  # the long prompt takes several lines, all inside its row
    # the step is the only difference: in the corner, which the plain grid leaves empty
    assert grids["plain"].shape == grid.shape
    changed = np.argwhere((grids["plain"] != grid).any(axis=2))
    assert changed.size and changed[:, 0].max() < top and changed[:, 1].max() < left
    assert (grids["plain"][:top, :left].min(axis=2) > 200).all()


def test_before_after_puts_each_seed_of_the_two_folders_side_by_side(reference, tiny_sdxl_dir, tmp_path):
    """sampling.before_after: a row per prompt, each seed's base image then the same seed's adapted one, labelled."""
    # the tiny base alone, seeds 0 and 1; `reference` is the adapted model with the same seeds
    base = _sample(tmp_path / "base", "--pretrained-model", str(tiny_sdxl_dir), "-n", "2")
    grid = Image.open(before_after(base, reference, tmp_path / "before-after.png"))
    left, top = _bands(grid, rows=1, cols=4)
    cells = np.asarray(grid.convert("RGB"))[top:, left:]
    for column, image in enumerate([base / "p00-s0.png", reference / "p00-s0.png", base / "p00-s1.png"]):
        cell = cells[:, column * 64 : (column + 1) * 64]
        assert np.array_equal(cell, np.asarray(Image.open(image).convert("RGB"))), image
    assert json.loads(grid.text["prompts"]) == [PROMPT]
    assert image_ids("p102-s7.png") == (102, 7) and image_ids("grid.png") is None
    with pytest.raises(KronaError, match="share no krona sample image"):
        before_after(base, tmp_path, tmp_path / "none.png")


def test_grid_labels_keep_every_space(tmp_path):
    """The prompt label of a 64 px grid, read back: every wrapped line's words are where the font lays them out,
    with blank columns at every space (10 px text drawn directly lost them: "a photoofsks square", "ste p")."""
    from krona_cli.inference.sampling import _grid_font, _wrap

    prompt = "a photo of sks square on an orange background step yellow"
    image = Image.fromarray(np.full((64, 64, 3), 128, dtype=np.uint8))
    path = write_grid(tmp_path / "g.png", {(0, 0): image}, [prompt], [0], {"krona_version": "x"})
    grid = np.asarray(Image.open(path).convert("L")).astype(int)
    left, top = _bands(Image.fromarray(grid.astype(np.uint8)), rows=1, cols=1)
    font = _grid_font(64)
    pad = max(2, font.size // 4)
    lines = _wrap(prompt, font, left - 2 * pad, 10)
    assert " ".join(lines) == prompt and len(lines) > 1
    drawn = font.font_variant(size=4 * font.size)
    band = grid[top:, :left] < 200  # the prompt's ink
    rows = np.flatnonzero(band.any(axis=1))
    # the lines of text: runs of rows with ink
    starts = [rows[0]] + [b for a, b in zip(rows, rows[1:]) if b > a + 1]
    ends = [a for a, b in zip(rows, rows[1:]) if b > a + 1] + [rows[-1]]
    assert len(starts) == len(lines)
    for text, y0, y1 in zip(lines, starts, ends):
        ink = band[y0 : y1 + 1].any(axis=0)
        for i, char in enumerate(text):
            if char == " ":  # where the text is laid out: at 4x the size, scaled down
                x = pad + (drawn.getlength(text[:i]) + drawn.getlength(text[: i + 1])) / 8
                assert not ink[int(x)], f"no space after '{text[:i]}'"
