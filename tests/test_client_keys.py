"""krona's kohya-named files (`export --to lora` and `--to lycoris`) against each client's own key rule, on the full
real SDXL and SD 1.5 layer lists (built on the meta device; the factors are small random tensors of the real shapes).

The rules are written here from the clients' documented behaviour, not taken from krona:
* ComfyUI builds a map from every lora name it accepts to a model weight: `lora_unet_` + the diffusers UNet module
  path with `.` -> `_` (and the same for the original SGM path), `lora_te_` / `lora_te1_` (CLIP ViT-L) and
  `lora_te2_` (SDXL's OpenCLIP bigG) + `text_model_encoder_layers_N_` + one of its six CLIP linears, and
  `lora_te2_text_projection`. A key whose lora name is not in the map is "lora key not loaded". A LoRA layer's
  multiplier is alpha / (rows of lora_down); a LoKr layer with both factors full gets 1.
* A1111/Forge translate a diffusers-named kohya UNet key into the original (compvis) module name with fixed
  arithmetic (`down_blocks_i_attentions_j` -> `input_blocks_{1+3i+j}_1`, resnets at `_0` with their children renamed,
  `mid_block` -> `middle_block_1` / `_0` / `_2`, `up_blocks_i_{attentions|resnets}_j` -> `output_blocks_{3i+j}_{1|0}`,
  `time_embedding_linear_n` -> `time_embed_{2n-2}`), and look the result up among the UNet's module names.
"""

import re

import pytest
import torch
from helpers import lycoris_torch
from torch import nn

from krona_cli.architectures import load_model_config
from krona_cli.formats import Adapter, KronLayer
from krona_cli.formats.lora_export import to_lora
from krona_cli.formats.original_layout import unet_path_to_sgm
from krona_cli.kron import fit_factors, parse_factors
from krona_cli.pipeline.models import build_meta_components

UNET_CONFIGS = {"sdxl": "sdxl_unet.json", "sd15": "sd15_unet.json"}
CLIP_LINEARS = {  # module path inside a CLIP layer -> its part of the lora name
    "self_attn.q_proj": "self_attn_q_proj",
    "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
    "mlp.fc1": "mlp_fc1",
    "mlp.fc2": "mlp_fc2",
}
TEXT_LAYER = re.compile(r"^(?:text_model\.)?encoder\.layers\.\d+\.(self_attn\.[qkvout_]+proj|mlp\.fc[12])$")


def _linears(model):
    return {name: tuple(m.weight.shape) for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _real_adapter(arch):
    """An adapter on every linear of the real UNet (A1111 has no rule for SDXL's add_embedding: left out) and on the
    CLIP layers' linears of every text encoder (plus SDXL's text_projection), factors fitted from 64x4 as krona
    fits them, with small random values. Returns it and {(component, module): weight shape}."""
    torch.manual_seed(0)
    requested = parse_factors("64x4")
    layers, shapes = {}, {}
    for component, model in build_meta_components(arch).items():
        for name, (d_out, d_in) in _linears(model).items():
            if component == "unet" and name.startswith("add_embedding."):
                continue
            if component != "unet" and not (TEXT_LAYER.match(name) or name == "text_projection"):
                continue
            module = (
                name
                if component == "unet" or name.startswith(("text_model.", "text_projection"))
                else ("text_model." + name)
            )
            f = fit_factors(requested, d_out, d_in)
            a, b = torch.randn(f.a_out, f.a_in), torch.randn(d_out // f.a_out, d_in // f.a_in) * 0.01
            layers.setdefault(component, {})[module] = KronLayer(a, b)
            shapes[(component, module)] = (d_out, d_in)
    adapter = Adapter(layers, scale=1.0, base_model=f"real-{arch}", architecture=arch)
    return adapter, shapes


@pytest.fixture(scope="module", params=["sdxl", "sd15"])
def real(request):
    arch = request.param
    adapter, shapes = _real_adapter(arch)
    lora, _, report = to_lora(adapter, rank=2)
    lokr, _ = lycoris_torch(adapter)
    return arch, adapter, shapes, {"lora": lora, "lycoris": lokr}


# --- ComfyUI ------------------------------------------------------------------------------------------------------


def _comfyui_key_map(arch):
    """{lora name: (component, module)} as ComfyUI builds it for this architecture."""
    components = build_meta_components(arch)
    config = load_model_config(UNET_CONFIGS[arch])
    key_map = {}
    for name, _param in components["unet"].named_parameters():
        if name.endswith(".weight"):
            module = name.removesuffix(".weight")
            key_map["lora_unet_" + module.replace(".", "_")] = ("unet", module)
            key_map["lora_unet_" + unet_path_to_sgm(module, config).replace(".", "_")] = ("unet", module)
    text_prefixes = (
        {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"} if arch == "sdxl" else {"text_encoder": "lora_te_"}
    )
    for component, prefix in text_prefixes.items():
        for layer in range(components[component].config.num_hidden_layers):
            for path, part in CLIP_LINEARS.items():
                key_map[f"{prefix}text_model_encoder_layers_{layer}_{part}"] = (
                    component,
                    f"text_model.encoder.layers.{layer}.{path}",
                )
    if arch == "sdxl":
        key_map["lora_te2_text_projection"] = ("text_encoder_2", "text_projection")
    return key_map


def test_every_key_loads_in_comfyui_into_its_own_layer_with_the_right_shape(real):
    arch, adapter, shapes, files = real
    key_map = _comfyui_key_map(arch)
    # SDXL: 743 UNet linears but add_embedding's 2, 12 + 32 CLIP layers of 6 linears, text_projection; SD 1.5: 160
    # attention and feed-forward linears, 22 resnet time projections, 2 time-embedding linears, 12 CLIP layers of 6
    assert len(shapes) == sum(len(f) for f in adapter.layers.values()) == {"sdxl": 1006, "sd15": 256}[arch]
    for kind, tensors in files.items():
        loaded = {}  # lora name -> its tensors by suffix
        for key, t in tensors.items():
            name, _, suffix = key.partition(".")
            assert name in key_map, f"{kind}: lora key not loaded: {key}"
            loaded.setdefault(name, {})[suffix] = t
        assert {key_map[name] for name in loaded} == set(shapes), kind  # every layer, each once
        for name, parts in loaded.items():
            shape = shapes[key_map[name]]
            if kind == "lora":
                assert set(parts) == {"lora_down.weight", "lora_up.weight", "alpha"}
                down, up = parts["lora_down.weight"], parts["lora_up.weight"]
                assert (up.shape[0], down.shape[1]) == shape and up.shape[1] == down.shape[0]
                assert parts["alpha"].item() / down.shape[0] == 1.0  # ComfyUI's multiplier
            else:
                assert set(parts) == {"lokr_w1", "lokr_w2", "alpha"}
                w1, w2 = parts["lokr_w1"], parts["lokr_w2"]
                assert (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]) == shape


# --- A1111 / Forge ------------------------------------------------------------------------------------------------

_RESNET_CHILDREN = {
    "norm1": "in_layers_0",
    "conv1": "in_layers_2",
    "norm2": "out_layers_0",
    "conv2": "out_layers_3",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
}


def _resnet_child(rest):
    for child, renamed in _RESNET_CHILDREN.items():
        if rest == child or rest.startswith(child + "_"):
            return renamed + rest[len(child) :]
    return rest


def _a1111_unet_module(name):
    """A1111's translation of a kohya UNet lora name into a compvis module name (`diffusion_model_...`), or None."""
    if m := re.fullmatch(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", name):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        inner = 1 if kind == "attentions" else 0
        rest = rest if kind == "attentions" else _resnet_child(rest)
        return f"diffusion_model_input_blocks_{1 + 3 * i + j}_{inner}_{rest}"
    if m := re.fullmatch(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", name):
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "attentions":
            return f"diffusion_model_middle_block_1_{rest}"
        return f"diffusion_model_middle_block_{2 * j}_{_resnet_child(rest)}"
    if m := re.fullmatch(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", name):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        inner = 1 if kind == "attentions" else 0
        rest = rest if kind == "attentions" else _resnet_child(rest)
        return f"diffusion_model_output_blocks_{3 * i + j}_{inner}_{rest}"
    if m := re.fullmatch(r"lora_unet_time_embedding_linear_(\d+)", name):
        return f"diffusion_model_time_embed_{2 * int(m[1]) - 2}"
    return None


def test_every_unet_key_resolves_in_a1111_to_its_own_original_module(real):
    arch, adapter, shapes, files = real
    config = load_model_config(UNET_CONFIGS[arch])
    unet = build_meta_components(arch)["unet"]
    modules = {  # A1111's network_layer_mapping: every module of the original UNet, `.` -> `_`
        "diffusion_model_" + unet_path_to_sgm(name.rsplit(".", 1)[0], config).replace(".", "_")
        for name, _ in unet.named_parameters()
    }
    for kind, tensors in files.items():
        names = {key.partition(".")[0] for key in tensors if key.startswith("lora_unet_")}
        assert len(names) == len(adapter.layers["unet"])
        for name in names:
            translated = _a1111_unet_module(name)
            assert translated in modules, f"{kind}: {name} -> {translated}"
        for module in adapter.layers["unet"]:
            name = "lora_unet_" + module.replace(".", "_")
            assert _a1111_unet_module(name) == "diffusion_model_" + unet_path_to_sgm(module, config).replace(".", "_")
