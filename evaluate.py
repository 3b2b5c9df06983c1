"""Evaluate a trained run's likelihood: bits/dim on the test set (images) or nats on held-out points (toy).

    python evaluate.py elbo --checkpoint=runs/img/checkpoint.pt --dataroot=data --num_eval=1000
    python evaluate.py ode --checkpoint=runs/swissroll/checkpoint.pt

elbo: the ELBO of the reverse SDE (λ=0), a lower bound on its log-likelihood (so an upper bound on bits/dim),
by --estimator (elbo: the low-variance estimator; random_t_slice: one uniform time slice), averaging
--elbo_repeats independent draws per example.
ode: the exact log-likelihood of the probability-flow ODE model (λ=1), adaptive dopri5 with --rtol/--atol and
the divergence exact or by one Hutchinson probe per solve; also reports the mean NFE per solve.

Images are dequantized x = (k + u) / 256 and, for runs trained with --real=True, logit-transformed with
the log-determinant added, exactly as in training; bpd = -log p(x) / (D ln 2) + 8. Toy runs report nats
on the fixed held-out swiss roll with the true log-likelihood and the paired gap. Every figure comes with
its standard error (std / sqrt(N)). `python evaluate.py elbo --help` lists a method's flags.
Exit status 1, one line on stderr, for bad input (checkpoint, data, --output, non-finite values); --output is atomic.
"""
from lib.checkpoint import CheckpointError
from lib.config import (ArgumentParser, ConfigError, HelpFormatter, device_name, fail, positive_float, positive_int,
                        resolve_device, seed_value)
from lib.evaluation import ELBO_ESTIMATORS, NonFiniteError
from lib.files import check_writable_file, reason
from lib.image_data import DatasetNotFoundError
from lib.likelihood_report import DIVERGENCES, describe, evaluate, write_report
from lib.ode import ODESolveError
from lib.saved_run import open_run
from lib.sdes import ELBO_TIMES

PROG = "evaluate.py"


def parse_args(argv=None):
    common = ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", required=True,
                        help="a run's checkpoint.pt (written by train_toy.py / train_img.py)")
    common.add_argument("--dataroot", default=None, help="images: where the data set lies (default: the run's)")
    common.add_argument("--num_eval", type=positive_int, default=None,
                        help="the first N test images (default all) or held-out toy points (default: the run's)")
    common.add_argument("--test_batch_size", type=positive_int, default=None,
                        help="examples per batch (default: the run's for images, all held-out points for the toy)")
    common.add_argument("--seed", type=seed_value, default=0, help="dequantization, ELBO and probe noise")
    common.add_argument("--device", type=device_name, default="auto", help="auto (CUDA when present), cpu, cuda[:N]")
    common.add_argument("--output", default=None, help="also write the report as JSON to this file")

    p = ArgumentParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    methods = p.add_subparsers(dest="method", required=True, metavar="{elbo,ode}")
    elbo = methods.add_parser("elbo", parents=[common], formatter_class=HelpFormatter,
                              help="the ELBO of the reverse SDE (λ=0)",
                              description="The ELBO of the reverse SDE (λ=0).")
    elbo.add_argument("--estimator", choices=list(ELBO_ESTIMATORS), default="elbo",
                      help="elbo: the low-variance estimator; random_t_slice: sdeflow-light's")
    elbo.add_argument("--num_times", type=positive_int, default=ELBO_TIMES,
                      help="elbo: stratified times per example of each draw (4 or more also estimate the "
                           "estimator's own noise)")
    elbo.add_argument("--elbo_repeats", type=positive_int, default=None,
                      help="independent draws averaged per example (default: the run's --elbo_repeats for the "
                           "toy, 1 for images)")
    ode = methods.add_parser("ode", parents=[common], formatter_class=HelpFormatter,
                             help="the exact likelihood of the probability-flow ODE (λ=1)",
                             description="The exact likelihood of the probability-flow ODE (λ=1).")
    ode.add_argument("--divergence", choices=DIVERGENCES, default=None,
                     help="exact, or one Hutchinson probe per solve (default: exact for the toy, rademacher for "
                          "images)")
    ode.add_argument("--rtol", type=positive_float, default=1e-5, help="relative tolerance of dopri5")
    ode.add_argument("--atol", type=positive_float, default=1e-5, help="absolute tolerance of dopri5")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
        if args.output:
            check_writable_file(args.output, "--output")  # before the evaluation, which can take hours
        report = evaluate(open_run(args.checkpoint, device), args, device)
        if args.output:
            try:
                write_report(report, args.output)
            except OSError as err:
                raise ConfigError(f"cannot write {args.output} ({reason(err)}); the report was: "
                                  f"{describe(report)}") from None
    except (ConfigError, CheckpointError, DatasetNotFoundError, NonFiniteError, ODESolveError, OSError) as err:
        fail(f"{PROG}: error: {err}")
    print(describe(report))


if __name__ == "__main__":
    main()
