"""`krona train --optimizer prodigy` and `adamw-schedulefree`: each trains, checkpoints and resumes bit for bit on the
tiny SDXL; schedule-free's evaluation weights are what its own `eval()` gives, and they are what the saved adapter
holds; settings an optimizer cannot take are one line."""

import pytest
import torch
from safetensors.torch import load_file
from test_train import config

from krona_cli.cli import main
from krona_cli.training.checkpoint import checkpoint_dir, load_checkpoint
from krona_cli.training.optimizers import build, evaluation_weights
from krona_cli.training.train import train


def _params(seed: int) -> dict[str, torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.nn.Parameter(torch.randn(shape, generator=g)) for name, shape in [("a", (6, 4)), ("b", (5,))]}


def _steps(params, optimizer, count: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(count):
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()


def test_schedule_free_evaluation_weights_are_its_own_eval_and_leave_training_weights_alone():
    params = _params(0)
    groups = [{"params": [params["b"]], "lr": 0.1}, {"params": [params["a"]], "lr": 0.05}]  # not in name order
    optimizer = build("adamw-schedulefree", groups, weight_decay=0.01, warmup_steps=2)
    assert all(torch.equal(w, p) for w, p in zip(evaluation_weights(optimizer, params).values(), params.values()))
    _steps(params, optimizer, 5, seed=1)
    training = {n: p.detach().clone() for n, p in params.items()}
    weights = evaluation_weights(optimizer, params)
    assert all(torch.equal(p, training[n]) for n, p in params.items())
    optimizer.eval()  # the library's own: puts its evaluation weights into the params
    for name, p in params.items():
        assert torch.equal(weights[name], p), name
        assert not torch.equal(weights[name], training[name]), name
    assert evaluation_weights(build("prodigy", [{"params": list(_params(2).values()), "lr": 1.0}], 0.0, 0), {}) is None


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["prodigy", "adamw-schedulefree"])
def test_each_optimizer_trains_and_resumes_bit_identically(tiny_sdxl_dir, tmp_path, optimizer):
    common = dict(optimizer=optimizer, batch_size=2, checkpoint_every=3)
    straight = train(config(tiny_sdxl_dir, tmp_path / "straight", steps=6, **common))
    first = train(config(tiny_sdxl_dir, tmp_path / "resumed", steps=3, **common))
    assert first.step == 3
    second = train(config(tiny_sdxl_dir, tmp_path / "resumed", steps=6, resume="latest", **common))
    assert straight.losses[3:] == second.losses
    a, b = load_file(straight.adapter), load_file(second.adapter)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    state = load_checkpoint(checkpoint_dir(tmp_path / "resumed", 6))
    group = state.optimizer["param_groups"][0]
    assert group["k"] == 6  # the optimizer's own step count went on from the checkpoint's 3
    trained = {name: torch.nn.Parameter(value.clone()) for name, value in state.params.items()}
    assert all(value.abs().sum() > 0 for name, value in trained.items() if name.endswith(".kron_b"))  # zero at init
    if optimizer == "prodigy":
        assert all(torch.equal(a[n], trained[n]) for n in trained)  # the adapter holds the training weights
        return
    # schedule-free: the adapter holds the library's eval() weights of the final state, not its training weights
    library = build(optimizer, [{"params": list(trained.values()), "lr": group["lr"]}], 0.0, 0)
    library.load_state_dict(state.optimizer)
    library.eval()
    assert all(torch.equal(a[n], p) for n, p in trained.items())
    assert not all(torch.equal(a[n], state.params[n]) for n in trained)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr-scheduler", "cosine"], "--optimizer adamw-schedulefree needs no learning-rate schedule"),
        (["--ema"], "--optimizer adamw-schedulefree averages the weights itself; leave out --ema"),
        (["--optimizer", "prodigy", "--text-encoder-lr", "0.5"], "leave out --text-encoder-lr"),
    ],
)
def test_settings_an_optimizer_cannot_take_are_one_line(tiny_sdxl_dir, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    args = ["train", "--config", "tiny", "--pretrained-model", str(tiny_sdxl_dir), "--output-dir", str(out)]
    args += ["--instance-dir", str(tmp_path), "--prompt", "a sks cat", "--optimizer", "adamw-schedulefree", *flags]
    # (a later --optimizer wins)
    assert main(args) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err
    assert not out.exists()
