"""Closed forms for Gaussian data and Gaussian mixtures diffused by the VP SDE: the oracles that the
unit tests (tests/) and the benchmarks (benchmarks/) compare the library's estimators with.

Gaussian data x ~ N(m, s0^2 I): Y_s | x ~ N(alpha x, sigma^2 I), so the marginal is p_s = N(alpha m, v(s) I)
with v(s) = alpha^2 s0^2 + sigma^2: the score, the drift a = g * score, the ELBO and the probability-flow
likelihood are all exact. A mixture of isotropic Gaussians stays one when diffused, so its log-density and
exact drift are known too (IsotropicGaussianMixture).
"""
import math

import torch

from lib.sdes import as_batch_time, batch_view


class GaussianDrift(torch.nn.Module):
    """The exact inference drift a(y, s) = g(s) grad log p_s(y) for N(m, s0^2 I) data."""

    def __init__(self, sde, mean, std):
        super().__init__()
        self.sde, self.mean, self.std = sde, mean, std

    def marginal_var(self, s):
        return self.sde.mean_weight(s) ** 2 * self.std ** 2 + self.sde.var(s)

    def forward(self, y, s):
        s = as_batch_time(s, y)
        alpha = batch_view(self.sde.mean_weight(s), y)
        v = batch_view(self.marginal_var(s), y)
        return self.sde.g(s, y) * -(y - alpha * self.mean) / v


def gaussian_log_prob(x, mean, var):
    """log N(x; mean, var I) per example, (B,)."""
    d = x[0].numel()
    return -0.5 * ((x - mean) ** 2).flatten(1).sum(1) / var - 0.5 * d * math.log(2 * math.pi * var)


def expected_elbo(sde, x, mean, std, T=None):
    """E[ELBO(x)] = log p(x) + E_{Y_T|x}[log N(Y_T; 0, I) - log p_T(Y_T)] (docs/math.md section 3). (B,)"""
    T = sde.T if T is None else T
    d = x[0].numel()
    t = torch.tensor(T, dtype=torch.float64)
    alpha, sig2 = sde.mean_weight(t).item(), sde.var(t).item()
    v_T = alpha ** 2 * std ** 2 + sig2
    x_sq = x.pow(2).flatten(1).sum(1)
    e_log_prior = -0.5 * d * math.log(2 * math.pi) - 0.5 * (alpha ** 2 * x_sq + d * sig2)
    e_log_pT = (-0.5 * d * math.log(2 * math.pi * v_T)
                - 0.5 * (alpha ** 2 * (x - mean).pow(2).flatten(1).sum(1) + d * sig2) / v_T)
    return gaussian_log_prob(x, mean, std ** 2) + e_log_prior - e_log_pT


def expected_dsm_given_s(sde, s, d, std):
    """E[dsm | s] = d alpha^2 s0^2 / (2 (alpha^2 s0^2 + sigma^2)) for x drawn from the data."""
    a2 = sde.mean_weight(s) ** 2 * std ** 2
    return d * a2 / (2 * (a2 + sde.var(s)))


class IsotropicGaussianMixture(torch.nn.Module):
    """Data p_0 = (1/K) sum_k N(mu_k, c^2 I) diffused by a VP-type SDE: p_s = (1/K) sum_k N(alpha mu_k, v(s) I),
    v(s) = alpha^2 c^2 + sigma^2. Exact log-density and exact drift a = g grad log p_s (the module's forward).

    centres: (K, ...) data-shaped; std: c. Component log-likelihoods are computed in float64 (they are
    differences of large numbers when c is small), everything else in y's dtype.
    """

    def __init__(self, sde, centres, std):
        super().__init__()
        self.sde, self.std = sde, float(std)
        self.register_buffer("centres", centres.flatten(1))  # (K, D)

    def marginal_var(self, s):
        return self.sde.mean_weight(s) ** 2 * self.std ** 2 + self.sde.var(s)

    def _component_log_probs(self, y, s):
        """log N(y; alpha mu_k, v I) for every k, float64, (B, K); also alpha and v, (B,)."""
        s = as_batch_time(s, y).double()
        alpha, v = self.sde.mean_weight(s), self.marginal_var(s)
        yf, mu = y.flatten(1).double(), self.centres.double()
        sq = yf.pow(2).sum(1, keepdim=True) - 2 * alpha[:, None] * yf @ mu.T + alpha[:, None] ** 2 * mu.pow(2).sum(1)
        d = yf.shape[1]
        return -0.5 * sq / v[:, None] - 0.5 * d * torch.log(2 * math.pi * v)[:, None], alpha, v

    def log_prob(self, y, s):
        """log p_s(y), (B,), float64."""
        comp, _, _ = self._component_log_probs(y, s)
        return torch.logsumexp(comp, 1) - math.log(self.centres.shape[0])

    def forward(self, y, s):
        comp, alpha, v = self._component_log_probs(y, s)
        resp = torch.softmax(comp, 1).to(y.dtype)  # (B, K) posterior over components
        alpha, v = alpha.to(y.dtype), v.to(y.dtype)
        score = -(y.flatten(1) - alpha[:, None] * (resp @ self.centres.to(y.dtype))) / v[:, None]
        return self.sde.g(as_batch_time(s, y), y) * score.view_as(y)


def expected_elbo_scaled_drift(sde, x, mean, std, scale, T=None, n=200_001):
    """E[ELBO(x)] and its derivative in `scale` for the drift scale * a*, a* exact for N(mean, std^2 I) data.

    With y - alpha m = alpha (x - m) + sigma eps and a* = -g (y - alpha m) / v (v = alpha^2 std^2 + sigma^2):
        E[1/2 |a|^2 + div(g a) - div f | s] = scale^2 g^2 (alpha^2 |x - m|^2 + D sigma^2) / (2 v^2)
                                              - scale g^2 D / v + D beta / 2,
    integrated over s by the trapezoid rule on geometric nodes (v changes on the scale std^2 / beta_min near 0).
    Returns two (B,) float64 tensors. At scale = 1 the value equals ``expected_elbo``.
    """
    T = sde.T if T is None else T
    d = x[0].numel()
    x = x.double()
    s = torch.cat([torch.linspace(0, 1e-9, 11, dtype=torch.float64)[:-1],
                   torch.logspace(-9, math.log10(T), n, dtype=torch.float64)])
    alpha2, sig2, g2 = sde.mean_weight(s) ** 2, sde.var(s), sde.beta(s)
    v = alpha2 * std ** 2 + sig2
    dist2 = (x - mean).pow(2).flatten(1).sum(1)[:, None]  # (B, 1)
    quad = g2 * (alpha2 * dist2 + d * sig2) / (2 * v ** 2)  # (B, nodes)
    lin = g2 * d / v
    integral = torch.trapezoid(scale ** 2 * quad - scale * lin + d * g2 / 2, s)
    d_integral = torch.trapezoid(2 * scale * quad - lin, s)
    t = torch.tensor(T, dtype=torch.float64)
    a_T2, s_T2 = sde.mean_weight(t).item() ** 2, sde.var(t).item()
    e_log_prior = -0.5 * d * math.log(2 * math.pi) - 0.5 * (a_T2 * x.pow(2).flatten(1).sum(1) + d * s_T2)
    return e_log_prior - integral, -d_integral
