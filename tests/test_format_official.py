"""Official DiffuseKronA checkpoints: the row-permuted layout of the official layer, reading its files, refusing
LoRA files and damaged ones.

The official layer is re-implemented here from reference/diffusekrona.md §1 (not imported from krona), so that
`kron.functional.diffusekrona_delta` (the update of the adapter's `DiffuseKronALayer`s) is checked against what that
layer computes rather than against itself.
"""

import copy
import random
import re

import pytest
import torch
from helpers import read_torch
from safetensors.torch import save_file
from torch import nn

from krona_cli.errors import KronaError
from krona_cli.formats import attach
from krona_cli.formats.adapter import DiffuseKronALayer
from krona_cli.formats.in_models import module_name
from krona_cli.formats.official import from_official, is_official
from krona_cli.formats.outline import LAYOUT_DIFFUSEKRONA
from krona_cli.kron.functional import diffusekrona_delta
from krona_cli.pipeline.tiny import build_tiny_pipeline

ATTN = re.compile(r"\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)$")


def official_forward(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The official KronALinearLayer on a 3-D input (batch, tokens, d_in), as the reference describes it:
    down = nn.Linear(a1, a2) (weight a2 × a1), up = nn.Linear(b2, b1) (weight b1 × b2)."""
    a2, a1 = down.shape
    b1, b2 = up.shape
    batch, tokens, _ = x.shape
    X = x.view(-1, a2, b2).transpose(1, 2)  # (N, b2, a2)
    Y = up @ (X @ down)  # (N, b1, a1)
    return Y.view(batch, tokens, a1 * b1)


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x - y).abs().max() / y.abs().max()).item()


# (d_out, d_in, a1, a2): SDXL-like 64x4 and 64x8, a1 != a2, odd and prime factors, factors of 1 and of the full width.
SHAPES = [
    (640, 2048, 64, 4),
    (640, 640, 64, 8),
    (32, 80, 4, 8),
    (80, 32, 8, 2),
    (12, 20, 3, 5),
    (21, 35, 7, 5),
    (6, 10, 1, 10),
    (6, 10, 6, 1),
]


@pytest.mark.parametrize("d_out,d_in,a1,a2", SHAPES)
def test_diffusekrona_delta_is_what_the_official_layer_computes(d_out, d_in, a1, a2):
    gen = torch.Generator().manual_seed(d_out * 1000 + d_in + a1 + a2)
    b1, b2 = d_out // a1, d_in // a2
    down = torch.randn(a2, a1, dtype=torch.float64, generator=gen)
    up = torch.randn(b1, b2, dtype=torch.float64, generator=gen)
    x = torch.randn(2, 5, d_in, dtype=torch.float64, generator=gen)
    a, b = down.T, up  # A (a1 × a2) is the down weight transposed; B (b1 × b2) is the up weight
    delta = diffusekrona_delta(a, b)
    assert delta.shape == (d_out, d_in)
    assert _rel(x @ delta.T, official_forward(x, down, up)) < 1e-10
    # The reference's closed form: rows of kron(A, B) regrouped. (torch.kron needs contiguous factors here:
    # torch 2.13 raises a view error for a transposed first argument.)
    kron = torch.kron(a.contiguous(), b)
    assert torch.allclose(delta, kron.reshape(a1, b1, d_in).transpose(0, 1).reshape(d_out, d_in), rtol=0, atol=1e-12)
    # Scale multiplies.
    assert torch.allclose(diffusekrona_delta(a, b, scale=0.25), 0.25 * delta, rtol=0, atol=1e-12)
    # The layout matters: it is the standard A ⊗ B only when A or B has a single row (nothing to regroup).
    if a1 > 1 and b1 > 1:
        assert not torch.allclose(delta, kron)
    else:
        assert torch.allclose(delta, kron)


@pytest.mark.parametrize("d_out,d_in,a1,a2", SHAPES[:5])
def test_diffusekrona_delta_elementwise(d_out, d_in, a1, a2):
    gen = torch.Generator().manual_seed(7)
    b1, b2 = d_out // a1, d_in // a2
    a = torch.randn(a1, a2, dtype=torch.float64, generator=gen)
    b = torch.randn(b1, b2, dtype=torch.float64, generator=gen)
    delta = diffusekrona_delta(a, b)
    # Every (p, q, i, j) at once, by index arithmetic: ΔW[p·a1 + q, i·b2 + j] = B[p, j] · A[q, i].
    p, q, i, j = torch.meshgrid(torch.arange(b1), torch.arange(a1), torch.arange(a2), torch.arange(b2), indexing="ij")
    assert torch.equal(delta[p * a1 + q, i * b2 + j], b[p, j] * a[q, i])
    # Spot checks written out by hand.
    assert delta[0, 0] == b[0, 0] * a[0, 0]
    assert delta[a1 - 1, b2 - 1] == b[0, b2 - 1] * a[a1 - 1, 0]  # row a1-1 is still B's first row
    assert delta[a1, b2] == b[1, 0] * a[0, 1]  # the next row block moves B down, the next column block A right


# ------------------------------------------------------------------------------------------------------------------
# Official files built in the test, in the official key naming.


def _divisors(n: int) -> list[int]:
    return [d for d in range(2, n) if n % d == 0]


def _official_unet_tensors(unet: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random official factors for every attention projection of `unet`, keyed as the official code saves them."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in unet.named_modules():
        if not (isinstance(module, nn.Linear) and ATTN.search(name)):
            continue
        attention, _, proj = name.removesuffix(".0").rpartition(".")
        a1 = rng.choice(_divisors(module.out_features))
        a2 = rng.choice([d for d in _divisors(module.in_features) if d != a1])
        b1, b2 = module.out_features // a1, module.in_features // a2
        prefix = f"unet.{attention}.processor.{proj}_lora"
        tensors[f"{prefix}.down.weight"] = 0.3 * torch.randn(a2, a1, generator=gen)
        tensors[f"{prefix}.up.weight"] = 0.3 * torch.randn(b1, b2, generator=gen)
    return tensors


def _official_text_tensors(component: str, encoder: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Official (fork) text-encoder factors for every CLIP q/k/v/out_proj."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in encoder.named_modules():
        if isinstance(module, nn.Linear) and re.search(r"self_attn\.(q|k|v|out)_proj$", name):
            path = name if name.startswith("text_model.") else "text_model." + name
            a1, a2 = 4, 2
            prefix = f"{component}.{path}.lora_linear_layer"
            tensors[f"{prefix}.down.weight"] = 0.3 * torch.randn(a2, a1, generator=gen)
            b_shape = (module.out_features // a1, module.in_features // a2)
            tensors[f"{prefix}.up.weight"] = 0.3 * torch.randn(*b_shape, generator=gen)
    return tensors


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline("sdxl", seed=0)


@pytest.fixture(scope="module")
def official_file(pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("official") / "pytorch_lora_weights.safetensors"
    tensors = _official_unet_tensors(pipe.unet)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path, tensors


def _unet_call(unet):
    gen = torch.Generator().manual_seed(0)
    cfg = unet.config
    sample = torch.randn(2, 4, 16, 16, generator=gen)
    kwargs = dict(
        encoder_hidden_states=torch.randn(2, 7, cfg.cross_attention_dim, generator=gen),
        added_cond_kwargs={
            "text_embeds": torch.randn(
                2, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim, generator=gen
            ),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
        },
    )
    with torch.no_grad():
        return unet(sample, 10, **kwargs).sample


def _hook_official(model: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list:
    """Add the official layer's output to each named linear's output (what the official processor does, scale 1)."""

    def hook_for(down, up):
        return lambda module, inputs, output: output + official_forward(inputs[0], down, up)

    return [model.get_submodule(name).register_forward_hook(hook_for(*f)) for name, f in factors.items()]


def test_official_file_gives_the_official_output(pipe, official_file):
    path, saved = official_file
    tensors, metadata = read_torch(path)
    adapter = from_official(tensors, metadata, str(path))
    layers = adapter.layers["unet"]
    assert len(layers) == 4 * 2 * 11  # q/k/v/out of attn1 and attn2 in the 11 transformer blocks

    base = pipe.unet.eval()
    # (1) the adapter's layers merged with their own update (diffusekrona_delta)
    assert all(isinstance(layer, DiffuseKronALayer) for layer in layers.values())
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for module, layer in layers.items():
            merged.get_submodule(module).weight += layer.delta(adapter.scale)
    # (2) the official layer, run beside each linear of another copy, straight from the file's down/up tensors
    hooked = copy.deepcopy(base)
    by_linear = {}
    for key in saved:
        if key.endswith(".down.weight"):
            attention, _, proj = key.removeprefix("unet.").removesuffix("_lora.down.weight").rpartition(".processor.")
            name = f"{attention}.{'to_out.0' if proj == 'to_out' else proj}"
            by_linear[name] = (saved[key], saved[key.replace(".down.", ".up.")])
    assert set(by_linear) == set(layers)
    handles = _hook_official(hooked, by_linear)
    try:
        official = _unet_call(hooked)
    finally:
        for h in handles:
            h.remove()
    ours = _unet_call(merged)
    plain = _unet_call(base)
    err = _rel(ours, official)
    assert err < 1e-5, err
    assert _rel(plain, official) > 1e-2  # the adapter changes the output, so the agreement means something

    # The standard layout on the same factors gives another function: reading the file as A ⊗ B would be wrong.
    standard = copy.deepcopy(base)
    with torch.no_grad():
        for module, layer in layers.items():
            standard.get_submodule(module).weight += torch.kron(layer.a, layer.b)
    assert _rel(_unet_call(standard), official) > 1e-3


def test_key_mapping_factors_and_settings(pipe, official_file):
    path, saved = official_file
    adapter = from_official(*read_torch(path), str(path))
    assert adapter.layout == LAYOUT_DIFFUSEKRONA == "diffusekrona"
    assert adapter.scale == 1.0 and adapter.base_model is None
    assert adapter.architecture is None  # the tiny UNet's context width, 80, is no known model's
    assert adapter.targets == {"unet": "attn"}
    assert set(adapter.layers) == {"unet"}
    linears = {n for n, m in pipe.unet.named_modules() if isinstance(m, nn.Linear) and ATTN.search(n)}
    assert set(adapter.layers["unet"]) == linears
    block = "down_blocks.1.attentions.0.transformer_blocks.0"
    pairs = [("attn1.to_q", "attn1.processor.to_q_lora"), ("attn2.to_out.0", "attn2.processor.to_out_lora")]
    for proj, key_proj in pairs:
        module = f"{block}.{proj}"
        down, up = saved[f"unet.{block}.{key_proj}.down.weight"], saved[f"unet.{block}.{key_proj}.up.weight"]
        a, b = adapter.layers["unet"][module].a, adapter.layers["unet"][module].b
        assert torch.equal(a, down.T) and torch.equal(b, up)
        assert a.is_contiguous() and a.dtype == torch.float32 and b.dtype == torch.float32
        assert adapter.layers["unet"][module].factors == f"{down.shape[1]}x{down.shape[0]}"
    for module, layer in adapter.layers["unet"].items():
        a_out, a_in = map(int, layer.factors.split("x"))
        linear = pipe.unet.get_submodule(module)
        assert isinstance(linear, nn.Linear)
        assert layer.a.shape == (a_out, a_in)
        assert diffusekrona_delta(layer.a, layer.b).shape == layer.delta().shape == linear.weight.shape
    assert len({layer.factors for layer in adapter.layers["unet"].values()}) > 3  # per-layer factors really differ
    # A diffusekrona adapter is not a standard one: attaching it as A ⊗ B is refused.
    with pytest.raises(KronaError, match="layout 'diffusekrona'"):
        attach({"unet": copy.deepcopy(pipe.unet)}, adapter)


def test_fp16_files_and_keys_without_unet_prefix(pipe):
    tensors = {k.removeprefix("unet."): v.half() for k, v in _official_unet_tensors(pipe.unet, seed=1).items()}
    adapter = from_official(tensors, {}, "bare")
    assert all(t.dtype == torch.float32 for layer in adapter.layers["unet"].values() for t in (layer.a, layer.b))
    assert len(adapter.layers["unet"]) == 88


def test_text_encoder_keys_map_to_clip_module_names(pipe):
    tensors = _official_unet_tensors(pipe.unet)
    tensors |= _official_text_tensors("text_encoder", pipe.text_encoder)
    tensors |= _official_text_tensors("text_encoder_2", pipe.text_encoder_2, seed=1)
    assert "text_encoder.text_model.encoder.layers.1.self_attn.out_proj.lora_linear_layer.up.weight" in tensors
    adapter = from_official(tensors, {"format": "pt"}, "te")
    assert set(adapter.layers) == {"unet", "text_encoder", "text_encoder_2"}
    assert adapter.targets == {"unet": "attn", "text_encoder": "text", "text_encoder_2": "text"}
    assert set(adapter.layers["text_encoder"]) == {
        f"text_model.encoder.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in ("q", "k", "v", "out")
    }
    assert adapter.layers["text_encoder_2"]["text_model.encoder.layers.0.self_attn.q_proj"].factors == "4x2"
    for component in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, component)
        for module in adapter.layers[component]:
            assert module_name(encoder, component, module) is not None  # a real linear of the installed CLIP

    # The official layer beside CLIP's projections equals the merged official ΔW here too.
    encoder = pipe.text_encoder.eval()
    ids = torch.randint(0, encoder.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    merged, hooked = copy.deepcopy(encoder), copy.deepcopy(encoder)
    factors = {}
    with torch.no_grad():
        for module, layer in adapter.layers["text_encoder"].items():
            local = module_name(encoder, "text_encoder", module)
            merged.get_submodule(local).weight += layer.delta()
            factors[local] = (layer.a.T.contiguous(), layer.b)
        _hook_official(hooked, factors)
        official = hooked(ids).last_hidden_state
        err = _rel(merged(ids).last_hidden_state, official)
    assert err < 1e-5, err
    assert _rel(encoder(ids).last_hidden_state, official) > 1e-2


def test_architecture_is_guessed_from_the_cross_attention_width():
    def layer(prefix, d_out, d_in, a1=64, a2=4):
        return {
            f"{prefix}.down.weight": torch.zeros(a2, a1),
            f"{prefix}.up.weight": torch.zeros(d_out // a1, d_in // a2),
        }

    for context, arch in [(2048, "sdxl"), (768, "sd15"), (1024, "sd2"), (512, None)]:
        block = "unet.mid_block.attentions.0.transformer_blocks.0"
        tensors = layer(f"{block}.attn1.processor.to_q_lora", 640, 640)
        tensors |= layer(f"{block}.attn2.processor.to_k_lora", 640, context)
        tensors |= layer(f"{block}.attn2.processor.to_v_lora", 640, context)
        assert from_official(tensors, {}, "x").architecture == arch


def test_is_official(pipe, official_file):
    _, saved = official_file
    assert is_official(saved)
    assert is_official(["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight"])
    assert is_official(["mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight"])
    assert not is_official(["unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.kron_a"])  # native
    assert not is_official(["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lokr_w1"])  # LyCORIS
    assert not is_official(["unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"])  # PEFT
    assert not is_official([])


# ------------------------------------------------------------------------------------------------------------------
# Refusals.


def _lora_tensors(unet: nn.Module, rank: int = 4) -> dict[str, torch.Tensor]:
    """A diffusers 0.21 LoRA file in the same naming: down (r, d_in), up (d_out, r)."""
    tensors = {}
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear) and ATTN.search(name):
            attention, _, proj = name.removesuffix(".0").rpartition(".")
            prefix = f"unet.{attention}.processor.{proj}_lora"
            tensors[f"{prefix}.down.weight"] = torch.randn(rank, module.in_features)
            tensors[f"{prefix}.up.weight"] = torch.zeros(module.out_features, rank)
    return tensors


@pytest.mark.parametrize("rank", [1, 4, 8])
def test_lora_file_in_the_same_naming_is_refused(pipe, rank):
    tensors = _lora_tensors(pipe.unet, rank)
    assert is_official(tensors)
    with pytest.raises(KronaError, match="looks like a LoRA file, not DiffuseKronA"):
        from_official(tensors, {}, "lora.safetensors")
    # Just the attention projections that LoRA reading cannot tell apart from DiffuseKronA alone still fail.
    only_q = {k: v for k, v in tensors.items() if ".attn1.processor.to_q_lora." in k}
    with pytest.raises(KronaError, match="LoRA"):
        from_official(only_q, {}, "lora.safetensors")


def test_ambiguous_file_is_refused():
    # A 64-wide to_q with 8x8 factors: down (8, 8), up (8, 8) also reads as a rank-8 LoRA of an 8-wide layer.
    prefix = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora"
    tensors = {f"{prefix}.down.weight": torch.randn(8, 8), f"{prefix}.up.weight": torch.randn(8, 8)}
    with pytest.raises(KronaError, match="LoRA"):
        from_official(tensors, {}, "x")


def test_down_without_up_is_refused(official_file):
    _, saved = official_file
    key = "unet.down_blocks.2.attentions.0.transformer_blocks.1.attn2.processor.to_v_lora.up.weight"
    tensors = {k: v for k, v in saved.items() if k != key}
    with pytest.raises(KronaError, match=r"down_blocks\.2\.attentions\.0\.transformer_blocks\.1\.attn2\.to_v.*no up"):
        from_official(tensors, {}, "x")
    key = key.replace(".up.", ".down.")
    tensors = {k: v for k, v in saved.items() if k != key}
    with pytest.raises(KronaError, match=r"attn2\.to_v.*no down"):
        from_official(tensors, {}, "x")


def test_mismatched_shapes_are_refused(official_file):
    _, saved = official_file
    tensors = dict(saved)
    key = "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight"
    tensors[key] = torch.randn(5, 7)
    with pytest.raises(KronaError, match=r"up_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn1\.to_out\.0"):
        from_official(tensors, {}, "x")
    # An attn2 key/value pair reading inputs of different widths.
    tensors = dict(saved)
    key = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora"
    tensors[f"{key}.up.weight"] = torch.randn(tensors[f"{key}.up.weight"].shape[0], 3)
    with pytest.raises(KronaError, match="not a consistent DiffuseKronA"):
        from_official(tensors, {}, "x")
    # Not a matrix.
    tensors = dict(saved)
    tensors[f"{key}.down.weight"] = torch.randn(4)
    with pytest.raises(KronaError, match="to_k_lora.down.weight"):
        from_official(tensors, {}, "x")


def test_unexpected_keys_are_refused(official_file):
    _, saved = official_file
    for extra in [
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.alpha",
        "unet.mid_block.attentions.0.transformer_blocks.0.ff.processor.net_lora.down.weight",
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight",
    ]:
        tensors = dict(saved) | {extra: torch.ones(2, 2)}
        with pytest.raises(KronaError, match=re.escape(extra)):
            from_official(tensors, {}, "x")
    with pytest.raises(KronaError, match="no tensors"):
        from_official({}, {}, "x")
