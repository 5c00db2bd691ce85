"""EMA of the adapter weights: the recurrence, its warmup, swapping the weights in and out, state round trips."""

import pytest
import torch

from krona_cli.errors import KronaError
from krona_cli.training.ema import EMA
from krona_cli.training.trainable import holding


def make_params(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (3, 4), "b": (5,)}
    return {name: torch.nn.Parameter(torch.randn(shape, generator=g).to(dtype)) for name, shape in shapes.items()}


def train_step(params, g):
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype))


@pytest.mark.parametrize("warmup", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_follows_the_recurrence(warmup, dtype):
    params = make_params(dtype=dtype)
    ema = EMA(params, decay=0.9, warmup=warmup)
    expected = {n: p.detach().double() for n, p in params.items()}
    g = torch.Generator().manual_seed(1)
    for n in range(1, 31):
        train_step(params, g)
        ema.update()
        d = min(0.9, (n + 1) / (n + 10)) if warmup else 0.9
        expected = {k: d * expected[k] + (1 - d) * params[k].detach().double() for k in params}
    assert ema.count == 30
    for k, shadow in ema.shadow().items():
        assert shadow.dtype == torch.float32
        torch.testing.assert_close(shadow.double(), expected[k], rtol=0, atol=1e-5)


def test_warmup_decay_of_the_first_updates():
    param = torch.nn.Parameter(torch.zeros(2))
    ema = EMA({"p": param}, decay=0.999)
    flat = EMA({"p": param}, decay=0.999, warmup=False)
    with torch.no_grad():
        param.fill_(1.0)
    ema.update()  # d = 2/11
    flat.update()  # d = 0.999
    torch.testing.assert_close(ema.shadow()["p"], torch.full((2,), 9 / 11))
    torch.testing.assert_close(flat.shadow()["p"], torch.full((2,), 0.001))
    ema.update()  # d = 3/12: 0.25 * 9/11 + 0.75
    torch.testing.assert_close(ema.shadow()["p"], torch.full((2,), 0.25 * 9 / 11 + 0.75))


def test_holding_swaps_ema_weights_in_and_restores_training_weights_exactly():
    params = make_params()
    ema = EMA(params, decay=0.5)
    train_step(params, torch.Generator().manual_seed(2))
    ema.update()
    training = {n: p.detach().clone() for n, p in params.items()}
    with pytest.raises(RuntimeError, match="boom"):
        with holding(params, ema.shadow()):
            for n, p in params.items():
                assert torch.equal(p, ema.shadow()[n]) and not torch.equal(p, training[n])
            raise RuntimeError("boom")
    for n, p in params.items():
        assert torch.equal(p, training[n])
    assert all(p.requires_grad for p in params.values())


def test_state_round_trip_then_continuing_is_identical():
    params, params2 = make_params(), make_params()
    ema = EMA(params, decay=0.95)
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        train_step(params, g)
        ema.update()
    state = ema.state_dict()
    assert state["__count__"].dtype == torch.int64 and state["__count__"].dim() == 0
    resumed = EMA(params2, decay=0.95)
    resumed.load_state_dict({k: v.clone() for k, v in state.items()})
    with torch.no_grad():
        for n, p in params2.items():
            p.copy_(params[n])
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for _ in range(4):
        train_step(params, g1)
        ema.update()
        train_step(params2, g2)
        resumed.update()
    assert resumed.count == ema.count == 8
    for n in params:
        assert torch.equal(ema.shadow()[n], resumed.shadow()[n])


@pytest.mark.parametrize(
    "edit",
    [
        lambda s: s.pop("a"),
        lambda s: s.update(c=torch.zeros(1)),
        lambda s: s.update(b=torch.zeros(6)),
        lambda s: s.pop("__count__"),
    ],
)
def test_load_state_dict_refuses_a_mismatch(edit):
    state = EMA(make_params()).state_dict()
    edit(state)
    with pytest.raises(KronaError, match="do not match"):
        EMA(make_params()).load_state_dict(state)


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 1.5])
def test_decay_outside_open_unit_interval_is_refused(decay):
    with pytest.raises(KronaError, match="decay"):
        EMA(make_params(), decay=decay)
