"""Swiss-roll study: how close does a trained MLPDrift's ELBO get to the true log-likelihood?

    python benchmarks/toy_study.py --steps 20000 --batch 512 --lr 2e-3 --debias True --ema 0.999

Trains on fresh swiss-roll samples every step (DSM loss of lib.sdes.PluginReverseSDE), then reports on a
fixed held-out set:
  * the held-out ELBO (mean of ``elbo_random_t_slice`` over ``--repeats`` passes), the true mean
    log-likelihood (quadrature), their gap and its standard error;
  * optionally (``--is_repeats``) a lower-variance estimate of the same ELBO: s ~ q (the debias density,
    weighted by 1/q) and the exact 2-D divergence instead of Hutchinson. Same expectation, smaller error bar;
  * optionally (``--ode True``) the exact probability-flow ODE log-likelihood (dopri5, exact divergence).
All timings are with torch.set_num_threads(1).
"""
import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lib.models.mlp import MLPDrift  # noqa: E402
from lib.sdes import PluginReverseSDE, VariancePreservingSDE  # noqa: E402

try:
    from lib.swiss_roll import sample_swiss_roll, swiss_roll_log_density  # noqa: E402
except ImportError:  # written concurrently by another engineer; same definitions below

    def sample_swiss_roll(n, noise=0.5, generator=None):
        """(n, 2): t ~ U[1.5 pi, 4.5 pi], (t cos t, t sin t) + N(0, noise^2 I), all divided by 10."""
        t = 1.5 * math.pi + 3 * math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
        x = torch.stack([t * torch.cos(t), t * torch.sin(t)], 1)
        x = x + noise * torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (x / 10).float()

    def swiss_roll_log_density(x, noise=0.5, n_grid=40001, chunk=256):
        """(n, 2) -> (n,): log 1/(3 pi) int N(x; c(t), (noise/10)^2 I) dt by the trapezoid rule in log space."""
        t = torch.linspace(1.5 * math.pi, 4.5 * math.pi, n_grid, dtype=torch.float64)
        c = torch.stack([t * torch.cos(t), t * torch.sin(t)], 1) / 10  # (G, 2)
        w = torch.full((n_grid,), 3 * math.pi / (n_grid - 1), dtype=torch.float64)
        w[0] = w[-1] = w[0] / 2
        s2 = (noise / 10) ** 2
        out = []
        for xb in x.to(torch.float64).split(chunk):
            d2 = (xb[:, None, :] - c[None]).pow(2).sum(-1)  # (b, G)
            out.append(torch.logsumexp(-0.5 * d2 / s2 + w.log(), 1))
        return torch.cat(out) - math.log(2 * math.pi * s2) - math.log(3 * math.pi)


def str2bool(v):
    if v not in ("True", "False"):
        raise argparse.ArgumentTypeError(f"expected True or False, got {v!r}")
    return v == "True"


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--schedule", choices=["constant", "cosine"], default="cosine")
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--min_lr_frac", type=float, default=0.0, help="cosine floor as a fraction of --lr")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay; 0 disables")
    p.add_argument("--debias", type=str2bool, default=True)
    p.add_argument("--grad_clip", type=float, default=0.0, help="0 disables")
    p.add_argument("--noise", type=float, default=0.5)
    # network (MLPDrift kwargs)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--time_embed", choices=["sinusoid", "log_sigma"], default="log_sigma")
    p.add_argument("--time_dim", type=int, default=64)
    p.add_argument("--conditioning", choices=["concat", "film"], default="concat")
    p.add_argument("--residual", type=str2bool, default=False)
    p.add_argument("--norm", choices=["none", "layer"], default="none")
    p.add_argument("--output", choices=["drift", "eps", "preconditioned"], default="preconditioned")
    p.add_argument("--local_std", type=float, default=0.05)
    p.add_argument("--y_fourier", type=int, default=0)
    p.add_argument("--y_fourier_scale", type=float, default=4.0)
    # evaluation
    p.add_argument("--n_eval", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=200, help="passes of elbo_random_t_slice over the held-out set")
    p.add_argument("--is_repeats", type=int, default=0, help="passes of the low-variance ELBO estimator")
    p.add_argument("--drift_reps", type=int, default=10, help="passes of the exact-drift gap 1/2 int E|a - a*|^2")
    p.add_argument("--ode", type=str2bool, default=False)
    p.add_argument("--ode_n", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", type=str, default="", help="write {name, kwargs, state_dict (EMA)} here")
    p.add_argument("--load", type=str, default="", help="skip training; evaluate this checkpoint")
    p.add_argument("--log_every", type=int, default=2000)
    return p.parse_args(argv)


def model_kwargs(args, sde):
    return dict(dim=2, width=args.width, depth=args.depth, time_embed=args.time_embed, time_dim=args.time_dim,
                conditioning=args.conditioning, residual=args.residual, norm=args.norm, output=args.output,
                local_std=args.local_std, y_fourier=args.y_fourier,
                y_fourier_scale=args.y_fourier_scale, beta_min=sde.beta_min, beta_max=sde.beta_max)


def lr_at(step, args):
    """Linear warm-up, then constant or cosine decay to min_lr_frac * lr."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.schedule == "constant":
        return args.lr
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


def train(gen, args):
    """Returns the EMA copy of the drift (or the drift itself when --ema 0) and the training wall time."""
    model = gen.a
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(args.seed + 1)
    t0, c0 = time.time(), time.process_time()
    run = 0.0
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        x = sample_swiss_roll(args.batch, noise=args.noise, generator=g)
        loss = gen.dsm(x).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        if args.ema > 0:
            # Warm the EMA up (as in many DDPM ports) so early averages are not dominated by the init.
            d = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    ema[k].mul_(d).add_(v.detach(), alpha=1 - d)
        run = loss.item() if step == 0 else 0.99 * run + 0.01 * loss.item()
        if args.log_every and (step + 1) % args.log_every == 0:
            print(f"step {step + 1:6d}  loss {run:.4f}  lr {lr_at(step, args):.2e}  {time.time() - t0:.1f}s wall, {time.process_time() - c0:.1f}s CPU", flush=True)
    wall, cpu = time.time() - t0, time.process_time() - c0
    if args.ema > 0:
        model.load_state_dict(ema)
    return wall, cpu


def elbo_low_variance(gen, x):
    """Same expectation as elbo_random_t_slice, lower variance: s ~ q weighted by 1/q, exact divergence. (B,)"""
    sde = gen.base_sde
    s, q = sde.importance_time_sampler(gen.T).sample((x.shape[0],), dtype=x.dtype)
    with torch.enable_grad():
        y = sde.sample(s, x).detach().requires_grad_(True)
        a = gen.a(y, s)
        ga = sde.g(s, y) * a
        div = sum(torch.autograd.grad(ga[:, i].sum(), y, retain_graph=True)[0][:, i] for i in range(x.shape[1]))
        integrand = 0.5 * a.pow(2).sum(1) + div - sde.div_f(s, y)
    y_T = sde.sample(torch.full_like(s, gen.T), x)
    return (sde.prior_log_prob(y_T) - integrand / q).detach()


def true_drift(sde, y, s, noise, n_grid=6001, chunk=512):
    """a*(y, s) = g(s) grad log p_s(y) of the swiss roll, by quadrature over the curve: (B, 2), float64.

    p_s(y) = 1/(3 pi) int N(y; alpha c(t), (alpha^2 k^2 + sigma^2) I) dt with k = noise / 10.
    """
    y, s = y.double(), s.double()
    t = torch.linspace(1.5 * math.pi, 4.5 * math.pi, n_grid, dtype=torch.float64)
    c = torch.stack([t * torch.cos(t), t * torch.sin(t)], 1) / 10  # (G, 2)
    alpha, var = sde.mean_weight(s), sde.var(s)
    v = alpha ** 2 * (noise / 10) ** 2 + var  # (B,)
    out = []
    for yb, ab, vb in zip(y.split(chunk), alpha.split(chunk), v.split(chunk)):
        diff = ab[:, None, None] * c[None] - yb[:, None, :]  # (b, G, 2)
        w = torch.softmax(-0.5 * diff.pow(2).sum(-1) / vb[:, None], dim=1)  # (b, G) posterior over t
        out.append((w[:, :, None] * diff).sum(1) / vb[:, None])  # the score
    return sde.g(s, y) * torch.cat(out)


def drift_error_gap(gen, x, noise, n_rep=10):
    """The ELBO gap as 1/2 int_0^T E|a - a*|^2 ds (s ~ q, weighted by 1/q): no DSM or Hutchinson noise.

    Returns (gap, standard error, {s-interval: contribution}).
    """
    sde = gen.base_sde
    sampler = sde.importance_time_sampler(gen.T)
    edges = [0.0, 1e-3, 1e-2, 0.05, 0.2, gen.T]
    vals, ss = [], []
    for _ in range(n_rep):
        s, q = sampler.sample((x.shape[0],), dtype=torch.float64)
        y = sde.sample(s, x.double())
        with torch.no_grad():
            a = gen.a(y.float(), s.float()).double()
        vals.append(0.5 * (a - true_drift(sde, y, s, noise)).pow(2).sum(1) / q)
        ss.append(s)
    vals, ss = torch.cat(vals), torch.cat(ss)
    parts = {f"[{lo:g},{hi:g})": (vals * ((ss >= lo) & (ss < hi))).mean().item() for lo, hi in zip(edges, edges[1:])}
    return vals.mean().item(), (vals.std() / math.sqrt(vals.numel())).item(), parts


def mean_and_se(fn, x, repeats):
    """Mean over the fixed set x of E[fn(x)], with the standard error of the estimator's randomness only."""
    vals = torch.stack([fn(x) for _ in range(repeats)]).double()  # (R, N)
    per_point_var = vals.var(0) if repeats > 1 else vals.var() * torch.ones(x.shape[0])
    return vals.mean().item(), (per_point_var.mean() / vals.numel()).sqrt().item()


def ode_log_likelihood(gen, x, rtol=1e-5, atol=1e-5):
    """Exact log p_0(x) of the probability-flow ODE: (B,) and the number of drift evaluations."""
    from torchdiffeq import odeint

    sde = gen.base_sde
    nfe = [0]

    def rhs(s, state):
        y, _ = state
        nfe[0] += 1
        with torch.enable_grad():
            y = y.detach().requires_grad_(True)
            sb = s.expand(y.shape[0]).to(y.dtype)
            F = sde.f(sb, y) - 0.5 * sde.g(sb, y) * gen.a(y, sb)
            div = sum(torch.autograd.grad(F[:, i].sum(), y, retain_graph=True)[0][:, i] for i in range(y.shape[1]))
        return F.detach(), div.detach()

    ts = torch.tensor([0.0, gen.T], dtype=x.dtype)
    ys, divs = odeint(rhs, (x, torch.zeros(x.shape[0], dtype=x.dtype)), ts, rtol=rtol, atol=atol, method="dopri5")
    return sde.prior_log_prob(ys[-1]) + divs[-1], nfe[0]


def main(args):
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    sde = VariancePreservingSDE()
    if args.load:
        ckpt = torch.load(args.load, weights_only=True)
        model = MLPDrift(**ckpt["kwargs"])
        model.load_state_dict(ckpt["state_dict"])
    else:
        model = MLPDrift(**model_kwargs(args, sde))
    print(json.dumps(vars(args)))
    print(f"parameters: {sum(p.numel() for p in model.parameters())}")
    gen = PluginReverseSDE(sde, model, sde.T, debias=args.debias)
    wall = cpu = 0.0
    if not args.load:
        wall, cpu = train(gen, args)
        # On a shared machine wall time includes waiting for a core; with one thread, CPU time is what an
        # otherwise idle core would take.
        print(f"training wall time: {wall:.1f}s, CPU time {cpu:.1f}s ({1000 * cpu / args.steps:.2f} ms/step)")
        if args.save:
            torch.save({"name": "MLPDrift", "kwargs": model_kwargs(args, sde), "state_dict": model.state_dict()},
                       args.save)
    gen.eval()

    x = sample_swiss_roll(args.n_eval, noise=args.noise, generator=torch.Generator().manual_seed(12345))
    logp = swiss_roll_log_density(x, noise=args.noise).double()
    true_ll = logp.mean().item()
    print(f"true mean log-likelihood: {true_ll:.4f}")
    res = {"train_wall_s": round(wall, 1), "train_cpu_s": round(cpu, 1), "true_ll": true_ll}
    t0 = time.time()
    if args.repeats:
        elbo, se = mean_and_se(gen.elbo_random_t_slice, x, args.repeats)
        res.update(elbo=elbo, gap=true_ll - elbo, gap_se=se)
        print(f"ELBO (elbo_random_t_slice, {args.repeats} passes): {elbo:.4f}   gap {true_ll - elbo:.4f} +- {se:.4f}"
              f"   ({time.time() - t0:.1f}s)")
    if args.is_repeats:
        t0 = time.time()
        elbo, se = mean_and_se(lambda v: elbo_low_variance(gen, v), x, args.is_repeats)
        res.update(elbo_is=elbo, gap_is=true_ll - elbo, gap_is_se=se)
        print(f"ELBO (s ~ q, exact div, {args.is_repeats} passes):    {elbo:.4f}   gap {true_ll - elbo:.4f} +- {se:.4f}"
              f"   ({time.time() - t0:.1f}s)")
    if args.drift_reps:
        t0 = time.time()
        gap, se, parts = drift_error_gap(gen, x, args.noise, args.drift_reps)
        res.update(gap_drift=gap, gap_drift_se=se, gap_drift_parts=parts)
        print(f"gap as 1/2 int E|a - a*|^2 ds: {gap:.4f} +- {se:.4f}   by s: "
              + "  ".join(f"{k} {v:.4f}" for k, v in parts.items()) + f"   ({time.time() - t0:.1f}s)")
    if args.ode:
        t0 = time.time()
        xo = x[: args.ode_n]
        ll, nfe = ode_log_likelihood(gen, xo)
        gap = (logp[: args.ode_n] - ll.double()).mean().item()
        res.update(ode_gap=gap, ode_nfe=nfe)
        print(f"ODE log-lik on {args.ode_n} points: {ll.mean().item():.4f} vs true {logp[: args.ode_n].mean().item():.4f}"
              f"   gap {gap:.4f}  nfe {nfe}   ({time.time() - t0:.1f}s)")
    print("RESULT " + json.dumps(res))


if __name__ == "__main__":
    main(get_args())
