"""Every bad input, from the command line: one line saying what is wrong and what to do (or a warning where the run can
go on), no traceback, exit code 2 for bad input (0 when the run goes on), and nothing half-written left behind.

Library-level tests of the same failures live beside their modules (test_data.py, test_formats.py, test_train.py,
test_reliability.py); this file is the one list of bad inputs as a user meets them. Exit codes 1 (internal error)
and 130 (interrupted) are covered in test_cli.py.
"""

import errno
import io
import os
import pickle
import random
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from krona_cli.cli import main
from krona_cli.pipeline import models
from krona_cli.training import data
from krona_cli.training.buckets import Bucket

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "cat"
PROMPT = "a photo of sks cat"
# Third-party chatter that is not krona's message (see test_a_model_loading_command_prints_only_krona_lines).
NOISE = ("[transformers]",)


def train_args(pipeline_dir, instance_dir, out, *extra):
    return [
        "train",
        "--config",
        "tiny",
        "--pretrained-model",
        str(pipeline_dir),
        "--instance-dir",
        str(instance_dir),
        "--prompt",
        PROMPT,
        "--output-dir",
        str(out),
        "--steps",
        "2",
        "--sample-every",
        "0",
        "--checkpoint-every",
        "0",
        *extra,
    ]


def run(capsys, args):
    """(exit code, stdout, krona's stderr lines) of `krona ARGS` run in this process."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, [line for line in err.strip().splitlines() if not line.startswith(NOISE)]


def assert_error(capsys, args, *needles):
    """`krona ARGS` fails with exit code 2 and one line holding every needle; returns that line."""
    code, _, lines = run(capsys, args)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def noise_image(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def photos(tmp_path, name="photos"):
    """A copy of the example photos (five cats, 160×160 to 451×300) to add bad files to."""
    folder = tmp_path / name
    shutil.copytree(EXAMPLES, folder)
    return folder


def png_claiming(width, height):
    """A real 4×4 PNG whose header is patched to say width × height (CRC fixed): a few bytes that claim many pixels."""
    buffer = io.BytesIO()
    noise_image(4, 4).save(buffer, format="PNG")
    real = buffer.getvalue()
    assert real[12:16] == b"IHDR"
    body = b"IHDR" + struct.pack(">II", width, height) + real[24:29]  # bit depth, colour type... kept
    return real[:8] + struct.pack(">I", 13) + body + struct.pack(">I", zlib.crc32(body)) + real[33:]


def nothing_written(out):
    """No adapter, checkpoint, sample or class image in `out` (a failed run leaves no output behind)."""
    if not out.exists():
        return True
    found = [p for p in out.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".png", ".json", ".yaml", ".md")]
    return not found


@pytest.fixture(scope="module")
def sdxl_adapter(tiny_sdxl_dir, tmp_path_factory):
    """A real adapter file trained for 1 step on the tiny SDXL pipeline."""
    out = tmp_path_factory.mktemp("sdxl-run")
    assert main(train_args(tiny_sdxl_dir, EXAMPLES, out, "--steps", "1")) == 0
    return out / "adapter.safetensors"


# --- 1. instance folder missing or empty ------------------------------------------------------------------------------


def test_missing_instance_folder(tiny_sd15_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert_error(
        capsys,
        train_args(tiny_sd15_dir, tmp_path / "nowhere", out),
        "--instance-dir",
        "nowhere",
        "does not exist",
        "point it at the folder",
    )
    assert not out.exists()


def test_empty_instance_folder(tiny_sd15_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "run"
    assert_error(
        capsys,
        train_args(tiny_sd15_dir, tmp_path / "empty", out),
        "--instance-dir",
        "holds no images",
        "add photos there",
    )
    assert not out.exists()


def test_eval_names_its_own_folder_flags(tmp_path, capsys):
    """krona eval's folders are --images and --reference (not --images-dir)."""
    (tmp_path / "generated").mkdir()
    assert_error(
        capsys,
        ["eval", "--images", tmp_path / "nowhere", "--reference", EXAMPLES, "--output", tmp_path / "m.json"],
        "--images '",
        "nowhere",
        "does not exist",
    )
    assert_error(
        capsys,
        ["eval", "--images", tmp_path / "generated", "--reference", EXAMPLES, "--output", tmp_path / "m.json"],
        "--images '",
        "holds no images",
    )
    assert_error(
        capsys,
        ["eval", "--images", EXAMPLES, "--reference", tmp_path / "generated", "--output", tmp_path / "m.json"],
        "--reference '",
        "holds no images",
    )
    assert not (tmp_path / "m.json").exists()


# --- 2. non-image and empty files among the photos --------------------------------------------------------------------


def test_non_image_and_empty_files_are_skipped_with_a_warning(tiny_sd15_dir, tmp_path, capsys):
    folder = photos(tmp_path)
    (folder / "notes.pdf").write_bytes(b"%PDF-1.4")
    (folder / "zero.jpg").write_bytes(b"")
    out = tmp_path / "run"
    code, _, lines = run(capsys, train_args(tiny_sd15_dir, folder, out))
    assert code == 0, lines
    warning = [line for line in lines if line.startswith("warning:")]
    assert len(warning) == 1 and "skipped 2 file(s)" in warning[0], lines
    assert "notes.pdf" in warning[0] and "zero.jpg" in warning[0]
    assert (out / "adapter.safetensors").is_file()


def test_a_folder_of_only_non_images_is_an_error(tiny_sd15_dir, tmp_path, capsys):
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "notes.pdf").write_bytes(b"%PDF-1.4")
    (folder / "zero.jpg").write_bytes(b"")
    out = tmp_path / "run"
    assert_error(
        capsys,
        train_args(tiny_sd15_dir, folder, out),
        "--instance-dir",
        "holds no images",
        "notes.pdf",
        "zero.jpg (empty)",
        "add photos there",
    )
    assert not out.exists()


# --- 3. and 4. a truncated JPEG, an image too large to decode ---------------------------------------------------------


def truncated_photos(tmp_path):
    folder = photos(tmp_path)
    full = (folder / "cat-02.jpg").read_bytes()
    (folder / "cat-02.jpg").write_bytes(full[: len(full) // 2])
    return folder, "cat-02.jpg"


def bomb_photos(tmp_path):
    folder = photos(tmp_path)
    (folder / "huge.png").write_bytes(png_claiming(20_000, 20_000))
    return folder, "huge.png"


def test_a_truncated_jpeg_is_an_error_naming_the_file(tiny_sd15_dir, tmp_path, capsys):
    folder, name = truncated_photos(tmp_path)
    out = tmp_path / "run"
    assert_error(capsys, train_args(tiny_sd15_dir, folder, out), f"{name}'", "truncated", "remove or replace it")
    assert not (out / "adapter.safetensors").exists() and not (out / "checkpoints").exists()


def test_an_image_too_large_to_decode_is_an_error_naming_the_file(tiny_sd15_dir, tmp_path, capsys):
    folder, name = bomb_photos(tmp_path)
    header = (folder / name).read_bytes()[:33]
    assert struct.unpack(">II", header[16:24]) == (20_000, 20_000)  # 400 MP claimed, a few bytes on disk
    assert zlib.crc32(header[12:29]) == struct.unpack(">I", header[29:33])[0]  # a valid header, not a damaged file
    out = tmp_path / "run"
    assert_error(
        capsys,
        train_args(tiny_sd15_dir, folder, out),
        f"{name}'",
        "too large to load safely",
        "downscale it or remove it",
    )
    assert not (out / "adapter.safetensors").exists() and not (out / "checkpoints").exists()


@pytest.mark.parametrize("bad", [truncated_photos, bomb_photos], ids=["truncated-jpeg", "too-large-png"])
def test_an_unusable_photo_fails_before_class_images_are_made_or_training_starts(bad, tiny_sd15_dir, tmp_path, capsys):
    folder, name = bad(tmp_path)
    out = tmp_path / "run"
    assert_error(
        capsys,
        train_args(
            tiny_sd15_dir,
            folder,
            out,
            "--class-prompt",
            "a photo of a cat",
            "--num-class-images",
            "2",
            "--checkpoint-every",
            "1",
        ),
        f"{name}'",
    )
    assert nothing_written(out) and not (out / "class-images").exists()


def test_an_unusable_photo_fails_before_the_model_loads(tiny_sd15_dir, tmp_path, capsys, monkeypatch):
    folder, name = truncated_photos(tmp_path)
    loaded = []
    original = models.load_pipeline
    monkeypatch.setattr(models, "load_pipeline", lambda *a, **k: loaded.append(1) or original(*a, **k))
    assert_error(capsys, train_args(tiny_sd15_dir, folder, tmp_path / "run"), f"{name}'")
    assert not loaded, "the base model was loaded before the photos were checked"


# --- 5. photos smaller than the resolution ----------------------------------------------------------------------------


def test_photos_smaller_than_the_resolution_are_upscaled_with_a_warning(tiny_sd15_dir, tmp_path, capsys):
    folder = tmp_path / "small"
    folder.mkdir()
    for i, (w, h) in enumerate([(40, 40), (50, 30), (100, 80)]):  # at 64 px: the first two are upscaled
        noise_image(w, h, seed=i).save(folder / f"s{i}.png")
    out = tmp_path / "run"
    code, _, lines = run(capsys, train_args(tiny_sd15_dir, folder, out))
    assert code == 0, lines
    warning = [line for line in lines if line.startswith("warning:")]
    assert len(warning) == 1 and "2 " in warning[0] and "smaller than their training size" in warning[0], lines
    assert "upscaled" in warning[0] and "s0.png" in warning[0] and "s1.png" in warning[0]
    assert "s2.png" not in warning[0]
    assert (out / "adapter.safetensors").is_file()


# --- 6. spaces and non-ASCII characters in every path -----------------------------------------------------------------


def test_paths_with_spaces_and_unicode_work_end_to_end(tiny_sd15_dir, tmp_path, capsys):
    from krona_cli.formats import load_adapter

    pipeline = tmp_path / "tiny ünï côde"
    shutil.copytree(tiny_sd15_dir, pipeline)
    folder = photos(tmp_path, "my phötos (cat) 猫")
    out = tmp_path / "run ü dir"
    code, _, lines = run(capsys, train_args(pipeline, folder, out))
    assert code == 0, lines
    adapter = out / "adapter.safetensors"
    assert load_adapter(adapter).base_model == str(pipeline)
    # the base recorded in the adapter (a non-ASCII path) is found again by sample
    code, _, lines = run(
        capsys,
        [
            "sample",
            "--adapter",
            adapter,
            "--prompt",
            "sks cat, été",
            "-n",
            "1",
            "--sample-steps",
            "1",
            "--output-dir",
            tmp_path / "samples ü",
        ],
    )
    assert code == 0, lines
    assert (tmp_path / "samples ü" / "grid.png").is_file()


# --- 7. factors -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factors,needle", [("64by4", "not of the form OxI"), ("0x4", "positive whole numbers")])
def test_malformed_factors_name_the_flag(factors, needle, tiny_sd15_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(models, "load_pipeline", lambda *a, **k: pytest.fail("loaded the model"))
    out = tmp_path / "run"
    assert_error(
        capsys,
        train_args(tiny_sd15_dir, EXAMPLES, out, "--factors", factors),
        "--factors",
        f"'{factors}'",
        needle,
        "64x4",
    )
    assert not out.exists()


def test_factors_that_divide_no_layer_are_fitted_per_layer_on_train(tiny_sd15_dir, tmp_path, capsys):
    """README: krona uses the nearest divisor not above the request and records what each layer uses."""
    from krona_cli.formats import load_adapter

    out = tmp_path / "run"
    code, _, lines = run(capsys, train_args(tiny_sd15_dir, EXAMPLES, out, "--factors", "7x3"))
    assert code == 0, lines
    adapter = load_adapter(out / "adapter.safetensors")
    used = {layer.factors for layer in adapter.layers["unet"].values()}
    assert "7x3" not in used  # the tiny SD 1.5 layers are 16..80 wide: 7 and 3 divide none of them
    for module, layer in adapter.layers["unet"].items():  # each layer: the largest divisor not above 7 and 3
        text = layer.factors
        a_out, a_in = map(int, text.split("x"))
        b_out, b_in = layer.b.shape
        d_out, d_in = a_out * b_out, a_in * b_in
        assert a_out == max(k for k in range(1, 8) if d_out % k == 0), (module, text)
        assert a_in == max(k for k in range(1, 4) if d_in % k == 0), (module, text)


def test_plan_strict_factors_that_do_not_divide_is_an_error(capsys):
    assert_error(
        capsys,
        ["plan", "--arch", "sd15", "--strict-factors", "--factors", "7x3"],
        "factors 7x3",
        "do not divide",
        "drop --strict-factors",
    )
    code, _, lines = run(capsys, ["plan", "--arch", "sd15", "--factors", "7x3"])  # without: fitted, fine
    assert code == 0 and not lines


# --- 8. an adapter for another base model -----------------------------------------------------------------------------


def test_sample_with_an_adapter_for_another_base_model(sdxl_adapter, tiny_sd15_dir, tmp_path, capsys):
    out = tmp_path / "samples"
    assert_error(
        capsys,
        [
            "sample",
            "--adapter",
            sdxl_adapter,
            "--pretrained-model",
            tiny_sd15_dir,
            "--prompt",
            "x",
            "-n",
            "1",
            "--sample-steps",
            "1",
            "--output-dir",
            out,
        ],
        "does not fit this base model",
        "made for sdxl",
        "sd15",
        "--pretrained-model",
    )
    assert not out.exists()


def test_merge_with_an_adapter_for_another_base_model(sdxl_adapter, tiny_sd15_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    assert_error(
        capsys,
        ["merge", "--adapter", sdxl_adapter, "--pretrained-model", tiny_sd15_dir, "--output-dir", out],
        "does not fit this base model",
        "made for sdxl",
        "sd15",
        "--pretrained-model",
    )
    assert not out.exists() and not list(tmp_path.glob(".merged*"))


# --- 9. truncated or corrupt adapter files ----------------------------------------------------------------------------


def adapter_commands(adapter, pipeline_dir, tmp_path):
    """Every command that reads an adapter, with where it would write."""
    return {
        "inspect": (["inspect", adapter], None),
        "sample": (
            [
                "sample",
                "--adapter",
                adapter,
                "--pretrained-model",
                pipeline_dir,
                "--prompt",
                "x",
                "-n",
                "1",
                "--sample-steps",
                "1",
                "--output-dir",
                tmp_path / "samples",
            ],
            tmp_path / "samples",
        ),
        "merge": (
            ["merge", "--adapter", adapter, "--pretrained-model", pipeline_dir, "--output-dir", tmp_path / "merged"],
            tmp_path / "merged",
        ),
        "export": (
            ["export", "--adapter", adapter, "--to", "lycoris", "--output", tmp_path / "out.safetensors"],
            tmp_path / "out.safetensors",
        ),
    }


@pytest.mark.parametrize("damage", ["cut in half", "random bytes", "empty"])
def test_a_truncated_or_corrupt_adapter_is_refused_by_every_command(
    damage, sdxl_adapter, tiny_sdxl_dir, tmp_path, capsys
):
    whole = sdxl_adapter.read_bytes()
    content = {"cut in half": whole[: len(whole) // 2], "random bytes": random.Random(7).randbytes(4096), "empty": b""}[
        damage
    ]
    bad = tmp_path / "adapter.safetensors"
    bad.write_bytes(content)
    for command, (args, target) in adapter_commands(bad, tiny_sdxl_dir, tmp_path).items():
        line = assert_error(
            capsys, args, "adapter.safetensors'", "not a readable .safetensors file", "truncated or corrupt"
        )
        assert target is None or not target.exists(), (command, line)


# --- 10. pickles given as adapters ------------------------------------------------------------------------------------


def pickles(tmp_path):
    tensors = {"unet.down_blocks.0.attn1.to_q.kron_a": torch.ones(2, 2)}
    torch.save(tensors, tmp_path / "x.pt")  # a zip archive holding a pickle
    shutil.copy(tmp_path / "x.pt", tmp_path / "x.safetensors")  # the same bytes, misleadingly named
    with open(tmp_path / "legacy.safetensors", "wb") as f:  # a bare pickle (protocol 2, as old .ckpt files)
        pickle.dump({"a": [1, 2]}, f, protocol=2)
    torch.save(tensors, tmp_path / "old.bin", _use_new_zipfile_serialization=False)  # torch's legacy format
    return [tmp_path / name for name in ("x.pt", "x.safetensors", "legacy.safetensors", "old.bin")]


def test_pickles_are_refused_and_never_unpickled(tiny_sdxl_dir, tmp_path, capsys, monkeypatch):
    files = pickles(tmp_path)

    def never(*args, **kwargs):
        raise AssertionError("krona tried to unpickle an adapter")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, never)
    for file in files:
        for command, (args, target) in adapter_commands(file, tiny_sdxl_dir, tmp_path).items():
            assert_error(capsys, args, f"{file.name}' is a pickle", "never loads pickles", ".safetensors")
            assert target is None or not target.exists(), command


# --- 11. an output folder that holds another run ----------------------------------------------------------------------


def test_an_output_folder_with_another_run_needs_overwrite_or_resume(tiny_sd15_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "adapter.safetensors").write_bytes(b"an earlier run's adapter")
    assert_error(
        capsys,
        train_args(tiny_sd15_dir, EXAMPLES, out),
        "--output-dir",
        "already holds a training run",
        "adapter.safetensors",
        "--resume latest",
        "--overwrite",
    )
    assert (out / "adapter.safetensors").read_bytes() == b"an earlier run's adapter"  # untouched
    assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors"]
    code, _, lines = run(capsys, train_args(tiny_sd15_dir, EXAMPLES, out, "--overwrite"))
    assert code == 0, lines
    assert (out / "adapter.safetensors").read_bytes() != b"an earlier run's adapter"


# --- 12. no space left on the device while saving ---------------------------------------------------------------------


def fail_fsync_of(monkeypatch, marker):
    """os.fsync raises ENOSPC for files whose name contains `marker` (the temp files the atomic writers fsync)."""
    real = os.fsync
    hits = []

    def fsync(fd):
        try:
            name = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            name = ""
        if marker in name:
            hits.append(name)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return hits


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to tell which file is being written")
def test_no_space_for_the_final_adapter_keeps_the_last_checkpoint(tiny_sd15_dir, tmp_path, capsys, monkeypatch):
    from krona_cli.training.checkpoint import list_checkpoints, load_checkpoint

    out = tmp_path / "run"
    args = train_args(tiny_sd15_dir, EXAMPLES, out, "--checkpoint-every", "1")
    hits = fail_fsync_of(monkeypatch, ".adapter.safetensors.")
    assert_error(capsys, args, "no space left", "adapter.safetensors", "free some space", "--resume latest")
    assert hits
    assert not list(out.glob("adapter.safetensors*")) and not list(out.glob(".adapter.safetensors*"))
    latest = list_checkpoints(out)[-1]
    assert latest.name == "step-000002" and load_checkpoint(latest).step == 2  # intact
    monkeypatch.undo()  # space freed: the same command with --resume latest finishes the run
    code, _, lines = run(capsys, args + ["--resume", "latest"])
    assert code == 0, lines
    assert (out / "adapter.safetensors").is_file()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to tell which file is being written")
def test_no_space_for_a_checkpoint_keeps_the_previous_one(tiny_sd15_dir, tmp_path, capsys, monkeypatch):
    from krona_cli.training.checkpoint import incomplete_leftovers, list_checkpoints, load_checkpoint

    out = tmp_path / "run"
    hits = fail_fsync_of(monkeypatch, ".step-000002.tmp-")  # the staging folder of the second checkpoint
    assert_error(
        capsys,
        train_args(tiny_sd15_dir, EXAMPLES, out, "--checkpoint-every", "1", "--steps", "3"),
        "no space left",
        "step-000002",
        "--resume latest",
    )
    assert hits
    assert [p.name for p in list_checkpoints(out)] == ["step-000001"]
    assert load_checkpoint(out / "checkpoints" / "step-000001").step == 1
    assert not incomplete_leftovers(out) and not (out / "adapter.safetensors").exists()


# --- exit codes and the one-line rule, from a real process ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_model_loading_command_prints_only_krona_lines(sdxl_adapter, tiny_sd15_dir, tmp_path):
    """In a fresh process (third-party warnings are printed once per process), an error found after the base model
    is loaded is still the only line on stderr."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "krona_cli",
            "sample",
            "--adapter",
            str(sdxl_adapter),
            "--pretrained-model",
            str(tiny_sd15_dir),
            "--prompt",
            "x",
            "-n",
            "1",
            "--sample-steps",
            "1",
            "--output-dir",
            str(tmp_path / "s"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"HF_HUB_OFFLINE": "1", "COLUMNS": "400"},
    )
    assert done.returncode == 2 and "does not fit this base model" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


# --- the data.py helpers train uses to check photos before it starts --------------------------------------------------


def test_check_images_decodes_every_photo_and_names_every_bad_one(tmp_path):
    folder, _ = truncated_photos(tmp_path / "a")
    paths, _ = data.scan_images(folder)
    with pytest.raises(data.KronaError, match=r"cannot read image '.*cat-02\.jpg'.*remove or replace it"):
        data.check_images(paths)
    (folder / "huge.png").write_bytes(png_claiming(20_000, 20_000))
    paths, _ = data.scan_images(folder)
    with pytest.raises(data.KronaError, match=r"^2 images cannot be used \(cat-02\.jpg, huge\.png\)"):
        data.check_images(paths)
    good, _ = data.scan_images(EXAMPLES)
    assert data.check_images(good) == [(300, 451), (240, 304), (300, 230), (180, 262), (160, 160)]


def test_small_images_warning_lists_the_upscaled_photos():
    paths = [Path(f"p{i}.png") for i in range(5)]
    sizes = [(300, 451), (40, 40), (80, 30), (64, 64), (10, 500)]  # (height, width)
    assert data.small_images_warning(paths, sizes, [Bucket(10, 10)] * 5) is None
    message = data.small_images_warning(paths, sizes, [Bucket(64, 64)] * 5)
    assert message.startswith("3 of 5 instance images are smaller than their training size and will be upscaled")
    assert "(p1.png 40×40 → 64×64, p2.png 30×80 → 64×64, p4.png 500×10 → 64×64);" in message
    assert "--resolution" in message
    assert data.small_images_warning(paths, sizes, [Bucket(1000, 1000)] * 5, what="class").startswith("5 of 5 class")
    assert "p2.png 30×80 → 1000×1000, ...);" in data.small_images_warning(paths, sizes, [Bucket(1000, 1000)] * 5)
    # a bucket's own size is not upscaled, whatever the shorter side; one side short of it is
    tall = [(128, 64), (120, 64)]
    assert data.small_images_warning(paths[:2], tall, [Bucket(128, 64)] * 2).startswith("1 of 2 instance")
