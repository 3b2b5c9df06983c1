"""MLPDrift: the drift network a(y, s) for flat data."""
import json

import pytest
import torch

from lib.models.mlp import MLPDrift
from lib.sdes import VariancePreservingSDE

VARIANTS = [
    dict(),
    dict(output="drift", time_embed="sinusoid"),
    dict(output="eps"),
    dict(conditioning="film", residual=True, norm="layer", depth=3, width=64),
    dict(y_fourier=8),
]


def build(seed=0, **kwargs):
    torch.manual_seed(seed)
    return MLPDrift(**kwargs)


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_output_shape_matches_input(kwargs):
    for d in (2, 5):
        net = build(dim=d, **kwargs)
        y, s = torch.randn(7, d), torch.rand(7)
        assert net(y, s).shape == (7, d)


def test_batch_of_one_keeps_its_shape():
    net = build()
    assert net(torch.randn(1, 2), torch.rand(1)).shape == (1, 2)


def test_rejects_time_of_wrong_shape():
    net = build()
    with pytest.raises(ValueError):
        net(torch.randn(4, 2), torch.rand(4, 1))


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_time_conditioning_resolves_nearby_times(kwargs):
    # s = 0.10 and 0.11 differ by 1% of [0, T]; an embedding of unscaled s barely separates them.
    net = build(**kwargs)
    if kwargs.get("residual"):
        for p in net.parameters():  # zero-initialised branches would hide the time path at init
            torch.nn.init.normal_(p, std=0.1)
    y = torch.randn(16, 2)
    raw = lambda s: net.net(y, torch.full((16,), s))  # noqa: E731
    rel = (raw(0.10) - raw(0.11)).norm() / raw(0.10).norm()
    assert rel > 1e-3


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_gradients_reach_every_parameter(kwargs):
    net = build(**kwargs)
    net(torch.randn(8, 2), torch.rand(8)).pow(2).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # Residual branches start at zero, so only their output layers get gradient at init; every layer
    # that the forward pass reads unconditionally must get some.
    assert net.inp.weight.grad.abs().sum() > 0 and net.head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_constructor_round_trips_through_json(kwargs):
    kw = dict(kwargs, beta_min=0.2, beta_max=15.0, local_std=0.03)
    net = build(**kw)
    rebuilt = MLPDrift(**json.loads(json.dumps({"name": "MLPDrift", "kwargs": kw}))["kwargs"])
    rebuilt.load_state_dict(net.state_dict())  # strict: same parameter names and shapes
    y, s = torch.randn(5, 2), torch.rand(5)
    torch.testing.assert_close(rebuilt(y, s), net(y, s))


def test_rejects_unknown_options():
    for bad in (dict(output="score"), dict(time_embed="raw"), dict(conditioning="add"), dict(norm="batch"),
                dict(time_dim=7), dict(local_std=-1.0)):
        with pytest.raises(ValueError):
            MLPDrift(**bad)


def test_schedule_matches_the_sde():
    sde = VariancePreservingSDE(beta_min=0.2, beta_max=15.0)
    net = MLPDrift(beta_min=0.2, beta_max=15.0)
    s = torch.tensor([0.0, 1e-7, 1e-3, 0.3, 1.0], dtype=torch.float64)
    torch.testing.assert_close(net.sigma2(s), sde.var(s))
    torch.testing.assert_close(net.beta(s), sde.beta(s))
    assert net.sigma2(torch.tensor([1e-7], dtype=torch.float32)).item() > 0  # expm1: no underflow


def test_eps_output_is_minus_g_over_sigma_times_noise_prediction():
    sde = VariancePreservingSDE()
    net = build(output="eps").double()
    y, s = torch.randn(6, 2, dtype=torch.float64), torch.rand(6, dtype=torch.float64) * 0.9 + 0.05
    g = sde.g(s, y)
    sigma = sde.var(s).sqrt()[:, None]
    torch.testing.assert_close(net(y, s), -g / sigma * net.net(y, s))
    # The DSM residual a sigma / g + eps is then eps - eps_hat: plain noise prediction.
    eps = torch.randn_like(y)
    torch.testing.assert_close(net(y, s) * sigma / g + eps, eps - net.net(y, s))


def test_preconditioned_output_is_scaled_score_with_a_noise_floor():
    sde = VariancePreservingSDE()
    net = build(output="preconditioned", local_std=0.05).double()
    y, s = torch.randn(6, 2, dtype=torch.float64), torch.tensor([0.0, 1e-4, 1e-2, 0.1, 0.5, 1.0], dtype=torch.float64)
    g = sde.g(s, y)
    c = (sde.var(s) + 0.05 ** 2).sqrt()[:, None]
    torch.testing.assert_close(net(y, s), -g / c * net.net(y, s))
    assert torch.isfinite(net(y, torch.zeros(6, dtype=torch.float64))).all()  # finite at s = 0


def test_drift_output_is_the_raw_network():
    net = build(output="drift")
    y, s = torch.randn(4, 2), torch.rand(4)
    torch.testing.assert_close(net(y, s), net.net(y, s))


def test_fourier_features_are_fixed_by_the_kwargs():
    a, b = build(seed=0, y_fourier=16), build(seed=1, y_fourier=16)
    torch.testing.assert_close(a.y_freqs, b.y_freqs)  # independent of the global RNG
    assert a.inp.in_features == 2 + 32 + a.time_dim
    y, s = torch.randn(3, 2), torch.rand(3)
    assert a(y, s).shape == (3, 2)
