"""The probability-flow likelihood, bits/dim and the logit transform against closed forms.

Closed form of the probability flow for Gaussian data x ~ N(m, Sigma), Sigma = Q diag(lam) Q^T
(the isotropic case N(m, s0^2 I) is Q = I, lam = s0^2), diffused by the VP SDE. The marginals are
p_s = N(alpha(s) m, V(s)) with V(s) = Q diag(v(s)) Q^T, v_i(s) = alpha(s)^2 lam_i + sigma^2(s), and the
exact drift is a = -g V^{-1} (y - alpha m). The probability flow
    dy/ds = F(y, s) = -1/2 beta y - 1/2 g a = -1/2 beta y + 1/2 beta V^{-1} (y - alpha m)
is affine, and in the eigenbasis each coordinate r_i = [Q^T (y - alpha m)]_i obeys
    dr_i/ds = 1/2 beta (1/v_i - 1) r_i,   while   d/ds log v_i = beta (1 - v_i) / v_i = beta (1/v_i - 1),
(dv_i/ds = -beta alpha^2 lam_i + beta alpha^2 = beta (1 - v_i)), so r_i / sqrt(v_i) is constant along the flow:
    y_s = alpha(s) m + Q diag(sqrt(v_i(s) / lam_i)) Q^T (x - m).                                   (FLOW)
The divergence is div F = sum_i 1/2 beta (1/v_i - 1) = sum_i 1/2 d/ds log v_i, so
    int_0^T div F ds = 1/2 sum_i log(v_i(T) / lam_i),
and the model's density at s = 0, the pushforward of the prior N(0, I) at s = T by the flow, is
    log p_ODE(x) = log N(y_T; 0, I) + 1/2 sum_i log(v_i(T) / lam_i),   y_T from (FLOW).          (LOGP)
Equivalently p_ODE = N(m - Q diag(sqrt(lam / v(T))) Q^T alpha(T) m, Q diag(lam / v(T)) Q^T): close to the data
law, since alpha(T) ~ 7e-3 and v(T) ~ 1, but not equal to it (the prior mismatch).

Hutchinson: with one probe u per example held fixed through the solve, and a Jacobian of a that does not
depend on y, the estimate is exactly (LOGP) + u^T K u - tr K, where
    K = int_0^T 1/2 beta V^{-1} ds = Q diag(k) Q^T,   k_i = 1/2 log(v_i(T) / lam_i) + 1/2 B(T)
(from int 1/2 beta / v_i = int 1/2 d log v_i + 1/2 beta). Its standard deviation is sqrt(2 sum_{i != j} K_ij^2)
for Rademacher probes and sqrt(2 sum_ij K_ij^2) for Gaussian ones; with an isotropic Sigma, K is diagonal and a
Rademacher probe is exact, so the Hutchinson tests use a rotated, anisotropic Sigma.
"""
import math

import pytest
import torch

from lib.hutchinson import sample_probe
from lib.likelihood import exact_divergence, ode_log_likelihood
from lib.oracles import GaussianDrift, gaussian_log_prob
from lib.samplers import sample_ode
from lib.sdes import PluginReverseSDE, SubVariancePreservingSDE, VariancePreservingSDE, as_batch_time, batch_view

DTYPE = torch.float64
MEAN_2D = torch.tensor([0.5, -0.3], dtype=DTYPE)
STD = 0.6
TOL_PER_DIM = 1e-3  # nats per dimension, the contract of ode_log_likelihood at its default tolerances


class RotatedGaussianDrift(torch.nn.Module):
    """The exact drift a = -g V(s)^{-1} (y - alpha m) for data N(m, Q diag(lam) Q^T) of any example shape.

    mean: shaped like one example; Q: (D, D) orthogonal; lam: (D,) eigenvalues, D = mean.numel().
    """

    def __init__(self, sde, mean, Q, lam):
        super().__init__()
        self.sde, self.mean, self.Q, self.lam = sde, mean, Q, lam

    def forward(self, y, s):
        s = as_batch_time(s, y)
        alpha = self.sde.mean_weight(s)  # (B,)
        v = alpha[:, None] ** 2 * self.lam + self.sde.var(s)[:, None]  # (B, D)
        r = (y - batch_view(alpha, y) * self.mean).flatten(1) @ self.Q  # eigenbasis coordinates (B, D)
        return self.sde.g(s, y) * -((r / v) @ self.Q.T).view_as(y)


def random_rotation(d, seed):
    q, r = torch.linalg.qr(torch.randn(d, d, dtype=DTYPE, generator=torch.Generator().manual_seed(seed)))
    return q * torch.sign(torch.diagonal(r))  # a Haar-distributed rotation, not a sign-biased one


def draw_data(n, mean, Q, lam, seed):
    """n draws of N(mean, Q diag(lam) Q^T), shaped (n, *mean.shape)."""
    z = torch.randn(n, lam.numel(), dtype=DTYPE, generator=torch.Generator().manual_seed(seed))
    return mean + ((z * lam.sqrt()) @ Q.T).view(n, *mean.shape)


def end_variances(sde, T, lam):
    t = torch.tensor(T, dtype=DTYPE)
    alpha_T = sde.mean_weight(t)
    return alpha_T, alpha_T ** 2 * lam + sde.var(t)


def flow_to_T(sde, T, x, mean, Q, lam):
    """y_T from (FLOW): the image of x under the probability flow from s = 0 to s = T."""
    alpha_T, v_T = end_variances(sde, T, lam)
    r = (x - mean).flatten(1) @ Q
    return alpha_T * mean + ((r * (v_T / lam).sqrt()) @ Q.T).view_as(x)


def closed_form_log_p(sde, T, x, mean, Q, lam):
    """(LOGP): log p_ODE(x) per example, (B,)."""
    _, v_T = end_variances(sde, T, lam)
    return sde.prior_log_prob(flow_to_T(sde, T, x, mean, Q, lam)) + 0.5 * torch.log(v_T / lam).sum()


def hutchinson_matrix(sde, T, Q, lam):
    """K = Q diag(k) Q^T, k_i = 1/2 log(v_i(T) / lam_i) + 1/2 B(T): the probe enters as u^T K u - tr K."""
    _, v_T = end_variances(sde, T, lam)
    k = 0.5 * torch.log(v_T / lam) + 0.5 * sde.integrated_beta(torch.tensor(T, dtype=DTYPE))
    return Q @ torch.diag(k) @ Q.T


def isotropic(shape):
    """(mean, Q, lam) of N(m, STD^2 I) for examples of the given shape, m varying across entries."""
    d = math.prod(shape)
    mean = MEAN_2D if shape == (2,) else torch.linspace(-0.5, 0.5, d, dtype=DTYPE).view(shape)
    return mean, torch.eye(d, dtype=DTYPE), torch.full((d,), STD ** 2, dtype=DTYPE)


def anisotropic(shape, seed=0):
    """(mean, Q, lam): a rotated covariance with eigenvalues spread over [0.05, 2]."""
    d = math.prod(shape)
    mean = torch.linspace(-0.6, 0.4, d, dtype=DTYPE).view(shape)
    return mean, random_rotation(d, seed), torch.logspace(math.log10(0.05), math.log10(2.0), d, dtype=DTYPE)


def gen_sde_for(mean, Q, lam, T=1.0, use_oracle=False, sde_cls=VariancePreservingSDE, **schedule):
    sde = sde_cls(T=T, **schedule)
    drift = GaussianDrift(sde, mean, lam[0].sqrt().item()) if use_oracle else RotatedGaussianDrift(sde, mean, Q, lam)
    return PluginReverseSDE(sde, drift, T)


# --- the closed form itself ------------------------------------------------------------------------


def test_closed_form_is_the_pushforward_gaussian():
    """(LOGP) equals the log-density of N(m - sqrt(lam / v_T) alpha_T m, lam / v_T I) (isotropic case)."""
    sde = VariancePreservingSDE()
    mean, Q, lam = isotropic((2,))
    x = draw_data(50, mean, Q, lam, seed=1)
    alpha_T, v_T = end_variances(sde, 1.0, lam[:1])
    c = (lam[0] / v_T[0]).sqrt()
    expected = gaussian_log_prob(x, mean - c * alpha_T * mean, (c ** 2).item())
    assert torch.allclose(closed_form_log_p(sde, 1.0, x, mean, Q, lam), expected, atol=1e-12)


# --- exact divergence ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2,), (3, 4, 4)], ids=["2d", "image"])
def test_exact_divergence_likelihood_matches_the_closed_form(shape):
    mean, Q, lam = isotropic(shape)
    gen = gen_sde_for(mean, Q, lam, use_oracle=True)  # tests/oracles.py's exact drift
    x = draw_data(200 if shape == (2,) else 16, mean, Q, lam, seed=2)
    log_p, nfe = ode_log_likelihood(gen, x)
    err = (log_p - closed_form_log_p(gen.base_sde, 1.0, x, mean, Q, lam)).abs().max().item()
    assert log_p.shape == (x.shape[0],) and log_p.dtype == DTYPE
    assert err / math.prod(shape) < TOL_PER_DIM, err
    assert 10 < nfe < 200


@pytest.mark.parametrize("sde_cls", [VariancePreservingSDE, SubVariancePreservingSDE])
@pytest.mark.parametrize("schedule", [{}, dict(beta_min=0.5, beta_max=12.0)], ids=["default", "other_schedule"])
def test_exact_divergence_likelihood_matches_the_closed_form_for_a_rotated_covariance(sde_cls, schedule):
    mean, Q, lam = anisotropic((2,))
    gen = gen_sde_for(mean, Q, lam, sde_cls=sde_cls, **schedule)
    x = draw_data(200, mean, Q, lam, seed=3)
    log_p, _ = ode_log_likelihood(gen, x)
    assert (log_p - closed_form_log_p(gen.base_sde, 1.0, x, mean, Q, lam)).abs().max() / 2 < TOL_PER_DIM


def test_likelihood_converges_to_the_closed_form_as_the_tolerance_tightens():
    """Not merely close: the error shrinks with rtol/atol, so the solve converges to (LOGP) itself."""
    mean, Q, lam = isotropic((2,))
    gen = gen_sde_for(mean, Q, lam, use_oracle=True)
    x = draw_data(100, mean, Q, lam, seed=4)
    exact = closed_form_log_p(gen.base_sde, 1.0, x, mean, Q, lam)
    errors = [(ode_log_likelihood(gen, x, rtol=tol, atol=tol)[0] - exact).abs().max().item() for tol in (1e-4, 1e-8)]
    assert errors[1] < 1e-6 and errors[1] < errors[0] / 10, errors


def test_likelihood_holds_for_another_horizon_T():
    mean, Q, lam = isotropic((2,))
    gen = gen_sde_for(mean, Q, lam, T=0.5, use_oracle=True)
    x = draw_data(100, mean, Q, lam, seed=5)
    log_p, _ = ode_log_likelihood(gen, x)
    assert (log_p - closed_form_log_p(gen.base_sde, 0.5, x, mean, Q, lam)).abs().max() / 2 < TOL_PER_DIM


# --- the integration direction (docs/math.md section 8) -------------------------------------------------


def noise_to_data_log_p(sde, T, x, mean, Q, lam):
    """What a noise -> data integration reports: x taken as y_T, flowed back to s = 0 (the inverse of (FLOW)),
    y_0 = m + Q diag(sqrt(lam / v_T)) Q^T (x - alpha_T m), with int_T^0 div F = -1/2 sum log(v_T / lam):
    log N(y_0; 0, I) - 1/2 sum_i log(v_i(T) / lam_i)."""
    alpha_T, v_T = end_variances(sde, T, lam)
    r = (x - alpha_T * mean).flatten(1) @ Q
    y_0 = mean + ((r * (lam / v_T).sqrt()) @ Q.T).view_as(x)
    return sde.prior_log_prob(y_0) - 0.5 * torch.log(v_T / lam).sum()


def test_a_noise_to_data_integration_would_fail_the_closed_form_tests():
    """The tests above can catch the pitfall: on their data the wrong direction is off by far more than
    the tolerance (0.3 nats per dimension or more on average, against 1e-3)."""
    sde = VariancePreservingSDE()
    for shape in [(2,), (3, 4, 4)]:
        mean, Q, lam = isotropic(shape)
        x = draw_data(200, mean, Q, lam, seed=2)
        gap = (noise_to_data_log_p(sde, 1.0, x, mean, Q, lam) - closed_form_log_p(sde, 1.0, x, mean, Q, lam)).abs()
        assert gap.mean() / math.prod(shape) > 0.3 and gap.max() / math.prod(shape) > 100 * TOL_PER_DIM


def test_likelihood_inverts_the_ode_sampler():
    """sample_ode maps a prior draw y to x (s = T -> 0); the likelihood must flow x back to y (s = 0 -> T):
    log p_ODE(x) = log N(y; 0, I) + 1/2 sum log(v(T) / lam). A likelihood integrated noise -> data would
    flow x further away from y instead."""
    mean, Q, lam = isotropic((2,))
    gen = gen_sde_for(mean, Q, lam, use_oracle=True)
    y = torch.randn(100, 2, dtype=DTYPE, generator=torch.Generator().manual_seed(6))
    x, _ = sample_ode(gen, y, rtol=1e-8, atol=1e-8, eps_end=0.0)
    log_p, _ = ode_log_likelihood(gen, x, rtol=1e-8, atol=1e-8)
    _, v_T = end_variances(gen.base_sde, 1.0, lam)
    expected = gen.base_sde.prior_log_prob(y) + 0.5 * torch.log(v_T / lam).sum()
    assert (log_p - expected).abs().max() < 1e-5


# --- Hutchinson divergence --------------------------------------------------------------------------


@pytest.mark.parametrize("vtype", ["rademacher", "gaussian"])
@pytest.mark.parametrize("shape", [(2,), (1, 4, 4)], ids=["2d", "image"])
def test_hutchinson_likelihood_is_the_closed_form_plus_the_probe_term(vtype, shape):
    """With the probe u held fixed through the solve, the estimate is (LOGP) + u^T K u - tr K exactly
    (up to solver error); u is redrawn here from the same seeded generator."""
    mean, Q, lam = anisotropic(shape)
    gen = gen_sde_for(mean, Q, lam)
    x = draw_data(64, mean, Q, lam, seed=8)
    log_p, _ = ode_log_likelihood(gen, x, vtype=vtype, generator=torch.Generator().manual_seed(9))
    u = sample_probe(x, vtype, generator=torch.Generator().manual_seed(9)).flatten(1)
    K = hutchinson_matrix(gen.base_sde, 1.0, Q, lam)
    expected = closed_form_log_p(gen.base_sde, 1.0, x, mean, Q, lam) + ((u @ K) * u).sum(1) - torch.trace(K)
    assert (log_p - expected).abs().max() / math.prod(shape) < TOL_PER_DIM


@pytest.mark.parametrize("vtype", ["rademacher", "gaussian"])
@pytest.mark.parametrize("shape", [(2,), (1, 4, 4)], ids=["2d", "image"])
def test_hutchinson_likelihood_is_unbiased_within_its_standard_error(vtype, shape):
    """R = 400 independent probes per point: the average lies within 4 standard errors (std / sqrt(R)) of
    (LOGP), and the spread of the estimates is the closed-form probe standard deviation (within 15%;
    the sample std of 2400 draws is good to a few per cent)."""
    points, repeats = 6, 400
    mean, Q, lam = anisotropic(shape)
    gen = gen_sde_for(mean, Q, lam)
    x = draw_data(points, mean, Q, lam, seed=10)
    flat = x.repeat(repeats, *([1] * len(shape)))  # point i at rows i, i + points, ...
    log_p, _ = ode_log_likelihood(gen, flat, vtype=vtype, generator=torch.Generator().manual_seed(11))
    err = log_p.view(repeats, points) - closed_form_log_p(gen.base_sde, 1.0, x, mean, Q, lam)
    se = err.std(0) / math.sqrt(repeats)
    assert (err.mean(0).abs() < 4 * se).all(), (err.mean(0), se)
    K = hutchinson_matrix(gen.base_sde, 1.0, Q, lam)
    off_diagonal = K - torch.diag(torch.diagonal(K))
    std = math.sqrt(2 * (off_diagonal if vtype == "rademacher" else K).pow(2).sum().item())
    assert err.std().item() == pytest.approx(std, rel=0.15)


def test_rademacher_probe_is_exact_for_an_isotropic_gaussian():
    """K is diagonal when Sigma = s0^2 I, and u_i^2 = 1: the Rademacher estimate has no variance at all."""
    mean, Q, lam = isotropic((1, 4, 4))
    gen = gen_sde_for(mean, Q, lam, use_oracle=True)
    x = draw_data(32, mean, Q, lam, seed=12)
    log_p, _ = ode_log_likelihood(gen, x, vtype="rademacher", generator=torch.Generator().manual_seed(13))
    assert (log_p - closed_form_log_p(gen.base_sde, 1.0, x, mean, Q, lam)).abs().max() / 16 < TOL_PER_DIM


def test_one_probe_per_solve_keeps_the_step_size_control():
    """A probe redrawn at every evaluation would make the right-hand side noisy and the adaptive solver
    shrink its steps without end; with one probe per solve the NFE stays that of the exact-divergence solve
    (within 50%). The drift refuses to run past twice that budget, so a broken solve fails instead of hanging."""
    mean, Q, lam = anisotropic((2,))
    gen = gen_sde_for(mean, Q, lam)
    x = draw_data(64, mean, Q, lam, seed=14)
    _, nfe_exact = ode_log_likelihood(gen, x)
    calls = []

    def budgeted_drift(y, s):
        calls.append(1)
        if len(calls) > 2 * nfe_exact:
            raise AssertionError(f"more than {2 * nfe_exact} drift evaluations: the step size control broke down")
        return gen.a(y, s)

    budgeted = PluginReverseSDE(gen.base_sde, budgeted_drift, gen.T)
    _, nfe_hutchinson = ode_log_likelihood(budgeted, x, vtype="gaussian", generator=torch.Generator().manual_seed(15))
    assert nfe_hutchinson <= 1.5 * nfe_exact, (nfe_hutchinson, nfe_exact)


# --- bookkeeping ------------------------------------------------------------------------------------


def test_nfe_counts_the_drift_evaluations():
    mean, Q, lam = isotropic((2,))
    sde = VariancePreservingSDE()
    drift = GaussianDrift(sde, mean, STD)
    calls = []

    def counting_drift(y, s):
        calls.append(1)
        return drift(y, s)

    _, nfe = ode_log_likelihood(PluginReverseSDE(sde, counting_drift, 1.0), draw_data(8, mean, Q, lam, seed=16))
    assert nfe == len(calls) > 0


def test_likelihood_runs_under_no_grad_and_returns_detached_values():
    mean, Q, lam = isotropic((2,))
    gen = gen_sde_for(mean, Q, lam, use_oracle=True)
    x = draw_data(8, mean, Q, lam, seed=17)
    with torch.no_grad():
        log_p, _ = ode_log_likelihood(gen, x)
    assert not log_p.requires_grad
    assert torch.allclose(log_p, ode_log_likelihood(gen, x)[0])


def test_exact_divergence_is_the_jacobian_trace():
    torch.manual_seed(0)
    W = torch.randn(5, 5, dtype=DTYPE)

    def f(y):  # a per-example nonlinear map (B, 5) -> (B, 5) with a dense Jacobian
        return torch.tanh(y @ W) * y.sum(1, keepdim=True)

    y = torch.randn(3, 5, dtype=DTYPE, requires_grad=True)
    expected = torch.stack([torch.trace(torch.autograd.functional.jacobian(lambda v: f(v[None])[0], y[i].detach()))
                            for i in range(3)])
    assert torch.allclose(exact_divergence(f(y), y), expected)


@pytest.mark.parametrize("kwargs, match", [({"vtype": "normal"}, "rademacher, gaussian"),
                                           ({"method": "rk4"}, "dopri5")])
def test_unknown_probe_or_solver_is_rejected(kwargs, match):
    mean, Q, lam = isotropic((2,))
    with pytest.raises(ValueError, match=match):
        ode_log_likelihood(gen_sde_for(mean, Q, lam, use_oracle=True), draw_data(4, mean, Q, lam, seed=0), **kwargs)
