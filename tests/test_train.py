"""`krona train` on the tiny pipelines: the whole run from the CLI, learning, exact resume, micro-conditioning,
cached latents, the LoRA baseline, interruption, dry runs and refusals."""

import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from helpers import fixed_pair_loss
from PIL import Image

from krona_cli.cli import main
from krona_cli.errors import KronaError
from krona_cli.pipeline import models
from krona_cli.training.config import load_config
from krona_cli.training.train import Reporter, TrainingInterrupted, train

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "cat"
PROMPT, CLASS_PROMPT = "a photo of sks cat", "a photo of a cat"


def tensors(adapter, component):
    """A Kronecker adapter's factors in one component by parameter name (`<module>.kron_a`, `<module>.kron_b`)."""
    return {
        f"{module}.kron_{part}": getattr(layer, part)
        for module, layer in adapter.layers[component].items()
        for part in ("a", "b")
    }


def config(pipeline_dir, out, **overrides):
    settings = dict(
        pretrained_model=str(pipeline_dir),
        instance_dir=str(EXAMPLES),
        prompt=PROMPT,
        output_dir=str(out),
        sample_every=0,
        checkpoint_every=0,
    )
    return load_config("tiny", settings | overrides)


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_cli_run_with_prior_preservation_writes_every_output(arch, request, tmp_path, capsys):
    from krona_cli.formats import load_adapter

    pipeline_dir = request.getfixturevalue(f"tiny_{arch}_dir")
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--config",
            "tiny",
            "--pretrained-model",
            str(pipeline_dir),
            "--instance-dir",
            str(EXAMPLES),
            "--prompt",
            PROMPT,
            "--class-prompt",
            CLASS_PROMPT,
            "--output-dir",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert len(list((out / "class-images").glob("class-*.png"))) == 8  # tiny.yaml: num-class-images 8, generated
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000015", "step-000030"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-000015.png", "step-000030.png"]
    adapter = load_adapter(out / "adapter.safetensors")
    assert adapter.architecture == arch and adapter.training["steps"] == 30
    assert adapter.num_params() > 0 and any(t.abs().sum() > 0 for t in tensors(adapter, "unet").values())
    card = (out / "README.md").read_text()
    assert PROMPT in card and "samples/step-000030.png" in card and "krona sample" in card
    assert load_config(out / "config.yaml", {}) == load_config(
        "tiny",
        {
            "pretrained_model": str(pipeline_dir),
            "instance_dir": str(EXAMPLES),
            "prompt": PROMPT,
            "class_prompt": CLASS_PROMPT,
            "output_dir": str(out),
        },
    ).resolved(arch, out)  # config.yaml: resolved values
    text = (out / "config.yaml").read_text()
    assert "null" not in text and not {"resume", "overwrite", "dry-run"} & set(yaml.safe_load(text))
    assert "trainable parameters" in captured.out and "Traceback" not in captured.err


@pytest.mark.slow
def test_training_learns_and_leaves_the_base_weights_untouched(tiny_sd15_dir, tmp_path, captured_pipes):
    """The loss at fixed (noise, timestep) pairs on the instance images falls by at least 20%.

    On the tiny SD 1.5 pipeline: its UNet has attention at the full latent resolution. The tiny SDXL UNet, like
    SDXL's, has none there, and on a random-weight network attention adapters then only reach coarse features: its
    loss stops at the no-information floor (1.18 -> 1.02, predicting zero noise gives 1.0), where a trained base
    starts far below it."""
    from krona_cli.inference.merge import load_and_bake

    cfg = config(tiny_sd15_dir, tmp_path / "run", steps=120, lr=3e-2, factors="4x4", center_crop=True, batch_size=2)
    result = train(cfg)
    base, _ = models.load_pipeline(str(tiny_sd15_dir))
    before = fixed_pair_loss(base, "sd15", EXAMPLES, PROMPT)
    after = fixed_pair_loss(load_and_bake([(result.adapter, 1.0)], str(tiny_sd15_dir)).pipe, "sd15", EXAMPLES, PROMPT)
    assert after <= 0.8 * before, (before, after)

    trained = captured_pipes[0]
    fresh = base.unet.state_dict()
    for name, value in trained.unet.state_dict().items():
        if ".kron_" not in name:
            assert torch.equal(value, fresh[name.replace(".base.", ".")]), name
    for component in ("text_encoder", "vae"):
        fresh_state = getattr(base, component).state_dict()
        assert all(torch.equal(v, fresh_state[k]) for k, v in getattr(trained, component).state_dict().items())


@pytest.mark.slow
def test_resume_is_bit_exact(tiny_sdxl_dir, tmp_path):
    from safetensors.torch import load_file

    common = dict(
        class_prompt=CLASS_PROMPT,
        class_dir=str(tmp_path / "classes"),
        ema=True,
        random_flip=True,
        batch_size=2,
        grad_accum=2,
    )
    straight = train(config(tiny_sdxl_dir, tmp_path / "straight", steps=20, **common))
    first = train(config(tiny_sdxl_dir, tmp_path / "resumed", steps=10, **common))
    assert first.step == 10
    second = train(config(tiny_sdxl_dir, tmp_path / "resumed", steps=20, resume="latest", **common))
    assert second.step == 20 and len(second.losses) == 10
    assert straight.losses[10:] == second.losses
    a, b = load_file(straight.adapter), load_file(second.adapter)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_class_images_get_their_own_micro_conditioning(tiny_sdxl_dir, tmp_path, captured_pipes, monkeypatch):
    from PIL import Image

    classes = tmp_path / "classes"
    classes.mkdir()
    for i, size in enumerate([(96, 80), (80, 120)]):  # (width, height), unlike any instance photo
        Image.new("RGB", size, (i * 90, 40, 200)).save(classes / f"c{i}.png")
    seen = []
    original_attach = __import__("krona_cli.training.trainable", fromlist=["trainable_adapter"]).trainable_adapter

    def attach_and_spy(pipe, *args, **kwargs):
        adapter = original_attach(pipe, *args, **kwargs)
        pipe.unet.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(
                (module.training, kwargs["added_cond_kwargs"]["time_ids"].clone())
            ),
            with_kwargs=True,
        )
        return adapter

    monkeypatch.setattr("krona_cli.training.trainable.trainable_adapter", attach_and_spy)
    cfg = config(
        tiny_sdxl_dir,
        tmp_path / "run",
        steps=2,
        center_crop=True,
        class_prompt=CLASS_PROMPT,
        class_dir=str(classes),
        num_class_images=2,
        batch_size=2,
    )
    train(cfg)
    training_calls = [t for training, t in seen if training]  # sampling runs the UNet in eval mode
    assert len(training_calls) == 2 and all(t.shape[0] == 4 for t in training_calls)  # 2 instance + 2 class rows
    instance_sizes = {Image.open(p).size[::-1] for p in EXAMPLES.glob("*.jpg")}
    for time_ids in training_calls:
        rows = [tuple(int(v) for v in row) for row in time_ids]
        assert {r[:2] for r in rows[:2]} <= instance_sizes
        # class rows: their own original size (h, w), their own centre crop at 64 px, target 64 x 64
        expected = {(80, 96, 0, 6, 64, 64), (120, 80, 16, 0, 64, 64)}
        assert set(rows[2:]) <= expected, rows


def test_cached_and_uncached_latents_give_the_same_losses(tiny_sdxl_dir, tmp_path):
    common = dict(steps=3, class_prompt=CLASS_PROMPT, class_dir=str(tmp_path / "classes"), random_flip=True)
    cached = train(config(tiny_sdxl_dir, tmp_path / "a", cache_latents=True, **common))
    uncached = train(config(tiny_sdxl_dir, tmp_path / "b", cache_latents=False, **common))
    assert cached.losses == pytest.approx(uncached.losses, rel=1e-5)


def test_lora_baseline_saves_a_file_diffusers_loads(tiny_sdxl_dir, tmp_path):
    from diffusers import DiffusionPipeline

    result = train(config(tiny_sdxl_dir, tmp_path / "run", adapter_type="lora", rank=2, steps=4, lr=1e-2))
    pipe = DiffusionPipeline.from_pretrained(tiny_sdxl_dir)
    base = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight.clone()
    pipe.load_lora_weights(str(result.adapter.parent), weight_name=result.adapter.name)
    layer = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert hasattr(layer, "lora_A") and torch.equal(layer.base_layer.weight, base)
    assert any(layer.lora_B[name].weight.abs().sum() > 0 for name in layer.lora_B)


def test_peft_lokr_trains_and_its_file_is_the_same_function_as_peft_computes(tiny_sdxl_dir, tmp_path, captured_pipes):
    """--adapter lokr trains peft's LoKr layers; the native file it writes (A = w1, B = scale · w2), attached by krona
    to a fresh UNet, gives the outputs of peft's own layers, and the factors are the ones asked for."""
    from krona_cli.formats import attach, load_adapter
    from krona_cli.pipeline.tiny import build_tiny_pipeline

    result = train(
        config(tiny_sdxl_dir, tmp_path / "run", adapter_type="lokr", factors="2x2", scale=0.5, steps=3, lr=1e-2)
    )
    adapter = load_adapter(result.adapter)
    assert adapter.layers["unet"] and all(layer.factors == "2x2" for layer in adapter.layers["unet"].values())
    assert all(layer.a.abs().sum() > 0 for layer in adapter.layers["unet"].values())  # w1 starts at 0: it learned
    trained = captured_pipes[0].unet.eval()
    fresh = build_tiny_pipeline("sdxl", seed=0).unet.eval()
    attach({"unet": fresh}, adapter)
    torch.manual_seed(0)
    sample = torch.randn(1, 4, 8, 8)
    hidden = torch.randn(1, 5, trained.config.cross_attention_dim)
    pooled = trained.config.projection_class_embeddings_input_dim - 6 * trained.config.addition_time_embed_dim
    extra = {"text_embeds": torch.randn(1, pooled), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        want = trained(sample, 10, hidden, added_cond_kwargs=extra).sample
        got = fresh(sample, 10, hidden, added_cond_kwargs=extra).sample
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_peft_lokr_takes_square_factors_only(tiny_sdxl_dir, tmp_path):
    with pytest.raises(KronaError, match="one factor for both sides"):
        train(config(tiny_sdxl_dir, tmp_path / "run", adapter_type="lokr", factors="4x2", steps=1))


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tiny_sdxl_dir, tmp_path):
    class KillAtStep2(Reporter):
        def step(self, step, total, loss, lr):
            if step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted) as stopped:
        train(config(tiny_sdxl_dir, out, steps=6), KillAtStep2())
    assert stopped.value.exit_code == 130 and "--resume latest" in str(stopped.value)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    assert not (out / "adapter.safetensors").exists()
    resumed = train(config(tiny_sdxl_dir, out, steps=6, resume="latest"))
    assert resumed.step == 6 and len(resumed.losses) == 4


def test_dry_run_checks_and_plans_without_training(tiny_sdxl_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--config",
            "tiny",
            "--pretrained-model",
            str(tiny_sdxl_dir),
            "--instance-dir",
            str(EXAMPLES),
            "--prompt",
            PROMPT,
            "--class-prompt",
            CLASS_PROMPT,
            "--output-dir",
            str(out),
            "--dry-run",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0 and "8 to generate" in printed and "dry run" in printed
    assert not (out / "class-images").exists() and not (out / "adapter.safetensors").exists()


def test_an_output_dir_with_another_run_is_refused(tiny_sdxl_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("steps: 1\n")
    code = main(
        [
            "train",
            "--config",
            "tiny",
            "--pretrained-model",
            str(tiny_sdxl_dir),
            "--instance-dir",
            str(EXAMPLES),
            "--prompt",
            PROMPT,
            "--output-dir",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--resume latest" in err and "--overwrite" in err and "Traceback" not in err


def test_resume_refuses_a_checkpoint_of_another_run(tiny_sdxl_dir, tmp_path):
    out = tmp_path / "run"
    train(config(tiny_sdxl_dir, out, steps=2))
    with pytest.raises(KronaError, match="other settings.*factors"):
        train(config(tiny_sdxl_dir, out, steps=4, factors="4x4", resume="latest"))


def test_xformers_on_a_cpu_is_a_clear_error(tiny_sdxl_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(KronaError, match="--xformers needs a CUDA GPU"):
        train(config(tiny_sdxl_dir, tmp_path / "run", xformers=True))


def test_text_encoders_8bit_adam_bf16_checkpointing_and_tensorboard(tiny_sdxl_dir, tmp_path):
    from krona_cli.formats import load_adapter

    out = tmp_path / "run"
    result = train(
        config(
            tiny_sdxl_dir,
            out,
            steps=3,
            train_text_encoder=True,
            text_encoder_factors="4x4",
            text_encoder_lr=1e-3,
            optimizer="adamw8bit",
            mixed_precision="bf16",
            gradient_checkpointing=True,
            snr_gamma=5.0,
            noise_offset=0.05,
            lr_scheduler="cosine",
            lr_warmup_steps=1,
            report_to="tensorboard",
            vae=str(tiny_sdxl_dir),
            class_prompt=CLASS_PROMPT,
            num_class_images=2,
        )
    )
    adapter = load_adapter(result.adapter)
    assert set(adapter.layers) == {"unet", "text_encoder", "text_encoder_2"}
    assert {layer.factors for layer in adapter.layers["text_encoder"].values()} == {"4x4"}
    assert all(torch.isfinite(t).all() for c in adapter.layers for t in tensors(adapter, c).values())
    assert all(t.dtype == torch.float32 for t in tensors(adapter, "text_encoder").values())  # fp32 under bf16
    assert any(t.abs().sum() > 0 for t in tensors(adapter, "text_encoder_2").values())
    assert list((out / "logs").rglob("events.out.tfevents.*")), "no TensorBoard event file"


def test_v_prediction_models_train_on_the_velocity(tiny_sd15_dir, tmp_path, monkeypatch):
    import json
    import shutil

    from krona_cli.families.ddpm import DDPM

    v_model = tmp_path / "v-model"
    shutil.copytree(tiny_sd15_dir, v_model)
    scheduler_config = v_model / "scheduler" / "scheduler_config.json"
    settings = json.loads(scheduler_config.read_text()) | {"prediction_type": "v_prediction"}
    scheduler_config.write_text(json.dumps(settings))
    kinds = []
    original = DDPM.target

    def spy(objective, latents, noise, timesteps):
        target = original(objective, latents, noise, timesteps)
        kinds.append(torch.allclose(target, objective.scheduler.get_velocity(latents, noise, timesteps)))
        return target

    monkeypatch.setattr(DDPM, "target", spy)
    result = train(config(v_model, tmp_path / "run", steps=2))
    assert kinds == [True, True] and "v-prediction" in dict(result.summary)["model"]


def test_with_ema_the_saved_adapter_holds_the_ema_weights(tiny_sd15_dir, tmp_path):
    from safetensors.torch import load_file

    from krona_cli.formats import load_adapter

    result = train(config(tiny_sd15_dir, tmp_path / "run", steps=4, ema=True, ema_decay=0.9, lr=1e-2))
    ema = load_file(result.checkpoints[-1] / "ema.safetensors")
    params = load_file(result.checkpoints[-1] / "params.safetensors")
    saved = tensors(load_adapter(result.adapter), "unet")
    assert saved and all(torch.equal(t, ema[f"ema.unet.{name}"]) for name, t in saved.items())
    assert any(not torch.equal(t, params[f"params.unet.{name}"]) for name, t in saved.items())


@pytest.mark.slow
@pytest.mark.subprocess
def test_ctrl_c_from_the_command_line_checkpoints_and_exits_130(tiny_sd15_dir, tmp_path):
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "krona_cli",
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
        "--steps",
        "100000",
        "--checkpoint-every",
        "0",
        "--sample-every",
        "0",
    ]  # the only checkpoint is the one Ctrl-C makes
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "config.yaml").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.1)  # config.yaml is written just before the first step
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "--resume latest" in stderr and "Traceback" not in stderr
    checkpoints = list((out / "checkpoints").iterdir())
    assert len(checkpoints) == 1 and not (out / "adapter.safetensors").exists()


@pytest.mark.slow
def test_compile_trains_the_same_adapter(tiny_sd15_dir, tmp_path, monkeypatch):
    """--compile runs the UNet through torch.compile (here with the aot_eager backend: inductor's C++ build takes
    minutes on a CPU) and trains what eager mode trains."""
    compiled = []
    original = torch.compile

    def aot_eager(model, **kwargs):
        compiled.append(model)
        return original(model, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", aot_eager)
    eager = train(config(tiny_sd15_dir, tmp_path / "eager", steps=3))
    fast = train(config(tiny_sd15_dir, tmp_path / "compiled", steps=3, compile=True))
    assert len(compiled) == 1 and "torch.compile" in dict(fast.summary)["precision"]
    assert fast.losses == pytest.approx(eager.losses, rel=1e-5)


def test_factors_that_do_not_divide_a_layer_are_fitted_counted_and_shown_or_refused(tiny_sd15_dir, tmp_path, capsys):
    from krona_cli.kron.factors import fit_factors, parse_factors
    from krona_cli.kron.injection import find_targets

    unet = models.load_pipeline(str(tiny_sd15_dir))[0].unet
    shapes = [tuple(unet.get_submodule(n).weight.shape) for n in find_targets(unet, "attn")]
    misfits = sum(out % 64 != 0 or inp % 4 != 0 for out, inp in shapes)
    assert 0 < misfits
    result = train(config(tiny_sd15_dir, tmp_path / "a", factors="64x4", dry_run=True))
    assert f"factors fitted to the {misfits} layer(s) they do not divide" in dict(result.summary)["adapter"]
    assert (
        "fitted"
        not in dict(train(config(tiny_sd15_dir, tmp_path / "b", factors="4x4", dry_run=True)).summary)["adapter"]
    )
    # per distinct layer shape, what 7x3 became (tiny widths 16, 32, 64: every shape is fitted)
    rows = dict(train(config(tiny_sd15_dir, tmp_path / "d", factors="7x3", dry_run=True)).summary)
    fitted = {(o, i): fit_factors(parse_factors("7x3"), o, i) for o, i in shapes}
    assert rows["factors used"] == ", ".join(f"{o}×{i}: {f} (asked 7x3)" for (o, i), f in sorted(fitted.items()))
    capsys.readouterr()  # the loading chatter of the calls above
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
            str(tmp_path / "c"),
            "--factors",
            "64x4",
            "--strict-factors",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "factors 64x4 do not divide layer" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "c" / "checkpoints").exists()


def test_resuming_a_finished_run_says_that_nothing_was_trained(tiny_sd15_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = [
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
        "--sample-images",
        "1",
        "--sample-steps",
        "1",
    ]
    assert main([*args, "--steps", "2"]) == 0
    assert "trained 2 steps ->" in capsys.readouterr().out
    grid = Image.open(out / "samples" / "step-000002.png")  # labelled: bands above and left of the one image
    assert grid.text["step"] == "2" and grid.width > 64 and grid.height > 64
    assert main([*args, "--steps", "2", "--resume", "latest"]) == 0
    printed = " ".join(capsys.readouterr().out.split())  # rich may wrap the line
    assert "already at step 2 of 2: nothing to train (raise --steps to train longer)" in printed
    assert "trained" not in printed
    assert main([*args, "--steps", "3", "--resume", "latest"]) == 0
    assert "trained 1 step, from step 2 (resumed) to 3 ->" in " ".join(capsys.readouterr().out.split())
