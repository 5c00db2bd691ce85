"""Train settings: YAML files and presets, flag overrides, validation errors that name the flag, typer options."""

import dataclasses
import re
from pathlib import Path

import pytest
import typer
import typer.rich_utils
import yaml
from typer.testing import CliRunner

from krona_cli.architectures import CONFIGS_DIR
from krona_cli.errors import KronaError
from krona_cli.training.config import CONFIG_PRESETS, RENAMED, TrainConfig, load_config, with_train_options

DATA = {"instance_dir": "photos", "prompt": "a photo of sks dog"}
DATA_FLAGS = ("--instance-dir", "photos", "--prompt", "a photo of sks dog")
FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error(path_or_none, overrides=DATA) -> str:
    with pytest.raises(KronaError) as info:
        load_config(path_or_none, overrides)
    return str(info.value)


# --- files, presets and overrides ---------------------------------------------------------------------------------


def test_defaults_need_only_data():
    cfg = load_config(None, DATA)
    assert cfg == TrainConfig(**DATA).with_absolute_paths()
    assert TrainConfig().validate(require_data=False).factors == "64x4"


def test_yaml_round_trip_gives_an_equal_config(tmp_path):
    cfg = load_config(
        None,
        {
            **DATA,
            "lr": 3e-4,
            "sample_prompt": ["a", "b: c"],
            "class_prompt": "yes",
            "mixed_precision": "no",
            "snr_gamma": 5.0,
            "resolution": 96,
            "ema": True,
        },
    )
    assert list(cfg.to_dict()) == [f.replace("_", "-") for f in FIELDS]
    assert load_config(write(tmp_path, cfg.to_yaml()), {}) == cfg


def test_flags_beat_the_file_and_none_means_not_given(tmp_path):
    path = write(tmp_path, "steps: 50\nlr: 2.0e-4\nprompt: from file\ninstance-dir: photos\n")
    cfg = load_config(path, {"steps": 7, "lr": None, "prompt": "from flag"})
    assert (cfg.steps, cfg.lr, cfg.prompt) == (7, 2e-4, "from flag")


def test_yaml_values_are_coerced_to_the_field_types(tmp_path):
    path = write(tmp_path, "instance_dir: photos\nprompt: p\nlr: 1e-4\nscale: 2\nsample-prompt: one prompt\n")
    cfg = load_config(path, {})
    assert (cfg.instance_dir, cfg.lr, cfg.scale, cfg.sample_prompt) == (
        str(Path("photos").absolute()),
        1e-4,
        2.0,
        ["one prompt"],
    )
    assert isinstance(cfg.scale, float)


def test_an_empty_file_is_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "# nothing yet\n"), DATA) == TrainConfig(**DATA).with_absolute_paths()


def test_paths_are_saved_absolute_and_hub_ids_as_given(tmp_path, monkeypatch):
    """config.yaml must work from any folder: local paths become absolute, a base model that is no local path stays
    a hub id, and an existing folder spelled like a hub id is that folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "model-1.0").mkdir(parents=True)
    cfg = load_config(None, {**DATA, "output_dir": "out", "class_dir": "~/classes", "vae": "madebyollin/sdxl-vae"})
    assert cfg.instance_dir == str(tmp_path / "photos") and cfg.output_dir == str(tmp_path / "out")
    assert cfg.class_dir == str(Path("~/classes").expanduser())
    assert cfg.pretrained_model == "stabilityai/stable-diffusion-xl-base-1.0" and cfg.vae == "madebyollin/sdxl-vae"
    assert load_config(None, {**DATA, "pretrained_model": "org/model-1.0"}).pretrained_model == str(
        tmp_path / "org" / "model-1.0"
    )


@pytest.mark.parametrize("name", CONFIG_PRESETS)
def test_each_preset_loads_validates_and_explains_itself(name):
    text = (CONFIGS_DIR / f"{name}.yaml").read_text()
    assert text.startswith("# ")
    keys = set(yaml.safe_load(text))
    assert not keys & {"instance-dir", "class-dir", "output-dir", "vae", "resume"}  # no paths to data or models
    assert ("pretrained-model" in keys) == (name not in ("tiny", "toy"))  # the folder a make- command wrote
    assert load_config(name, DATA).prompt == DATA["prompt"]


def test_preset_values():
    sdxl, sd15, tiny = (load_config(name, DATA) for name in ("sdxl", "sd15", "tiny"))
    assert (sdxl.resolution, sdxl.mixed_precision, sdxl.gradient_checkpointing) == (1024, "bf16", True)
    assert (sdxl.factors, sdxl.lr, sdxl.steps, sdxl.class_prompt) == ("64x4", 5e-4, 1000, None)
    assert (sd15.pretrained_model, sd15.resolution) == ("stable-diffusion-v1-5/stable-diffusion-v1-5", 512)
    assert (tiny.resolution, tiny.factors, tiny.steps, tiny.lr) == (64, "8x4", 30, 1e-3)
    assert (tiny.report_to, tiny.mixed_precision, tiny.pretrained_model) == ("none", "no", TrainConfig.pretrained_model)


def test_a_file_beats_a_preset_of_the_same_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "steps: 3\n", name="tiny")
    assert load_config("tiny", DATA).steps == 3


def test_a_folder_of_a_presets_name_does_not_hide_the_preset(tmp_path, monkeypatch):
    """`krona make-tiny tiny && krona train --config tiny ...`: the folder is the model, the preset is the config."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    assert load_config("tiny", DATA).steps == load_config(CONFIGS_DIR / "tiny.yaml", DATA).steps


# --- errors ---------------------------------------------------------------------------------------------------------


def test_missing_file_names_the_presets(tmp_path):
    message = error(tmp_path / "nope.yaml")
    assert "nope.yaml' does not exist" in message and "sdxl, sd15, tiny" in message


def test_bad_yaml_names_the_line(tmp_path):
    message = error(write(tmp_path, "steps: 5\nlr: 1e-4: 2\n"))
    assert "run.yaml' is not valid YAML (line 2, column 9): mapping values are not allowed here" in message


def test_top_level_must_be_a_mapping(tmp_path):
    assert "mapping" in error(write(tmp_path, "- steps\n- 5\n"))


@pytest.mark.parametrize(
    "key, suggestion",
    [
        ("lerning-rate", "lr"),
        ("learning_rate", "lr"),
        ("stpes", "steps"),
        ("max-train-steps", "steps"),
        ("instance-data-dir", "instance-dir"),
        ("factor", "factors"),
    ],
)
def test_unknown_key_suggests_the_closest(tmp_path, key, suggestion):
    message = error(write(tmp_path, f"{key}: 1\n"))
    assert f"unknown key '{key}' in run.yaml; did you mean '{suggestion}'?" == message


def test_unknown_key_without_a_close_match(tmp_path):
    assert "krona train --help" in error(write(tmp_path, "zzzzzz: 1\n"))


def test_a_config_key_inside_a_config_is_an_error(tmp_path):
    assert "'config' in run.yaml" in error(write(tmp_path, "config: sdxl\n"))


def test_the_same_key_twice_is_an_error(tmp_path):
    assert "'grad-accum' is given twice" in error(write(tmp_path, "grad-accum: 2\ngrad_accum: 3\n"))


@pytest.mark.parametrize(
    "line, message",
    [
        ("steps: abc", "'steps' in run.yaml must be an integer, got 'abc'"),
        ("steps: 2.5", "'steps' in run.yaml must be an integer, got 2.5"),
        ("lr: fast", "'lr' in run.yaml must be a number, got 'fast'"),
        ("center-crop: 'yes'", "'center-crop' in run.yaml must be true or false, got 'yes'"),
        ("mixed-precision: no", "'mixed-precision' in run.yaml must be a string (quote it"),
        ("sample-prompt: [a, 1]", "'sample-prompt' in run.yaml must be a string or a list of strings"),
        ("steps:", "'steps' in run.yaml cannot be empty"),
    ],
)
def test_wrong_types_name_the_key(tmp_path, line, message):
    assert error(write(tmp_path, line + "\n")).startswith(message)


def test_wrong_override_types_name_the_flag():
    assert error(None, {**DATA, "steps": "abc"}).startswith("--steps must be an integer")


@pytest.mark.parametrize(
    "field, value, message",
    [
        (
            "lr_scheduler",
            "cosin",
            "--lr-scheduler must be one of constant, constant_with_warmup, cosine, linear, polynomial; got 'cosin'",
        ),
        ("adapter_type", "loha", "--adapter-type must be one of kron, lora"),
        ("targets", "text", "--train-text-encoder"),
        ("optimizer", "sgd", "--optimizer must be one of"),
        ("mixed_precision", "fp8", "--mixed-precision must be one of"),
        ("report_to", "comet", "--report-to must be one of"),
        ("steps", 0, "--steps must be at least 1; got 0"),
        ("batch_size", 0, "--batch-size must be at least 1"),
        ("grad_accum", 0, "--grad-accum must be at least 1"),
        ("repeats", 0, "--repeats must be at least 1"),
        ("num_class_images", -1, "--num-class-images must be at least 0"),
        ("rank", 0, "--rank must be at least 1"),
        ("sample_images", 0, "--sample-images must be at least 1"),
        ("lr", 0.0, "--lr must be greater than 0"),
        ("text_encoder_lr", -1.0, "--text-encoder-lr must be greater than 0"),
        ("ema_decay", 1.0, "--ema-decay must be less than 1"),
        ("ema_decay", 0.0, "--ema-decay must be greater than 0"),
        ("resolution", 100, "--resolution must be a multiple of 8"),
        ("resolution", 0, "--resolution must be at least 8"),
        ("factors", "64by4", "--factors: factors '64by4' are not of the form OxI"),
        ("text_encoder_factors", "0x4", "--text-encoder-factors: factors '0x4' must be positive"),
        ("targets", "to_(q", "--targets: targets 'to_(q' is neither a preset"),
        ("instance_dir", None, "--instance-dir is required"),
        ("prompt", " ", "--prompt is required"),
    ],
)
def test_validation_errors_name_the_flag(field, value, message):
    cfg = dataclasses.replace(TrainConfig(**DATA), **{field: value})
    with pytest.raises(KronaError, match=re.escape(message)):
        cfg.validate()


@pytest.mark.parametrize("adapter", ["lora", "lokr"])
def test_kron_init_is_refused_where_no_kronecker_factor_is_drawn(adapter):
    cfg = dataclasses.replace(TrainConfig(**DATA), adapter_type=adapter, kron_init="invariant")
    with pytest.raises(KronaError, match=re.escape(f"--adapter-type {adapter} has none: leave --kron-init out")):
        cfg.validate()
    dataclasses.replace(cfg, kron_init="normal").validate()  # the default, given or not


def test_require_data_false_skips_the_data_check():
    assert TrainConfig().validate(require_data=False).instance_dir is None
    with pytest.raises(KronaError, match="--instance-dir"):
        TrainConfig().validate()


# --- derived values ---------------------------------------------------------------------------------------------


def test_effective_learning_rates():
    assert TrainConfig().effective_lr() == 5e-4
    assert TrainConfig(adapter_type="lora").effective_lr() == 1e-4
    assert TrainConfig(lr=2e-3).effective_text_encoder_lr() == 2e-3
    assert TrainConfig(lr=2e-3, text_encoder_lr=1e-5).effective_text_encoder_lr() == 1e-5


def test_config_hash_covers_the_run_not_its_outputs():
    base = TrainConfig(**DATA)
    digest = base.config_hash()
    assert re.fullmatch(r"[0-9a-f]{64}", digest) and TrainConfig(**DATA).config_hash() == digest
    same = dict(
        output_dir="elsewhere",
        resume="latest",
        dry_run=True,
        overwrite=True,
        sample_prompt=["x"],
        sample_every=1,
        report_to="none",
        checkpoint_every=1,
        keep_checkpoints=0,
        lr=5e-4,
        steps=5000,
        gradient_checkpointing=True,
        cache_latents=False,
        class_batch_size=1,
        batch_size=4,
        grad_accum=2,
    )
    assert dataclasses.replace(base, **same).config_hash() == digest
    for change in ({"mixed_precision": "bf16"}, {"factors": "8x4"}, {"seed": 1}, {"prompt": "other"}, {"lr": 1e-3}):
        assert dataclasses.replace(base, **change).config_hash() != digest, change


# --- typer ------------------------------------------------------------------------------------------------------


@pytest.fixture()
def cli(monkeypatch):
    """A throwaway app with the train options, recording what reaches the command; wide help (no truncated flags)."""
    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", 220)
    seen = {}
    app = typer.Typer()

    @app.callback()
    def _root():
        pass

    @app.command("train")
    @with_train_options
    def train(config=None, **overrides):
        seen.update(overrides, config=config)
        seen["cfg"] = load_config(config, overrides)

    def run(*args):
        result = CliRunner().invoke(app, ["train", *args])
        return result, seen

    return run


def test_help_lists_every_flag(cli):
    result, _ = cli("--help")
    assert result.exit_code == 0
    for name in FIELDS:
        flag = "--" + name.replace("_", "-")
        assert re.search(rf"{flag}\b(?!-)", result.output), flag
    for flag in (
        "--config",
        "--no-cache-latents",
        "--no-train-text-encoder",
        "[default: (1000)]",
        "[default: (1024 for SDXL, 512 otherwise)]",
        "One of: no, fp16, bf16",
    ):
        assert flag in result.output, flag


def test_flags_reach_the_command_typed_and_absent_ones_as_none(cli):
    result, seen = cli(
        *DATA_FLAGS,
        "--steps",
        "5",
        "--no-cache-latents",
        "--sample-prompt",
        "a",
        "--sample-prompt",
        "b",
        "--lr",
        "1e-3",
    )
    assert result.exit_code == 0, result.output
    assert seen["steps"] == 5 and type(seen["steps"]) is int
    assert seen["cache_latents"] is False and seen["sample_prompt"] == ["a", "b"] and seen["lr"] == 1e-3
    assert seen["config"] is None and seen["rank"] is None and seen["ema"] is None
    assert set(seen) == {*FIELDS, *(old.replace("-", "_") for old in RENAMED), "config", "cfg"}


def test_a_renamed_setting_still_works_with_a_note(tmp_path):
    """`adapter` (a type in train, a file everywhere else) is `adapter-type` now; the old flag and YAML key work."""
    notes = []
    assert load_config(None, {**DATA, "adapter": "lora"}, notes).adapter_type == "lora"
    assert notes == ["--adapter is now --adapter-type (the old name goes in the next release)"]
    notes = []
    assert load_config(write(tmp_path, "adapter: lora\n"), DATA, notes).adapter_type == "lora"
    assert len(notes) == 1 and "'adapter'" in notes[0] and "'adapter-type'" in notes[0]
    assert load_config(None, {**DATA, "adapter": "lora", "adapter_type": "kron"}).adapter_type == "kron"


def test_config_preset_and_flags_together(cli):
    result, seen = cli("--config", "tiny", "--steps", "7", *DATA_FLAGS)
    assert result.exit_code == 0, result.output
    tiny = load_config("tiny", DATA)
    assert seen["cfg"] == dataclasses.replace(tiny, steps=7)


def test_bad_flag_values_are_usage_errors(cli):
    result, _ = cli("--steps", "many")
    assert result.exit_code == 2 and "--steps" in result.output


def test_the_weighting_scheme_choices_are_the_flow_matching_objectives():
    from krona_cli.families.flow_match import WEIGHTINGS
    from krona_cli.training.config import WEIGHTING_SCHEMES

    assert WEIGHTING_SCHEMES == WEIGHTINGS


def test_the_model_card_names_an_init_other_than_the_papers(tmp_path):
    from krona_cli.training.card import write_model_card

    for init, shown in (("invariant", True), ("normal", False)):
        cfg = dataclasses.replace(TrainConfig(**DATA), kron_init=init)
        card = write_model_card(tmp_path, cfg, "sdxl", 10, 1000, None).read_text()
        assert ("`--kron-init invariant`" in card) is shown
