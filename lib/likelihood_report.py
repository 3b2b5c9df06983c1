"""The likelihood report behind evaluate.py: a saved run's log-likelihood on held-out data, with standard errors.

Toy runs: nats per point on the fixed held-out swiss-roll set (lib.toy_task.HELD_OUT_SEED; by default the
run's own --num_eval points, the set its training log reports on), next to the true log-likelihood
(quadrature, lib/swiss_roll.py) and the gap to it, paired per point.
Image runs: bits/dim over the test set, each image dequantized x = (k + u) / 256 and moved to the model's
space with the run's logit transform and its log-determinant, exactly as in training (DESIGN.md section 5).

Methods:
  elbo  the ELBO of the plug-in reverse SDE (λ=0): a lower bound on that model's log-likelihood (an upper
        bound on its bits/dim), by the estimator named in lib.evaluation.ELBO_ESTIMATORS.
  ode   the exact log-likelihood of the probability-flow ODE model (λ=1), adaptive dopri5, with the
        divergence exact or by one Hutchinson probe per solve; reports the mean NFE per solve.
The report's keys follow the training metrics (elbo, elbo_std_err, elbo_gap, ...; bpd, bpd_std_err).
"""
import json

import torch

from lib.config import ConfigError, resolve_choice_options
from lib.evaluation import ODELikelihood, elbo_estimator, summarize, test_set_bits_per_dim
from lib.image_data import load_image_datasets, test_loader
from lib.swiss_roll import sample_swiss_roll, swiss_roll_log_density
from lib.toy_task import HELD_OUT_SEED

METHODS = ("elbo", "ode")
DIVERGENCES = ("exact", "rademacher", "gaussian")
# Options that only one method takes: ((the method,), its default; None: decided by the kind of run).
METHOD_OPTIONS = {
    "estimator": (("elbo",), "elbo"),
    "elbo_repeats": (("elbo",), None),
    "divergence": (("ode",), None),
    "rtol": (("ode",), 1e-5),
    "atol": (("ode",), 1e-5),
}


def resolve_options(opts, run):
    """Fill in the defaults of the options left None, in place; ConfigError for one that does not apply."""
    resolve_choice_options(opts, "method", METHOD_OPTIONS)
    toy = run.kind == "toy"
    if opts.method == "elbo" and opts.elbo_repeats is None:
        # The toy's held-out ELBO averages many cheap slices per point, as its training log does.
        opts.elbo_repeats = run.args.get("elbo_repeats", 64) if toy else 1
    if opts.method == "ode" and opts.divergence is None:
        opts.divergence = "exact" if toy else "rademacher"  # exact costs one backward pass per dimension
    if toy and opts.dataroot is not None:
        raise ConfigError("--dataroot applies to image runs; a toy run evaluates on its fixed held-out swiss roll")
    return opts


def evaluate(run, opts, device):
    """The report (a dict of plain values) for a lib.saved_run.SavedRun on `device`."""
    torch.manual_seed(opts.seed)  # the ELBO's times, noise and probes, and the ODE's probes
    if opts.method == "elbo":
        estimate, ode = elbo_estimator(run.gen_sde, opts.estimator, opts.elbo_repeats), None
    else:
        vtype = None if opts.divergence == "exact" else opts.divergence
        estimate = ode = ODELikelihood(run.gen_sde, rtol=opts.rtol, atol=opts.atol, vtype=vtype)
    report = {"checkpoint": opts.checkpoint, "kind": run.kind, "iteration": run.iteration, "method": opts.method,
              **{name: getattr(opts, name) for name in METHOD_OPTIONS if getattr(opts, name) is not None}}
    if run.kind == "toy":
        report.update(_toy(run, opts, device, estimate))
    else:
        report.update(_images(run, opts, device, estimate))
    if ode is not None:
        report["ode_nfe_mean"] = sum(ode.nfe) / len(ode.nfe)
        report["ode_solves"] = len(ode.nfe)
    return report


def describe(report):
    """The report as one line of text."""
    m = report["method"]
    if m == "elbo":
        how = f"ELBO (estimator {report['estimator']}, {report['elbo_repeats']} draw(s) per example)"
    else:
        how = (f"ODE log-likelihood ({report['divergence']} divergence, rtol {report['rtol']:g}, "
               f"atol {report['atol']:g})")
    if report["kind"] == "toy":
        text = (f"{how} on {report['num_points']} held-out swiss-roll points: {report[m]:.4f} ± "
                f"{report[m + '_std_err']:.4f} nats; true {report['true_log_likelihood']:.4f} ± "
                f"{report['true_log_likelihood_std_err']:.4f}; gap {report[m + '_gap']:+.4f} ± "
                f"{report[m + '_gap_std_err']:.4f} (paired)")
    else:
        text = (f"bits/dim by the {how} on {report['num_images']} {report['dataset']} test images: "
                f"{report['bpd']:.4f} ± {report['bpd_std_err']:.4f}")
    if "ode_nfe_mean" in report:
        text += f"; mean NFE {report['ode_nfe_mean']:.1f} over {report['ode_solves']} solve(s)"
    return text


def write_report(report, path):
    with open(path, "w") as fh:
        json.dump(report, fh, indent=2)
        fh.write("\n")


def _toy(run, opts, device, estimate):
    noise = run.extra["noise"]
    n = opts.num_eval or run.args.get("num_eval", 2000)
    x = sample_swiss_roll(n, noise, torch.Generator().manual_seed(HELD_OUT_SEED))  # (n, 2), as in training
    true_logp = swiss_roll_log_density(x, noise)  # (n,) float64
    x = x.to(device)
    batch = opts.test_batch_size or n  # one solve over all points by default, as training's evaluation
    values = torch.cat([estimate(x[i:i + batch]).double().cpu() for i in range(0, n, batch)])
    report = {"unit": "nats", "num_points": n, **summarize(opts.method, values, true_logp)}
    truth = summarize("true_log_likelihood", true_logp)
    return {**report, **truth}


def _images(run, opts, device, estimate):
    dataset = run.extra["dataset"]
    dataroot = opts.dataroot or run.args.get("dataroot", "data")
    _, test_set, info = load_image_datasets(dataset, dataroot)
    if opts.num_eval is not None and opts.num_eval > len(test_set):
        raise ConfigError(f"--num_eval={opts.num_eval} exceeds the {len(test_set)} test images in {dataroot}")
    batch = opts.test_batch_size or run.args.get("test_batch_size", 256)
    loader = test_loader(test_set, batch, test_subset=opts.num_eval)
    bpd = test_set_bits_per_dim(estimate, loader, run.to_model_space, info.dim, device, seed=(opts.seed,))
    return {"unit": "bits/dim", "dataset": dataset, "num_images": bpd.numel(), **summarize("bpd", bpd)}
