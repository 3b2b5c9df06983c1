"""Distributions over forward diffusion time s in [0, T].

Every sampler returns ``(s, density)`` so that importance weights stay visible
at the call site: an unbiased estimate of int_0^T h(s) ds is h(s) / density(s).
``sample`` draws independent times, ``sample_stratified`` a batch with one time in each
equal-probability stratum (the training loss's times).

The family:
  * ``UniformTimeSampler``: s ~ U[0, T].
  * ``VPImportanceTimeSampler``, ``SubVPImportanceTimeSampler``: the "debiasing" distribution of Huang et
    al. (2021) for the VP and sub-VP SDEs, q(s) prop. to g(s)^2 / sigma(s)^2 for s >= t_epsilon and flat
    below it. Training DSM with s ~ q (unweighted) is, up to a constant, training with the ELBO's
    likelihood weighting.
"""

import torch


class TimeSampler:
    """Interface: a density on [0, T] with a closed-form CDF and inverse CDF."""

    T: float

    def density(self, s):
        """s: any shape -> q(s), same shape."""
        raise NotImplementedError

    def cdf(self, s):
        raise NotImplementedError

    def icdf(self, u):
        raise NotImplementedError

    def sample(self, shape, generator=None, device=None, dtype=torch.float32):
        """Inverse-CDF sampling.

        Returns (s, q(s)), both of the given shape. The uniform draws and the
        inversion run in float64 (the debias CDF is steep near s = 0) and are
        cast to ``dtype`` at the end.
        """
        return self._at(torch.rand(shape, generator=generator, device=device, dtype=torch.float64), dtype)

    def sample_stratified(self, n, generator=None, device=None, dtype=torch.float32):
        """n times, one in each of the n equal-probability strata of the density, in random order.

        Returns (s, density(s)), both (n,). Each s_i alone is distributed by the density, so a per-example
        loss stays unbiased example by example; jointly they cover [0, T] evenly, so a batch mean over them
        varies less than over independent draws (the spread of the loss across s no longer enters it).
        """
        k = torch.randperm(n, generator=generator, device=device).to(torch.float64)
        return self._at((k + torch.rand(n, generator=generator, device=device, dtype=torch.float64)) / n, dtype)

    def _at(self, u, dtype):
        """(s, density(s)) at the float64 CDF values u, cast to dtype at the end."""
        s = self.icdf(u)
        return s.to(dtype), self.density(s).to(dtype)


class UniformTimeSampler(TimeSampler):
    def __init__(self, T=1.0):
        self.T = _positive_float(T, "T")

    def density(self, s):
        s = torch.as_tensor(s)
        return torch.full_like(s, 1.0 / self.T, dtype=_float_dtype(s))

    def cdf(self, s):
        return torch.as_tensor(s) / self.T

    def icdf(self, u):
        return torch.as_tensor(u) * self.T


class _LinearBetaImportanceTimeSampler(TimeSampler):
    """q(s) prop. to g(s)^2 / sigma(s)^2 on [t_epsilon, T], constant q(t_epsilon) below, for an SDE with
    beta linear in s and B(s) = beta_min s + (beta_max - beta_min) s^2 / 2.

    g^2 / sigma^2 = beta(s) rate(B(s)), so with L an antiderivative of rate in B (dL/ds = beta rate) the CDF
    above t_epsilon is (L(B(s)) - L(B(t_epsilon))) / Z plus the flat part's mass, and it inverts through L's
    and B's inverses in closed form. Subclasses give rate, L and L^-1 (docs/math.md sections 2.3, 2.4).
    """

    def __init__(self, beta_min=0.1, beta_max=20.0, T=1.0, t_epsilon=1e-3):
        self.beta_min = _positive_float(beta_min, "beta_min")
        self.beta_max = float(beta_max)
        if self.beta_max < self.beta_min:
            raise ValueError(f"beta_max must be >= beta_min, got beta_min={beta_min}, beta_max={beta_max}")
        self.T = _positive_float(T, "T")
        self.t_epsilon = _positive_float(t_epsilon, "t_epsilon")
        if self.t_epsilon >= self.T:
            raise ValueError(f"t_epsilon must lie in (0, T), got t_epsilon={t_epsilon}, T={T}")
        eps = torch.tensor(self.t_epsilon, dtype=torch.float64)
        B_eps = self._B(eps)
        # Unnormalised mass of the flat part [0, t_eps) and of the tail [t_eps, T].
        self._q_eps = (self._beta(eps) * self._rate(B_eps)).item()
        self._L_eps = self._L(B_eps).item()
        self._flat_mass = self.t_epsilon * self._q_eps
        tail = self._L(self._B(torch.tensor(self.T, dtype=torch.float64))).item() - self._L_eps
        self._Z = self._flat_mass + tail

    def _rate(self, B):
        """(g^2 / sigma^2) / beta as a function of B."""
        raise NotImplementedError

    def _L(self, B):
        """An antiderivative of _rate in B."""
        raise NotImplementedError

    def _L_inverse(self, L):
        raise NotImplementedError

    def _beta(self, s):
        return self.beta_min + (self.beta_max - self.beta_min) * s

    def _B(self, s):
        return self.beta_min * s + 0.5 * (self.beta_max - self.beta_min) * s ** 2

    def _B_inverse(self, b):
        # Root of (d/2) s^2 + beta_min s - b = 0 written as 2b / (beta_min + sqrt(...)):
        # no cancellation for small b, and it stays valid when beta_max == beta_min.
        d = self.beta_max - self.beta_min
        return 2 * b / (self.beta_min + torch.sqrt(self.beta_min ** 2 + 2 * d * b))

    def density(self, s):
        s = torch.as_tensor(s)
        s64 = s.to(torch.float64).clamp(min=self.t_epsilon)
        q = self._beta(s64) * self._rate(self._B(s64)) / self._Z
        inside = (s >= 0) & (s <= self.T)
        return torch.where(inside, q, torch.zeros_like(q)).to(_float_dtype(s))

    def cdf(self, s):
        s = torch.as_tensor(s)
        s64 = s.to(torch.float64).clamp(0.0, self.T)
        flat = s64 * self._q_eps
        tail = self._flat_mass + self._L(self._B(s64.clamp(min=self.t_epsilon))) - self._L_eps
        return (torch.where(s64 < self.t_epsilon, flat, tail) / self._Z).to(_float_dtype(s))

    def icdf(self, u):
        u = torch.as_tensor(u)
        mass = u.to(torch.float64) * self._Z
        flat = mass / self._q_eps
        tail = self._B_inverse(self._L_inverse(mass - self._flat_mass + self._L_eps))
        s = torch.where(mass < self._flat_mass, flat, tail)
        return s.clamp(0.0, self.T).to(_float_dtype(u))


class VPImportanceTimeSampler(_LinearBetaImportanceTimeSampler):
    """The VP SDE's q: g^2 / sigma^2 = beta / (1 - exp(-B)), whose antiderivative in B is
    log(exp(B) - 1) = log_expm1(B), inverted by softplus."""

    def _rate(self, B):
        return 1.0 / -torch.expm1(-B)

    def _L(self, B):
        return _log_expm1(B)

    def _L_inverse(self, L):
        return torch.nn.functional.softplus(L)  # log_expm1(B) = L  <=>  B = log(1 + exp(L))


class SubVPImportanceTimeSampler(_LinearBetaImportanceTimeSampler):
    """The sub-VP SDE's q: g^2 / sigma^2 = beta (1 + exp(-B)) / (1 - exp(-B)), whose antiderivative in B is
    2 log(exp(B) - 1) - B = 2 log(2 sinh(B / 2)), inverted as B = 2 asinh(exp(L / 2) / 2)."""

    def _rate(self, B):
        return (1.0 + torch.exp(-B)) / -torch.expm1(-B)

    def _L(self, B):
        return 2 * _log_expm1(B) - B

    def _L_inverse(self, L):
        return 2 * torch.asinh(torch.exp(0.5 * L) / 2)


def _log_expm1(x):
    """log(exp(x) - 1) for x > 0, without overflow for large x or cancellation for small x."""
    return x + torch.log(-torch.expm1(-x))


def _float_dtype(x):
    return x.dtype if x.is_floating_point() else torch.get_default_dtype()


def _positive_float(value, name):
    value = float(value)
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value
