"""Closed forms for Gaussian data x ~ N(m, s0^2 I) diffused by the VP SDE.

Y_s | x ~ N(alpha x, sigma^2 I), so the marginal is p_s = N(alpha m, v(s) I) with
v(s) = alpha^2 s0^2 + sigma^2: the score, the drift a = g * score, the ELBO and the
probability-flow likelihood are all exact.
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
    """E[ELBO(x)] = log p(x) + E_{Y_T|x}[log N(Y_T; 0, I) - log p_T(Y_T)] (DESIGN.md section 3). (B,)"""
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
