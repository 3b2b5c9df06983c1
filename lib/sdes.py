"""Forward (inference) SDEs and the plug-in reverse (generative) SDE.

Notation follows Huang, Lim & Courville (2021) and ../shared/DESIGN.md:
forward time s in [0, T], generative time t = T - s. The network is the
inference drift a(y, s); the score is a / g.

Time always has shape (B,); it is broadcast where it meets data of shape
(B, ...), so the same code serves 2-D toy points and (B, C, H, W) images.
"""
import abc
import math

import torch
from torch import nn

from lib.hutchinson import check_vtype, divergence_estimate, sample_probe
from lib.time_sampling import UniformTimeSampler, VPImportanceTimeSampler


def batch_view(t, y):
    """Reshape per-example t (B,) to (B, 1, ..., 1) so it broadcasts against y (B, ...)."""
    return t.reshape(t.shape[0], *([1] * (y.dim() - 1)))


def as_batch_time(t, y):
    """Time for a batch y (B, ...) as a (B,) tensor on y's device and dtype.

    Accepts a float, a 0-d or 1-element tensor, or any tensor with B elements
    (e.g. sdeflow-light's (B, 1, 1, 1)); never squeezes a batch of one away.
    """
    t = torch.as_tensor(t, dtype=y.dtype, device=y.device)
    B = y.shape[0]
    if t.numel() == 1:
        return t.reshape(1).expand(B)
    if t.numel() != B:
        raise ValueError(f"time must be a scalar or hold one value per example ({B}), got shape {tuple(t.shape)}")
    return t.reshape(B)


class SDE(abc.ABC):
    """A forward SDE dY = f(Y, s) ds + g(s) dB_s with affine drift, hence a Gaussian kernel.

    Y_s | y0 ~ N(mean_weight(s) y0, var(s) I). Samplers and likelihoods only use
    this interface, so a new SDE is one subclass.
    """

    T: float

    @abc.abstractmethod
    def f(self, t, y):
        """Drift, shaped like y (B, ...)."""

    @abc.abstractmethod
    def g(self, t, y):
        """Diffusion coefficient, (B, 1, ..., 1) (broadcasts against y)."""

    @abc.abstractmethod
    def div_f(self, t, y):
        """Exact divergence of the drift in y, (B,)."""

    @abc.abstractmethod
    def mean_weight(self, t):
        """alpha(t), shaped like t."""

    @abc.abstractmethod
    def var(self, t):
        """sigma^2(t), shaped like t."""

    @abc.abstractmethod
    def importance_time_sampler(self, T=None):
        """The "debiasing" time distribution q(s) prop. to g^2 / sigma^2 on [0, T]."""

    def sample(self, t, y0, return_noise=False):
        """Draw Y_t | Y_0 = y0.

        t: (B,) forward times (or anything ``as_batch_time`` accepts); y0: (B, ...).
        Returns y_t (B, ...), or (y_t, eps, std, g) with std and g of shape
        (B, 1, ..., 1), where y_t = alpha y0 + std * eps.
        """
        t = as_batch_time(t, y0)
        alpha = batch_view(self.mean_weight(t), y0)
        std = batch_view(self.var(t), y0).sqrt()
        eps = torch.randn_like(y0)
        y = alpha * y0 + std * eps
        if not return_noise:
            return y
        return y, eps, std, self.g(t, y)

    def prior_sample(self, shape, device=None, dtype=torch.float32, generator=None):
        return torch.randn(shape, device=device, dtype=dtype, generator=generator)

    def prior_log_prob(self, y):
        """log N(y; 0, I) per example, (B,)."""
        d = y[0].numel()
        return -0.5 * y.pow(2).flatten(1).sum(1) - 0.5 * d * math.log(2 * math.pi)

    def sample_debiasing_t(self, shape, device=None, dtype=torch.float32, generator=None):
        """s ~ q of the given shape (DESIGN.md section 2)."""
        s, _ = self.importance_time_sampler().sample(shape, generator=generator, device=device, dtype=dtype)
        return s


class VariancePreservingSDE(SDE):
    """dY = -1/2 beta(s) Y ds + sqrt(beta(s)) dB_s, beta linear from beta_min to beta_max on [0, 1].

    B(s) = int_0^s beta, alpha(s) = exp(-B/2), sigma^2(s) = 1 - exp(-B).
    """

    def __init__(self, beta_min=0.1, beta_max=20.0, T=1.0, t_epsilon=0.001):
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)
        if not 0 < self.beta_min <= self.beta_max:
            raise ValueError(f"need 0 < beta_min <= beta_max, got beta_min={beta_min}, beta_max={beta_max}")
        self.T = float(T)
        if not self.T > 0:
            raise ValueError(f"T must be > 0, got {T}")
        self.t_epsilon = float(t_epsilon)

    def beta(self, t):
        return self.beta_min + (self.beta_max - self.beta_min) * t

    def integrated_beta(self, t):
        """B(t) = int_0^t beta."""
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t ** 2

    def mean_weight(self, t):
        return torch.exp(-0.5 * self.integrated_beta(t))

    def var(self, t):
        # 1 - exp(-B) underflows to 0 in float32 for t below ~6e-7; expm1 does not.
        return -torch.expm1(-self.integrated_beta(t))

    def f(self, t, y):
        t = as_batch_time(t, y)
        return -0.5 * batch_view(self.beta(t), y) * y

    def g(self, t, y):
        t = as_batch_time(t, y)
        return batch_view(self.beta(t).sqrt(), y)

    def div_f(self, t, y):
        t = as_batch_time(t, y)
        return -0.5 * y[0].numel() * self.beta(t)

    def importance_time_sampler(self, T=None):
        return VPImportanceTimeSampler(self.beta_min, self.beta_max, self.T if T is None else T, self.t_epsilon)


class PluginReverseSDE(nn.Module):
    """The generative SDE built by plugging the drift network a into the reverse of base_sde.

    For lambda in [0, 1] (generative time t, s = T - t):
        mu_lambda(t, y)    = (1 - lambda/2) g(s) a(y, s) - f(y, s)
        sigma_lambda(t, y) = sqrt(1 - lambda) g(s)
    lambda = 0 is the reverse SDE, lambda = 1 the probability-flow ODE.

    drift_a(y, s): y (B, ...), s (B,) forward time -> (B, ...).
    """

    def __init__(self, base_sde, drift_a, T, vtype="rademacher", debias=False):
        super().__init__()
        self.base_sde = base_sde
        self.a = drift_a
        self.T = float(T)  # a float, or a 0-d / 1-element tensor
        self.vtype = check_vtype(vtype)
        self.debias = bool(debias)
        self.time_sampler = base_sde.importance_time_sampler(self.T) if self.debias else UniformTimeSampler(self.T)

    def mu(self, t, y, lmbd=0.0):
        lmbd = _check_lambda(lmbd)
        s = self.T - as_batch_time(t, y)
        return (1.0 - 0.5 * lmbd) * self.base_sde.g(s, y) * self.a(y, s) - self.base_sde.f(s, y)

    def sigma(self, t, y, lmbd=0.0):
        lmbd = _check_lambda(lmbd)
        s = self.T - as_batch_time(t, y)
        return math.sqrt(1.0 - lmbd) * self.base_sde.g(s, y)

    def dsm(self, x):
        """Denoising score matching loss per example, (B,) (DESIGN.md section 2).

        With debias on, s ~ q and the loss is deliberately NOT reweighted by 1/q:
        sampling from q is what turns the DSM weighting into the ELBO's.
        """
        s, _ = self.time_sampler.sample((x.shape[0],), device=x.device, dtype=x.dtype)
        y, eps, std, g = self.base_sde.sample(s, x, return_noise=True)
        a = self.a(y, s)
        return 0.5 * (a * std / g + eps).pow(2).flatten(1).sum(1)

    def elbo_random_t_slice(self, x):
        """ELBO of the plug-in reverse SDE (lambda = 0) in nats, (B,) (DESIGN.md section 3).

        One s ~ U[0, T], one Y_s, one Hutchinson probe and one sampled Y_T per example:
            log N(Y_T; 0, I) - (1/2 |a|^2 + div(g a) - div f)(Y_s, s) / (1/T).
        Keeps the graph for optimisation in training mode only.
        """
        sampler = UniformTimeSampler(self.T)
        s, q = sampler.sample((x.shape[0],), device=x.device, dtype=x.dtype)
        with torch.enable_grad():  # the divergence needs autograd even under no_grad evaluation
            y = self.base_sde.sample(s, x).detach().requires_grad_(True)
            a = self.a(y, s)
            ga = self.base_sde.g(s, y) * a
            probe = sample_probe(y, self.vtype)
            div_ga = divergence_estimate(ga, y, probe, create_graph=self.training)
            integrand = 0.5 * a.pow(2).flatten(1).sum(1) + div_ga - self.base_sde.div_f(s, y)
        y_T = self.base_sde.sample(torch.full_like(s, self.T), x)
        elbo = self.base_sde.prior_log_prob(y_T) - integrand / q
        return elbo if self.training else elbo.detach()


def _check_lambda(lmbd):
    lmbd = float(lmbd)
    if not 0.0 <= lmbd <= 1.0:
        raise ValueError(f"lambda must lie in [0, 1] (0: reverse SDE, 1: probability-flow ODE), got {lmbd}")
    return lmbd
