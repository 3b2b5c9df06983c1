"""The swiss-roll task for the shared training loop: data, evaluation against the true density, figures.

Evaluation on a fixed held-out set reports three log-likelihoods side by side (nats, mean ±
standard error over the held-out points):
    true   quadrature of the swiss roll's density (lib/swiss_roll.py)
    ode    the model's exact log-likelihood along the probability-flow ODE (dopri5, exact 2-D divergence)
    elbo   the model's ELBO (PluginReverseSDE.elbo, averaged over --elbo_repeats draws per point)
and the gaps ode - true and elbo - true, paired per point (so their standard errors are small).
"""
import torch

from lib.config import resolve_device
from lib.evaluation import repeated_mean, summarize
from lib.likelihood import ode_log_likelihood
from lib.plotting import samples_figure, trajectories_figure
from lib.samplers import sample_lambda
from lib.swiss_roll import sample_swiss_roll, swiss_roll_log_density
from lib.training import Task

HELD_OUT_SEED = 20211  # one held-out set for every run, so runs with different seeds compare on it


def make_toy_task(args, rank=0, world_size=1):
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
            # The global batch is drawn whole and each rank takes its share, so it is the same for any
            # number of processes (torchrun).
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + it)
            yield sample_swiss_roll(args.batch_size, args.noise, g)[rank::world_size].to(device)

    def evaluate(gen_sde, iteration):
        elbo = repeated_mean(gen_sde.elbo, test_x, args.elbo_repeats)
        metrics = summarize("elbo", elbo, true_logp)
        metrics["true_log_likelihood"] = true_logp.mean().item()
        if iteration == args.num_iterations:  # the exact likelihood costs an adaptive solve: final only
            logp, nfe = ode_log_likelihood(gen_sde, test_x)
            metrics.update(summarize("ode", logp, true_logp))
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
        times = torch.linspace(0.0, gen_sde.T, args.num_steps + 1)  # the sampler's grid, generative time
        samples, paths = {}, {}
        for lmbd in args.lambdas:
            x, states = sample_lambda(gen_sde, y0, args.num_steps, lmbd, return_trajectory=True, generator=g)
            samples[f"λ={lmbd:g}"] = x
            if lmbd in (0.0, 1.0):
                kind = "reverse SDE" if lmbd == 0.0 else "probability-flow ODE"
                paths[f"λ={lmbd:g} ({kind})"] = (times, torch.stack(states))  # (K,), (K, N, 2)
        logger.figure("samples", samples_figure(
            data, samples, f"Swiss roll: samples by λ ({args.num_steps} Euler-Maruyama steps, iteration {iteration})"),
            iteration, "samples.png")
        if paths:
            logger.figure("trajectories", trajectories_figure(
                paths, f"Particles from noise (t=0) to data (t=T), {args.num_steps} Euler-Maruyama steps, "
                       f"iteration {iteration}"),
                iteration, "trajectories.png")

    return Task(kind="toy", model=model, sde=sde, batches=batches, evaluate=evaluate, describe=describe,
                sample=sample, extra={"noise": args.noise})
