"""The likelihood report behind evaluate.py: a saved run's log-likelihood on held-out data, with standard errors.

What is scored, and on which data, is the run's task's (lib/task.py, `likelihood_report`): toy runs report
nats per point on the fixed held-out swiss roll next to the true log-likelihood and the paired gap; image
runs bits/dim over the test set, dequantized and transformed exactly as in training (docs/math.md section 5).

Methods:
  elbo  the ELBO of the plug-in reverse SDE (λ=0): a lower bound on that model's log-likelihood (an upper
        bound on its bits/dim), by the estimator named in lib.evaluation.ELBO_ESTIMATORS.
  ode   the exact log-likelihood of the probability-flow ODE model (λ=1), adaptive dopri5, with the
        divergence exact or by one Hutchinson probe per solve; reports the mean NFE per example (each
        batch's solve weighted by its number of examples).
The report's keys follow the training metrics (elbo, elbo_std_err, elbo_gap, ...; bpd, bpd_std_err).
"""
import json

import torch

from lib.evaluation import NonFiniteError, ODELikelihood, elbo_estimator, stratified_elbo
from lib.files import atomic_path

METHODS = ("elbo", "ode")
DIVERGENCES = ("exact", "rademacher", "gaussian")


def evaluate(run, opts, device):
    """The report (a dict of plain values) for a lib.saved_run.SavedRun on `device`.

    opts: evaluate.py's arguments (method: elbo with estimator, elbo_repeats; ode with divergence, rtol, atol;
    and checkpoint, seed, num_eval, test_batch_size, dataroot). Settings left None take the run's defaults.
    """
    task = run.task
    with_noise = False
    if opts.method == "elbo":
        repeats = opts.elbo_repeats or task.default_elbo_repeats()
        settings = {"estimator": opts.estimator, "elbo_repeats": repeats}
        if opts.estimator == "elbo":
            settings["num_times"] = opts.num_times
        # One stratified draw per example carries its own variance estimate (four strata or more).
        with_noise = opts.estimator == "elbo" and repeats == 1 and opts.num_times >= 4
        estimate = (stratified_elbo(run.gen_sde, opts.num_times) if with_noise
                    else elbo_estimator(run.gen_sde, opts.estimator, repeats, num_times=opts.num_times))
        ode = None
    else:
        settings = {"divergence": opts.divergence or task.default_divergence(), "rtol": opts.rtol, "atol": opts.atol}
        vtype = None if settings["divergence"] == "exact" else settings["divergence"]
        estimate = ode = ODELikelihood(run.gen_sde, rtol=opts.rtol, atol=opts.atol, vtype=vtype)
    report = {"checkpoint": opts.checkpoint, "kind": task.kind, "iteration": run.iteration, "method": opts.method,
              **settings}
    estimate = _finite(estimate, "ELBO" if opts.method == "elbo" else "ODE log-likelihood", opts.checkpoint)
    report.update(task.likelihood_report(estimate, opts.method, device, opts.seed, num_eval=opts.num_eval,
                                         batch_size=opts.test_batch_size, dataroot=opts.dataroot,
                                         with_noise=with_noise))
    if ode is not None:
        report["ode_nfe_mean"] = ode.mean_nfe()  # per example: a short last batch weighs as little as it holds
        report["ode_solves"] = len(ode.nfe)
    return report


def _finite(estimate, what, checkpoint):
    """estimate, stopping at the first batch with a non-finite value (NonFiniteError) rather than reporting nan."""
    def checked(x):
        out = estimate(x)
        values = out[0] if isinstance(out, tuple) else out  # (values, their variances) with_noise
        bad = int((~torch.isfinite(values)).sum())
        if bad:
            raise NonFiniteError(f"the {what} is not finite for {bad} of the {x.shape[0]} examples of a batch: the "
                                 f"network in {checkpoint} gives non-finite outputs; evaluate an earlier checkpoint "
                                 "(the run's log shows where training went wrong)")
        return out

    return checked


def describe(report):
    """The report as one line of text."""
    m = report["method"]
    if m == "elbo":
        times = f", {report['num_times']} stratified times" if "num_times" in report else ""
        how = f"ELBO (estimator {report['estimator']}{times}, {report['elbo_repeats']} draw(s) per example)"
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
    key = ("bpd" if report["kind"] != "toy" else m) + "_estimator_std_err"
    if key in report:
        text += f" (of which the estimator's noise: ± {report[key]:.4f})"
    if "ode_nfe_mean" in report:
        text += f"; mean NFE per example {report['ode_nfe_mean']:.1f} over {report['ode_solves']} solve(s)"
    return text


def write_report(report, path):
    """The report as JSON at `path`, written atomically (OSError if it cannot be)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as fh:
            json.dump(report, fh, indent=2)
            fh.write("\n")
