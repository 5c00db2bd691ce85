"""The model families as objects (krona_cli/families/): found by name, from a denoiser's config and from an adapter's
cross-attention width, with the real models' shipped configs."""

from types import SimpleNamespace

import pytest

from krona_cli import families
from krona_cli.architectures import load_model_config
from krona_cli.errors import KronaError
from krona_cli.pipeline.tiny import build_tiny_pipeline


def test_names_are_listed_in_registry_order_and_unknown_names_say_which_exist():
    assert [f.name for f in families.FAMILIES] == ["sdxl", "sd15", "sd2", "flux"]
    assert families.get("sd2").title == "SD 2.x"
    with pytest.raises(KronaError, match=r"unknown architecture 'flux9'; use one of sdxl, sd15, sd2, flux$"):
        families.get("flux9")
    # meta builds and `krona plan` need the real model's configs and layer list: SD 2.x has none shipped
    with pytest.raises(KronaError, match=r"unknown architecture 'sd2'; use one of sdxl, sd15, flux$"):
        families.with_layer_list("sd2")


@pytest.mark.parametrize(
    ("config", "name"), [("sdxl_unet.json", "sdxl"), ("sd15_unet.json", "sd15"), ("sd2_unet.json", "sd2")]
)
def test_the_shipped_unet_configs_are_recognised_as_their_family(config, name):
    assert families.recognise_denoiser(load_model_config(config)).name == name


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_tiny_unets_are_recognised_through_their_config_objects(arch):
    """Tiny UNets have odd cross-attention widths: SDXL by its text-time conditioning, anything else is SD 1.x."""
    unet = build_tiny_pipeline(arch).unet
    assert unet.config.cross_attention_dim not in {768, 1024, 2048}
    assert families.recognise_denoiser(unet.config).name == arch


def test_each_familys_components_name_configs_that_exist_and_the_denoiser_comes_first():
    for family in families.FAMILIES:
        roles = [c.role for c in family.components]
        assert roles[0] == "denoiser" and set(roles[1:]) == {"text"}
        for config in family.component_configs().values():
            assert load_model_config(config)
        widths = {load_model_config(c.config).get("cross_attention_dim") for c in family.components[:1]}
        assert widths == {family.context_width}


def test_adapters_are_placed_by_the_widths_their_cross_attention_reads():
    assert families.by_context_width({2048}) == "sdxl"
    assert families.by_context_width({768}) == "sd15"
    assert families.by_context_width({1024}) == "sd2"
    assert families.by_context_width({768, 2048}) is None  # two families: no guess
    assert families.by_context_width({100}) is None
    assert families.by_context_width(set()) is None


def test_default_resolutions():
    defaults = {f.name: f.default_resolution for f in families.FAMILIES}
    assert defaults == {"sdxl": 1024, "sd15": 512, "sd2": 512, "flux": 512}


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_a_loaded_pipeline_is_recognised_by_its_denoiser(arch):
    pipe = build_tiny_pipeline(arch)
    assert families.recognise_pipeline(pipe, "here").name == arch
    family = families.by_pipeline_class(type(pipe).__name__)
    assert family.pipeline_class == type(pipe).__name__
    assert ("safety_checker" in family.load_extras) == (arch == "sd15")  # SD 1.x/2.x load without their checker


def test_a_pipeline_krona_does_not_train_gets_one_line_naming_it():
    class AudioLDMPipeline:  # what matters is its class name and that no family claims its denoiser
        components = {"transformer": SimpleNamespace(config={"num_layers": 2}), "vae": object()}

    expected = r"^'m/x' is a AudioLDMPipeline, not a pipeline krona trains \(SDXL, SD 1\.x, SD 2\.x, FLUX\.1\)$"
    with pytest.raises(KronaError, match=expected):
        families.recognise_pipeline(AudioLDMPipeline(), "m/x")
    assert families.by_pipeline_class("AudioLDMPipeline") is None


def test_adapter_files_may_hold_every_familys_components_in_registry_order():
    assert families.components() == ("unet", "text_encoder", "text_encoder_2", "transformer")


def test_flux_takes_a_runs_flow_matching_settings_and_the_sd_families_refuse_them():
    flux = families.get("flux")
    tuned = flux.configured(guidance=1.0, max_sequence_length=64, weighting_scheme="logit_normal")
    assert (tuned.guidance, tuned.max_sequence_length, tuned.weighting) == (1.0, 64, "logit_normal")
    assert flux.configured() == flux and flux.guidance == 3.5 and flux.max_sequence_length == 512
    with pytest.raises(KronaError, match=r"^--max-sequence-length is at most 512 \(FLUX\.1's T5 context\)$"):
        flux.configured(max_sequence_length=513)
    assert families.get("sdxl").configured(guidance=None) == families.get("sdxl")
    expected = r"^--max-sequence-length applies to flow-matching models \(FLUX\.1\), not SDXL; leave it out$"
    with pytest.raises(KronaError, match=expected):
        families.get("sdxl").configured(max_sequence_length=77)
