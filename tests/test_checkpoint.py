"""Training checkpoints: exact round trips (params, optimizers, schedulers, RNG), atomic writes, rotation, resume."""

import json
import logging
import math
import random

import numpy as np
import pytest
import torch
from diffusers.optimization import get_scheduler

from krona_cli.errors import KronaError
from krona_cli.training import checkpoint as ckpt
from krona_cli.training.checkpoint import (
    TrainingState,
    capture_rng,
    checkpoint_dir,
    incomplete_leftovers,
    list_checkpoints,
    load_checkpoint,
    pack_tree,
    resolve_resume,
    restore_rng,
    save_checkpoint,
    unpack_tree,
)

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def assert_same(a, b):
    """Equal values of equal types all the way down: tensors by dtype, shape and bits; floats by their repr."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b) and [type(k) for k in a] == [type(k) for k in b]
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, float):
        assert repr(a) == repr(b)
    else:
        assert a == b


def state(step, **kw):
    params = {"unet.a": torch.randn(4, 2), "te.b": torch.randn(3)}
    optimizer = {"state": {0: {"step": torch.tensor(2.0)}}, "param_groups": [{"params": [0, 1]}]}
    return TrainingState(step=step, params=params, optimizer=optimizer, lr_scheduler={"last_epoch": 2}, **kw)


def test_pack_tree_round_trips_exactly_through_json_and_safetensors():
    from safetensors.torch import load, save

    obj = {
        "state": {0: {"step": torch.tensor(3.0), "q": torch.randint(0, 255, (4, 8), dtype=torch.uint8)}, 7: {}},
        "groups": [{"betas": (0.9, 0.999), "lr": 0.1, "eps": 1e-308, "neg": -0.0, "inf": math.inf, "none": None}],
        "mixed": {1: "int", "1": "str", False: [1, (2, (3,))], 2.5: 0.1 + 0.2, None: torch.arange(5.0).bfloat16()},
        "__tensor__": "looks like a tag but is data",
        "only": {"__tuple__": [1, 2]},
        "flags": [True, False, 2**70, "x"],
    }
    tree, tensors = pack_tree(obj, "opt")
    assert all(k.startswith("opt.") for k in tensors) and "opt.state.0.q" in tensors
    back = unpack_tree(json.loads(json.dumps(tree)), load(save(tensors)))
    assert_same(obj, back)


def test_pack_tree_refuses_what_it_cannot_store():
    with pytest.raises(TypeError, match="set"):
        pack_tree({"a": {1, 2}})


def test_checkpoint_round_trips_params_ema_and_meta(tmp_path):
    ema = {"unet.a": torch.randn(4, 2), "__count__": torch.tensor(12)}
    s = state(12, ema=ema, meta={"config": {"lr": 1e-4}, "hash": "ab"})
    path = save_checkpoint(tmp_path, s)
    assert path == checkpoint_dir(tmp_path, 12) == tmp_path / "checkpoints" / "step-000012"
    files = sorted(p.name for p in path.iterdir())
    assert files == ["ema.safetensors", "optimizer.safetensors", "params.safetensors", "state.json"]
    back = load_checkpoint(path)
    assert back.step == 12 and back.meta == s.meta and back.rng is None
    assert_same(s.params, back.params)
    assert_same(s.ema, back.ema)


def _optimizer(kind, params):
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, lr=1e-2, weight_decay=0.1)


@pytest.mark.parametrize("kind", ["adamw", "adamw8bit"])
def test_resumed_optimizer_and_scheduler_continue_bit_identically(tmp_path, kind):
    def setup(weights):
        params = {n: torch.nn.Parameter(w.clone()) for n, w in weights.items()}
        opt = _optimizer(kind, list(params.values()))
        return params, opt, get_scheduler("cosine", opt, num_warmup_steps=3, num_training_steps=20)

    def train(params, opt, sched, steps, seed):
        g, lrs = torch.Generator().manual_seed(seed), []
        for _ in range(steps):
            for p in params.values():
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
            sched.step()
            lrs.append(sched.get_last_lr()[0])
        return lrs

    torch.manual_seed(0)
    init = {"big": torch.randn(64, 128), "small": torch.randn(7)}  # 8-bit state needs >= 4096 elements
    params, opt, sched = setup(init)
    train(params, opt, sched, 5, seed=1)
    path = save_checkpoint(tmp_path, TrainingState(5, dict(params), opt.state_dict(), sched.state_dict()))
    lrs = train(params, opt, sched, 5, seed=2)

    loaded = load_checkpoint(path)
    params2, opt2, sched2 = setup(loaded.params)
    opt2.load_state_dict(loaded.optimizer)
    sched2.load_state_dict(loaded.lr_scheduler)
    assert train(params2, opt2, sched2, 5, seed=2) == lrs
    for name in params:
        assert torch.equal(params[name], params2[name]), name


def test_rng_restored_from_a_checkpoint_repeats_the_same_draws(tmp_path):
    s = state(1)
    s.rng = capture_rng()
    path = save_checkpoint(tmp_path, s)

    def draw():
        return random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(), torch.rand(4)

    first = draw()
    restore_rng(load_checkpoint(path).rng)
    second = draw()
    assert first[:4] == second[:4] and torch.equal(first[4], second[4])


def test_crash_while_saving_leaves_previous_checkpoint_and_no_partial_one(tmp_path, monkeypatch):
    first = save_checkpoint(tmp_path, state(10))
    real_write = ckpt.write_bytes_atomic

    def crashing_write(path, data):
        if path.name == "state.json":
            raise OSError("disk full")
        return real_write(path, data)

    monkeypatch.setattr(ckpt, "write_bytes_atomic", crashing_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, state(20))
    assert not checkpoint_dir(tmp_path, 20).exists()
    assert list_checkpoints(tmp_path) == [first] and incomplete_leftovers(tmp_path) == []
    load_checkpoint(first)


def test_leftovers_of_a_killed_run_are_ignored_and_reported(tmp_path):
    first = save_checkpoint(tmp_path, state(10))
    staged = tmp_path / "checkpoints" / ".step-000030.tmp-abc"
    partial = checkpoint_dir(tmp_path, 40)
    for folder in staged, partial:
        folder.mkdir()
        (folder / "params.safetensors").write_bytes(b"")
    (tmp_path / "checkpoints" / "notes.txt").write_text("mine")
    assert list_checkpoints(tmp_path) == [first]
    assert incomplete_leftovers(tmp_path) == [staged, partial]
    assert resolve_resume(tmp_path, "latest") == first


def test_rotation_keeps_the_newest_and_sorts_by_step(tmp_path):
    for step in (999_999, 1, 1_000_000, 5):
        save_checkpoint(tmp_path, state(step), keep=None)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001", "step-000005", "step-999999", "step-1000000"]
    save_checkpoint(tmp_path, state(1_000_001), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-1000000", "step-1000001"]
    assert incomplete_leftovers(tmp_path) == []
    with pytest.raises(KronaError, match="keep"):
        save_checkpoint(tmp_path, state(3), keep=-1)


def test_resolve_resume(tmp_path):
    assert resolve_resume(tmp_path, "latest") is None
    with pytest.raises(KronaError, match="latest"):
        resolve_resume(tmp_path, str(tmp_path / "nope"))
    path = save_checkpoint(tmp_path, state(7))
    assert resolve_resume(tmp_path, "latest") == path
    assert resolve_resume(tmp_path, str(path)) == path
    with pytest.raises(KronaError, match="not a complete checkpoint"):
        resolve_resume(tmp_path, str(tmp_path))


@pytest.mark.parametrize(
    "file, damage, match",
    [
        ("state.json", lambda f: f.write_bytes(f.read_bytes()[:50]), "corrupt"),
        ("state.json", lambda f: f.write_text(json.dumps({**json.loads(f.read_text()), "version": 99})), "version 99"),
        ("state.json", lambda f: f.write_text("{}"), "corrupt"),
        ("params.safetensors", lambda f: f.unlink(), "missing"),
        ("optimizer.safetensors", lambda f: f.write_bytes(b"\0" * 7), "corrupt"),
        ("rng.safetensors", lambda f: f.write_bytes(b"{}"), "corrupt"),
    ],
)
def test_damaged_checkpoint_names_the_file(tmp_path, file, damage, match):
    path = save_checkpoint(tmp_path, state(3, rng=capture_rng()))
    damage(path / file)
    with pytest.raises(KronaError, match=match) as info:
        load_checkpoint(path)
    assert str(path / file) in str(info.value)
