"""Tests for krona_cli.pipeline.tiny_flux: the offline tiny FLUX.1 pipeline and its T5-style tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline
from transformers import T5Tokenizer

from krona_cli.errors import KronaError
from krona_cli.pipeline.tiny import MARKER
from krona_cli.pipeline.tiny_flux import build_t5_tokenizer, build_tiny_flux_pipeline, make_tiny_flux

#: Every linear of FLUX's attention and single-block MLP, by the end of its qualified name.
PROJECTIONS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "proj_mlp",
    "proj_out",
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Every test runs as if there were no model hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_flux_dir(tmp_path_factory):
    return make_tiny_flux(tmp_path_factory.mktemp("tiny") / "flux")


def _weights(pipe: FluxPipeline) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of every model in ``pipe``, keyed ``component.name``."""
    return {
        f"{component}.{name}": tensor
        for component in ("transformer", "vae", "text_encoder", "text_encoder_2")
        for name, tensor in getattr(pipe, component).state_dict().items()
    }


def _generate(pipe: FluxPipeline, **kwargs) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        "a photo of sks dog on the beach",
        num_inference_steps=2,
        guidance_scale=3.5,
        max_sequence_length=32,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).images


# --- pipeline --------------------------------------------------------------------------------------------------------


def test_make_tiny_flux_saves_a_loadable_runnable_pipeline(tiny_flux_dir):
    assert tiny_flux_dir.is_absolute()
    assert json.loads((tiny_flux_dir / MARKER).read_text()) == {"arch": "flux", "seed": 0}
    size = sum(f.stat().st_size for f in tiny_flux_dir.rglob("*") if f.is_file())
    assert size < 8 * 2**20

    pipe = DiffusionPipeline.from_pretrained(tiny_flux_dir)
    assert type(pipe) is FluxPipeline
    assert isinstance(pipe.tokenizer_2, T5Tokenizer)
    assert pipe.vae_scale_factor == 8
    vae = pipe.vae.config
    assert (vae.latent_channels, vae.scaling_factor, vae.shift_factor) == (16, 0.3611, 0.1159)
    assert not vae.use_quant_conv and not vae.use_post_quant_conv
    transformer = pipe.transformer.config
    assert transformer.in_channels == 4 * vae.latent_channels and transformer.guidance_embeds
    assert (transformer.num_layers, transformer.num_single_layers) == (2, 2)
    scheduler = pipe.scheduler.config
    assert scheduler.use_dynamic_shifting and (scheduler.base_shift, scheduler.max_shift) == (0.5, 1.15)
    assert (scheduler.base_image_seq_len, scheduler.max_image_seq_len, scheduler.shift) == (256, 4096, 3.0)

    images = _generate(pipe)
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()
    assert images.std() > 0


def test_saved_weights_are_the_built_ones(tiny_flux_dir):
    loaded = _weights(FluxPipeline.from_pretrained(tiny_flux_dir))
    built = _weights(build_tiny_flux_pipeline(seed=0))
    assert loaded.keys() == built.keys()
    assert all(torch.equal(loaded[key], built[key]) for key in built)


def test_same_seed_same_weights_other_seed_other_weights():
    torch.manual_seed(123)
    before = torch.rand(4)
    torch.manual_seed(123)
    first = _weights(build_tiny_flux_pipeline(seed=0))
    assert torch.equal(torch.rand(4), before)  # the caller's RNG is untouched
    second = _weights(build_tiny_flux_pipeline(seed=0))
    other = _weights(build_tiny_flux_pipeline(seed=1))
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert not torch.equal(first["transformer.x_embedder.weight"], other["transformer.x_embedder.weight"])
    assert not torch.equal(first["text_encoder_2.shared.weight"], other["text_encoder_2.shared.weight"])


def test_schnell_like_pipeline_has_no_guidance_embedding_and_runs(tmp_path):
    target = make_tiny_flux(tmp_path / "schnell", seed=3, guidance_embeds=False)
    assert json.loads((target / MARKER).read_text())["arch"] == "flux-schnell"
    pipe = FluxPipeline.from_pretrained(target)
    assert not pipe.transformer.config.guidance_embeds
    assert not any(name.startswith("time_text_embed.guidance") for name, _ in pipe.transformer.named_parameters())
    assert not pipe.scheduler.config.use_dynamic_shifting
    assert np.isfinite(_generate(pipe)).all()


def test_make_tiny_flux_replaces_only_its_own_folders(tmp_path, tiny_flux_dir):
    with pytest.raises(KronaError):
        make_tiny_flux(tiny_flux_dir)  # ours, but no overwrite
    target = tmp_path / "flux"
    make_tiny_flux(target, seed=1)
    make_tiny_flux(target, seed=2, overwrite=True)
    assert json.loads((target / MARKER).read_text())["seed"] == 2
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(KronaError):
        make_tiny_flux(foreign, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"


# --- text encoders ---------------------------------------------------------------------------------------------------


def test_encode_prompt_gives_the_widths_the_transformer_expects():
    pipe = build_tiny_flux_pipeline(seed=0)
    config = pipe.transformer.config
    with torch.no_grad():
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(
            ["a photo of sks dog", "a red car"], prompt_2=None, max_sequence_length=32
        )
    assert prompt_embeds.shape == (2, 32, config.joint_attention_dim)
    assert pooled.shape == (2, config.pooled_projection_dim)
    assert text_ids.shape == (32, 3)
    assert torch.isfinite(prompt_embeds).all() and torch.isfinite(pooled).all()
    assert not torch.equal(prompt_embeds[0], prompt_embeds[1])
    assert not torch.equal(pooled[0], pooled[1])


def test_every_attention_projection_is_divisible_by_16():
    transformer = build_tiny_flux_pipeline(seed=0).transformer
    linears = {
        name: module
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear) and name.endswith(PROJECTIONS)
    }
    # 2 double blocks x 8 attention projections, 2 single blocks x (to_q, to_k, to_v, proj_mlp, proj_out), the
    # transformer's own proj_out.
    assert len(linears) == 2 * 8 + 2 * 5 + 1
    assert any(name.startswith("single_transformer_blocks.") and name.endswith("proj_mlp") for name in linears)
    for name, linear in linears.items():
        assert linear.in_features % 16 == 0 and linear.out_features % 16 == 0, name


# --- T5 tokenizer ----------------------------------------------------------------------------------------------------


def test_t5_tokenizer_special_ids_and_eos():
    tokenizer = build_t5_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
    ids = tokenizer("a photo of sks dog").input_ids
    assert ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) == 1
    padded = tokenizer("a dog", padding="max_length", max_length=8)
    assert padded.input_ids == [*tokenizer("a dog").input_ids] + [0] * 5
    assert padded.attention_mask == [1, 1, 1, 0, 0, 0, 0, 0]
    assert tokenizer.model_max_length == 512


def test_t5_tokenizer_common_words_are_single_tokens():
    tokenizer = build_t5_tokenizer()
    for word in ("a", "photo", "of", "dog", "sks", "beach", "watercolor", "Photo", "Dog"):
        assert tokenizer.tokenize(word) == ["\u2581" + word], word
    assert tokenizer.decode(tokenizer("A Photo of zebra, 42!").input_ids, skip_special_tokens=True) == (
        "A Photo of zebra, 42!"
    )
    assert len(tokenizer.tokenize("zebra")) > 1  # not in the corpus: characters
    assert build_t5_tokenizer("zebra").tokenize("zebra") == ["\u2581zebra"]


def test_t5_tokenizer_is_deterministic_and_round_trips(tmp_path):
    tokenizer = build_t5_tokenizer()
    assert tokenizer.get_vocab() == build_t5_tokenizer().get_vocab()
    tokenizer.save_pretrained(tmp_path)
    assert not (tmp_path / "spiece.model").exists()
    loaded = T5Tokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    prompts = ["a photo of sks dog", "A Cute zebra, ÜNÏCODE 123 ~~", ""]
    for prompt in prompts:
        assert loaded(prompt).input_ids == tokenizer(prompt).input_ids, prompt
    batch = dict(padding="max_length", max_length=16, truncation=True)
    assert loaded(prompts, **batch).input_ids == tokenizer(prompts, **batch).input_ids
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.model_max_length) == (0, 1, 512)
