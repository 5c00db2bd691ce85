"""--base-precision int8 / nf4: the frozen base quantized by bitsandbytes, the Kronecker update beside it."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import fixed_pair_loss
from torch import nn

from krona_cli.cli import main
from krona_cli.errors import KronaError
from krona_cli.kron import KronLinear, inject
from krona_cli.kron.injection import load_factors, set_scale
from krona_cli.kron.layer import is_quantized
from krona_cli.pipeline import models
from krona_cli.pipeline.quantize import check_device, quantize, weight_bytes

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "cat"
PROMPT = "a photo of sks cat"
PRECISIONS = ["int8", "nf4"]


def runs_here(precision):
    """Skip (with bitsandbytes' reason) where this bitsandbytes build cannot run the mode on the CPU."""
    try:
        check_device(precision, torch.float32, "cpu")
    except KronaError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_the_update_runs_beside_the_quantized_layer_exactly(precision):
    """y = base_q(x) + s·(A ⊗ B)x with the quantized layer's own output, and the gradients of A, B and x are those of
    that expression (autograd through F.linear with the materialised kron); the quantized weights never change."""
    runs_here(precision)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 192))
    assert quantize(model, precision, torch.float32, "cpu") == 1 and is_quantized(model[0])
    base = model[0]
    layer = KronLinear(base, "8x4", scale=0.7)
    with torch.no_grad():
        layer.kron_b.normal_()
    stored = base.weight.detach().clone()
    x = torch.randn(3, 5, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    a_ref = layer.kron_a.detach().clone().requires_grad_()
    b_ref = layer.kron_b.detach().clone().requires_grad_()

    y = layer(x)
    y_ref = base(x_ref) + F.linear(x_ref, 0.7 * torch.kron(a_ref, b_ref))
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    for got, want in [(layer.kron_a.grad, a_ref.grad), (layer.kron_b.grad, b_ref.grad), (x.grad, x_ref.grad)]:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.optim.AdamW(layer.parameters(), lr=0.1).step()
    assert torch.equal(base.weight, stored) and not base.weight.requires_grad
    with pytest.raises(KronaError, match="full-precision base"):
        layer.merge()


def test_quantize_replaces_linear_layers_and_shrinks_the_weights(tiny_sdxl_unet):
    runs_here("int8")
    linears = sum(type(m) is nn.Linear for m in tiny_sdxl_unet.modules())
    convs = {n: m.weight.dtype for n, m in tiny_sdxl_unet.named_modules() if isinstance(m, nn.Conv2d)}
    before = weight_bytes(tiny_sdxl_unet)
    assert before == 4 * sum(t.numel() for t in [*tiny_sdxl_unet.parameters(), *tiny_sdxl_unet.buffers()])
    # int8: one byte per linear weight plus one fp32 scale per output row; biases and everything else stay fp32
    linear_weights = [m.weight for m in tiny_sdxl_unet.modules() if type(m) is nn.Linear]
    expected = before - sum(3 * w.numel() - 4 * w.shape[0] for w in linear_weights)
    assert quantize(tiny_sdxl_unet, "int8", torch.float32, "cpu") == linears
    assert weight_bytes(tiny_sdxl_unet) == expected
    assert not any(type(m) is nn.Linear for m in tiny_sdxl_unet.modules())
    assert all(is_quantized(m) for m in tiny_sdxl_unet.modules() if isinstance(m, nn.Linear))
    assert {n: m.weight.dtype for n, m in tiny_sdxl_unet.named_modules() if isinstance(m, nn.Conv2d)} == convs
    assert weight_bytes(tiny_sdxl_unet) < before


def test_nf4_leaves_layers_that_are_not_whole_4bit_blocks_in_full_precision(tiny_sdxl_unet):
    runs_here("nf4")
    blocks = {
        n
        for n, m in tiny_sdxl_unet.named_modules()
        if type(m) is nn.Linear and m.in_features % 64 == 0 and m.out_features % 64 == 0
    }
    assert 0 < quantize(tiny_sdxl_unet, "nf4", torch.float32, "cpu") == len(blocks)
    quantized = {n for n, m in tiny_sdxl_unet.named_modules() if isinstance(m, nn.Linear) and is_quantized(m)}
    assert quantized == blocks


@pytest.mark.parametrize("precision", PRECISIONS)
def test_quantizing_draws_nothing_from_the_seeded_generator(precision, tiny_sdxl_unet):
    """A run seeds torch's generator, quantizes the base, then draws its adapter init and noise: quantizing (and
    probing the device) must leave the generator as it was, so that a seed means the same run on any base precision
    (an int8 run once started from other factors than the fp32 run of its seed, docs/toy.md)."""
    runs_here(precision)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    check_device(precision, torch.float32, "cpu")
    quantize(tiny_sdxl_unet, precision, torch.float32, "cpu")
    assert torch.equal(torch.get_rng_state(), state)


def test_a_mode_bitsandbytes_cannot_run_is_one_clear_line(monkeypatch, tiny_sd15_dir, tmp_path, capsys):
    import bitsandbytes as bnb

    def broken(self, x):
        raise RuntimeError("no kernel for this device\nlong trace")

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", broken)
    with pytest.raises(
        KronaError,
        match=r"bitsandbytes cannot run --base-precision nf4 on cpu \(no kernel for this "
        r"device\); use --base-precision bf16",
    ):
        check_device("nf4", torch.float32, "cpu")
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--config",
            "tiny",
            "--pretrained-model",
            str(tiny_sd15_dir),
            "--instance-dir",
            str(EXAMPLES),
            "--prompt",
            PROMPT,
            "--output-dir",
            str(out),
            "--base-precision",
            "nf4",
        ]
    )
    err = capsys.readouterr().err
    assert code != 0 and "bitsandbytes cannot run --base-precision nf4" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err
    assert not (out / "adapter.safetensors").exists() and not (out / "checkpoints").exists()


def test_missing_bitsandbytes_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(KronaError, match="needs bitsandbytes: pip install bitsandbytes"):
        check_device("int8", torch.float32, "cpu")


def test_float_base_precision_must_match_the_compute_precision():
    from krona_cli.training.config import load_config

    with pytest.raises(KronaError, match="--base-precision bf16 needs --mixed-precision bf16"):
        load_config(None, {"instance_dir": "x", "prompt": "p", "base_precision": "bf16"})
    assert load_config(None, {"instance_dir": "x", "prompt": "p", "base_precision": "int8"}).base_precision == "int8"


@pytest.mark.slow
@pytest.mark.parametrize("precision", PRECISIONS)
def test_quantized_training_learns_and_merges_into_the_full_precision_base(precision, tiny_sd15_dir, tmp_path, capsys):
    """From the CLI: training on an int8 / nf4 base lowers the loss on the instance images (by at least 15%, measured
    on the full-precision base with the adapter merged), and `krona merge` into the full-precision base gives what
    the adapter gives when it runs unmerged on that base: UNet predictions within 1e-4 (relative), sampled 8-bit
    images within 1 level."""
    from krona_cli.formats import load_adapter
    from krona_cli.inference.sampling import SampleConfig, render

    runs_here(precision)
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--config",
            "tiny",
            "--pretrained-model",
            str(tiny_sd15_dir),
            "--instance-dir",
            str(EXAMPLES),
            "--prompt",
            PROMPT,
            "--output-dir",
            str(out),
            "--base-precision",
            precision,
            "--steps",
            "120",
            "--lr",
            "3e-2",
            "--factors",
            "4x4",
            "--center-crop",
            "--batch-size",
            "2",
            "--checkpoint-every",
            "0",
            "--sample-every",
            "0",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"frozen base {precision}" in captured.out and "frozen weights" in captured.out
    assert (
        main(
            [
                "merge",
                "--adapter",
                str(out / "adapter.safetensors"),
                "--pretrained-model",
                str(tiny_sd15_dir),
                "--output-dir",
                str(tmp_path / "merged"),
            ]
        )
        == 0
    )

    base, _ = models.load_pipeline(str(tiny_sd15_dir))
    merged, _ = models.load_pipeline(str(tmp_path / "merged"))
    before = fixed_pair_loss(base, "sd15", EXAMPLES, PROMPT)
    after = fixed_pair_loss(merged, "sd15", EXAMPLES, PROMPT)
    print(f"{precision}: fixed-pair loss {before:.4f} -> {after:.4f}")
    assert after <= 0.85 * before, (before, after)

    adapter = load_adapter(out / "adapter.safetensors")
    unmerged, _ = models.load_pipeline(str(tiny_sd15_dir))
    inject(unmerged.unet, adapter.targets["unet"], "4x4")
    load_factors(unmerged.unet, {module: (layer.a, layer.b) for module, layer in adapter.layers["unet"].items()})
    set_scale(unmerged.unet, adapter.scale)
    g = torch.Generator().manual_seed(3)
    cfg = base.unet.config
    sample = torch.randn(2, cfg.in_channels, 8, 8, generator=g)
    text = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    with torch.no_grad():
        want = unmerged.unet(sample, torch.tensor([10, 700]), text).sample
        got = merged.unet(sample, torch.tensor([10, 700]), text).sample
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
        assert (
            merged.unet(sample, torch.tensor([10, 700]), text).sample
            - base.unet(sample, torch.tensor([10, 700]), text).sample
        ).abs().max() > 1e-3  # it did change
    config = SampleConfig(num_images=2, steps=4, width=64, height=64, batch_size=2)
    images = [render(p, config, [PROMPT]) for p in (merged, unmerged)]
    for key in images[0]:
        a, b = (np.asarray(i[key], dtype=np.int16) for i in images)
        assert np.abs(a - b).max() <= 1, key


@pytest.mark.subprocess
def test_a_fresh_krona_process_imports_bitsandbytes_only_to_quantize(tiny_sd15_dir, tmp_path):
    """diffusers would import bitsandbytes at its own import (1.2 s): krona holds it back in a fresh process, sampling
    never loads it, and a run on an int8 base still quantizes with it."""
    runs_here("int8")
    report = "import sys; m = sys.modules.get('bitsandbytes'); print('bitsandbytes:', m is not None)"

    def krona(*args: str) -> str:
        code = f"import sys; from krona_cli.cli import main; code = main({list(args)!r}); {report}; sys.exit(code)"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1]

    sample = ["sample", "--pretrained-model", str(tiny_sd15_dir), "--prompt", PROMPT, "-n", "1", "--sample-steps", "1"]
    assert krona(*sample, "--output-dir", str(tmp_path / "s")) == "bitsandbytes: False"
    train = ["train", "--config", "tiny", "--pretrained-model", str(tiny_sd15_dir), "--instance-dir", str(EXAMPLES)]
    train += ["--prompt", PROMPT, "--steps", "1", "--base-precision", "int8", "--output-dir", str(tmp_path / "t")]
    assert krona(*train, "--sample-every", "0", "--checkpoint-every", "0") == "bitsandbytes: True"
