"""The swiss-roll target: how long the default `python train_toy.py` takes, and how close it gets to the truth.

    python benchmarks/toy_target.py [--saveroot DIR] [--repeats 400] [--json PATH] [-- train_toy.py flags ...]

Runs train_toy.py (its defaults, or the flags after `--`) in a fresh run folder and times it, then
measures the trained (EMA) model on the run's held-out set more precisely than the run's own log can:

  * the ELBO gap E[log p] - E[ELBO] two ways:
      direct     PluginReverseSDE.elbo averaged over --repeats passes, minus the quadrature truth;
      exact      1/2 int_0^T E_{p_s}|a - a*|^2 ds + KL(p_T || N(0, I)), with the exact diffused drift
                 a* = g grad log p_s of the swiss roll (lib/swiss_roll.py) and s ~ q weighted by 1/q.
                 This is the same number (the ELBO of the plug-in reverse SDE falls short of log p by
                 exactly these two terms in expectation over the data) without the estimator's noise;
                 the KL term is bounded by alpha_T^2 E|x|^2 / 2 < 1e-4 nats and left out.
  * the exact (probability-flow ODE) log-likelihood gap, as the run reported it.

Target (issue 3): wall time <= 5 minutes on a 2-core CPU, ELBO gap <= 0.03 nats, ODE gap as small or smaller.
The figures also go to benchmarks/results/toy_target.json (--json PATH).
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from report import add_json_arg, write_json  # noqa: E402

import train_toy  # noqa: E402
from lib.evaluation import mean_and_stderr, repeated_mean  # noqa: E402
from lib.saved_run import open_run  # noqa: E402
from lib.swiss_roll import diffused_swiss_roll_score  # noqa: E402


@torch.no_grad()
def drift_error_gap(gen_sde, x, noise, repeats, generator):
    """1/2 int_0^T E|a(Y_s, s) - a*(Y_s, s)|^2 ds over the points x (N, 2): (mean, standard error, by_s).

    One s ~ q per point and pass (q the debiasing density: it follows the 1/sigma^2 growth of the
    integrand near s = 0), weighted by 1/q. by_s splits the mean by intervals of s.
    """
    sde = gen_sde.base_sde
    sampler = sde.importance_time_sampler(gen_sde.T)
    values, times = [], []
    for _ in range(repeats):
        s, q = sampler.sample((x.shape[0],), generator=generator, dtype=torch.float64)
        y = sde.sample(s, x.double())
        a = gen_sde.a(y.float(), s.float()).double()
        a_true = sde.g(s, y) * diffused_swiss_roll_score(y, sde.mean_weight(s), sde.var(s), noise)
        values.append(0.5 * (a - a_true).square().sum(1) / q)
        times.append(s)
    values, times = torch.cat(values), torch.cat(times)
    edges = [0.0, 1e-3, 1e-2, 0.05, 0.2, gen_sde.T]
    by_s = {f"[{lo:g}, {hi:g})": (values * ((times >= lo) & (times < hi))).mean().item()
            for lo, hi in zip(edges, edges[1:])}
    mean, se = mean_and_stderr(values)
    return mean, se, by_s


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--saveroot", default=None, help="where the run folder goes (default: a temporary folder)")
    p.add_argument("--repeats", type=int, default=400, help="ELBO passes over the held-out set")
    p.add_argument("--drift_repeats", type=int, default=20, help="passes for the exact gap")
    add_json_arg(p, "toy_target")
    p.add_argument("train_toy_args", nargs="*", help="flags for train_toy.py (after --)")
    args = p.parse_args()
    saveroot = args.saveroot or tempfile.mkdtemp(prefix="toy_target_")
    argv = [f"--saveroot={saveroot}", "--expname=toy_target", *args.train_toy_args]
    print("command: python train_toy.py " + " ".join(argv))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")

    wall0, cpu0 = time.time(), time.process_time()
    train_toy.main(argv)
    wall, cpu = time.time() - wall0, time.process_time() - cpu0

    run_dir = os.path.join(saveroot, "toy_target")
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        final = [json.loads(line) for line in fh][-1]
    run = open_run(os.path.join(run_dir, "checkpoint.pt"), torch.device("cpu"))
    gen_sde, run_args = run.gen_sde, vars(run.task.args)
    noise = run_args["noise"]
    x, true_logp = run.task.held_out(run_args["num_eval"])  # the run's own held-out set

    torch.manual_seed(0)
    with torch.no_grad():
        elbo = repeated_mean(gen_sde.elbo, x, args.repeats).double().cpu()
    direct, direct_se = mean_and_stderr(true_logp - elbo)
    exact, exact_se, by_s = drift_error_gap(gen_sde, x, noise, args.drift_repeats, torch.Generator().manual_seed(1))

    print(f"training + evaluation wall time {wall:.1f} s (process CPU time {cpu:.1f} s), "
          f"{run_args['num_iterations']} iterations")
    print(f"held-out points {x.shape[0]}, true mean log-likelihood {true_logp.mean().item():.4f} nats")
    print(f"ELBO gap, direct ({args.repeats} passes):       {direct:+.4f} ± {direct_se:.4f} nats")
    print(f"ELBO gap, 1/2 int E|a - a*|^2 ds:      {exact:+.4f} ± {exact_se:.4f} nats   by s: "
          + "  ".join(f"{k} {v:.4f}" for k, v in by_s.items()))
    print(f"ODE gap (the run's final evaluation):  {-final['ode_gap']:+.4f} ± {final['ode_gap_std_err']:.4f} nats"
          f"   NFE {final['ode_nfe']}")
    targets = {"wall time <= 300 s": wall <= 300, "ELBO gap <= 0.03 nats": exact + 2 * exact_se <= 0.03,
               "ODE gap <= ELBO gap": -final["ode_gap"] <= exact + 2 * exact_se}
    for name, ok in targets.items():
        print(f"  {'met ' if ok else 'MISSED'}  {name}")
    write_json("toy_target", {
        "train_toy_command": "python train_toy.py " + " ".join(argv), "iterations": run_args["num_iterations"],
        "wall_seconds": wall, "cpu_seconds": cpu, "held_out_points": x.shape[0],
        "true_mean_log_likelihood_nats": true_logp.mean().item(),
        "elbo_gap_direct_nats": direct, "elbo_gap_direct_stderr": direct_se, "elbo_gap_direct_passes": args.repeats,
        "elbo_gap_exact_nats": exact, "elbo_gap_exact_stderr": exact_se, "elbo_gap_exact_by_s": by_s,
        "ode_gap_nats": -final["ode_gap"], "ode_gap_stderr": final["ode_gap_std_err"], "ode_nfe": final["ode_nfe"],
        "targets_met": targets}, args)


if __name__ == "__main__":
    main()
