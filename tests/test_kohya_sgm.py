"""kohya's SDXL files name UNet layers the SGM way (`lora_unet_input_blocks_4_1_...`): krona reads them (LoKr and LoRA),
maps every key of the real SDXL UNet to its diffusers module, bakes them on a non-standard base (the tiny SDXL) to the
same weights as the diffusers-named file when given that base's UNet config, and inspects and exports them."""

import pytest
import torch
from helpers import lycoris_torch, random_adapter, read_torch
from safetensors.torch import save_file
from torch import nn

from krona_cli.architectures import load_model_config
from krona_cli.errors import KronaError
from krona_cli.formats import describe, load_adapter
from krona_cli.formats.kohya_names import encode_path
from krona_cli.formats.lora import from_lora
from krona_cli.formats.lora_export import to_lora
from krona_cli.formats.lycoris import from_lycoris
from krona_cli.formats.original_layout import unet_path_to_sgm
from krona_cli.inference.export import export_adapter
from krona_cli.inference.merge import bake, pipeline_components
from krona_cli.pipeline.models import build_component
from krona_cli.pipeline.tiny import build_tiny_pipeline

TE = "text_model.encoder.layers.{}.self_attn.q_proj"


def _chosen_sdxl_modules():
    """Every attention linear of the real SDXL UNet, every resnet time projection (SGM `emb_layers_1`), proj_in and
    proj_out, feed-forward, and the time and label embeddings (SGM `time_embed`, `label_emb`): {module: shape}."""
    unet = build_component("sdxl", "unet")
    wanted = (
        ".to_q",
        ".to_k",
        ".to_v",
        ".to_out.0",
        ".time_emb_proj",
        ".proj_in",
        ".proj_out",
        ".ff.net.0.proj",
        ".ff.net.2",
    )
    return {
        name: tuple(m.weight.shape)
        for name, m in unet.named_modules()
        if isinstance(m, nn.Linear)
        and (name.endswith(wanted) or name.startswith(("time_embedding.", "add_embedding.")))
    }


def _sgm_name(module, config):
    return "lora_unet_" + encode_path(unet_path_to_sgm(module, config))


def _kohya_sgm_files(modules, config):
    """A LoKr and a LoRA file's tensors, SGM-named as kohya writes them, plus a layer of each SDXL text encoder."""
    lokr, lora = {}, {}
    names = [_sgm_name(m, config) for m in modules] + [
        "lora_te1_" + encode_path(TE.format(0)),
        "lora_te2_" + encode_path(TE.format(31)),
    ]
    for i, name in enumerate(names):
        lokr[f"{name}.lokr_w1"] = torch.full((1, 1), float(i + 1))
        lokr[f"{name}.lokr_w2"] = torch.ones(1, 2)
        lokr[f"{name}.alpha"] = torch.tensor(1.0)
        lora[f"{name}.lora_down.weight"] = torch.full((1, 2), float(i + 1))
        lora[f"{name}.lora_up.weight"] = torch.ones(1, 1)
        lora[f"{name}.alpha"] = torch.tensor(1.0)
    return lokr, lora


@pytest.fixture(scope="module")
def real_sdxl():
    modules = _chosen_sdxl_modules()
    config = load_model_config("sdxl_unet.json")
    return modules, config, *_kohya_sgm_files(modules, config)


def test_every_sgm_key_of_the_real_sdxl_unet_maps_to_its_diffusers_module(real_sdxl):
    modules, config, lokr, lora = real_sdxl
    # 560 attention, 140 feed-forward, 22 proj_in/out, 17 resnet time projections, 4 embedding linears: all 743
    assert len(modules) == 743
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lokr_w1" in lokr
    assert "lora_unet_output_blocks_0_0_emb_layers_1.lora_down.weight" in lora
    assert "lora_unet_time_embed_0.alpha" in lora and "lora_unet_label_emb_0_2.lokr_w2" in lokr
    expected = {("unet", m) for m in modules} | {("text_encoder", TE.format(0)), ("text_encoder_2", TE.format(31))}
    adapter = from_lycoris(lokr, {}, "kohya-lokr")
    assert {(c, m) for c, layers in adapter.layers.items() for m in layers} == expected
    assert adapter.key_format == "kohya-sgm" and adapter.architecture == "sdxl"
    # each key's tensors went to its own module: w1 holds the key's position in the file
    sgm_names = [_sgm_name(m, config) for m in modules]
    for i, module in enumerate(modules):
        assert adapter.layers["unet"][module].a.item() == float(i + 1), (module, sgm_names[i])
    read = from_lora(lora, {}, "kohya-lora")
    assert {(c, m) for c, layers in read.layers.items() for m in layers} == expected
    assert read.key_format == "kohya-sgm"
    for i, module in enumerate(modules):
        assert read.layers["unet"][module].down[0, 0].item() == float(i + 1)


def test_sgm_files_are_inspected_and_exported(real_sdxl, tmp_path):
    modules, config, lokr, lora = real_sdxl
    save_file(lokr, str(tmp_path / "kohya-lokr.safetensors"), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    save_file(lora, str(tmp_path / "kohya-lora.safetensors"))
    info = describe(tmp_path / "kohya-lokr.safetensors")
    assert (info["format"], info["key_format"], info["architecture"]) == ("lycoris", "kohya-sgm", "sdxl")
    assert info["layers"] == {"unet": len(modules), "text_encoder": 1, "text_encoder_2": 1}
    info = describe(tmp_path / "kohya-lora.safetensors")
    assert (info["format"], info["key_format"]) == ("lora", "kohya-sgm")
    assert info["layers"]["unet"] == len(modules)
    source = load_adapter(tmp_path / "kohya-lokr.safetensors")
    for to in ("native", "lycoris", "lora"):
        out = tmp_path / f"out-{to}.safetensors"
        export_adapter(tmp_path / "kohya-lokr.safetensors", to, out, rank=2 if to == "lora" else None)
        back = load_adapter(out)
        assert {c: set(m) for c, m in back.layers.items()} == {c: set(m) for c, m in source.layers.items()}, to
        if to != "native":  # krona writes diffusers module names, which every client maps
            assert back.key_format == "kohya"
            assert f"lora_unet_{encode_path('down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q')}" in {
                k.partition(".")[0] for k in read_torch(out)[0]
            }


# --- a non-standard base: the tiny SDXL (layers_per_block=1, so its SGM numbers are not the real SDXL's) -----------


def _to_sgm(tensors, config):
    """A kohya-named file's tensors with the UNet's lora names rewritten the SGM way for a UNet of this config."""
    out = {}
    for key, t in tensors.items():
        name, _, suffix = key.partition(".")
        if name.startswith("lora_unet_"):
            module = next(m for m in _TINY_UNET_MODULES if encode_path(m) == name[len("lora_unet_") :])
            name = _sgm_name(module, config)
        out[f"{name}.{suffix}"] = t
    return out


_TINY_UNET_MODULES = [n for n, m in build_tiny_pipeline("sdxl").unet.named_modules() if isinstance(m, nn.Linear)]


def _baked(adapter):
    pipe = build_tiny_pipeline("sdxl")
    components = pipeline_components(pipe)
    bake(components, [(adapter, 1.0)], "sdxl")
    return {c: m.state_dict() for c, m in components.items()}


@pytest.mark.parametrize("kind", ["lycoris", "lora"])
def test_tiny_sdxl_sgm_file_merges_like_the_diffusers_named_one(kind, tmp_path):
    adapter = random_adapter("sdxl", scale=0.5, seed=7)
    config = build_tiny_pipeline("sdxl").unet.config
    if kind == "lycoris":
        tensors, metadata = lycoris_torch(adapter)
    else:
        tensors, metadata, _ = to_lora(adapter, rank=3)
        tensors = {k: torch.from_numpy(v) for k, v in tensors.items()}
    metadata = {k: v for k, v in metadata.items() if k != "krona"}  # as another trainer wrote it
    sgm = _to_sgm(tensors, config)
    # tiny: down block 0 is one resnet and a downsampler (input_blocks 1, 2), so down block 1 starts at 3
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q" in {k.partition(".")[0] for k in sgm}
    save_file(tensors, str(tmp_path / "diffusers-named.safetensors"), metadata=metadata)
    save_file(sgm, str(tmp_path / "sgm-named.safetensors"), metadata=metadata)
    plain = load_adapter(tmp_path / "diffusers-named.safetensors")
    from_sgm = load_adapter(tmp_path / "sgm-named.safetensors", unet_config=config)
    assert (plain.key_format, from_sgm.key_format) == ("kohya", "kohya-sgm")
    expected, got = _baked(plain), _baked(from_sgm)
    base = _baked(random_adapter("sdxl", scale=0.0, seed=7))
    changed = 0
    for component, state in expected.items():
        for key, value in state.items():
            assert torch.equal(got[component][key], value), (component, key)
            changed += not torch.equal(value, base[component][key])
    assert changed == sum(len(m) for m in adapter.layers.values())
    # read with the real SDXL UNet's numbering instead, the same names point at other layers or at none
    with pytest.raises(KronaError, match="SGM way.*SDXL UNet does not have"):
        load_adapter(tmp_path / "sgm-named.safetensors")


# --- SD 1.x: the default numbering follows what the file says ----------------------------------------------------


def test_sd1_files_are_numbered_with_the_sd15_unet():
    config = load_model_config("sd15_unet.json")
    module = "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k"
    name = _sgm_name(module, config)
    assert name == "lora_unet_input_blocks_2_1_transformer_blocks_0_attn2_to_k"
    one = {f"{name}.lokr_w1": torch.ones(1, 1), f"{name}.lokr_w2": torch.ones(2, 2)}
    te = {
        "lora_te_" + encode_path(TE.format(0)) + ".lokr_w1": torch.ones(1, 1),
        "lora_te_" + encode_path(TE.format(0)) + ".lokr_w2": torch.ones(2, 2),
    }
    # by kohya's base model version, or by the one text encoder's prefix
    assert set(from_lycoris(one, {"ss_base_model_version": "sd_v1"}, "x").layers["unet"]) == {module}
    assert set(from_lycoris(one | te, {}, "x").layers["unet"]) == {module}
    # SDXL's input_blocks.2 is a resnet alone, so the same file read as SDXL's is refused
    with pytest.raises(KronaError, match="SDXL UNet does not have"):
        from_lycoris(one, {}, "x")


def test_cli_merge_numbers_sgm_layers_by_the_given_base(tiny_sdxl_dir, tmp_path):
    """`krona merge --pretrained-model` reads a kohya SGM-named file with that base's own UNet numbering (the tiny
    SDXL's, not the real SDXL's) and bakes what the diffusers-named file bakes."""
    from krona_cli.cli import main
    from krona_cli.pipeline.models import load_pipeline

    tensors, metadata = lycoris_torch(random_adapter("sdxl", scale=0.5, seed=11))
    metadata = {k: v for k, v in metadata.items() if k != "krona"}
    save_file(tensors, str(tmp_path / "plain.safetensors"), metadata=metadata)
    save_file(
        _to_sgm(tensors, build_tiny_pipeline("sdxl").unet.config), str(tmp_path / "sgm.safetensors"), metadata=metadata
    )
    for name in ("plain", "sgm"):
        assert (
            main(
                [
                    "merge",
                    "--adapter",
                    str(tmp_path / f"{name}.safetensors"),
                    "--pretrained-model",
                    str(tiny_sdxl_dir),
                    "--output-dir",
                    str(tmp_path / f"merged-{name}"),
                ]
            )
            == 0
        )
    plain, sgm = (load_pipeline(str(tmp_path / f"merged-{name}"))[0].unet.state_dict() for name in ("plain", "sgm"))
    assert all(torch.equal(plain[k], sgm[k]) for k in plain)
