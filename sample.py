"""Draw samples from a trained run (toy or image) along the λ family and tabulate cost and quality.

    python sample.py --checkpoint=runs/swissroll/checkpoint.pt --lmbd=0,0.25,0.5,0.75,1 --num_steps=1000
    python sample.py --checkpoint=runs/img/checkpoint.pt --sampler=pc --snr=0.16 --num_samples=64
    python sample.py --checkpoint=runs/img/checkpoint.pt --sampler=ode --rtol=1e-5 --atol=1e-5

Samplers and λ (0: reverse SDE, 1: probability-flow ODE):
  em   Euler-Maruyama with --num_steps equal steps, one run per λ of --lmbd (default 0,0.25,0.5,0.75,1).
  pc   predictor-corrector: the reverse SDE (λ=0) with --n_corrector Langevin steps at --snr after each
       --predictor step; --lmbd may only be 0.
  ode  the probability-flow ODE (λ=1), adaptive dopri5 with --rtol/--atol; --lmbd may only be 1.
A flag the chosen sampler does not use is refused rather than ignored. pc and ode stop at forward time
s = 1e-3 and, with --denoise=True (default), take Tweedie's denoising step from there.

Writes into --outdir (default <run folder>/samples_<sampler>): lambda_<λ>.png per λ (an image grid, or
for the toy a scatter of the samples over fresh swiss-roll data) and samples.csv with λ, sampler,
steps, NFE (network evaluations), seconds and, for the toy, the sliced Wasserstein-2 distance to fresh
data next to the same distance between two fresh data sets (its floor). The table is also printed.
"""
import argparse
import os

from lib.checkpoint import CheckpointError
from lib.config import (ArgumentParser, ConfigError, device_name, fail, lambda_list, nonnegative_int, positive_float,
                        positive_int, resolve_device, str2bool)
from lib.sample_sweep import format_table, resolve_options, sweep
from lib.samplers import PREDICTORS, SAMPLERS
from lib.saved_run import open_run

PROG = "sample.py"


def parse_args(argv=None):
    p = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a run's checkpoint.pt (written by train_toy.py / train_img.py)")
    p.add_argument("--sampler", choices=SAMPLERS, default="em",
                   help="em: Euler-Maruyama λ sweep; pc: predictor-corrector (λ=0); "
                        "ode: adaptive probability flow (λ=1)")
    p.add_argument("--lmbd", type=lambda_list, default=None,
                   help="comma-separated λ in [0, 1] for em (default 0,0.25,0.5,0.75,1); pc is λ=0 and ode λ=1 by "
                        "construction, so they refuse any other --lmbd")
    p.add_argument("--num_steps", type=positive_int, default=None, help="em and pc steps (default 1000)")
    p.add_argument("--num_samples", type=positive_int, default=64, help="samples per λ")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--device", type=device_name, default="auto", help="auto (CUDA when present), cpu, cuda[:N]")
    p.add_argument("--outdir", default=None, help="output folder (default: <run folder>/samples_<sampler>)")
    p.add_argument("--snr", type=positive_float, default=None, help="pc: Langevin signal-to-noise ratio (default 0.16)")
    p.add_argument("--n_corrector", type=nonnegative_int, default=None, help="pc: Langevin steps per step (default 1)")
    p.add_argument("--predictor", choices=PREDICTORS, default=None, help="pc: predictor (default reverse_diffusion)")
    p.add_argument("--rtol", type=positive_float, default=None, help="ode: relative tolerance (default 1e-5)")
    p.add_argument("--atol", type=positive_float, default=None, help="ode: absolute tolerance (default 1e-5)")
    p.add_argument("--denoise", type=str2bool, default=None,
                   help="pc, ode: True (default): a final Tweedie denoising step at s = 1e-3")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        resolve_options(args)
        device = resolve_device(args.device)
        run = open_run(args.checkpoint, device)
        outdir = args.outdir or os.path.join(run.dir, f"samples_{args.sampler}")
        rows = sweep(run, args, device, outdir)
    except (ConfigError, CheckpointError, OSError) as err:
        fail(f"{PROG}: error: {err}")
    print(format_table(rows))
    print(f"wrote {len(rows)} figure(s) and samples.csv to {outdir}")


if __name__ == "__main__":
    main()
