"""Single-file checkpoints in the original (LDM/SGM) layout, checked against diffusers' own independent reader: tiny
pipelines go through a file and `from_single_file` unchanged; the real SDXL and SD 1.5 architectures, built on the meta
device, map to complete key sets that diffusers classifies and converts back to exactly the diffusers names and shapes.
"""

import json
import struct
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders import single_file_utils as sfu
from safetensors import safe_open

from krona_cli.architectures import load_model_config
from krona_cli.errors import KronaError
from krona_cli.formats.original_layout import (
    original_architecture,
    read_openclip_tensors,
    save_single_file,
    to_original,
)
from krona_cli.pipeline.models import build_component
from krona_cli.pipeline.tiny import build_tiny_pipeline

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
READERS = {
    "sdxl": (StableDiffusionXLPipeline, {}),
    "sd15": (StableDiffusionPipeline, {"safety_checker": None, "requires_safety_checker": False}),
}


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_diffusers_reads_the_file_back_exactly(arch, tmp_path, request):
    folder = request.getfixturevalue(f"tiny_{arch}_dir")  # seed 0: config only, its weights must not leak in
    pipe = build_tiny_pipeline(arch, seed=1)
    path = save_single_file(pipe, tmp_path / "model.safetensors", torch.float32, {"modelspec.title": "tiny"})
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp file left behind
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"modelspec.title": "tiny"}
        assert original_architecture(f.keys()) == arch

    cls, kwargs = READERS[arch]
    loaded = cls.from_single_file(str(path), config=str(folder), torch_dtype=torch.float32, **kwargs)
    compared = 0
    for name in COMPONENTS:
        if getattr(pipe, name, None) is None:
            continue
        ours, theirs = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        for key, tensor in ours.items():
            assert torch.equal(tensor, theirs[key]), f"{name}.{key}"
        compared += 1
    assert compared == (4 if arch == "sdxl" else 3)
    seed0 = build_tiny_pipeline(arch, seed=0).unet.conv_in.weight
    assert not torch.equal(seed0, loaded.unet.conv_in.weight)  # the weights did come from the file
    openclip = read_openclip_tensors(path)  # SDXL's second text encoder alone, as krona reads it back
    prefix = "conditioner.embedders.1.model."
    expected = {k: t for k, t in to_original(pipe).items() if k.startswith(prefix)}
    assert openclip.keys() == expected.keys() and all(torch.equal(openclip[k], expected[k]) for k in expected)
    assert bool(openclip) == (arch == "sdxl")


def test_file_is_cast_to_the_dtype_and_readable_by_safetensors(tmp_path):
    pipe = build_tiny_pipeline("sd15")
    path = save_single_file(pipe, tmp_path / "sub" / "half.safetensors", torch.float16)
    expected = to_original(pipe)
    with safe_open(path, "pt") as f:
        assert f.metadata() is None
        assert set(f.keys()) == set(expected)
        for key in f.keys():
            tensor = f.get_tensor(key)
            assert tensor.dtype == torch.float16
            assert torch.equal(tensor, expected[key].half()), key
    header_length = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert header_length % 8 == 0
    json.loads(path.read_bytes()[8 : 8 + header_length])


def _real_size(arch):
    """The real architecture's components on the meta device, as a stand-in for a pipeline."""
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(load_model_config("sdxl_vae.json"))
    text_2 = build_component(arch, "text_encoder_2") if arch == "sdxl" else None
    text = build_component(arch, "text_encoder")
    return SimpleNamespace(unet=build_component(arch, "unet"), vae=vae, text_encoder=text, text_encoder_2=text_2)


def _without_text_model(state, has_wrapper):
    return state if has_wrapper else {k.removeprefix("text_model."): v for k, v in state.items()}


def _assert_same(converted, model, what):
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected, what


@pytest.mark.parametrize(("arch", "diffusers_type"), [("sdxl", "xl_base"), ("sd15", "v1")])
def test_real_architectures_map_completely_and_diffusers_converts_them_back(arch, diffusers_type):
    pipe = _real_size(arch)
    original = to_original(pipe)
    sources = sum(len(getattr(pipe, c).state_dict()) for c in COMPONENTS if getattr(pipe, c) is not None)
    # every diffusers tensor has its own key (to_original refuses collisions); only OpenCLIP's q, k, v become one
    merged = 4 * pipe.text_encoder_2.config.num_hidden_layers if arch == "sdxl" else 0
    assert len(original) == sources - merged
    assert original_architecture(original) == arch
    assert sfu.CHECKPOINT_KEY_NAMES["v1" if arch == "sd15" else "xl_base"] in original
    assert sfu.infer_diffusers_model_type(original) == diffusers_type

    # diffusers' converters run on meta tensors: they give back exactly the diffusers names and shapes
    _assert_same(sfu.convert_ldm_unet_checkpoint(original, pipe.unet.config), pipe.unet, "unet")
    _assert_same(sfu.convert_ldm_vae_checkpoint(original, pipe.vae.config), pipe.vae, "vae")
    clip = sfu.convert_ldm_clip_checkpoint(original)
    _assert_same(_without_text_model(clip, hasattr(pipe.text_encoder, "text_model")), pipe.text_encoder, "text_encoder")
    if arch == "sdxl":
        prefix = "conditioner.embedders.1.model."
        openclip = sfu.convert_open_clip_checkpoint(pipe.text_encoder_2, original, prefix=prefix)
        _assert_same(openclip, pipe.text_encoder_2, "text_encoder_2")
        assert original[prefix + "text_projection"].shape == (1280, 1280)
        assert original[prefix + "transformer.resblocks.31.attn.in_proj_weight"].shape == (3 * 1280, 1280)


def test_original_architecture_reads_the_text_encoder_keys():
    sd2_keys = iter(["model.diffusion_model.out.2.bias", "cond_stage_model.model.ln_final.weight"])
    assert original_architecture(sd2_keys) == "sd2"
    assert original_architecture(["cond_stage_model.transformer.text_model.final_layer_norm.bias"]) == "sd15"
    assert original_architecture(["model.diffusion_model.out.2.bias", "lora_unet_x.lora_up.weight"]) is None
    assert original_architecture([]) is None


def test_sd2_is_refused_with_what_to_do_instead(tmp_path):
    tiny = build_tiny_pipeline("sd15")
    sd2_like = SimpleNamespace(
        unet=SimpleNamespace(config={**tiny.unet.config, "cross_attention_dim": 1024}),
        vae=tiny.vae,
        text_encoder=tiny.text_encoder,
    )
    with pytest.raises(KronaError, match="SDXL and SD 1.x, not SD 2.x.*diffusers folder") as caught:
        save_single_file(sd2_like, tmp_path / "sd2.safetensors", torch.float16)
    assert "\n" not in str(caught.value)
    assert not any(tmp_path.iterdir())


def test_incomplete_pipeline_is_refused():
    tiny = build_tiny_pipeline("sdxl")
    refiner_like = SimpleNamespace(unet=tiny.unet, vae=tiny.vae, text_encoder=None, text_encoder_2=tiny.text_encoder_2)
    with pytest.raises(KronaError, match="no text_encoder;.*diffusers folder"):
        to_original(refiner_like)


def test_injected_adapters_and_quantized_weights_are_refused():
    from krona_cli.kron import inject

    adapted = build_tiny_pipeline("sd15")
    inject(adapted.unet, targets="attn", factors="4x4")
    with pytest.raises(KronaError, match="unet still holds Kronecker adapters"):
        to_original(adapted)
    quantized = build_tiny_pipeline("sd15")
    quantized.vae.register_buffer("SCB", torch.zeros(4, dtype=torch.int8))
    with pytest.raises(KronaError, match="vae has weights that are not floating point"):
        to_original(quantized)
