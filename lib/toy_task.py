"""The swiss-roll task: fresh data every step, evaluation against the true density, figures.

Evaluation on a fixed held-out set reports log-likelihoods side by side (nats, mean ± standard error
over the held-out points):
    true   quadrature of the swiss roll's density (lib/swiss_roll.py)
    elbo   the model's ELBO (PluginReverseSDE.elbo with --elbo_times stratified times, averaged over
           --elbo_repeats draws per point), with the exact drift's ELBO as a control variate (below)
    ode    at the end of the run, the exact log-likelihood along the probability-flow ODE (dopri5, exact
           2-D divergence)
and the gaps elbo - true and ode - true, paired per point (so their standard errors are small).

The control variate. On the swiss roll the ELBO's noise is the draw of Y_s at a given s, not the draw of s
(stratifying s barely helps), and it is nearly the same for any drift close to the truth. So the exact drift
a* (lib.swiss_roll.SwissRollDrift) is estimated on the very same draws (s, eps, probes), and
    elbo(x) = log p(x) + ELBO_a(x) - ELBO_a*(x),
whose mean is the model's ELBO minus delta(x) = E[log N(Y_T; 0, I) - log p_T(Y_T) | x], the exact drift's own
gap, below alpha_T^2 E|x|^2 / 2 < 1e-4 nats. Measured on the default run (2000 points, 16 evaluations per
point): the gap's standard error 0.003 nats, against 0.037 from 64 plain draws per point.
"""
import functools

import matplotlib.pyplot as plt
import torch

from lib.config import ConfigError
from lib.evaluation import repeated_mean, sliced_wasserstein, summarize, summary_with_noise
from lib.likelihood import ode_log_likelihood
from lib.plotting import samples_figure, trajectories_figure
from lib.rng import Stream, generator, held_out_generator
from lib.samplers import sample_lambda
from lib.sdes import PluginReverseSDE
from lib.swiss_roll import SwissRollDrift, sample_swiss_roll, swiss_roll_log_density
from lib.task import Task, device_of

SW_PROJECTIONS = 256  # a fixed number of directions and a fixed seed: the distance is a reproducible metric
VIEW = 1.6  # half-width of the sample scatter plots; the swiss roll spans about [-1.2, 1.4]


class ToyTask(Task):
    kind = "toy"
    # "lambdas" is --lmbd's former name, still found in older checkpoints' arguments.
    resumable_args = frozenset({"num_eval", "lmbd", "lambdas", "num_samples", "elbo_repeats", "elbo_times"})
    legacy_args = {**Task.legacy_args, "elbo_times": 1}

    @classmethod
    def from_stored_args(cls, args):
        if "lambdas" in args and "lmbd" not in args:
            args["lmbd"] = args.pop("lambdas")
        return cls(args)

    @property
    def model(self):
        sde = self.sde
        return {"name": "mlp", "kwargs": {"dim": 2, "width": self.args.width, "depth": self.args.depth,
                                          "local_std": self.args.noise / 10, "beta_min": sde["beta_min"],
                                          "beta_max": sde["beta_max"], "sde": sde["name"]}}

    @property
    def extra(self):
        return {"noise": self.args.noise}

    @property
    def sample_shape(self):
        return (2,)

    @functools.lru_cache(maxsize=2)
    def held_out(self, n):
        """The fixed held-out set: (points (n, 2), their true log-density (n,) float64), the same for every run."""
        x = sample_swiss_roll(n, self.args.noise, held_out_generator())
        return x, swiss_roll_log_density(x, self.args.noise).to(torch.float64)

    # --- training ----------------------------------------------------------------------------------

    def batches(self, start, device):
        it = start
        while True:
            it += 1
            # The global batch is drawn whole and each rank takes its share, so it is the same for any
            # number of processes (torchrun).
            g = generator(self.args.seed, Stream.TOY_BATCH, it)
            yield sample_swiss_roll(self.args.batch_size, self.args.noise, g)[self.rank::self.world_size].to(device)

    def evaluate(self, gen_sde, iteration):
        x, true_logp = self.held_out(self.args.num_eval)
        x = x.to(device_of(gen_sde))
        metrics = summarize("elbo", self.controlled_elbo(gen_sde, x, true_logp), true_logp)
        metrics["true_log_likelihood"] = true_logp.mean().item()
        if iteration == self.args.num_iterations:  # the exact likelihood costs an adaptive solve: final only
            logp, nfe = ode_log_likelihood(gen_sde, x)
            metrics.update(summarize("ode", logp, true_logp))
            metrics["ode_nfe"] = nfe
        return metrics

    def controlled_elbo(self, gen_sde, x, true_logp):
        """The model's ELBO of the points x (N, 2) with the exact drift's as control variate (module docstring),
        (N,) float64; true_logp (N,): their log-density."""
        oracle = PluginReverseSDE(gen_sde.base_sde, SwissRollDrift(gen_sde.base_sde, self.args.noise), gen_sde.T,
                                  vtype=gen_sde.vtype).eval()
        seed = int(torch.randint(2**62, ()))  # from the caller's stream; both estimates replay it

        def estimate(sde):
            torch.manual_seed(seed)
            draws = functools.partial(sde.elbo, num_times=self.args.elbo_times)
            return repeated_mean(draws, x, self.args.elbo_repeats).double().cpu()

        return true_logp + estimate(gen_sde) - estimate(oracle)

    def describe(self, iteration, loss, m):
        text = (f"Iteration {iteration}  loss {loss:.4f}  ELBO {m['elbo']:.4f} ± {m['elbo_std_err']:.4f}  "
                f"true {m['true_log_likelihood']:.4f}  gap {m['elbo_gap']:+.4f} ± {m['elbo_gap_std_err']:.4f}")
        if "ode" in m:
            text += (f"  ODE {m['ode']:.4f} ± {m['ode_std_err']:.4f}  "
                     f"gap {m['ode_gap']:+.4f} ± {m['ode_gap_std_err']:.4f}  NFE {m['ode_nfe']}")
        return text

    def sample(self, gen_sde, iteration, logger):
        a = self.args
        device = device_of(gen_sde)
        g = generator(a.seed, Stream.SAMPLES, iteration, device=device)
        y0 = torch.randn(a.num_samples, 2, generator=g, device=device)
        data = sample_swiss_roll(a.num_samples, a.noise, held_out_generator(offset=1))
        times = torch.linspace(0.0, gen_sde.T, a.num_steps + 1)  # the sampler's grid, generative time
        samples, paths = {}, {}
        for lmbd in a.lmbd:
            x, states = sample_lambda(gen_sde, y0, a.num_steps, lmbd, return_trajectory=True, generator=g)
            samples[f"λ={lmbd:g}"] = x
            if lmbd in (0.0, 1.0):
                kind = "reverse SDE" if lmbd == 0.0 else "probability-flow ODE"
                paths[f"λ={lmbd:g} ({kind})"] = (times, torch.stack(states))  # (K,), (K, N, 2)
        logger.figure("samples", samples_figure(
            data, samples, f"Swiss roll: samples by λ ({a.num_steps} Euler-Maruyama steps, iteration {iteration})"),
            iteration, "samples.png")
        if paths:
            logger.figure("trajectories", trajectories_figure(
                paths, f"Particles from noise (t=0) to data (t=T), {a.num_steps} Euler-Maruyama steps, "
                       f"iteration {iteration}"),
                iteration, "trajectories.png")

    # --- tools -------------------------------------------------------------------------------------

    def likelihood_report(self, estimate, name, device, seed, num_eval=None, batch_size=None, dataroot=None,
                          with_noise=False):
        """On the run's held-out set (by default its own --num_eval points, the set its log reports on), in
        batches of `batch_size` (default: all points in one call, as training evaluates), next to the truth.
        with_noise: estimate returns (values, their estimator's variances), as lib.evaluation.stratified_elbo."""
        if dataroot is not None:
            raise ConfigError("--dataroot applies to image runs; a toy run evaluates on its fixed held-out swiss roll")
        n = num_eval or self.args.num_eval
        x, true_logp = self.held_out(n)
        x, batch = x.to(device), batch_size or n
        torch.manual_seed(seed)  # the ELBO's times, noise and probes, and the ODE's probes
        parts = [estimate(x[i:i + batch]) for i in range(0, n, batch)]
        values, noise = (zip(*parts) if with_noise else (parts, None))
        values = torch.cat([v.double().cpu() for v in values])
        noise = None if noise is None else torch.cat([v.double().cpu() for v in noise])
        return {"unit": "nats", "num_points": n, **summary_with_noise(name, values, noise, true_logp),
                **summarize("true_log_likelihood", true_logp), f"{name}_per_point": values.tolist()}

    def default_elbo_repeats(self):
        return self.args.elbo_repeats  # the toy's held-out ELBO averages many cheap draws, as its log does

    def default_divergence(self):
        return "exact"  # two dimensions: two backward passes

    def save_samples(self, x, path, title, seed):
        """A scatter of x (N, 2) over fresh swiss-roll data, and its sliced Wasserstein-2 distance to that data
        next to the distance between two fresh data sets of the same size (what a perfect sampler scores)."""
        g = generator(seed, Stream.FRESH_DATA)
        data, other = (sample_swiss_roll(x.shape[0], self.args.noise, g) for _ in range(2))
        x = x.cpu()
        quality = {"sliced_wasserstein": _sw(x, data), "sliced_wasserstein_floor": _sw(other, data)}
        outside = int((x.abs() > VIEW).any(1).sum())
        label = "samples" + (f" ({outside} outside the view)" if outside else "")
        fig = samples_figure(data, {label: x}, f"Swiss roll: {title}\nsliced W2 to fresh data "
                             f"{quality['sliced_wasserstein']:.3f} "
                             f"(data to data: {quality['sliced_wasserstein_floor']:.3f})",
                             lim=VIEW)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        return quality


def _sw(x, y):
    return sliced_wasserstein(x, y, SW_PROJECTIONS, torch.Generator().manual_seed(0)).item()
