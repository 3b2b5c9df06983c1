"""Samplers for the plug-in reverse SDE (generative time t in [0, T], forward time s = T - t).

Every sampler starts from y ~ N(0, I) of shape (B, ...) passed in by the caller, takes its noise
from an explicit ``torch.Generator`` (None: torch's default), and returns data of the same shape,
so the same code serves 2-D toy points and (B, C, H, W) images.

  * ``sample_lambda``: Euler-Maruyama of the lambda-family (docs/math.md section 1).
  * ``sample_pc``: predictor-corrector sampling (Song et al. 2021, Algorithm 1).
  * ``sample_ode``: the probability-flow ODE (lambda = 1) with an adaptive solver; returns the NFE.
  * ``tweedie_denoise``: the optional last step x = E[x | y_s] = (y + sigma^2(s) score) / alpha(s).
"""
import math
import operator

import torch
from lib.ode import check_ode_method, solve_to_end
from lib.sdes import _check_lambda, as_batch_time, batch_view

PREDICTORS = ("reverse_diffusion", "euler_maruyama")
# Command-line names (sample.py): sample_lambda (Euler-Maruyama), sample_pc, sample_ode.
SAMPLERS = ("em", "pc", "ode")


@torch.no_grad()
def sample_lambda(gen_sde, y, num_steps, lmbd=0.0, return_trajectory=False, generator=None):
    """Euler-Maruyama for dY = mu_lambda(t, Y) dt + sigma_lambda(t, Y) dW from t = 0 to t = T.

    y: (B, ...) draw from the prior N(0, I) at t = 0. num_steps equal steps dt = T / num_steps,
    drift and noise evaluated at the left end t_i = i dt (so s = T - t_i >= dt: the drift is
    never asked for s = 0):
        y_{i+1} = y_i + mu_lambda(t_i, y_i) dt + sigma_lambda(t_i, y_i) sqrt(dt) z_i,  z_i ~ N(0, I).
    Returns y at t = T (B, ...), or (y, states) with the num_steps + 1 states, the input first.
    lambda = 1 draws no noise: the result is a deterministic function of y.
    """
    lmbd = _check_lambda(lmbd)  # fail before any network evaluation
    num_steps = _check_num_steps(num_steps)
    T = float(gen_sde.T)
    dt = T / num_steps
    states = [y]
    for i in range(num_steps):
        t = as_batch_time(i * dt, y)
        drift = gen_sde.mu(t, y, lmbd) * dt
        if lmbd < 1.0:
            drift = drift + gen_sde.sigma(t, y, lmbd) * math.sqrt(dt) * _noise_like(y, generator)
        y = y + drift
        if return_trajectory:
            states.append(y)
    return (y, states) if return_trajectory else y


@torch.no_grad()
def sample_pc(gen_sde, y, num_steps, snr=0.16, n_corrector=1, predictor="reverse_diffusion", denoise=True,
              eps_end=1e-3, generator=None):
    """Predictor-corrector sampling, predictor first and then the corrector (Algorithm 1 of Song et al. 2021).

    y: (B, ...) prior draw at s = T. Forward times s_0 = T > s_1 > ... > s_N = eps_end, equal steps.
    Step i: the predictor moves y from s_i to s_{i+1} using the score at s_i, then ``n_corrector``
    Langevin steps at s_{i+1} with signal-to-noise ratio ``snr``. The grid stops at eps_end
    (default 1e-3, Song et al.'s choice) rather than 0 because a trained score is unreliable and
    large as s -> 0; ``denoise`` then removes the remaining sigma(eps_end) noise by Tweedie's formula.
    predictor: 'reverse_diffusion' or 'euler_maruyama'. Returns (B, ...).
    """
    if predictor not in PREDICTORS:
        raise ValueError(f"unknown predictor {predictor!r}; allowed: {', '.join(PREDICTORS)}")
    num_steps = _check_num_steps(num_steps)
    n_corrector = operator.index(n_corrector)
    if n_corrector < 0:
        raise ValueError(f"n_corrector must be >= 0, got {n_corrector}")
    if not snr > 0:
        raise ValueError(f"snr must be > 0, got {snr}")
    T = _check_eps_end(gen_sde, eps_end)
    step = _reverse_diffusion_step if predictor == "reverse_diffusion" else _euler_maruyama_step
    grid = torch.linspace(T, eps_end, num_steps + 1, dtype=torch.float64).tolist()
    for s_cur, s_next in zip(grid[:-1], grid[1:]):
        y = step(gen_sde, y, s_cur, s_next, generator)
        for _ in range(n_corrector):
            y = _langevin_step(gen_sde, y, s_next, snr, generator)
    return tweedie_denoise(gen_sde, y, eps_end) if denoise else y


@torch.no_grad()
def sample_ode(gen_sde, y, rtol=1e-5, atol=1e-5, method="dopri5", denoise=False, eps_end=1e-3):
    """Integrate the probability-flow ODE dy/dt = mu_1(t, y) from t = 0 to t = T - eps_end adaptively.

    y: (B, ...) prior draw. The solve stops at forward time s = eps_end (default 1e-3) instead of 0:
    a trained drift a = g * score is large and fast-varying as s -> 0, which makes the ODE stiff
    there and costs many function evaluations for a change of order sigma(eps_end) ~ 1e-2.
    Pass eps_end=0 to integrate all the way. ``denoise`` applies Tweedie's formula at s = eps_end.
    All examples share one adaptive step sequence. Returns (x (B, ...), nfe).
    """
    check_ode_method(method)
    T = _check_eps_end(gen_sde, eps_end)
    nfe = 0

    def flow(t, y_t):
        nonlocal nfe
        nfe += 1
        return gen_sde.mu(as_batch_time(t, y_t), y_t, 1.0)

    t_span = torch.tensor([0.0, T - eps_end], dtype=y.dtype, device=y.device)
    x = solve_to_end(flow, y, t_span, rtol, atol, method)
    return (tweedie_denoise(gen_sde, x, eps_end) if denoise else x), nfe


def tweedie_denoise(gen_sde, y, s):
    """E[x | y_s] = (y + sigma^2(s) score(y, s)) / alpha(s), with score = a / g (Tweedie's formula).

    y: (B, ...); s: forward time, a float or (B,). Returns (B, ...).
    """
    s = as_batch_time(s, y)
    base = gen_sde.base_sde
    alpha = batch_view(base.mean_weight(s), y)
    var = batch_view(base.var(s), y)
    return (y + var * _score(gen_sde, y, s)) / alpha


# --- predictor and corrector steps --------------------------------------------------------------


def _score(gen_sde, y, s):
    """grad log p_s(y) = a(y, s) / g(s); s (B,)."""
    return gen_sde.a(y, s) / gen_sde.base_sde.g(s, y)


def _euler_maruyama_step(gen_sde, y, s_cur, s_next, generator):
    """One Euler-Maruyama step of the reverse SDE (lambda = 0) from s_cur down to s_next."""
    h = s_cur - s_next
    t = as_batch_time(gen_sde.T - s_cur, y)
    return y + gen_sde.mu(t, y) * h + gen_sde.sigma(t, y) * math.sqrt(h) * _noise_like(y, generator)


def _reverse_diffusion_step(gen_sde, y, s_cur, s_next, generator):
    """Song et al.'s reverse-diffusion predictor built on the exact one-step forward kernel.

    Forward, Y_{s_cur} = r Y_{s_next} + G z with r = alpha(s_cur) / alpha(s_next) and
    G^2 = sigma^2(s_cur) - r^2 sigma^2(s_next), i.e. drift (r - 1) y and noise G. Reversed:
        y <- y - (r - 1) y + G^2 score(y, s_cur) + G z.
    For the VP SDE G^2 = 1 - r^2 is DDPM's beta_i, so this is their ancestral-style step.
    """
    base = gen_sde.base_sde
    # The coefficients are shared by the batch: compute them once in float64, because
    # sigma^2(s_cur) - r^2 sigma^2(s_next) cancels badly in float32 for small steps.
    s_pair = torch.tensor([s_cur, s_next], dtype=torch.float64)
    alpha, var = base.mean_weight(s_pair), base.var(s_pair)
    r = (alpha[0] / alpha[1]).item()
    G2 = (var[0] - r ** 2 * var[1]).item()
    s = as_batch_time(s_cur, y)
    return (2.0 - r) * y + G2 * _score(gen_sde, y, s) + math.sqrt(G2) * _noise_like(y, generator)


def _langevin_step(gen_sde, y, s, snr, generator):
    """One Langevin corrector step at forward time s (Song et al. 2021, Algorithm 4).

    step = 2 (snr |z| / |score|)^2;  y <- y + step * score + sqrt(2 step) z.
    The norms are averaged over the batch, as in Song et al.'s code: a per-example ratio is
    unbounded in low dimension (a 2-D point at the mode has |score| ~ 0), at the price of making
    a sample depend on the rest of its batch. Their extra VP factor alpha_i = 1 - beta_i (~1) is
    left out.
    """
    s = as_batch_time(s, y)
    score = _score(gen_sde, y, s)
    z = _noise_like(y, generator)
    score_norm = score.flatten(1).norm(dim=1).mean()
    noise_norm = z.flatten(1).norm(dim=1).mean()
    step = 2.0 * (snr * noise_norm / score_norm) ** 2
    return y + step * score + torch.sqrt(2.0 * step) * z


# --- checks and helpers -------------------------------------------------------------------------


def _noise_like(y, generator):
    return torch.randn(y.shape, generator=generator, dtype=y.dtype, device=y.device)


def _check_num_steps(num_steps):
    num_steps = operator.index(num_steps)  # rejects 10.0 and friends
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return num_steps


def _check_eps_end(gen_sde, eps_end):
    """Return T as a float after checking 0 <= eps_end < T."""
    T = float(gen_sde.T)
    if not 0.0 <= eps_end < T:
        raise ValueError(f"eps_end must lie in [0, T) = [0, {T}), got {eps_end}")
    return T
