"""Single-file checkpoints: `krona merge --output X.safetensors` writes one, and krona trains, samples and merges
from one offline; files from other tools get the shipped configs and CLIP's own tokenizer."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from krona_cli.cli import main
from krona_cli.formats import collect_adapter, save_adapter
from krona_cli.formats.original_layout import save_single_file, to_original
from krona_cli.inference.merge import pipeline_components
from krona_cli.kron import adapted_layers, inject
from krona_cli.pipeline.clip_tokenizer import clip_tokenizer
from krona_cli.pipeline.models import load_pipeline
from krona_cli.pipeline.single_file import (
    METADATA_KEY,
    PIPELINES,
    _shipped,
    _tokenizers,
    _write_config_folder,
    describe_file,
    pipeline_description,
)
from krona_cli.pipeline.tiny import build_tiny_pipeline, clip_text_config, make_tiny
from krona_cli.pipeline.toy import build_toy_pipeline, make_toy

EXAMPLES = __import__("pathlib").Path(__file__).resolve().parent.parent / "examples" / "cat"


def test_clip_tokenizer_is_openais():
    """Token ids of the real CLIP tokenizer, as published with SD (e.g. diffusers' docs and countless notebooks)."""
    tokenizer = clip_tokenizer()
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]
    assert tokenizer("a photo of an astronaut riding a horse on mars").input_ids == [
        49406,
        320,
        1125,
        539,
        550,
        18376,
        6765,
        320,
        4558,
        525,
        7496,
        49407,
    ]
    assert clip_tokenizer().pad_token_id == 49407 and clip_tokenizer("!").pad_token_id == 0


@pytest.mark.parametrize("arch", sorted(PIPELINES))
def test_shipped_configs_make_a_folder_diffusers_reads(arch, tmp_path):
    """What a single file from another tool gets: every component builds from the written config folder (on the meta
    device), with the real sizes, and the pipeline class and tokenizers are SD's."""
    import diffusers
    import transformers

    description = _shipped(arch)
    _write_config_folder(tmp_path, description)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == ("StableDiffusionXLPipeline" if arch == "sdxl" else "StableDiffusionPipeline")
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel.from_config(diffusers.UNet2DConditionModel.load_config(tmp_path / "unet"))
        config = transformers.CLIPTextConfig.from_pretrained(tmp_path / "text_encoder")
    assert unet.config.cross_attention_dim == {"sdxl": 2048, "sd15": 768, "sd2": 1024}[arch]
    assert config.hidden_size == {"sdxl": 768, "sd15": 768, "sd2": 1024}[arch]
    assert hasattr(transformers, index["text_encoder"][1])
    scheduler = getattr(diffusers, index["scheduler"][1]).from_pretrained(tmp_path / "scheduler")
    assert scheduler.config.get("prediction_type", "epsilon") == ("v_prediction" if arch == "sd2" else "epsilon")
    tokenizers = _tokenizers(description)
    assert all(len(t) == 49408 for t in tokenizers.values())


def test_other_tools_files_are_told_apart_by_their_keys(tmp_path):
    assert (
        describe_file(tmp_path / "x", ["conditioner.embedders.1.model.ln_final.weight"], {})["class"]
        == "StableDiffusionXLPipeline"
    )
    sd2 = describe_file(tmp_path / "x", ["cond_stage_model.model.ln_final.weight"], {})
    assert sd2["components"]["scheduler"]["prediction_type"] == "v_prediction"
    from krona_cli.errors import KronaError

    with pytest.raises(KronaError, match="not a model checkpoint krona knows"):
        describe_file(tmp_path / "x", ["model.diffusion_model.foo", "some.other.key"], {})


# every pipeline krona makes: (maker, architecture); the toy SDXL's two text encoders are equally wide, the tiny one's
# are not
MADE = [("tiny", "sdxl"), ("tiny", "sd15"), ("toy", "sdxl"), ("toy", "sd15")]


def _random_adapter(pipe, arch, seed=3):
    """Kronecker adapters on every UNet attention and feed-forward layer (4x4) and text encoder layer (2x2) of `pipe`,
    random B, collected."""
    components = pipeline_components(pipe)
    torch.manual_seed(seed)
    for name, model in components.items():
        inject(model, targets="attn-ff" if name == "unet" else "text", factors="4x4" if name == "unet" else "2x2")
    for model in components.values():
        for layer in adapted_layers(model).values():
            with torch.no_grad():
                layer.kron_b.normal_(std=0.05)
    targets = {c: ("attn-ff" if c == "unet" else "text") for c in components}
    return collect_adapter(components, base_model=arch, architecture=arch, targets=targets)


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """(maker, arch) -> (arch, root): that pipeline, merged with a random adapter into a diffusers folder
    (root/merged) and a single file (root/merged.safetensors), both fp32; each made once per module."""
    made = {}

    def get(maker, arch):
        if (maker, arch) not in made:
            root = tmp_path_factory.mktemp(f"single-{maker}-{arch}")
            base = (make_toy if maker == "toy" else make_tiny)(root / maker, arch=arch)
            build = build_toy_pipeline if maker == "toy" else build_tiny_pipeline
            adapter = save_adapter(root / "adapter.safetensors", _random_adapter(build(arch), arch))
            common = ["merge", "--adapter", str(adapter), "--pretrained-model", str(base), "--dtype", "fp32"]
            assert main([*common, "--output-dir", str(root / "merged")]) == 0
            assert main([*common, "--output", str(root / "merged.safetensors")]) == 0
            made[maker, arch] = arch, root
        return made[maker, arch]

    return get


@pytest.fixture(scope="module", params=["sdxl", "sd15"])
def single_file(request, merged):
    """A tiny pipeline merged with a random adapter, as a diffusers folder and as a single file."""
    return merged("tiny", request.param)


@pytest.fixture(scope="module", params=MADE, ids=[f"{m}-{a}" for m, a in MADE])
def any_single_file(request, merged):
    """Every pipeline krona makes merged with a random adapter, as a diffusers folder and as a single file."""
    return merged(*request.param)


def test_merged_single_file_reads_back_as_the_folder(any_single_file):
    """Every weight of the single file, read offline by krona through diffusers' own converter, equals the merged
    diffusers folder's (none left unloaded), and the file names the adapter it carries."""
    arch, root = any_single_file
    folder, _ = load_pipeline(str(root / "merged"))
    file, file_arch = load_pipeline(str(root / "merged.safetensors"))
    assert file_arch == arch and type(file) is type(folder)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(folder, name, None) is None:
            continue
        a, b = getattr(folder, name).state_dict(), getattr(file, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert file.tokenizer.get_vocab() == folder.tokenizer.get_vocab()
    from safetensors import safe_open

    with safe_open(str(root / "merged.safetensors"), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert json.loads(meta["krona_merge"])["adapters"][0]["file"] == str(root / "adapter.safetensors")
    assert METADATA_KEY in meta and not any(k.startswith("unet.") for k in keys)


def test_single_file_samples_the_same_images_as_the_folder(any_single_file, tmp_path):
    """`krona sample` from the merged single file of every pipeline krona makes gives the merged folder's image."""
    arch, root = any_single_file
    prompt = ["--prompt", "a photo of sks square", "-n", "1", "--sample-steps", "2", "--width", "64", "--height", "64"]
    assert (
        main(["sample", "--pretrained-model", str(root / "merged"), *prompt, "--output-dir", str(tmp_path / "a")]) == 0
    )
    assert (
        main(
            [
                "sample",
                "--pretrained-model",
                str(root / "merged.safetensors"),
                *prompt,
                "--output-dir",
                str(tmp_path / "b"),
            ]
        )
        == 0
    )
    # the same images up to float rounding: the weights are bit-identical, but a matmul's last bit depends on where its
    # operands lie in memory (F.linear(h, W) and F.linear(h, W.clone()) differ by 2e-7 here), so a pixel may move by 1
    a, b = (np.asarray(Image.open(tmp_path / d / "p00-s0.png")).astype(int) for d in ("a", "b"))
    assert a.shape == b.shape and np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01


def test_single_file_base_trains_and_merges(single_file, tmp_path):
    """A single-file base trains (its path is saved absolute), and the adapter merges into it again."""
    arch, root = single_file
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--config",
                "tiny",
                "--pretrained-model",
                str(root / "merged.safetensors"),
                "--instance-dir",
                str(EXAMPLES),
                "--prompt",
                "a photo of sks cat",
                "--steps",
                "2",
                "--output-dir",
                str(out),
            ]
        )
        == 0
    )
    assert (
        main(["merge", "--adapter", str(out / "adapter.safetensors"), "--output", str(tmp_path / "again.safetensors")])
        == 0
    )
    from safetensors import safe_open

    with safe_open(str(tmp_path / "again.safetensors"), "pt") as f:  # a single file defaults to fp16, as shared
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # checkpoints are
    again, _ = load_pipeline(str(tmp_path / "again.safetensors"))
    assert again.unet.dtype == torch.float32  # loaded in the dtype asked for


def test_merge_output_mistakes_are_one_line(single_file, tmp_path, capsys):
    arch, root = single_file
    adapter = str(root / "adapter.safetensors")
    cases = [
        (["--output", str(tmp_path / "model.ckpt")], "must end in .safetensors"),
        (["--output", str(root / "merged.safetensors")], "exists"),
        (["--output-dir", str(tmp_path / "d"), "--output", str(tmp_path / "m.safetensors")], "one of them"),
        (["--format", "single-file", "--output-dir", str(tmp_path / "d")], "--output"),
    ]
    for flags, expected in cases:
        assert main(["merge", "--adapter", adapter, *flags]) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1


def test_sdxl_text_encoders_read_back_apart_whatever_their_widths(tmp_path):
    """diffusers gives a CLIP text model as wide as SDXL's first encoder that encoder's weights: an SDXL whose second
    encoder is as wide as its first (here also with a narrower projection) still reads back its own second encoder."""
    from transformers import CLIPTextModelWithProjection

    pipe = build_tiny_pipeline("sdxl")
    width = pipe.text_encoder.config.hidden_size
    config = clip_text_config(pipe.tokenizer_2, width, "gelu").to_dict() | {"projection_dim": width // 2}
    torch.manual_seed(7)
    pipe.text_encoder_2 = CLIPTextModelWithProjection(type(pipe.text_encoder.config)(**config)).eval()
    path = save_single_file(
        pipe, tmp_path / "m.safetensors", torch.float32, {METADATA_KEY: json.dumps(pipeline_description(pipe))}
    )
    loaded, arch = load_pipeline(str(path))
    assert arch == "sdxl"
    for name in ("text_encoder", "text_encoder_2"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert loaded.text_encoder_2.text_projection.weight.shape == (width // 2, width)


def test_original_layout_of_a_pipeline_has_no_diffusers_keys():
    """A sanity check of what A1111/ComfyUI look for first: the original prefixes only."""
    keys = to_original(build_tiny_pipeline("sdxl")).keys()
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "conditioner"}
