"""Exact log-likelihood by the probability-flow ODE, and bits per dimension for 8-bit images.

Forward time s in [0, T] (s = 0: data, s = T: noise). The probability-flow ODE
    dy/ds = F(y, s) = f(y, s) - 1/2 g(s) a(y, s)
moves p_0 onto p_s, and along it d log p_s(y_s) / ds = -div F(y_s, s) (instantaneous change of
variables). Integrating from s = 0 to T and replacing p_T by the prior N(0, I):
    log p_0(x) = log N(y_T; 0, I) + int_0^T div F(y_s, s) ds,    y_0 = x.
Integrating noise -> data instead flips the sign of the integral (DESIGN.md section 8: ~30 bpd).
"""
import math

import torch
from torchdiffeq import odeint

from lib.hutchinson import check_vtype, divergence_estimate, sample_probe
from lib.sdes import as_batch_time

# Only adaptive solvers: a fixed-grid one given t = [0, T] would take a single step.
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


def check_ode_method(method):
    """Return method if it names an adaptive torchdiffeq solver, else raise ValueError listing them."""
    if method not in ADAPTIVE_METHODS:
        raise ValueError(f"unknown ODE method {method!r}; allowed (adaptive): {', '.join(ADAPTIVE_METHODS)}")
    return method


def land_on_end(t_span):
    """torchdiffeq options making the last adaptive step end exactly at t_span[-1].

    By default the adaptive solvers step past the final time and interpolate back, which would
    evaluate the drift outside [0, T] (forward time s < 0, where the VP variance is negative).
    """
    return {"step_t": t_span[-1:]}


def ode_log_likelihood(gen_sde, x, rtol=1e-5, atol=1e-5, method="dopri5", vtype=None, generator=None):
    """log p_0(x) in nats under the probability-flow ODE of gen_sde, and the number of drift evaluations.

    x: (B, ...) data in the space the SDE runs in. Solves, from s = 0 to s = gen_sde.T, the
    augmented state (y, int div F) with y_0 = x and
        dy/ds = f(y, s) - 1/2 g(s) a(y, s),    d/ds int = div f(s) - 1/2 g(s) div_y a(y, s),
    using the SDE's exact div f. vtype=None: exact div a, one backward pass per dimension
    (low dimension only); 'rademacher' / 'gaussian': Hutchinson, v^T (d a / d y) v with ONE probe
    per example drawn before the solve and held fixed, so the ODE the adaptive solver sees is
    smooth (resampling inside the solve breaks its error control) and the estimate stays unbiased.
    All examples share one adaptive step sequence; use the network in eval mode (batch-coupled
    layers would mix examples). Works under torch.no_grad.
    Returns (log_p (B,), detached; nfe, an int).
    """
    check_ode_method(method)
    if vtype is not None:
        check_vtype(vtype)
    base = gen_sde.base_sde
    probe = None if vtype is None else sample_probe(x, vtype, generator=generator)
    nfe = 0

    def augmented_flow(s, state):
        nonlocal nfe
        nfe += 1
        y = state[0].detach()
        s = as_batch_time(s, y)
        with torch.enable_grad():  # the divergence needs autograd even when called under no_grad
            y.requires_grad_(True)
            half_ga = 0.5 * base.g(s, y) * gen_sde.a(y, s)
            div_half_ga = exact_divergence(half_ga, y) if probe is None else divergence_estimate(half_ga, y, probe)
        dy = base.f(s, y) - half_ga
        return dy.detach(), (base.div_f(s, y) - div_half_ga).detach()

    state0 = (x.detach(), torch.zeros(x.shape[0], dtype=x.dtype, device=x.device))
    s_span = torch.tensor([0.0, float(gen_sde.T)], dtype=x.dtype, device=x.device)
    solution = odeint(augmented_flow, state0, s_span, rtol=rtol, atol=atol, method=method, options=land_on_end(s_span))
    y_T, int_div = (v[-1] for v in solution)
    return (base.prior_log_prob(y_T) + int_div).detach(), nfe


def exact_divergence(out, inp):
    """tr(d out / d inp) per example, (B,), by D backward passes (D = inp[0].numel()).

    out, inp: (B, ...), out a per-example function of inp, so that the gradient of a column summed
    over the batch is that column's gradient for every example.
    """
    out = out.flatten(1)  # (B, D)
    diag = [torch.autograd.grad(out[:, i].sum(), inp, retain_graph=True)[0].flatten(1)[:, i]
            for i in range(out.shape[1])]
    return torch.stack(diag, 1).sum(1)


# --- bits per dimension (DESIGN.md section 5) ---------------------------------------------------


def logit_transform(x, alpha=0.05):
    """Map dequantized data x in [0, 1) to z = logit(p), p = alpha + (1 - 2 alpha) x.

    x: (B, ...). Returns (z (B, ...), logdet (B,)) with the change-of-variables term
        log|det dz/dx| = sum_i [log(1 - 2 alpha) - log p_i - log(1 - p_i)],
    so that log p_X(x) = log p_Z(z) + logdet. alpha keeps p away from 0 and 1, where logit diverges.
    """
    p = alpha + (1.0 - 2.0 * alpha) * x
    log_p, log_1mp = torch.log(p), torch.log1p(-p)
    logdet = (math.log1p(-2.0 * alpha) - log_p - log_1mp).flatten(1).sum(1)
    return log_p - log_1mp, logdet


def bits_per_dim(log_p, num_dims, logdet=0.0):
    """Bits per dimension of 8-bit data from the model's log-density of its dequantized version.

    log_p: (B,) log-density in the model's space (z after the logit transform, else x_tilde in
    [0, 1)); logdet: (B,) log|dz/dx_tilde| from ``logit_transform`` (0 without it); num_dims = C H W.
    log p(x_tilde) = log_p + logdet, and x_tilde = (k + u) / 256 puts each integer k in a cube of side
    1/256, so -log P(k) <= -E_u log p(x_tilde) + D log 256 (Jensen). Hence
        bpd = -(log_p + logdet) / (D ln 2) + 8,
    an upper bound on the discrete code length. Returns (B,).
    """
    return -(log_p + logdet) / (num_dims * math.log(2.0)) + 8.0


def mean_and_stderr(values):
    """Mean and standard error std / sqrt(N) (sample std, N - 1) as floats.

    values: a tensor of any shape, or a sequence of tensors / numbers (e.g. per-batch results),
    all pooled. One value gives a nan standard error.
    """
    if isinstance(values, torch.Tensor):
        flat = values.reshape(-1)
    else:
        parts = [torch.as_tensor(v).reshape(-1) for v in values]
        flat = torch.cat(parts) if parts else torch.empty(0)
    flat = flat.detach().double()
    n = flat.numel()
    if n == 0:
        raise ValueError("mean_and_stderr needs at least one value")
    stderr = (flat.std() / math.sqrt(n)).item() if n > 1 else float("nan")
    return flat.mean().item(), stderr
