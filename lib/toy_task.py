"""The swiss-roll task for the shared training loop: data, evaluation against the true density, figures.

Evaluation on a fixed held-out set reports three log-likelihoods side by side (nats, mean ±
standard error over the held-out points):
    true   quadrature of the swiss roll's density (lib/swiss_roll.py)
    ode    the model's exact log-likelihood along the probability-flow ODE (dopri5, exact 2-D divergence)
    elbo   the model's ELBO (random t slice, averaged over repeats per point)
and the gaps ode - true and elbo - true, paired per point (so their standard errors are small).
"""
import torch

from lib.config import resolve_device
from lib.likelihood import mean_and_stderr, ode_log_likelihood
from lib.plotting import samples_figure, trajectories_figure
from lib.samplers import sample_lambda
from lib.swiss_roll import sample_swiss_roll, swiss_roll_log_density
from lib.training import Task

HELD_OUT_SEED = 20211  # one held-out set for every run, so runs with different seeds compare on it


def make_toy_task(args):
    sde = {"beta_min": 0.1, "beta_max": 20.0, "T": args.T0}
    model = {"name": "mlp", "kwargs": {
        "dim": 2, "width": args.width, "depth": args.depth, "local_std": args.noise / 10,
        "beta_min": sde["beta_min"], "beta_max": sde["beta_max"],
    }}
    test_x = sample_swiss_roll(args.num_eval, args.noise, torch.Generator().manual_seed(HELD_OUT_SEED))
    true_logp = swiss_roll_log_density(test_x, args.noise).to(torch.float64)  # (N,)
    test_x = test_x.to(resolve_device(args.device))

    def batches(start, device):
        it = start
        while True:
            it += 1
            # Fresh samples every step, a pure function of (seed, iteration): resuming replays nothing.
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + it)
            yield sample_swiss_roll(args.batch_size, args.noise, g).to(device)

    def evaluate(gen_sde, iteration):
        elbo = elbo_per_point(gen_sde, test_x, args.elbo_repeats)
        metrics = _summary("elbo", elbo, true_logp)
        metrics["true_log_likelihood"] = true_logp.mean().item()
        if iteration == args.num_iterations:  # the exact likelihood costs an adaptive solve: final only
            logp, nfe = ode_log_likelihood(gen_sde, test_x)
            metrics.update(_summary("ode", logp.double().cpu(), true_logp))
            metrics["ode_nfe"] = nfe
        return metrics

    def describe(iteration, loss, m):
        text = (f"Iteration {iteration}  loss {loss:.4f}  ELBO {m['elbo']:.4f} ± {m['elbo_std_err']:.4f}  "
                f"true {m['true_log_likelihood']:.4f}  gap {m['elbo_gap']:+.4f} ± {m['elbo_gap_std_err']:.4f}")
        if "ode" in m:
            text += (f"  ODE {m['ode']:.4f} ± {m['ode_std_err']:.4f}  "
                     f"gap {m['ode_gap']:+.4f} ± {m['ode_gap_std_err']:.4f}  NFE {m['ode_nfe']}")
        return text

    def sample(gen_sde, iteration, logger):
        device = next(gen_sde.parameters()).device
        g = torch.Generator(device=device).manual_seed(args.seed)
        y0 = torch.randn(args.num_samples, 2, generator=g, device=device)
        data = sample_swiss_roll(args.num_samples, args.noise, torch.Generator().manual_seed(HELD_OUT_SEED + 1))
        samples, paths = {}, {}
        for lmbd in args.lambdas:
            x, states = sample_lambda(gen_sde, y0, args.num_steps, lmbd, return_trajectory=True, generator=g)
            samples[f"λ={lmbd:g}"] = x
            if lmbd in (0.0, 1.0):
                kind = "reverse SDE" if lmbd == 0.0 else "probability-flow ODE"
                paths[f"λ={lmbd:g} ({kind})"] = states[:: max(1, args.num_steps // 100)] + [states[-1]]
        logger.figure("samples", samples_figure(
            data, samples, f"Swiss roll: samples by λ ({args.num_steps} Euler-Maruyama steps, iteration {iteration})"),
            iteration, "samples.png")
        if paths:
            logger.figure("trajectories", trajectories_figure(
                paths, gen_sde.T, f"Particle trajectories from noise (t=0) to data (t=T), iteration {iteration}"),
                iteration, "trajectories.png")

    return Task(kind="toy", model=model, sde=sde, batches=batches, evaluate=evaluate, describe=describe,
                sample=sample, extra={"noise": args.noise})


@torch.no_grad()
def elbo_per_point(gen_sde, x, repeats, chunk=50_000):
    """The ELBO of each point averaged over `repeats` independent slices: (N,) float64 on the CPU."""
    n = x.shape[0]
    flat = x.repeat(repeats, 1)  # (repeats * N, 2), point i at rows i, i + N, ...
    parts = [gen_sde.elbo_random_t_slice(flat[i:i + chunk]) for i in range(0, flat.shape[0], chunk)]
    return torch.cat(parts).double().cpu().view(repeats, n).mean(0)


def _summary(name, values, true_logp):
    mean, se = mean_and_stderr(values)
    gap, gap_se = mean_and_stderr(values - true_logp)
    return {name: float(mean), f"{name}_std_err": float(se), f"{name}_gap": float(gap),
            f"{name}_gap_std_err": float(gap_se)}
