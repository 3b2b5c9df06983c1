"""Draw samples from a trained run (toy or image) along the λ family and tabulate cost and quality.

    python sample.py em --checkpoint=runs/swissroll/checkpoint.pt --lmbd=0,0.25,0.5,0.75,1 --num_steps=1000
    python sample.py pc --checkpoint=runs/img/checkpoint.pt --snr=0.16 --num_samples=64
    python sample.py ode --checkpoint=runs/img/checkpoint.pt --rtol=1e-5 --atol=1e-5

Samplers and λ (0: reverse SDE, 1: probability-flow ODE):
  em   Euler-Maruyama with --num_steps equal steps, one run per λ of --lmbd.
  pc   predictor-corrector: the reverse SDE (λ=0) with --n_corrector Langevin steps at --snr after each
       --predictor step.
  ode  the probability-flow ODE (λ=1), adaptive dopri5 with --rtol/--atol.
pc and ode stop at forward time s = 1e-3 and, with --denoise=True, take Tweedie's denoising step from there.
`python sample.py pc --help` lists a sampler's flags; another sampler's flag is refused.

Writes into --outdir (default <run folder>/samples_<sampler>): lambda_<λ>.png per λ (an image grid, or
for the toy a scatter of the samples over fresh swiss-roll data) and samples.csv with λ, sampler,
steps, NFE (network evaluations), seconds and, for the toy, the sliced Wasserstein-2 distance to fresh
data next to the same distance between two fresh data sets (its floor). The table is also printed.
Exit status 1, one line on stderr, for bad input (checkpoint, --outdir, non-finite samples); files are written whole.
"""
import os

from lib.checkpoint import CheckpointError
from lib.config import (ArgumentParser, ConfigError, HelpFormatter, check_writable_dir, device_name, fail,
                        lambda_list, nonnegative_int, positive_float, positive_int, resolve_device, seed_value,
                        str2bool)
from lib.evaluation import NonFiniteError
from lib.files import WriteError
from lib.ode import ODESolveError
from lib.sample_sweep import format_table, sweep
from lib.samplers import PREDICTORS
from lib.saved_run import open_run

PROG = "sample.py"


def parse_args(argv=None):
    common = ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", required=True,
                        help="a run's checkpoint.pt (written by train_toy.py / train_img.py)")
    common.add_argument("--num_samples", type=positive_int, default=64, help="samples per λ")
    common.add_argument("--seed", type=seed_value, default=0, help="the prior draw and the sampler noise")
    common.add_argument("--device", type=device_name, default="auto", help="auto (CUDA when present), cpu, cuda[:N]")
    common.add_argument("--outdir", default=None, help="output folder (default: <run folder>/samples_<sampler>)")

    p = ArgumentParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    samplers = p.add_subparsers(dest="sampler", required=True, metavar="{em,pc,ode}")

    def add(name, summary):
        return samplers.add_parser(name, parents=[common], formatter_class=HelpFormatter, help=summary,
                                   description=summary)

    em = add("em", "Euler-Maruyama of the λ family, one run per λ")
    em.add_argument("--lmbd", type=lambda_list, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                    help="comma-separated λ in [0, 1]: 0 the reverse SDE, 1 the probability-flow ODE")
    em.add_argument("--num_steps", type=positive_int, default=1000, help="equal steps from noise to data")
    pc = add("pc", "predictor-corrector sampling of the reverse SDE (λ=0)")
    pc.add_argument("--num_steps", type=positive_int, default=1000, help="predictor steps")
    pc.add_argument("--snr", type=positive_float, default=0.16, help="Langevin signal-to-noise ratio")
    pc.add_argument("--n_corrector", type=nonnegative_int, default=1, help="Langevin steps after each predictor step")
    pc.add_argument("--predictor", choices=PREDICTORS, default=PREDICTORS[0], help="the predictor step")
    pc.add_argument("--denoise", type=str2bool, default=True, help="a final Tweedie denoising step at s = 1e-3")
    ode = add("ode", "the probability-flow ODE (λ=1), adaptive dopri5")
    ode.add_argument("--rtol", type=positive_float, default=1e-5, help="relative tolerance")
    ode.add_argument("--atol", type=positive_float, default=1e-5, help="absolute tolerance")
    ode.add_argument("--denoise", type=str2bool, default=True, help="a final Tweedie denoising step at s = 1e-3")
    args = p.parse_args(argv)
    repeated = sorted({x for x in getattr(args, "lmbd", []) if args.lmbd.count(x) > 1})
    if repeated:
        p.error(f"--lmbd lists {','.join(f'{x:g}' for x in repeated)} more than once")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
        run = open_run(args.checkpoint, device)
        outdir = args.outdir or os.path.join(run.dir, f"samples_{args.sampler}")
        check_writable_dir(outdir, "--outdir")  # before sampling, which can take long
        rows = sweep(run, args, device, outdir)
    except (ConfigError, CheckpointError, NonFiniteError, ODESolveError, WriteError, OSError) as err:
        fail(f"{PROG}: error: {err}")
    print(format_table(rows))
    print(f"wrote {len(rows)} figure(s) and samples.csv to {outdir}")


if __name__ == "__main__":
    main()
