"""The model families as objects (krona_cli/families/): found by name, from a denoiser's config and from an adapter's
cross-attention width, with the real models' shipped configs."""

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest

from krona_cli import families
from krona_cli.architectures import load_model_config
from krona_cli.errors import KronaError
from krona_cli.pipeline.tiny import build_tiny_pipeline


def test_names_are_listed_in_registry_order_and_unknown_names_say_which_exist():
    assert [f.name for f in families.FAMILIES] == [
        "sdxl",
        "sd15",
        "sd2",
        "flux",
        "sd3",
        "flux2",
        "qwen-image",
        "z-image",
    ]
    assert families.get("sd2").title == "SD 2.x"
    with pytest.raises(
        KronaError,
        match=r"unknown architecture 'flux9'; use one of sdxl, sd15, sd2, flux, sd3, flux2, qwen-image, z-image$",
    ):
        families.get("flux9")
    # meta builds and `krona plan` need the real model's configs and layer list: SD 2.x has none shipped
    with pytest.raises(
        KronaError, match=r"unknown architecture 'sd2'; use one of sdxl, sd15, flux, sd3, flux2, qwen-image, z-image$"
    ):
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
    assert defaults == {
        "sdxl": 1024,
        "sd15": 512,
        "sd2": 512,
        "flux": 512,
        "sd3": 512,
        "flux2": 1024,
        "qwen-image": 512,
        "z-image": 1024,
    }


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

    trained = r"\(SDXL, SD 1\.x, SD 2\.x, FLUX\.1, SD3, FLUX\.2 \[klein\], Qwen-Image, Z-Image\)$"
    expected = r"^'m/x' is a AudioLDMPipeline, not a pipeline krona trains " + trained
    with pytest.raises(KronaError, match=expected):
        families.recognise_pipeline(AudioLDMPipeline(), "m/x")
    assert families.by_pipeline_class("AudioLDMPipeline") is None


def test_adapter_files_may_hold_every_familys_components_in_registry_order():
    assert families.components() == ("unet", "text_encoder", "text_encoder_2", "transformer", "text_encoder_3")


def test_flux_takes_a_runs_flow_matching_settings_and_the_sd_families_refuse_them():
    flux = families.get("flux")
    tuned = flux.configured(guidance=1.0, max_sequence_length=64, weighting_scheme="logit_normal")
    assert (tuned.guidance, tuned.max_sequence_length, tuned.weighting) == (1.0, 64, "logit_normal")
    assert flux.configured() == flux and flux.guidance == 3.5 and flux.max_sequence_length is None
    # unset: the model's T5 tokenizer's length, at most FluxPipeline's 512
    lengths = [flux.sequence_length(SimpleNamespace(model_max_length=n)) for n in (32, 512, int(1e30))]
    assert lengths == [32, 512, 512] and tuned.sequence_length(SimpleNamespace(model_max_length=32)) == 64
    with pytest.raises(KronaError, match=r"^--max-sequence-length is at most 512 \(FLUX\.1's T5 context\)$"):
        flux.configured(max_sequence_length=513)
    assert families.get("sdxl").configured(guidance=None) == families.get("sdxl")
    expected = r"^--max-sequence-length does not apply to SDXL models; leave it out$"
    with pytest.raises(KronaError, match=expected):
        families.get("sdxl").configured(max_sequence_length=77)


def test_what_files_and_other_tools_call_each_family():
    sdxl, sd15, sd2, flux, sd3, flux2, qwen_image, z_image = families.FAMILIES
    assert [f.buckets_by_default for f in families.FAMILIES] == [True] + [False] * 7
    assert qwen_image.trained_text() == () and qwen_image.single_file.layout == "diffusers"
    assert flux2.trained_text() == () and flux2.single_file.layout == "flux2"
    assert z_image.trained_text() == () and z_image.single_file.layout == "z_image"
    assert sd3.kohya_prefixes() == {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    assert sd3.trained_text() == ("text_encoder", "text_encoder_2") and sd3.single_file.layout == "sd3"
    assert sd3.ui.base_id(None, "stabilityai/stable-diffusion-3.5-large") == "stable-diffusion-3.5-large"
    assert sdxl.kohya_prefixes() == {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    assert sd15.kohya_prefixes() == sd2.kohya_prefixes() == {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    assert flux.kohya_prefixes() == {} and flux.file_naming == "flux_names" and flux.single_file.denoiser_only
    # modelspec: SD 2.x's id and default resolution follow the prediction type; FLUX.1 [schnell] by its name
    assert (sd2.ui.base_id("v", None), sd2.ui.default_resolution("v")) == ("stable-diffusion-v2-768-v", 768)
    assert (sd2.ui.base_id(None, "x"), sd2.ui.default_resolution(None)) == (None, None)
    assert flux.ui.base_id(None, "black-forest-labs/FLUX.1-Schnell") == "flux-1-schnell"
    assert flux.ui.base_id(None, None) == "flux-1-dev" and sdxl.ui.base_id("v", "schnell") == sdxl.ui.modelspec_id
    assert set(families.get("sdxl").single_file_configs()) == {
        "unet",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "scheduler",
    }
    assert flux.single_file_configs() == {}


def test_single_files_are_recognised_by_the_first_key_that_marks_a_family():
    assert families.recognise_keys(["model.diffusion_model.x", "cond_stage_model.model.ln_final.weight"]).name == "sd2"
    keys = ["cond_stage_model.transformer.x", "conditioner.embedders.1.model.ln_final.weight"]
    assert families.recognise_keys(keys).name == "sd15"
    assert families.recognise_keys(["conditioner.embedders.0.transformer.x"]) is None


def test_adapter_files_are_recognised_by_denoiser_version_text_encoders_then_width():
    width = {"unet": {"down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": SimpleNamespace(shape=(8, 1024))}}
    recognise = families.recognise_adapter
    flux_only = {"transformer": {"single_transformer_blocks.0.proj_mlp": None, "transformer_blocks.0.attn.to_q": None}}
    assert recognise({"ss_base_model_version": "sdxl_base_v1-0"}, flux_only) == "flux"
    # a transformer FLUX.1 and SD3 both have: the first family (registry order) whose real model has every module
    assert recognise({}, {"transformer": {"transformer_blocks.0.attn.add_k_proj": None}}) == "flux"
    assert recognise({}, {"transformer": {"transformer_blocks.3.attn2.to_q": None}}) == "sd3"  # SD3.5 Medium's
    assert recognise({}, {"transformer": {"noise_refiner.1.attention.to_q": None}}) == "z-image"
    assert recognise({}, {"transformer": {"single_transformer_blocks.0.attn.to_qkv_mlp_proj": None}}) == "flux2"
    assert recognise({}, {"transformer": {"transformer_blocks.0.img_mlp.net.2": None}}) == "qwen-image"
    assert recognise({"ss_base_model_version": "sdxl_base_v1-0"}, width) == "sdxl"
    assert recognise({"ss_base_model_version": "flux1"}, width) == "flux"
    assert recognise({"ss_base_model_version": "sd_v1"}, width, 2) == "sd15"
    assert recognise({"ss_base_model_version": "sd_v2"}, width) is None  # not read as SD 2.x, as before
    assert recognise({}, width, 2) == "sdxl" and recognise({}, width, 1) == "sd15"
    assert recognise({}, width) == "sd2" and recognise({}, {}) is None


# --- the rule: nothing outside a family module branches on the family ----------------------------------------------

PACKAGE = Path(families.__file__).resolve().parent.parent
# The tiny and toy test models are per-family fixtures (their builders are the families' test doubles). Defaults that
# name a family (cli's `--arch sdxl`, study.py's default toy, CONFIG_PRESETS) are settings, not branches: a keyword, a
# parameter default or a tuple is never flagged.
ALLOWED = {"pipeline/tiny.py", "pipeline/tiny_flux.py", "pipeline/toy.py"}


def _names_family(node: ast.AST) -> bool:
    """A family-name string literal, or a tuple, list or set of them (`arch in ("sdxl", "sd2")`)."""
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_names_family(element) for element in node.elts)
    return isinstance(node, ast.Constant) and node.value in {f.name for f in families.FAMILIES}


def family_branches(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) of every place that compares with, keys a dict by or subscripts with a family's name."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            equality = (ast.Eq, ast.NotEq, ast.In, ast.NotIn)
            if any(isinstance(op, equality) for op in node.ops) and any(_names_family(s) for s in sides):
                found.append((node.lineno, "comparison"))
        elif isinstance(node, ast.Dict) and any(k is not None and _names_family(k) for k in node.keys):
            found.append((node.lineno, "dict key"))
        elif isinstance(node, ast.Subscript) and _names_family(node.slice):
            found.append((node.lineno, "subscript"))
        elif isinstance(node, ast.MatchValue) and _names_family(node.value):
            found.append((node.lineno, "match case"))
    return found


def test_the_scan_finds_each_kind_of_family_branch():
    source = 'a == "sdxl"\nb in ("sd15", "x")\n{"sd2": 1}\nc["flux"]\nf(arch="sdxl")\nd = ("sdxl", "sd15")\n'
    assert family_branches(ast.parse(source)) == [
        (1, "comparison"),
        (2, "comparison"),
        (3, "dict key"),
        (4, "subscript"),
    ]


def test_no_family_branches_outside_families():
    """What a family knows lives in its module (krona_cli/families/): everything else asks the family (its fields,
    the registry) rather than comparing names."""
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(PACKAGE).as_posix()
        if where.startswith("families/") or where in ALLOWED:
            continue
        hits += [f"{where}:{line} {what}" for line, what in family_branches(ast.parse(path.read_text()))]
    assert hits == []


@pytest.mark.parametrize(
    "arch, distilled, variant",
    [
        ("sdxl", False, ""),
        ("flux", False, "[dev]"),
        ("flux-schnell", False, "[schnell]"),
        ("sd3", False, ""),
        ("flux2", False, "base"),
        ("flux2", True, "distilled"),
        ("qwen-image", False, ""),
        ("z-image", False, ""),
    ],
)
def test_sampling_defaults_are_the_variant_the_pipeline_is(arch, distilled, variant):
    """FLUX.1 [dev] and [schnell] by the guidance embedding, FLUX.2 [klein]'s step-distilled releases by the
    pipeline's `is_distilled`; the others have one."""
    pipe = build_tiny_pipeline(arch)
    if distilled:
        pipe.register_to_config(is_distilled=True)
    family = families.recognise_pipeline(pipe, arch)
    assert family.sampler_variant(pipe) == variant
    assert family.sampler_defaults(pipe) == family.samplers[variant]


def test_help_texts_give_every_familys_default():
    """`families.in_words` lists each family (and variant) once, with its own value: read back, the text is the data."""
    text = families.in_words(lambda f: {variant: d.steps for variant, d in f.samplers.items()})
    read = {}
    for group in text.split("; "):
        value, names = group.split(" for ", 1)
        for name in names.replace(" and ", ", ").split(", "):
            assert name not in read, name
            read[name] = int(value)
    want = {f"{f.title} {v}".strip(): d.steps for f in families.FAMILIES for v, d in f.samplers.items()}
    assert read == want and len(text.split("; ")) == len(set(want.values()))
