"""PluginReverseSDE.elbo: unbiased (value and gradient) against closed forms, and the test can fail.

Statistical tests: per-example estimates over many repeats, |z| < 4 (a false alarm about once in 16,000
runs per test), fixed seeds, float64. Sharp data (std 0.005 to 0.02) puts the draws below t_epsilon, where
the Hutchinson form is used, on equal footing with the denoising form above it.
"""
import math

import pytest
import torch

import lib.sdes
from lib.oracles import (GaussianDrift, IsotropicGaussianMixture, expected_elbo, expected_elbo_scaled_drift,
                         gaussian_log_prob)
from lib.sdes import PluginReverseSDE, SubVariancePreservingSDE, VariancePreservingSDE
from test_sdes import mlp_drift

SCHEDULES = [dict(beta_min=0.1, beta_max=20.0), dict(beta_min=0.5, beta_max=12.0)]
DATA = [((2,), 0.6), ((2,), 0.02), ((1, 3, 3), 0.01), ((3, 2, 2), 0.005)]  # (shape of x, data std)


def z_score(err):
    """Mean of err over everything in units of its standard error (entries independent)."""
    return err.mean().item() / (err.std().item() / math.sqrt(err.numel()))


def repeated(x, reps):
    return x.repeat(reps, *([1] * (x.dim() - 1)))


def gaussian_elbo_error(sde, shape, std, reps, seed, vtype="rademacher", mean=0.3, num_times=1):
    """elbo - E[elbo] for 8 points of N(mean, std^2 I) data, exact drift, (reps, 8)."""
    torch.manual_seed(seed)
    gen = PluginReverseSDE(sde, GaussianDrift(sde, mean, std), sde.T, vtype=vtype).eval()
    x = mean + std * torch.randn(8, *shape, dtype=torch.float64)
    with torch.no_grad():
        elbo = gen.elbo(repeated(x, reps), num_times=num_times).view(reps, 8)
    return elbo - expected_elbo(sde, x, mean, std)


@pytest.mark.parametrize("sde_cls", [VariancePreservingSDE, SubVariancePreservingSDE])
@pytest.mark.parametrize("shape,std", DATA)
@pytest.mark.parametrize("cfg", SCHEDULES)
def test_elbo_is_unbiased_for_gaussian_data(cfg, shape, std, sde_cls):
    err = gaussian_elbo_error(sde_cls(**cfg), shape, std, reps=4000, seed=0)
    assert abs(z_score(err)) < 4, (err.mean().item(), z_score(err))


@pytest.mark.parametrize("sde_cls", [VariancePreservingSDE, SubVariancePreservingSDE])
@pytest.mark.parametrize("cfg", SCHEDULES)
def test_stratified_elbo_is_unbiased_for_gaussian_data(cfg, sde_cls):
    """K = 8 stratified times per example (each example its own draws): still E[elbo] exactly."""
    err = gaussian_elbo_error(sde_cls(**cfg), (1, 3, 3), 0.01, reps=600, seed=5, num_times=8)
    assert abs(z_score(err)) < 4, (err.mean().item(), z_score(err))


def test_stratified_times_remove_the_variance_of_the_time_draw():
    """When the integrand is a smooth function of s alone (on trained image models it nearly is), the variance
    left by K strata is that of h / q within a stratum, O(K^-3): 8 strata at 8x the cost cut it far more than
    the 8x of 8 independent draws. Here h = q (1 + s^2), so h / q = 1 + s^2 varies only through s."""
    sde = VariancePreservingSDE()
    gen = PluginReverseSDE(sde, GaussianDrift(sde, 0.3, 0.01), sde.T).eval()
    q = sde.importance_time_sampler()
    gen._elbo_integrand = lambda x, s: q.density(s) * (1 + s ** 2)
    x = torch.zeros(4000, 2, dtype=torch.float64)
    torch.manual_seed(6)
    one, eight = gen.elbo(x, num_times=1).var(), gen.elbo(x, num_times=8).var()
    assert one / eight > 100, (one.item(), eight.item())


def test_the_strata_spread_estimates_the_estimators_variance():
    """lib.evaluation.stratified_elbo's per-example variance, averaged over many draws, is the actual variance of
    the estimate to within a factor of 2 (it assumes h / q locally linear across three neighbouring strata)."""
    from lib.evaluation import stratified_elbo

    torch.manual_seed(8)
    sde = VariancePreservingSDE()
    gen = PluginReverseSDE(sde, GaussianDrift(sde, 0.3, 0.01), sde.T).eval()
    x = 0.3 + 0.01 * torch.randn(8, 1, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        value, variance = stratified_elbo(gen, 8)(repeated(x, 500))
    actual = value.view(500, 8).var(0)  # (8,) per example
    claimed = variance.view(500, 8).mean(0)
    assert torch.all(claimed > 0.5 * actual) and torch.all(claimed < 2 * actual), (claimed, actual)


def test_elbo_is_unbiased_with_gaussian_probes():
    err = gaussian_elbo_error(VariancePreservingSDE(), (1, 3, 3), 0.01, reps=4000, seed=1, vtype="gaussian")
    assert abs(z_score(err)) < 4


def test_elbo_is_unbiased_for_a_sharp_gaussian_mixture():
    """Multimodal data: E[elbo] = log p_0(x) + E[log N(Y_T; 0, I) - log p_T(Y_T) | x] (second term by Monte Carlo)."""
    torch.manual_seed(2)
    sde = VariancePreservingSDE()
    centres = torch.rand(3, 1, 3, 3, dtype=torch.float64)
    mixture = IsotropicGaussianMixture(sde, centres, 0.01)
    x = centres[torch.tensor([0, 1, 2, 0])] + 0.01 * torch.randn(4, 1, 3, 3, dtype=torch.float64)
    t_T = torch.ones(20_000, dtype=torch.float64)
    mismatch = []
    for xi in x:
        y_T = sde.sample(t_T, xi.expand(20_000, 1, 3, 3))
        mismatch.append((sde.prior_log_prob(y_T) - mixture.log_prob(y_T, t_T)).mean())
    expected = mixture.log_prob(x, torch.zeros(4, dtype=torch.float64)) + torch.stack(mismatch)
    gen = PluginReverseSDE(sde, mixture, 1.0).eval()
    with torch.no_grad():
        elbo = gen.elbo(repeated(x, 5000), num_times=1).view(5000, 4)
    assert abs(z_score(elbo - expected)) < 4


def _drop_importance_weight(monkeypatch):
    """s ~ q as before, but the density reported as 1: the integrand is no longer divided by q(s)."""
    original = VariancePreservingSDE.importance_time_sampler

    def sampler(self, T=None):
        q = original(self, T)
        q.density = lambda s: torch.ones_like(torch.as_tensor(s))
        return q

    monkeypatch.setattr(VariancePreservingSDE, "importance_time_sampler", sampler)


def _drop_divergence(monkeypatch):
    """The Hutchinson form below t_epsilon without its div(g a) term."""
    monkeypatch.setattr(lib.sdes, "divergence_estimate", lambda out, inp, probe, create_graph=False:
                        out.new_zeros(out.shape[0]))


def _drop_denoising_offset(monkeypatch):
    """The denoising form above t_epsilon without its closed-form drift-free term."""
    monkeypatch.setattr(VariancePreservingSDE, "denoising_offset", lambda self, s0, s1, y: torch.zeros_like(s0))


@pytest.mark.parametrize("breakage", [_drop_importance_weight, _drop_divergence, _drop_denoising_offset])
def test_the_oracle_test_fails_for_a_broken_estimator(breakage, monkeypatch):
    """The unbiasedness test above can fail: each deliberately broken variant is rejected (|z| >= 4)."""
    breakage(monkeypatch)
    err = gaussian_elbo_error(VariancePreservingSDE(), (2,), 0.02, reps=4000, seed=0)
    assert abs(z_score(err)) >= 4, z_score(err)


class ScaledDrift(torch.nn.Module):
    """scale * exact drift of Gaussian data, with scale a trainable parameter."""

    def __init__(self, exact, scale):
        super().__init__()
        self.exact = exact
        self.scale = torch.nn.Parameter(torch.tensor(scale, dtype=torch.float64))

    def forward(self, y, s):
        return self.scale * self.exact(y, s)


@pytest.mark.parametrize("cfg", SCHEDULES)
def test_elbo_value_and_gradient_are_unbiased_for_a_wrong_drift_in_training_mode(cfg):
    """With a = 0.8 a*: E[elbo] and E[d elbo / d scale] match the quadrature of expected_elbo_scaled_drift.

    The gradient below t_epsilon flows through the Hutchinson divergence (create_graph), above it through
    the denoising residual; dropping either would bias it.
    """
    torch.manual_seed(3)
    sde = VariancePreservingSDE(**cfg)
    mean, std, scale = 0.3, 0.01, 0.8
    drift = ScaledDrift(GaussianDrift(sde, mean, std), scale)
    gen = PluginReverseSDE(sde, drift, sde.T).train()
    x = mean + std * torch.randn(4, 1, 2, 2, dtype=torch.float64)
    want, want_grad = expected_elbo_scaled_drift(sde, x, mean, std, scale)
    values, grads = [], []
    for _ in range(25):  # chunks: the spread of the chunk gradients gives the gradient's standard error
        elbo = gen.elbo(repeated(x, 400), num_times=1).view(400, 4)
        (grad,) = torch.autograd.grad(elbo.mean(), drift.scale)
        values.append(elbo.detach() - want)
        grads.append(grad - want_grad.mean())
    assert abs(z_score(torch.cat(values))) < 4
    assert abs(z_score(torch.stack(grads))) < 4, (torch.stack(grads).mean().item(), want_grad.mean().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2,), (3, 4, 4)])
def test_elbo_is_a_finite_per_example_vector_of_the_input_dtype(shape, dtype):
    sde = VariancePreservingSDE()
    gen = PluginReverseSDE(sde, GaussianDrift(sde, 0.5, 0.05), 1.0).eval()
    torch.manual_seed(4)
    for batch in (1, 300):  # one example takes one form only; 300 hold both (below t_eps ~5% each)
        x = (0.5 + 0.05 * torch.randn(batch, *shape)).to(dtype)
        elbo = gen.elbo(x)
        assert elbo.shape == (batch,) and elbo.dtype == dtype and torch.isfinite(elbo).all()


def test_elbo_is_differentiable_in_training_mode_only_and_runs_under_no_grad():
    sde = VariancePreservingSDE()
    gen = PluginReverseSDE(sde, mlp_drift(2), 1.0)
    x = torch.randn(64, 2)
    assert gen.train().elbo(x).requires_grad
    assert not gen.eval().elbo(x).requires_grad
    with torch.no_grad():
        assert torch.isfinite(gen.elbo(x)).all()
        assert torch.isfinite(gen.train().elbo(x)).all()


def test_elbo_gradients_reach_the_drift_parameters():
    torch.manual_seed(5)
    drift = mlp_drift(4)
    gen = PluginReverseSDE(VariancePreservingSDE(), drift, 1.0).train()
    (-gen.elbo(torch.randn(256, 1, 2, 2)).mean()).backward()
    for name, p in drift.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_elbo_rejects_a_horizon_below_t_epsilon():
    sde = VariancePreservingSDE(t_epsilon=1e-3)
    gen = PluginReverseSDE(sde, GaussianDrift(sde, 0.0, 1.0), 5e-4)
    with pytest.raises(ValueError, match="t_epsilon must lie in"):
        gen.elbo(torch.randn(4, 2))


def test_mixture_oracle_drift_is_g_times_the_gradient_of_its_log_density():
    sde = VariancePreservingSDE()
    torch.manual_seed(6)
    mixture = IsotropicGaussianMixture(sde, torch.rand(3, 1, 2, 2, dtype=torch.float64), 0.05)
    y = torch.rand(5, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    s = torch.tensor([0.0, 1e-4, 0.01, 0.3, 1.0], dtype=torch.float64)
    (score,) = torch.autograd.grad(mixture.log_prob(y, s).sum(), y)
    assert torch.allclose(mixture(y, s), sde.g(s, y) * score)
    one = IsotropicGaussianMixture(sde, torch.full((1, 1, 2, 2), 0.3, dtype=torch.float64), 0.05)
    assert torch.allclose(one.log_prob(y, torch.zeros(5, dtype=torch.float64)), gaussian_log_prob(y, 0.3, 0.05 ** 2))
