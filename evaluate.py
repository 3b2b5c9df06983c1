"""Evaluate a trained run's likelihood: bits/dim on the test set (images) or nats on held-out points (toy).

    python evaluate.py --checkpoint=runs/swissroll/checkpoint.pt --method=ode
    python evaluate.py --checkpoint=runs/img/checkpoint.pt --method=elbo --dataroot=data --num_eval=1000

--method=elbo: the ELBO of the reverse SDE (λ=0), a lower bound on its log-likelihood (so an upper bound
on bits/dim), by --estimator (elbo: the low-variance estimator; random_t_slice: one uniform time slice);
--elbo_repeats averages independent draws per example (default: the run's own setting for the toy, 1 for
images). --method=ode: the exact log-likelihood of the probability-flow ODE model (λ=1), adaptive dopri5
with --rtol/--atol and the divergence exact (toy default) or by one Hutchinson probe per solve
(--divergence=rademacher, the image default, or gaussian); also reports the mean NFE per solve.

Images are dequantized x = (k + u) / 256 and, for runs trained with --real=True, logit-transformed with
the log-determinant added, exactly as in training; bpd = -log p(x) / (D ln 2) + 8. Toy runs report nats
on the fixed held-out swiss roll with the true log-likelihood and the paired gap. Every figure comes with
its standard error (std / sqrt(N)). A flag the chosen method does not use is refused.
"""
import argparse

from lib.checkpoint import CheckpointError
from lib.config import (ArgumentParser, ConfigError, device_name, fail, nonnegative_int, positive_float, positive_int,
                        resolve_device)
from lib.evaluation import ELBO_ESTIMATORS
from lib.image_data import DatasetNotFoundError
from lib.likelihood_report import DIVERGENCES, METHODS, describe, evaluate, resolve_options, write_report
from lib.saved_run import open_run

PROG = "evaluate.py"


def parse_args(argv=None):
    p = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a run's checkpoint.pt (written by train_toy.py / train_img.py)")
    p.add_argument("--method", choices=METHODS, default="elbo", help="elbo (a bound, λ=0) or ode (exact, λ=1)")
    p.add_argument("--estimator", choices=list(ELBO_ESTIMATORS), default=None,
                   help="elbo: which ELBO estimator (default elbo)")
    p.add_argument("--elbo_repeats", type=positive_int, default=None, help="elbo: independent draws per example")
    p.add_argument("--divergence", choices=DIVERGENCES, default=None,
                   help="ode: exact (toy default) or a Hutchinson probe (rademacher: image default, gaussian)")
    p.add_argument("--rtol", type=positive_float, default=None, help="ode: relative tolerance (default 1e-5)")
    p.add_argument("--atol", type=positive_float, default=None, help="ode: absolute tolerance (default 1e-5)")
    p.add_argument("--dataroot", default=None, help="images: where the data set lies (default: the run's --dataroot)")
    p.add_argument("--num_eval", type=positive_int, default=None,
                   help="the first N test images (default all) or held-out toy points (default: the run's --num_eval)")
    p.add_argument("--test_batch_size", type=positive_int, default=None,
                   help="examples per batch (default: the run's for images, all held-out points for the toy)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="dequantization, ELBO and probe noise")
    p.add_argument("--device", type=device_name, default="auto", help="auto (CUDA when present), cpu, cuda[:N]")
    p.add_argument("--output", default=None, help="also write the report as JSON to this file")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
        run = open_run(args.checkpoint, device)
        report = evaluate(run, resolve_options(args, run), device)
        if args.output:
            write_report(report, args.output)
    except (ConfigError, CheckpointError, DatasetNotFoundError, OSError) as err:
        fail(f"{PROG}: error: {err}")
    print(describe(report))


if __name__ == "__main__":
    main()
