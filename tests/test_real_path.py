"""The path a real user takes: the default hub ids through a local Hugging Face cache (tiny pipelines stand in for the
real weights under the real repo ids), the README's commands as written, run from other folders in a fresh shell
without scripts/setup.sh's variables, and base models given in every wrong way."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import put_in_hub_cache

from krona_cli.cli import main
from krona_cli.pipeline.tiny import make_tiny, make_tiny_clip, make_tiny_dino

pytestmark = pytest.mark.subprocess  # every test here starts krona or Python processes

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "cat"
KRONA = Path(sys.executable).parent / "krona"
SDXL, SD15, SD21 = (
    "stabilityai/stable-diffusion-xl-base-1.0",
    "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "stabilityai/stable-diffusion-2-1",
)
# What a README command needs to finish in seconds on the tiny models; nothing else is changed.
SMALL_TRAIN = [
    "--steps",
    "2",
    "--resolution",
    "64",
    "--num-class-images",
    "2",
    "--sample-steps",
    "2",
    "--sample-images",
    "1",
    "--checkpoint-every",
    "0",
    "--report-to",
    "none",
    "--mixed-precision",
    "no",
]


SD35 = ("stabilityai/stable-diffusion-3.5-medium", "stabilityai/stable-diffusion-3.5-large")
Z_IMAGE = "Tongyi-MAI/Z-Image"
KLEIN = ("black-forest-labs/FLUX.2-klein-4B", "black-forest-labs/FLUX.2-klein-9B")
QWEN_IMAGE = "Qwen/Qwen-Image"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A Hugging Face cache holding tiny pipelines under the real SDXL, SD 1.5 and SD 2.1 ids and tiny scorers under
    the ids `krona eval` uses by default."""
    root = tmp_path_factory.mktemp("hub")
    cache = root / "cache"
    put_in_hub_cache(make_tiny(root / "sdxl", arch="sdxl"), SDXL, cache)
    put_in_hub_cache(make_tiny(root / "sd15", arch="sd15"), SD15, cache)
    sd21 = make_tiny(root / "sd21", arch="sd15")
    scheduler = sd21 / "scheduler" / "scheduler_config.json"
    scheduler.write_text(scheduler.read_text().replace('"epsilon"', '"v_prediction"'))
    put_in_hub_cache(sd21, SD21, cache)
    sd3 = make_tiny(root / "sd3", arch="sd3")
    for repo in SD35:
        put_in_hub_cache(sd3, repo, cache)
    put_in_hub_cache(make_tiny(root / "z-image", arch="z-image"), Z_IMAGE, cache)
    put_in_hub_cache(make_tiny(root / "qwen-image", arch="qwen-image"), QWEN_IMAGE, cache)
    klein = make_tiny(root / "flux2", arch="flux2")
    for repo in KLEIN:
        put_in_hub_cache(klein, repo, cache)
    put_in_hub_cache(make_tiny_clip(root / "clip"), "openai/clip-vit-base-patch32", cache)
    put_in_hub_cache(make_tiny_dino(root / "dino"), "facebook/dino-vits16", cache)
    return cache


def fresh_shell(cache) -> dict:
    """The environment of a new terminal: none of setup.sh's variables, the hub offline, the cache standing in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "DIFFUSERS_", "KRONA_"))}
    return env | {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def krona(args, cwd, env):
    done = subprocess.run([str(KRONA), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"krona {' '.join(args)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_readme_commands_with_the_default_sdxl_model(hub_cache, tmp_path):
    """The README's train, sample and merge lines as written (train scaled down by flags), then, from another folder,
    the sample and merge commands the model card prints, and eval with its default scorer models."""
    env = fresh_shell(hub_cache)
    work = tmp_path / "work"
    shutil.copytree(EXAMPLES, work / "dog")
    krona(
        [
            "train",
            "--config",
            "sdxl",
            "--instance-dir",
            "dog/",
            "--prompt",
            "a photo of sks dog",
            "--class-prompt",
            "a photo of a dog",
            "--output-dir",
            "dog-run/",
            *SMALL_TRAIN,
        ],
        work,
        env,
    )
    krona(
        ["sample", "--adapter", "dog-run/adapter.safetensors", "--prompt", "a photo of sks dog on the moon", "-n", "4"],
        work,
        env,
    )
    assert len(list((work / "samples").glob("*.png"))) == 5  # four images and the grid
    krona(["merge", "--adapter", "dog-run/adapter.safetensors", "--output-dir", "dog-merged/"], work, env)
    assert (work / "dog-merged" / "model_index.json").is_file()

    run = work / "dog-run"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["pretrained-model"] == SDXL
    assert all(Path(config[k]).is_absolute() for k in ("instance-dir", "output-dir"))
    card = (run / "README.md").read_text()
    commands = [shlex.split(line) for line in card.splitlines() if line.startswith(("krona sample", "krona merge"))]
    assert [c[1] for c in commands] == ["sample", "merge"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for command in commands:
        assert str(run / "adapter.safetensors") in command and SDXL in command
        krona(command[1:], elsewhere, env)
    assert (elsewhere / "merged" / "model_index.json").is_file() and len(
        list((elsewhere / "samples").glob("*.png"))
    ) == 5
    krona(
        [
            "eval",
            "--images",
            "samples",
            "--reference",
            str(work / "dog"),
            "--prompt",
            "a photo of sks dog",
            "--output",
            "metrics.json",
        ],
        elsewhere,
        env,
    )
    metrics = json.loads((elsewhere / "metrics.json").read_text())
    assert metrics["generated"] == 4 and all(metrics[k] is not None for k in ("clip_i", "clip_t", "dino"))


@pytest.mark.slow
@pytest.mark.parametrize("repo", [SD15, SD21])
def test_sd_hub_ids_train_and_sample_offline(hub_cache, tmp_path, repo):
    """SD 1.5 (the sd15 preset's default) and SD 2.1 (v-prediction) by their hub ids, offline from the cache."""
    env = fresh_shell(hub_cache)
    base = ["--config", "sd15"] if repo == SD15 else ["--config", "sd15", "--pretrained-model", repo]
    done = krona(
        [
            "train",
            *base,
            "--instance-dir",
            str(EXAMPLES),
            "--prompt",
            "a photo of sks cat",
            "--output-dir",
            "run",
            *SMALL_TRAIN,
        ],
        tmp_path,
        env,
    )
    assert ("v-prediction" in done.stdout) == (repo == SD21)
    krona(
        ["sample", "--adapter", "run/adapter.safetensors", "--prompt", "sks cat", "-n", "1", "--sample-steps", "2"],
        tmp_path,
        env,
    )


@pytest.mark.slow
@pytest.mark.parametrize("repo", [*SD35, *KLEIN, QWEN_IMAGE, Z_IMAGE])
def test_transformer_families_hub_ids_train_sample_merge_and_export_offline(hub_cache, tmp_path, repo):
    """SD3.5 Medium and Large, FLUX.2 [klein] 4B and 9B, Qwen-Image and Z-Image by their hub ids, offline from the
    cache, from another folder in a fresh shell: a run with prior preservation (class images drawn by the model),
    then every command on its adapter (merged into a folder and into the single transformer file)."""
    env = fresh_shell(hub_cache)
    args = ["--pretrained-model", repo, "--instance-dir", str(EXAMPLES), "--prompt", "a photo of sks cat"]
    args += ["--class-prompt", "a photo of a cat", "--output-dir", "run", *SMALL_TRAIN]
    done = krona(["train", *args], tmp_path, env)
    said = " ".join(done.stdout.split())  # rich wraps long lines at the terminal's width
    arch, layout = ("sd3", "Stability's MMDiT layout")
    if repo in KLEIN:
        arch, layout = "flux2", "Black Forest Labs' layout"
    elif repo == Z_IMAGE:
        arch, layout = "z-image", "its original layout"
    elif repo == QWEN_IMAGE:
        arch, layout = "qwen-image", "its own names"
    assert f"{repo} ({arch}, flow-matching)" in said and f"transformer alone, in {layout}" in said
    adapter = ["--adapter", "run/adapter.safetensors"]
    small = ["--sample-steps", "2", "--width", "64", "--height", "64"]  # Qwen-Image's native side is 1024
    krona(["sample", *adapter, "--prompt", "sks cat", "-n", "1", *small], tmp_path, env)
    krona(["merge", *adapter, "--output-dir", "merged"], tmp_path, env)
    krona(["merge", *adapter, "--pretrained-model", repo, "--output", "merged.safetensors"], tmp_path, env)
    krona(["export", *adapter, "--to", "lycoris", "--output", "lokr.safetensors"], tmp_path, env)
    shown = krona(["inspect", "lokr.safetensors"], tmp_path, env).stdout
    assert repo in shown and arch in shown and "transformer" in shown
    assert (tmp_path / "merged" / "transformer").is_dir() and (tmp_path / "merged.safetensors").is_file()
    assert len(list((tmp_path / "run").rglob("class*/*.png"))) == 2


@pytest.mark.slow
def test_sd35_downloaded_without_t5_trains_samples_and_merges_with_drop_t5(tmp_path):
    """SD3.5 Large as `hf download ... --exclude "text_encoder_3/*" "tokenizer_3/*"` leaves it in the cache, by its hub
    id in a fresh shell from another folder: `--drop-t5` trains, and the sample and merge lines it prints work as
    printed; a merged folder (which would lack T5) is refused in one line, and so is sampling without the flag, which
    names it."""
    folder = make_tiny(tmp_path / "sd3", arch="sd3")
    shutil.rmtree(folder / "text_encoder_3")
    shutil.rmtree(folder / "tokenizer_3")
    put_in_hub_cache(folder, SD35[1], tmp_path / "cache")
    env, work = fresh_shell(tmp_path / "cache") | {"COLUMNS": "400"}, tmp_path / "work"  # the lines unwrapped
    work.mkdir()
    args = ["--pretrained-model", SD35[1], "--instance-dir", str(EXAMPLES), "--prompt", "a photo of sks cat"]
    done = krona(["train", *args, "--output-dir", "run", "--drop-t5", *SMALL_TRAIN], work, env)
    assert "Could not reach the Hub" not in done.stderr  # huggingface_hub's warning on every offline load, quieted
    printed = [shlex.split(line, comments=True) for line in done.stdout.splitlines() if line.startswith("  krona ")]
    sample = next(line for line in printed if line[1] == "sample")
    merge = next(line for line in printed if line[1] == "merge")
    assert "--drop-t5" in sample and "--drop-t5" in merge
    krona([*sample[1:], "-n", "1", "--sample-steps", "2", "--width", "64", "--height", "64"], work, env)
    krona(merge[1:], work, env)
    assert (work / "run.safetensors").is_file() and (work / "samples" / "grid.png").is_file()
    refused = subprocess.run(
        [str(KRONA), *merge[1:4], "--output-dir", "merged", "--drop-t5"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "a merged folder holds every text encoder" in refused.stderr and not (work / "merged").exists()
    forgot = [str(KRONA), *sample[1 : sample.index("--drop-t5")], "--output-dir", "forgot"]
    forgot = subprocess.run(forgot, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert forgot.returncode == 2 and len(forgot.stderr.strip().splitlines()) == 1, forgot.stderr
    assert forgot.stderr.strip().endswith("if it was downloaded without its T5, add --drop-t5")


@pytest.mark.slow
def test_hub_id_not_in_the_cache_offline_is_one_line(hub_cache, tmp_path):
    env = fresh_shell(hub_cache)
    done = subprocess.run(
        [str(KRONA), "sample", "--pretrained-model", "stabilityai/sdxl-turbo-2.0", "--prompt", "x"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "hf download stabilityai/sdxl-turbo-2.0" in lines[0] and "HF_HUB_OFFLINE" in lines[0]


def test_adapter_given_as_the_base_model_is_named(tmp_path, tiny_sd15_dir, capsys):
    from helpers import random_adapter

    from krona_cli.formats import save_adapter, save_lora, save_lycoris

    adapter = random_adapter("sd15")
    files = {
        "krona": save_adapter(tmp_path / "native.safetensors", adapter),
        "LyCORIS/kohya LoKr": tmp_path / "lokr.safetensors",
        "LoRA": tmp_path / "lora.safetensors",
    }
    save_lycoris(files["LyCORIS/kohya LoKr"], adapter)
    save_lora(files["LoRA"], adapter, rank=4)
    for kind, path in files.items():
        assert (
            main(["sample", "--pretrained-model", str(path), "--prompt", "x", "--output-dir", str(tmp_path / "s")]) == 2
        )
        err = capsys.readouterr().err
        assert f"is a {kind} adapter, not a base model" in err and "--adapter" in err
        assert len(err.strip().splitlines()) == 1


def test_local_path_wins_over_a_hub_id_of_the_same_spelling(tmp_path, tiny_sd15_dir, monkeypatch):
    """A folder named like a hub id (`org/model-1.0`) is the folder: what exists decides, not the spelling."""
    from krona_cli.pipeline.hub import locate

    folder = tmp_path / "org" / "model-1.0"
    shutil.copytree(tiny_sd15_dir, folder)
    monkeypatch.chdir(tmp_path)
    assert locate("org/model-1.0") == ("folder", folder)
    assert locate("org/other-1.0") == ("hub", "org/other-1.0")
