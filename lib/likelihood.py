"""Exact log-likelihood by the probability-flow ODE (docs/math.md section 4).

Forward time s in [0, T] (s = 0: data, s = T: noise). The probability-flow ODE
    dy/ds = F(y, s) = f(y, s) - 1/2 g(s) a(y, s)
moves p_0 onto p_s, and along it d log p_s(y_s) / ds = -div F(y_s, s) (instantaneous change of
variables). Integrating from s = 0 to T and replacing p_T by the prior N(0, I):
    log p_0(x) = log N(y_T; 0, I) + int_0^T div F(y_s, s) ds,    y_0 = x.
Integrating noise -> data instead flips the sign of the integral (docs/math.md section 8: ~30 bpd).
"""
import torch

from lib.hutchinson import check_vtype, divergence_estimate, sample_probe
from lib.ode import check_ode_method, solve_to_end
from lib.sdes import as_batch_time


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
    y_T, int_div = solve_to_end(augmented_flow, state0, s_span, rtol, atol, method)
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
