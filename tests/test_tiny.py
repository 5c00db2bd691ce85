"""Tests for krona_cli.pipeline.tiny: the offline tiny SDXL / SD1.5 pipelines and the tiny CLIP-style tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTokenizer

from krona_cli.errors import KronaError
from krona_cli.pipeline.tiny import build_tiny_pipeline, build_tokenizer, make_tiny

PIPELINE_CLASSES = {"sdxl": StableDiffusionXLPipeline, "sd15": StableDiffusionPipeline}
ATTENTION_LINEARS = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Every test runs as if there were no model hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _attention_linears(unet: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The UNet's attention projections: ``...attn1.to_q``, ``...attn2.to_out.0`` and so on."""
    return {
        name: module
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear)
        and any(name.endswith(f"{attn}.{proj}") for attn in ("attn1", "attn2") for proj in ATTENTION_LINEARS)
    }


# --- pipelines -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_make_tiny_saves_a_loadable_runnable_pipeline(tmp_path, arch):
    target = tmp_path / "models" / arch  # parent does not exist yet
    assert make_tiny(target, arch=arch) == target
    assert (target / "model_index.json").is_file()
    assert sorted(p.name for p in target.parent.iterdir()) == [arch]  # no staging folder left behind
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    assert size < 16 * 2**20

    pipe = DiffusionPipeline.from_pretrained(target)
    assert type(pipe) is PIPELINE_CLASSES[arch]
    assert pipe.vae.config.scaling_factor == {"sdxl": 0.13025, "sd15": 0.18215}[arch]
    assert pipe.vae_scale_factor == 8

    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        "a photo of sks dog on the beach",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()


def test_sdxl_folder_loads_with_its_own_pipeline_class(tmp_path):
    pipe = StableDiffusionXLPipeline.from_pretrained(make_tiny(tmp_path / "sdxl", arch="sdxl"))
    # SDXL's UNet attends to both encoders' states side by side and is conditioned on the pooled projection.
    hidden = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert pipe.unet.config.cross_attention_dim == hidden
    assert pipe.unet.config.addition_embed_type == "text_time"
    for encoder, tokenizer in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)):
        assert encoder.config.vocab_size == len(tokenizer)
        assert encoder.config.eos_token_id == tokenizer.eos_token_id
        assert encoder.config.bos_token_id == tokenizer.bos_token_id
        assert encoder.config.pad_token_id == tokenizer.pad_token_id


def test_make_tiny_replaces_its_own_pipeline_folder_with_overwrite_only(tmp_path):
    target = tmp_path / "tiny"
    make_tiny(target, arch="sd15")
    with pytest.raises(KronaError, match="--overwrite"):
        make_tiny(target, arch="sdxl")
    make_tiny(target, arch="sdxl", overwrite=True)
    assert DiffusionPipeline.load_config(target)["_class_name"] == "StableDiffusionXLPipeline"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_make_tiny_never_replaces_a_pipeline_it_did_not_write(tmp_path):
    """A user's own diffusers model folder is not replaced, --overwrite or not."""
    target = make_tiny(tmp_path / "model", arch="sd15")
    (target / "krona-tiny.json").unlink()  # as any other diffusers pipeline folder
    with pytest.raises(KronaError, match="did not write"):
        make_tiny(target, overwrite=True)
    assert (target / "unet").is_dir()


def test_make_tiny_fills_an_existing_empty_folder(tmp_path):
    make_tiny(tmp_path, arch="sd15")
    assert (tmp_path / "model_index.json").is_file()


def test_make_tiny_refuses_to_overwrite_other_data(tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(KronaError, match="notes.txt"):
        make_tiny(target, overwrite=True)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]


def test_same_seed_gives_identical_weights_and_leaves_global_rng_alone():
    rng_before = torch.random.get_rng_state()
    first = build_tiny_pipeline("sdxl", seed=0).unet.state_dict()
    second = build_tiny_pipeline("sdxl", seed=0).unet.state_dict()
    other = build_tiny_pipeline("sdxl", seed=1).unet.state_dict()
    assert torch.equal(torch.random.get_rng_state(), rng_before)

    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)


@pytest.mark.parametrize("bad_arch", ["sd21", "SDXL", ""])
def test_unknown_arch_is_a_krona_error(tmp_path, bad_arch):
    with pytest.raises(KronaError, match="'sdxl', 'sd15'"):
        make_tiny(tmp_path / "x", arch=bad_arch)
    with pytest.raises(KronaError):
        build_tiny_pipeline(bad_arch)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_unet_attention_linears_are_kronecker_friendly(arch):
    linears = _attention_linears(build_tiny_pipeline(arch).unet)
    assert linears
    for suffix in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k"):
        assert any(name.endswith(suffix) for name in linears), suffix
    # Every width is a multiple of 16, so 2x2, 4x4, 8x4, 4x8 ... Kronecker factors divide every projection.
    for name, linear in linears.items():
        assert linear.in_features % 16 == 0 and linear.out_features % 16 == 0, name
    cross_dim = 80 if arch == "sdxl" else 32
    assert {m.in_features for n, m in linears.items() if n.endswith("attn2.to_k")} == {cross_dim}


# --- tokenizer -------------------------------------------------------------------------------------------------------


def test_tokenizer_vocab_has_clips_layout():
    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab()
    by_id = sorted(vocab, key=vocab.__getitem__)
    assert sorted(vocab.values()) == list(range(len(vocab)))

    byte_symbols = set(ByteLevel.alphabet())
    assert set(by_id[:256]) == byte_symbols
    assert by_id[256:512] == [symbol + "</w>" for symbol in by_id[:256]]
    assert by_id[-2:] == ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) > 512 + 2  # some merges were learned
    assert build_tokenizer().get_vocab() == vocab


def test_tokenizer_special_tokens_are_clips():
    tokenizer = build_tokenizer()
    assert isinstance(tokenizer, CLIPTokenizer)
    assert tokenizer.bos_token == "<|startoftext|>"
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == tokenizer.unk_token_id
    assert tokenizer.convert_ids_to_tokens(tokenizer.eos_token_id) == "<|endoftext|>"
    assert tokenizer.model_max_length == 77


def test_tokenizer_encodes_prompts_clip_style():
    tokenizer = build_tokenizer()
    ids = tokenizer("A photo of SKS dog").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "<|startoftext|>", "a</w>", "photo</w>", "of</w>", "sks</w>", "dog</w>", "<|endoftext|>",
    ]  # fmt: skip
    padded = tokenizer("a photo of sks dog", padding="max_length", max_length=77, truncation=True).input_ids
    assert padded[: len(ids)] == ids
    assert len(padded) == 77 and set(padded[len(ids) :]) == {tokenizer.pad_token_id}
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of sks dog"


def test_tokenizer_never_falls_back_to_unk_on_unicode():
    tokenizer = build_tokenizer()
    text = "café 🐶 ünïcødé — 日本語 naïve"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert ids and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_tokenizer_round_trips_through_save_pretrained(tmp_path):
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    assert reloaded.model_max_length == 77
    for text in ("a photo of sks dog", "a zebra-like café 🐶 under the moon!", ""):
        kwargs = dict(padding="max_length", max_length=77, truncation=True)
        assert reloaded(text, **kwargs).input_ids == tokenizer(text, **kwargs).input_ids
