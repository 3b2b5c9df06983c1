"""The 2-D swiss roll toy distribution: a sampler and its exact log density.

This is the swiss roll as the diffusion-model literature uses it: scikit-learn's
``make_swiss_roll(n, noise)`` keeping columns 0 and 2, divided by 10. That is,

    t ~ U[T_MIN, T_MAX] = U[1.5 pi, 4.5 pi],
    x = (c(t) * 10 + noise * eps) / 10 = c(t) + tau * eps,   eps ~ N(0, I_2),

with the curve c(t) = (t cos t, t sin t) / 10 and tau = noise / 10. The density
is therefore a uniform mixture of isotropic Gaussians strung along the curve,

    p(x) = 1 / (T_MAX - T_MIN) * int_{T_MIN}^{T_MAX} N(x; c(t), tau^2 I_2) dt,

which has no closed form; ``swiss_roll_log_density`` evaluates it by a 1-D
quadrature over t in log space (see ``quadrature_rule`` for the rule and for why
its node count is enough).

No global random state is touched anywhere: randomness comes only from the
``torch.Generator`` passed in (or torch's default generator when none is).
"""
import functools
import math

import numpy as np
import torch

T_MIN = 1.5 * math.pi
T_MAX = 4.5 * math.pi
SCALE = 10.0  # the roll is divided by this after adding the noise
DEFAULT_NOISE = 0.5

# Quadrature design (see ``quadrature_rule``).
NODES_PER_PANEL = 8  # Gauss-Legendre nodes per panel
PANEL_WIDTH_IN_TAU = 2.0  # panel width, measured in arc length, in units of tau
MIN_PANELS = 8  # floor on the number of uniform panels (matters for large noise only)
END_GRADING_LEVELS = 24  # geometrically shrinking panels added next to each end of the roll
_MAX_CHUNK_ELEMENTS = 1 << 22  # points x nodes per chunk: 4M float64 = 32 MiB per temporary


def swiss_roll_curve(t):
    """The noiseless roll c(t) = (t cos t, t sin t) / 10.

    t: tensor of any shape (...) -> tensor (..., 2) of the same dtype.
    """
    return torch.stack((t * torch.cos(t), t * torch.sin(t)), dim=-1) / SCALE


def arc_length(t):
    """Arc length of c from T_MIN to t (numpy float64 in and out, any shape).

    |c'(t)| = sqrt(1 + t^2) / 10 and int sqrt(1 + t^2) dt = (t sqrt(1 + t^2) + asinh t) / 2.
    """
    t = np.asarray(t, dtype=np.float64)

    def primitive(u):
        return (u * np.sqrt(1.0 + u * u) + np.arcsinh(u)) / (2.0 * SCALE)

    return primitive(t) - primitive(T_MIN)


ROLL_LENGTH = float(arc_length(T_MAX))  # about 8.937


def _inverse_arc_length(s):
    """t in [T_MIN, T_MAX] with arc_length(t) = s, by bisection (monotone, exact to ~1 ulp)."""
    s = np.asarray(s, dtype=np.float64)
    lo = np.full_like(s, T_MIN)
    hi = np.full_like(s, T_MAX)
    for _ in range(64):  # interval 3 pi / 2^64 is far below float64 resolution at t ~ 10
        mid = 0.5 * (lo + hi)
        above = arc_length(mid) > s
        hi = np.where(above, mid, hi)
        lo = np.where(above, lo, mid)
    return 0.5 * (lo + hi)


def _check_density_noise(noise):
    noise = float(noise)
    if not (math.isfinite(noise) and noise > 0.0):
        raise ValueError(
            f"noise must be a finite number in the open interval (0, inf) for the density "
            f"(the noiseless roll has no density); got {noise!r}"
        )
    return noise


@functools.lru_cache(maxsize=32)
def _quadrature_rule_numpy(noise, refine):
    tau = noise / SCALE
    n_uniform = max(MIN_PANELS, int(math.ceil(ROLL_LENGTH / (PANEL_WIDTH_IN_TAU * tau)))) * refine
    h = ROLL_LENGTH / n_uniform
    # Panel boundaries in arc length: uniform with width h, plus at each end extra
    # boundaries at h/2, h/4, ..., h/2^L from the end (geometric grading).
    grading = h * 0.5 ** np.arange(1, END_GRADING_LEVELS + 1)
    s_bounds = np.concatenate([np.linspace(0.0, ROLL_LENGTH, n_uniform + 1), grading, ROLL_LENGTH - grading])
    s_bounds = np.unique(np.clip(s_bounds, 0.0, ROLL_LENGTH))
    t_bounds = _inverse_arc_length(s_bounds)
    t_bounds[0], t_bounds[-1] = T_MIN, T_MAX
    u, w = np.polynomial.legendre.leggauss(NODES_PER_PANEL)
    left, right = t_bounds[:-1, None], t_bounds[1:, None]
    half = 0.5 * (right - left)
    t = (0.5 * (left + right) + half * u[None, :]).ravel()
    weights = (half * w[None, :]).ravel()
    return t, np.log(weights)


def quadrature_rule(noise=DEFAULT_NOISE, refine=1):
    """The t-quadrature used by ``swiss_roll_log_density``.

    Returns (t, log_w): float64 CPU tensors of shape (N,), with sum(w) = T_MAX - T_MIN,
    such that int_{T_MIN}^{T_MAX} f(t) dt ~= sum_i w_i f(t_i).

    Rule: composite Gauss-Legendre, NODES_PER_PANEL = 8 nodes per panel. Panel
    boundaries are equally spaced in *arc length* along c (not in t), with panel
    width h = PANEL_WIDTH_IN_TAU * tau / refine = 2 tau / refine, plus
    END_GRADING_LEVELS = 24 geometrically graded boundaries (h/2, h/4, ..., h/2^24)
    next to each end of the roll. N = 8 * (max(8, ceil(L / (2 tau))) * refine + 48),
    L = ROLL_LENGTH ~= 8.94; e.g. N = 1104 for noise 0.5 and N = 3960 for noise 0.1.

    Why this is enough. For a point x near the roll, the integrand
    N(x; c(t), tau^2 I) is a bump around the closest point t0 of width about
    tau / |c'(t0)| in t, |c'(t)| = sqrt(1 + t^2) / 10; in arc length s that
    width is simply tau everywhere along the roll (the t-width shrinks by a
    factor ~3 from the inner to the outer end, which a uniform-in-t grid would
    have to pay for everywhere). So every panel spans at most 2 / refine bump
    widths, and 8-point Gauss-Legendre integrates a Gaussian over 2 standard
    deviations to a relative error of about 1e-9. Off the roll (distance d from
    it) the interior bumps narrow only by sqrt(1 + d * curvature), but for points
    beyond either end the integrand is a truncated exponential with a decay
    length tau^2 / d in arc length, much shorter than tau: the graded panels at
    the ends resolve decay lengths down to h / 2^24. The rule is scale-free in
    tau, so its relative accuracy is the same for every noise level.

    Measured against refine=6 over a 61 x 61 grid of [-2.5, 2.5]^2, i.e. on,
    between and well off the arms: max |error| in log p is 6e-8 nats for noise 0.1
    and 8e-8 for noise 0.5 (2e-9 inside [-1.6, 1.6]^2), far inside the 1e-4 nats
    promised for noise >= 0.1; against adaptive Gauss-Kronrod (tests) 5e-10.
    Accuracy degrades only for points many units away from the roll, where the
    interior bumps have narrowed a lot and the density is astronomically small:
    error 7e-5 nats at x = (10, 10) and 2e-2 at (-30, 5) for noise 0.1. Such
    values stay finite (log space).

    refine: positive integer multiplying the number of uniform panels (a finer
    rule, for convergence checks).
    """
    noise = _check_density_noise(noise)
    refine = int(refine)
    if refine < 1:
        raise ValueError(f"refine must be an integer >= 1; got {refine!r}")
    t, log_w = _quadrature_rule_numpy(noise, refine)
    return torch.from_numpy(t.copy()), torch.from_numpy(log_w.copy())


def sample_swiss_roll(n, noise=DEFAULT_NOISE, generator=None, device=None):
    """Draw n points from the 2-D swiss roll.

    n: number of samples (int >= 0).
    noise: std of the Gaussian noise added *before* dividing by 10 (sklearn's
        convention), so the std per coordinate in the returned units is noise / 10.
        Must be >= 0 (0 gives points exactly on the curve).
    generator: optional torch.Generator; all randomness is drawn from it (t first,
        then the noise), so the same generator seed gives the same samples. No
        global numpy / python random state is used. Without a generator torch's
        default generator is used.
    device: where to create the samples; defaults to the generator's device (CPU
        when there is no generator).

    Returns a float32 tensor of shape (n, 2). Computation is in float64, then cast.
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0; got {n}")
    noise = float(noise)
    if not (math.isfinite(noise) and noise >= 0.0):
        raise ValueError(f"noise must be a finite number in [0, inf) for sampling; got {noise!r}")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    t = T_MIN + (T_MAX - T_MIN) * u
    eps = torch.randn(n, 2, generator=generator, device=device, dtype=torch.float64)
    x = swiss_roll_curve(t) + (noise / SCALE) * eps
    return x.to(torch.float32)


def swiss_roll_log_density(x, noise=DEFAULT_NOISE, refine=1, chunk_size=None):
    """Exact (to quadrature accuracy) log density of the swiss roll, in nats.

    x: tensor of shape (n, 2) (any leading shape (..., 2) is accepted).
    noise: the sampler's noise parameter; must be > 0 (ValueError otherwise).
    refine: integer >= 1, multiplies the number of quadrature panels (see
        ``quadrature_rule``); the default rule is accurate to well below 1e-4 nats
        for noise >= 0.1 (about 1e-7 measured) anywhere within a few units of the roll.
    chunk_size: points processed at once; default keeps points x nodes <= 4M
        (about 32 MiB per float64 temporary), so n = 10k points at noise 0.1 take
        a few chunks and no large allocation.

    Returns a float64 tensor of shape (n,) (resp. (...)) on x's device, whatever
    x's dtype: the truth is meant for evaluation, so it is kept in full precision.

    Computed as
        log p(x) = logsumexp_i [log w_i - |x - c(t_i)|^2 / (2 tau^2)]
                   - log(T_MAX - T_MIN) - log(2 pi tau^2)
    in float64 (the squared distance expanded so that the sum over nodes is a
    matmul; the max is subtracted before exponentiating), so points far from the roll give large negative finite values
    instead of underflowing to -inf.
    """
    noise = _check_density_noise(noise)
    if x.shape[-1] != 2:
        raise ValueError(f"x must have shape (..., 2); got {tuple(x.shape)}")
    lead_shape = x.shape[:-1]
    device = x.device
    pts = x.reshape(-1, 2).to(dtype=torch.float64)
    t, log_w = quadrature_rule(noise, refine)
    t, log_w = t.to(device), log_w.to(device)
    centers = swiss_roll_curve(t)  # (N, 2)
    tau_sq = (noise / SCALE) ** 2
    # -|x - c|^2 / (2 tau^2) = x.c / tau^2 - |c|^2 / (2 tau^2) - |x|^2 / (2 tau^2): the last
    # term is constant across nodes and leaves the logsumexp; the rest is one matmul.
    # In float64 the cancellation costs ~1e-16 * |x| |c| / tau^2 nats (1e-12 near the roll).
    node_bias = log_w - centers.square().sum(dim=-1) / (2.0 * tau_sq)  # (N,)
    const = -math.log(T_MAX - T_MIN) - math.log(2.0 * math.pi * tau_sq)
    if chunk_size is None:
        chunk_size = max(1, _MAX_CHUNK_ELEMENTS // centers.shape[0])
    chunk_size = int(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    out = torch.empty(pts.shape[0], dtype=torch.float64, device=device)
    for start in range(0, pts.shape[0], chunk_size):
        block = pts[start:start + chunk_size]
        logits = torch.addmm(node_bias[None, :], block, centers.T, alpha=1.0 / tau_sq)  # (B, N)
        peak = logits.amax(dim=1)  # finite: every logit is finite
        lse = logits.sub_(peak[:, None]).exp_().sum(dim=1).log_().add_(peak)
        out[start:start + chunk_size] = lse - block.square().sum(dim=-1) / (2.0 * tau_sq)
    return (out + const).reshape(lead_shape)


def diffused_swiss_roll_score(y, alpha, var, noise=DEFAULT_NOISE):
    """The exact score grad_y log p_s(y) of the swiss roll diffused by a VP-type kernel.

    Y_s = alpha x + sqrt(var) eps with x from the swiss roll, so p_s is again a mixture along the
    (scaled) curve: p_s(y) = 1 / (T_MAX - T_MIN) int N(y; alpha c(t), v I) dt, v = alpha^2 tau^2 + var,
    and its score is the posterior mean of (alpha c(t) - y) / v over t. The integral over t uses
    ``quadrature_rule(noise)``, built for bumps of width tau; a diffused bump is wider, so it stays
    accurate. Used to split a model's ELBO gap into 1/2 int E|a - a*|^2 ds (benchmarks/toy_target.py).

    y: (B, 2); alpha, var: (B,) (per-example forward time). Returns (B, 2) float64 on y's device.
    """
    noise = _check_density_noise(noise)
    y, alpha, var = y.double(), alpha.double(), var.double()
    t, log_w = quadrature_rule(noise)
    centers = swiss_roll_curve(t.to(y.device))  # (N, 2)
    v = alpha ** 2 * (noise / SCALE) ** 2 + var  # (B,)
    diff = alpha[:, None, None] * centers[None] - y[:, None, :]  # (B, N, 2)
    posterior = torch.softmax(log_w.to(y.device) - diff.square().sum(-1) / (2 * v[:, None]), dim=1)  # (B, N)
    return (posterior[:, :, None] * diff).sum(1) / v[:, None]


class SwissRollDrift(torch.nn.Module):
    """The exact inference drift a*(y, s) = g(s) grad log p_s(y) of the swiss roll diffused by `sde` (any SDE of
    lib.sdes with alpha, sigma and g): y (B, 2), s (B,) -> (B, 2) in y's dtype. The optimal network, and the
    control variate of the toy's ELBO (lib/toy_task.py)."""

    def __init__(self, sde, noise=DEFAULT_NOISE):
        super().__init__()
        self.sde, self.noise = sde, noise

    def forward(self, y, s):
        s = s.expand(y.shape[0]) if s.dim() == 0 else s
        score = diffused_swiss_roll_score(y, self.sde.mean_weight(s), self.sde.var(s), self.noise)
        return (self.sde.g(s, y) * score).to(y.dtype)
