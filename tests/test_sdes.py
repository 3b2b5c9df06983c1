"""The VP and sub-VP SDEs and the plug-in reverse SDE against closed forms for Gaussian data."""
import math

import pytest
import torch

from lib.oracles import GaussianDrift, expected_dsm_given_s, expected_elbo
from lib.sdes import PluginReverseSDE, SubVariancePreservingSDE, VariancePreservingSDE, build_sde

SCHEDULES = [dict(beta_min=0.1, beta_max=20.0), dict(beta_min=0.5, beta_max=12.0)]
SDE_CLASSES = [VariancePreservingSDE, SubVariancePreservingSDE]


def mlp_drift(d, hidden=32):
    """A small trainable drift a(y, s) for gradient tests: input (y, s)."""
    net = torch.nn.Sequential(torch.nn.Linear(d + 1, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, d))

    class Drift(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, y, s):
            return self.net(torch.cat([y.flatten(1), s[:, None]], 1)).view_as(y)

    return Drift()


# --- the forward SDE --------------------------------------------------------------------------


@pytest.mark.parametrize("sde_cls", SDE_CLASSES)
@pytest.mark.parametrize("cfg", SCHEDULES)
def test_marginal_coefficients_solve_the_sde_moment_equations(cfg, sde_cls):
    """d alpha/ds = -beta/2 alpha and d sigma^2/ds = -beta sigma^2 + g^2, alpha(0) = 1, sigma^2(0) = 0: the
    moments of dY = -beta Y / 2 ds + g dB, whatever g is."""
    sde = sde_cls(**cfg)
    s = torch.linspace(0.01, 1, 50, dtype=torch.float64, requires_grad=True)
    alpha, var = sde.mean_weight(s), sde.var(s)
    (d_alpha,) = torch.autograd.grad(alpha.sum(), s)
    (d_var,) = torch.autograd.grad(var.sum(), s)
    beta, g2 = sde.beta(s), sde.g(s, s[:, None]).squeeze(1) ** 2
    assert torch.allclose(d_alpha, -0.5 * beta * alpha)
    assert torch.allclose(d_var, -beta * var + g2)
    zero = torch.zeros(1, dtype=torch.float64)
    assert sde.mean_weight(zero).item() == 1.0 and sde.var(zero).item() == 0.0


@pytest.mark.parametrize("cfg", SCHEDULES)
def test_sub_vp_has_song_et_als_closed_forms_and_stays_below_vp(cfg):
    """sigma^2 = (1 - e^-B)^2, g^2 = beta (1 - e^-2B) (Song et al. 2021, eq. 31); sub-VP's variance is VP's squared."""
    sub, vp = SubVariancePreservingSDE(**cfg), VariancePreservingSDE(**cfg)
    s = torch.linspace(1e-4, 1, 101, dtype=torch.float64)
    B = cfg["beta_min"] * s + 0.5 * (cfg["beta_max"] - cfg["beta_min"]) * s ** 2
    assert torch.allclose(sub.var(s), (1 - torch.exp(-B)) ** 2, rtol=1e-12)
    assert torch.allclose(sub.g(s, s[:, None]).squeeze(1) ** 2, sub.beta(s) * (1 - torch.exp(-2 * B)), rtol=1e-12)
    assert torch.all(sub.var(s) < vp.var(s)) and torch.equal(sub.mean_weight(s), vp.mean_weight(s))


def test_build_sde_rebuilds_each_sde_from_its_spec_and_defaults_to_vp():
    for cls in SDE_CLASSES:
        sde = cls(beta_min=0.2, beta_max=15.0, T=0.9, t_epsilon=2e-3)
        again = build_sde(sde.spec())
        assert type(again) is cls and again.spec() == sde.spec()
    assert type(build_sde({"beta_min": 0.1, "beta_max": 20.0, "T": 1.0})) is VariancePreservingSDE  # old checkpoints
    with pytest.raises(ValueError, match="vp, subvp"):
        build_sde({"name": "ve"})


def test_vp_variance_does_not_underflow_in_float32_near_zero():
    var = VariancePreservingSDE().var(torch.tensor([1e-7, 1e-9], dtype=torch.float32))
    assert torch.allclose(var.double(), torch.tensor([1e-8, 1e-10], dtype=torch.float64), rtol=1e-3)


def test_vp_sample_has_the_closed_form_kernel():
    sde = VariancePreservingSDE()
    torch.manual_seed(0)
    n = 200_000
    y0 = torch.full((n, 2), 1.5, dtype=torch.float64)
    t = torch.full((n,), 0.3, dtype=torch.float64)
    y, eps, std, g = sde.sample(t, y0, return_noise=True)
    alpha, var = sde.mean_weight(t[0]).item(), sde.var(t[0]).item()
    assert torch.allclose(y, alpha * y0 + std * eps)
    assert g.shape == (n, 1) and torch.allclose(g, sde.beta(t[0]).sqrt().expand_as(g))
    se_mean = math.sqrt(var / n)
    assert abs(y.mean().item() - 1.5 * alpha) < 4 * se_mean
    assert y.var().item() == pytest.approx(var, rel=4 * math.sqrt(2 / n))


def test_vp_drift_divergence_matches_autograd():
    sde = VariancePreservingSDE()
    y = torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    s = torch.rand(3, dtype=torch.float64)
    f = sde.f(s, y)
    jac_trace = sum(torch.autograd.grad(f.flatten(1)[:, i].sum(), y, retain_graph=True)[0].flatten(1)[:, i]
                    for i in range(32))
    assert torch.allclose(sde.div_f(s, y), jac_trace)


@pytest.mark.parametrize("sde_cls", SDE_CLASSES)
@pytest.mark.parametrize("cfg", SCHEDULES)
def test_denoising_offset_is_the_integral_of_its_integrand(cfg, sde_cls):
    """int_{s0}^{s1} (D g^2 / (2 sigma^2) + div f) ds, by the trapezoid rule on geometric nodes."""
    sde = sde_cls(**cfg)
    y = torch.zeros(3, 2, 2, 2, dtype=torch.float64)  # D = 8
    s0 = torch.tensor([1e-5, 1e-3, 0.2], dtype=torch.float64)
    s1 = torch.tensor([1.0, 0.5, 0.9], dtype=torch.float64)
    for i in range(3):
        s = torch.logspace(math.log10(s0[i]), math.log10(s1[i]), 200_001, dtype=torch.float64)
        integrand = 8 * sde.g(s, s[:, None]).squeeze(1) ** 2 / (2 * sde.var(s)) - 0.5 * 8 * sde.beta(s)
        want = torch.trapezoid(integrand, s).item()
        assert sde.denoising_offset(s0, s1, y)[i].item() == pytest.approx(want, rel=1e-7)


@pytest.mark.parametrize("t", [1e-3, 0.3, 1.0])
def test_expected_prior_log_prob_matches_monte_carlo(t):
    torch.manual_seed(7)
    sde = VariancePreservingSDE()
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    n = 100_000
    y = sde.sample(torch.full((n * 3,), t, dtype=torch.float64), x.repeat(n, 1, 1, 1))
    samples = sde.prior_log_prob(y).view(n, 3)
    z = (samples.mean(0) - sde.expected_prior_log_prob(t, x)) / (samples.std(0) / math.sqrt(n))
    assert z.abs().max() < 4, z


# --- the lambda family -------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1.0, torch.tensor(1.0), torch.tensor([0.8])])
def test_mu_and_sigma_match_the_formulas_at_lambda_0_half_and_1(T):
    sde = VariancePreservingSDE(T=float(T))
    gen = PluginReverseSDE(sde, GaussianDrift(sde, 0.3, 0.7), T)
    y = torch.randn(5, 3, dtype=torch.float64)
    t = torch.rand(5, dtype=torch.float64) * float(T)
    s = float(T) - t
    g = sde.beta(s).sqrt()[:, None]
    a = gen.a(y, s)
    f = -0.5 * sde.beta(s)[:, None] * y
    assert torch.allclose(gen.mu(t, y, 0.0), g * a - f)
    assert torch.allclose(gen.mu(t, y, 1.0), 0.5 * g * a - f)
    assert torch.allclose(gen.mu(t, y, 0.5), 0.75 * g * a - f)
    assert torch.allclose(gen.sigma(t, y, 0.0).expand_as(y), g.expand_as(y))
    assert torch.allclose(gen.sigma(t, y, 1.0), torch.zeros_like(g))
    assert torch.allclose(gen.sigma(t, y, 0.5), math.sqrt(0.5) * g)


def test_lambda_ode_drift_is_the_probability_flow_of_the_true_score():
    """At lambda = 1: mu = -(f - g^2 score / 2), the probability-flow ODE run backwards."""
    sde = VariancePreservingSDE()
    drift = GaussianDrift(sde, 0.0, 1.0)  # N(0, I) data: the marginal stays N(0, I), score = -y
    gen = PluginReverseSDE(sde, drift, 1.0)
    y = torch.randn(4, 2, dtype=torch.float64)
    t = torch.full((4,), 0.4, dtype=torch.float64)
    beta = sde.beta(1.0 - t)[:, None]
    assert torch.allclose(gen.mu(t, y, 1.0), -(-0.5 * beta * y - 0.5 * beta * -y))  # zero: stationary


def test_time_may_be_given_as_sdeflow_light_does():
    sde = VariancePreservingSDE()
    gen = PluginReverseSDE(sde, GaussianDrift(sde, 0.0, 0.5), 1.0)
    y = torch.randn(2, 1, 3, 3)
    ones = torch.ones(2, 1, 1, 1)
    assert torch.allclose(gen.mu(ones * 0.3, y), gen.mu(torch.full((2,), 0.3), y))
    assert torch.allclose(gen.mu(0.3, y[:1]), gen.mu(torch.tensor([0.3]), y[:1]))
    with pytest.raises(ValueError, match="one value per example"):
        gen.mu(torch.zeros(3), y)


@pytest.mark.parametrize("lmbd", [-0.1, 1.5, float("nan")])
def test_lambda_outside_unit_interval_is_rejected(lmbd):
    sde = VariancePreservingSDE()
    gen = PluginReverseSDE(sde, GaussianDrift(sde, 0.0, 1.0), 1.0)
    y = torch.randn(2, 2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        gen.mu(torch.zeros(2), y, lmbd)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        gen.sigma(torch.zeros(2), y, lmbd)


def test_unknown_vtype_is_rejected_at_construction():
    sde = VariancePreservingSDE()
    with pytest.raises(ValueError, match="rademacher, gaussian"):
        PluginReverseSDE(sde, GaussianDrift(sde, 0.0, 1.0), 1.0, vtype="normal")


# --- denoising score matching ------------------------------------------------------------------


@pytest.mark.parametrize("sde_cls", SDE_CLASSES)
@pytest.mark.parametrize("debias", [False, True])
@pytest.mark.parametrize("cfg", SCHEDULES)
def test_dsm_mean_matches_closed_form(cfg, debias, sde_cls):
    """E[dsm] = int E[dsm | s] p(s) ds, with p = U[0, T] or the debiasing q."""
    torch.manual_seed(1)
    sde = sde_cls(**cfg)
    mean, std, d, n = 0.5, 0.3, 2, 400_000
    gen = PluginReverseSDE(sde, GaussianDrift(sde, mean, std), sde.T, debias=debias)
    loss = gen.dsm(mean + std * torch.randn(n, d, dtype=torch.float64))
    # Geometric nodes: with debias q is steep near t_epsilon, and E[dsm | s] varies on the scale of s.
    s = torch.cat([torch.linspace(0, sde.t_epsilon, 2001, dtype=torch.float64)[:-1],
                   torch.logspace(math.log10(sde.t_epsilon), 0, 200_001, dtype=torch.float64)])
    weight = gen.time_sampler.density(s)
    expected = torch.trapezoid(expected_dsm_given_s(sde, s, d, std) * weight, s).item()
    z = (loss.mean().item() - expected) / (loss.std().item() / math.sqrt(n))
    assert abs(z) < 4, (loss.mean().item(), expected, z)


def test_dsm_is_a_per_example_vector_for_images_and_keeps_dtype():
    sde = VariancePreservingSDE()
    gen = PluginReverseSDE(sde, GaussianDrift(sde, 0.0, 1.0), 1.0, debias=True)
    for dtype in (torch.float32, torch.float64):
        loss = gen.dsm(torch.randn(4, 3, 8, 8, dtype=dtype))
        assert loss.shape == (4,) and loss.dtype == dtype and torch.isfinite(loss).all()


def test_dsm_with_exact_drift_beats_a_wrong_drift():
    """Guards the sign convention a = g * score: flipping the drift's sign must raise the loss."""
    torch.manual_seed(2)
    sde = VariancePreservingSDE()
    drift = GaussianDrift(sde, 0.0, 0.5)
    x = 0.5 * torch.randn(20_000, 2, dtype=torch.float64)
    good = PluginReverseSDE(sde, drift, 1.0).dsm(x).mean()
    bad = PluginReverseSDE(sde, lambda y, s: -drift(y, s), 1.0).dsm(x).mean()
    assert bad > good + 0.5


# --- the ELBO ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sde_cls", SDE_CLASSES)
@pytest.mark.parametrize("vtype", ["rademacher", "gaussian"])
@pytest.mark.parametrize("cfg", SCHEDULES)
def test_elbo_random_t_slice_is_unbiased_for_gaussian_data(cfg, vtype, sde_cls):
    torch.manual_seed(3)
    sde = sde_cls(**cfg)
    mean, std, d = torch.tensor([0.5, -0.3]), 0.6, 2
    gen = PluginReverseSDE(sde, GaussianDrift(sde, mean, std), sde.T, vtype=vtype).eval()
    x = (mean + std * torch.randn(8, d)).double()
    reps = 6000
    with torch.no_grad():
        elbo = gen.elbo_random_t_slice(x.repeat(reps, 1)).view(reps, 8)
    err = elbo - expected_elbo(sde, x, mean.double(), std)
    n = err.numel()
    z = err.mean().item() / (err.std().item() / math.sqrt(n))
    assert abs(z) < 4, (err.mean().item() / d, z)


def test_elbo_oracle_holds_for_image_shaped_data():
    torch.manual_seed(4)
    sde = VariancePreservingSDE()
    gen = PluginReverseSDE(sde, GaussianDrift(sde, 0.2, 0.8), 1.0).eval()
    x = (0.2 + 0.8 * torch.randn(4, 1, 2, 2)).double()
    reps = 8000
    elbo = gen.elbo_random_t_slice(x.repeat(reps, 1, 1, 1)).view(reps, 4)
    err = elbo - expected_elbo(sde, x, 0.2, 0.8)
    z = err.mean().item() / (err.std().item() / math.sqrt(err.numel()))
    assert abs(z) < 4


def test_elbo_oracle_detects_a_missing_drift_divergence():
    """The oracle test can fail: an estimator that ignores div f is biased by int d beta / 2 ds."""
    torch.manual_seed(5)
    sde = VariancePreservingSDE()
    gen = PluginReverseSDE(sde, GaussianDrift(sde, 0.0, 0.6), 1.0).eval()
    x = 0.6 * torch.randn(8, 2, dtype=torch.float64)
    elbo = gen.elbo_random_t_slice(x.repeat(2000, 1)).view(2000, 8)
    s = torch.rand(2000, 8, dtype=torch.float64)
    biased = elbo + (-0.5 * 2 * sde.beta(s))  # add div f back: the integrand forgets it
    err = biased - expected_elbo(sde, x, 0.0, 0.6)
    assert abs(err.mean().item()) / (err.std().item() / math.sqrt(err.numel())) > 4


def test_elbo_and_dsm_gradients_reach_the_drift_parameters():
    torch.manual_seed(6)
    sde = VariancePreservingSDE()
    drift = mlp_drift(4)
    gen = PluginReverseSDE(sde, drift, 1.0).train()
    x = torch.randn(16, 1, 2, 2)
    for loss in (gen.dsm(x).mean(), -gen.elbo_random_t_slice(x).mean()):
        drift.zero_grad()
        loss.backward()
        for name, p in drift.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_elbo_div_term_is_differentiable_in_training_mode_only():
    """create_graph in training: the Hutchinson term carries second-order gradient; in eval nothing is kept."""
    sde = VariancePreservingSDE()
    drift = mlp_drift(2)
    gen = PluginReverseSDE(sde, drift, 1.0)
    x = torch.randn(8, 2)
    assert gen.train().elbo_random_t_slice(x).requires_grad
    assert not gen.eval().elbo_random_t_slice(x).requires_grad
    with torch.no_grad():
        assert torch.isfinite(gen.elbo_random_t_slice(x)).all()
