"""The run's pure parts: which samples each process takes in each micro-batch, the summary rows, and a checkpoint's
state and its restore side by side (on a toy model, without a pipeline)."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from krona_cli.errors import KronaError
from krona_cli.training.buckets import Bucket
from krona_cli.training.checkpoint import load_checkpoint, save_checkpoint
from krona_cli.training.config import load_config
from krona_cli.training.run import Data, Run, batch_indices
from krona_cli.training.train import Plan, Reporter, summary

# --- batch_indices: the sample index rule -----------------------------------------------------------------------------


def taken(at_step, world, grad_accum, batch_size):
    """{(process, micro): (positions, sample indices)} of one step."""
    return {
        (p, m): tuple(map(list, batch_indices(at_step, m, p, world, batch_size, grad_accum)))
        for p in range(world)
        for m in range(grad_accum)
    }


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("grad_accum", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_every_sample_of_a_step_is_taken_once_whatever_the_split(world, grad_accum, batch_size):
    global_batch = world * grad_accum * batch_size
    for at_step in (0, 1, 7):
        slices = taken(at_step, world, grad_accum, batch_size)
        positions = sorted(p for ps, _ in slices.values() for p in ps)
        samples = sorted(g for _, gs in slices.values() for g in gs)
        assert positions == list(range(global_batch))  # each position exactly once across processes × micro-batches
        assert samples == list(range(at_step * global_batch, (at_step + 1) * global_batch))
        for ps, gs in slices.values():
            assert len(ps) == batch_size and ps == list(range(ps[0], ps[0] + batch_size))  # a contiguous slice
            assert [g - at_step * global_batch for g in gs] == ps  # sample g is position g - step × global batch
        # what one process sees with the same global batch in more micro-batches: the same samples at the same places
        alone = taken(at_step, 1, world * grad_accum, batch_size)
        pairs = {pair for ps, gs in slices.values() for pair in zip(ps, gs)}
        assert pairs == {pair for ps, gs in alone.values() for pair in zip(ps, gs)}


def test_micro_batches_are_cut_micro_batch_major():
    # step 2, 2 processes × 2 micro-batches × batch 3: micro 0 takes positions 0-5 (process 0 then 1), micro 1 6-11
    assert batch_indices(2, 0, 1, 2, 3, 2) == (range(3, 6), range(27, 30))
    assert batch_indices(2, 1, 0, 2, 3, 2) == (range(6, 9), range(30, 33))


# --- summary: pure rows -----------------------------------------------------------------------------------------------


def settings(tmp_path, **overrides):
    return load_config(
        None,
        {
            "instance_dir": str(tmp_path / "photos"),
            "prompt": "a photo of sks dog",
            "output_dir": str(tmp_path / "out"),
            **overrides,
        },
    )


def plan(tmp_path, **changes):
    values = {
        "arch": "sdxl",
        "prediction": "v_prediction",
        "resolution": 1024,
        "compute": "bf16",
        "base_precision": "nf4",
        "device": "cuda:0",
        "photos": 3,
        "buckets": [Bucket(1216, 832), Bucket(1216, 832), Bucket(1024, 1024)],
        "class_dir": tmp_path / "classes",
        "to_generate": 7,
        "params": 12345,
        "fitted": 0,
        "resume_from": None,
        "world": 2,
        "memory": "1 GiB",
        "out": tmp_path / "out",
    }
    return Plan(**(values | changes))


def test_summary_is_a_pure_function_of_settings_and_plan(tmp_path):
    cfg = settings(tmp_path, batch_size=2, grad_accum=3, class_prompt="a photo of a dog", num_class_images=9)
    rows = dict(summary(cfg, plan(tmp_path)))
    assert summary(cfg, plan(tmp_path)) == summary(cfg, plan(tmp_path))
    assert not (tmp_path / "out").exists() and not (tmp_path / "classes").exists()  # touches nothing
    assert rows["model"].endswith("(sdxl, v-prediction)")
    assert rows["trainable parameters"] == "12,345"
    assert rows["instance images"] == "3 × 1 repeats, 'a photo of sks dog'"
    assert rows["sizes"].startswith("aspect-ratio buckets of about 1024² px: ") and "832×1216" in rows["sizes"]
    assert rows["class images"] == f"9 of 'a photo of a dog' in {tmp_path / 'classes'} (7 to generate)"
    assert rows["batch"] == "2 per process × 3 accumulation × 2 process(es) = 12 per step"
    assert rows["precision"].startswith("compute bf16, frozen base nf4, adapter weights fp32, on cuda:0")
    assert rows["memory (estimate)"] == "1 GiB" and rows["output"] == str(tmp_path / "out")
    assert list(rows) == [
        "model",
        "adapter",
        "trainable parameters",
        "instance images",
        "sizes",
        "class images",
        "steps",
        "batch",
        "optimizer",
        "precision",
        "memory (estimate)",
        "output",
    ]


def test_summary_names_squares_fitted_factors_and_the_resume_point(tmp_path):
    rows = dict(
        summary(
            settings(tmp_path),
            plan(
                tmp_path,
                buckets=None,
                resolution=512,
                fitted=4,
                world=1,
                resume_from=tmp_path / "checkpoints" / "step-000040",
            ),
        )
    )
    assert rows["sizes"] == "512×512 squares"
    assert "factors fitted to the 4 layer(s)" in rows["adapter"]
    assert rows["steps"].endswith(", resuming from step-000040")
    assert rows["class images"].startswith("none (no --class-prompt")


def test_summary_shows_the_factors_each_layer_shape_got_where_they_were_fitted(tmp_path):
    from krona_cli.kron.factors import fit_factors, parse_factors

    def fitted(*shapes):  # what trainable_adapter gives each (d_out, d_in) for --factors 7x3
        return tuple((o, i, str(fit_factors(parse_factors("7x3"), o, i)), "7x3") for o, i in shapes)

    def row(*shapes):
        rows = summary(settings(tmp_path, factors="7x3"), plan(tmp_path, fitted=40, layer_factors=fitted(*shapes)))
        assert [key for key, _ in rows][:3] == ["model", "adapter", "factors used"]
        return dict(rows)["factors used"]

    # more than 4 shapes: only the fitted ones (700×300 takes 7x3 as asked), in shape order
    assert row((1280, 2048), (640, 640), (700, 300), (1280, 768), (640, 2048), (1280, 1280)) == (
        "640×640: 5x2 (asked 7x3), 640×2048: 5x2 (asked 7x3), 1280×768: 5x3 (asked 7x3), "
        "1280×1280: 5x2 (asked 7x3), 1280×2048: 5x2 (asked 7x3)"
    )
    assert row((700, 300), (640, 640)) == "640×640: 5x2 (asked 7x3), 700×300: 7x3"  # few shapes: all of them
    many = row(*[(o, 640) for o in range(641, 661)])  # 20 fitted shapes: the first 6, then how many more
    assert many.count("asked 7x3") == 6 and many.endswith(" and 14 more shapes")
    # every layer as asked, or a LoRA adapter (no Kronecker layers): no row
    for layers in (fitted((700, 300), (70, 30)), ()):
        assert "factors used" not in dict(summary(settings(tmp_path), plan(tmp_path, layer_factors=layers)))


# --- state and restore ------------------------------------------------------------------------------------------------


def toy_run(tmp_path, cfg, seed, world=1, photo_bytes=b"photo"):
    """A Run around one linear layer, with a fake accelerator: enough for state() and restore()."""
    from krona_cli.training.ema import EMA

    photo = tmp_path / "photos" / "a.jpg"
    photo.parent.mkdir(exist_ok=True)
    photo.write_bytes(photo_bytes)
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    params = {f"unet.{name}": p for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(params.values(), lr=0.1)
    accelerator = SimpleNamespace(
        num_processes=world,
        process_index=0,
        scaler=None,
        device=torch.device("cpu"),
        is_main_process=True,
        wait_for_everyone=lambda: None,
    )
    return Run(
        cfg,
        accelerator,
        {"unet": model},
        model,
        params,
        optimizer,
        torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5),
        EMA(params, 0.9),
        None,
        SimpleNamespace(weight_dtype=torch.float32),
        Data(SimpleNamespace(what="instance", paths=[photo]), None, None, None),
        None,
        tmp_path / "out",
        Reporter(),
    )


def train_a_little(run: Run, steps: int) -> None:
    for _ in range(steps):
        inputs = torch.randn(4, 3, generator=torch.Generator().manual_seed(run.done))
        run.denoiser(inputs).square().mean().backward()
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad()
        run.ema.update()
        run.done += 1


def test_restore_continues_exactly_where_state_left_off(tmp_path):
    cfg = settings(tmp_path)
    first = toy_run(tmp_path, cfg, seed=1)
    train_a_little(first, 3)
    path = save_checkpoint(tmp_path / "out", first.state())  # through the on-disk container and back
    expected_draw = torch.rand(3)  # the global RNG right after the state was taken

    second = toy_run(tmp_path, cfg, seed=2)
    second.restore(load_checkpoint(path), path)
    assert second.done == 3 and torch.rand(3).equal(expected_draw)
    for name, p in first.params.items():
        assert second.params[name].equal(p)
    assert second.lr_scheduler.state_dict() == first.lr_scheduler.state_dict()
    assert all(second.ema.state_dict()[k].equal(v) for k, v in first.ema.state_dict().items())
    train_a_little(first, 2)
    train_a_little(second, 2)  # the optimizer's moments came back too: the same next steps
    assert all(second.params[name].equal(p) for name, p in first.params.items())


def test_restore_refuses_another_global_batch_other_photos_or_other_weights(tmp_path):
    cfg = settings(tmp_path)
    path = save_checkpoint(tmp_path / "out", toy_run(tmp_path, cfg, seed=1).state())
    state = load_checkpoint(path)
    with pytest.raises(KronaError, match="global batch of 1 samples per step; this run has 2"):
        toy_run(tmp_path, cfg, seed=1, world=2).restore(state, path)
    with pytest.raises(KronaError, match=r"instance images changed .*changed a\.jpg"):
        toy_run(tmp_path, cfg, seed=1, photo_bytes=b"another photo").restore(state, path)
    other = toy_run(tmp_path, cfg, seed=1)
    other.params = {"unet.other": other.params["unet.weight"]}
    with pytest.raises(KronaError, match="does not hold the weights this run trains"):
        other.restore(state, path)
    with pytest.raises(KronaError, match=r"other settings \(seed\)"):
        toy_run(tmp_path, settings(tmp_path, seed=5), seed=1).restore(state, path)
    assert Path(path).name == "step-000000"
