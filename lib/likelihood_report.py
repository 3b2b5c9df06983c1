"""The likelihood report behind evaluate.py: a saved run's log-likelihood on held-out data, with standard errors.

What is scored, and on which data, is the run's task's (lib/task.py, `likelihood_report`): toy runs report
nats per point on the fixed held-out swiss roll next to the true log-likelihood and the paired gap; image
runs bits/dim over the test set, dequantized and transformed exactly as in training (docs/math.md section 5).

Methods:
  elbo  the ELBO of the plug-in reverse SDE (λ=0): a lower bound on that model's log-likelihood (an upper
        bound on its bits/dim), by the estimator named in lib.evaluation.ELBO_ESTIMATORS.
  ode   the exact log-likelihood of the probability-flow ODE model (λ=1), adaptive dopri5, with the
        divergence exact or by one Hutchinson probe per solve; reports the mean NFE per solve.
The report's keys follow the training metrics (elbo, elbo_std_err, elbo_gap, ...; bpd, bpd_std_err).
"""
import json

from lib.evaluation import ODELikelihood, elbo_estimator

METHODS = ("elbo", "ode")
DIVERGENCES = ("exact", "rademacher", "gaussian")


def evaluate(run, opts, device):
    """The report (a dict of plain values) for a lib.saved_run.SavedRun on `device`.

    opts: evaluate.py's arguments (method: elbo with estimator, elbo_repeats; ode with divergence, rtol, atol;
    and checkpoint, seed, num_eval, test_batch_size, dataroot). Settings left None take the run's defaults.
    """
    task = run.task
    if opts.method == "elbo":
        settings = {"estimator": opts.estimator, "elbo_repeats": opts.elbo_repeats or task.default_elbo_repeats()}
        estimate, ode = elbo_estimator(run.gen_sde, opts.estimator, settings["elbo_repeats"]), None
    else:
        settings = {"divergence": opts.divergence or task.default_divergence(), "rtol": opts.rtol, "atol": opts.atol}
        vtype = None if settings["divergence"] == "exact" else settings["divergence"]
        estimate = ode = ODELikelihood(run.gen_sde, rtol=opts.rtol, atol=opts.atol, vtype=vtype)
    report = {"checkpoint": opts.checkpoint, "kind": task.kind, "iteration": run.iteration, "method": opts.method,
              **settings}
    report.update(task.likelihood_report(estimate, opts.method, device, opts.seed, num_eval=opts.num_eval,
                                         batch_size=opts.test_batch_size, dataroot=opts.dataroot))
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
