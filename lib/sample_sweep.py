"""The λ sweep behind sample.py: draw samples from a trained run with each sampler setting, time them,
count the network evaluations, save a figure per setting and a table.

Samplers (lib/samplers.py) and what λ means for each:
  em   Euler-Maruyama of the plug-in reverse SDE family, one run per λ in [0, 1] (0: reverse SDE,
       1: probability-flow ODE), `num_steps` equal steps: the λ sweep.
  pc   predictor-corrector: the reverse SDE (λ = 0) with Langevin corrector steps; λ is 0 by construction.
  ode  the probability-flow ODE (λ = 1) with an adaptive solver; λ is 1 by construction.

Every setting starts from the same prior draw (seeded by --seed), so the λ columns compare like with
like; the sampler's own noise comes from a generator seeded by (seed, λ), so a λ gives the same samples
whichever list it is part of. NFE is counted on the network itself (a forward hook), for every sampler.
"""
import csv
import math
import os
import time

import matplotlib.pyplot as plt
import torch
from torchvision.utils import save_image

from lib.config import ConfigError, resolve_choice_options
from lib.evaluation import sliced_wasserstein
from lib.plotting import samples_figure  # switches matplotlib to the Agg backend (no display needed)
from lib.samplers import PREDICTORS, sample_lambda, sample_ode, sample_pc
from lib.swiss_roll import sample_swiss_roll
from lib.training import derived_seed

DEFAULT_LAMBDAS = {"em": [0.0, 0.25, 0.5, 0.75, 1.0], "pc": [0.0], "ode": [1.0]}
# Defaults of the options that only some samplers take: (the samplers, the default).
SAMPLER_OPTIONS = {
    "num_steps": (("em", "pc"), 1000),
    "snr": (("pc",), 0.16),
    "n_corrector": (("pc",), 1),
    "predictor": (("pc",), PREDICTORS[0]),
    "rtol": (("ode",), 1e-5),
    "atol": (("ode",), 1e-5),
    "denoise": (("pc", "ode"), True),
}
SW_PROJECTIONS = 256  # a fixed number of directions and a fixed seed: the distance is a reproducible metric
SW_SEED = 0
VIEW = 1.6  # half-width of the toy scatter plots; the swiss roll spans about [-1.2, 1.4]
PRIOR, SAMPLER_NOISE, FRESH_DATA = 1, 2, 3  # tags keeping the random streams derived from --seed apart


def resolve_options(opts):
    """Fill in the sampler-specific defaults of a namespace whose unset options are None, in place.

    Refuses, with a ConfigError naming the flag, an option the chosen sampler does not take and a λ list
    other than the natural one for pc (0) and ode (1): silently ignoring them would mislabel the results.
    """
    sampler = opts.sampler
    resolve_choice_options(opts, "sampler", SAMPLER_OPTIONS)
    natural = DEFAULT_LAMBDAS[sampler]
    if opts.lmbd is None:
        opts.lmbd = list(natural)
    elif sampler != "em" and opts.lmbd != natural:
        what = "the reverse SDE (λ=0)" if sampler == "pc" else "the probability-flow ODE (λ=1)"
        raise ConfigError(f"--sampler={sampler} samples {what} only, got --lmbd={_join(opts.lmbd)}; "
                          f"pass --lmbd={natural[0]:g} or leave --lmbd out (use --sampler=em to sweep λ)")
    repeated = sorted({x for x in opts.lmbd if opts.lmbd.count(x) > 1})
    if repeated:
        raise ConfigError(f"--lmbd lists {_join(repeated)} more than once")
    return opts


def draw(gen_sde, y, opts, lmbd, generator):
    """One sampler run from the prior draw y (B, ...): returns x (B, ...)."""
    if opts.sampler == "em":
        return sample_lambda(gen_sde, y, opts.num_steps, lmbd, generator=generator)
    if opts.sampler == "pc":
        return sample_pc(gen_sde, y, opts.num_steps, snr=opts.snr, n_corrector=opts.n_corrector,
                         predictor=opts.predictor, denoise=opts.denoise, generator=generator)
    return sample_ode(gen_sde, y, rtol=opts.rtol, atol=opts.atol, denoise=opts.denoise)[0]


def sweep(run, opts, device, outdir):
    """Sample with every λ of opts.lmbd; write one PNG per λ and samples.csv into outdir; return the rows.

    run: a lib.saved_run.SavedRun on `device`. Row keys: lambda, sampler, steps, nfe, seconds, and for the
    toy sliced_wasserstein (samples vs fresh swiss-roll data) and sliced_wasserstein_floor (two fresh data
    sets of the same size: what a perfect sampler would score).
    """
    os.makedirs(outdir, exist_ok=True)
    y = torch.randn(opts.num_samples, *run.sample_shape, generator=_generator(device, opts.seed, PRIOR), device=device)
    if run.kind == "toy":
        g = torch.Generator().manual_seed(derived_seed(opts.seed, FRESH_DATA))
        data, other = (sample_swiss_roll(opts.num_samples, run.extra["noise"], g) for _ in range(2))
    rows = []
    for lmbd in opts.lmbd:
        g = _generator(device, opts.seed, SAMPLER_NOISE, round(lmbd * 1e6))
        nfe, seconds, x = _timed_and_counted(run.gen_sde, lambda: draw(run.gen_sde, y, opts, lmbd, g), device)
        row = {"lambda": lmbd, "sampler": opts.sampler, "steps": opts.num_steps or "adaptive", "nfe": nfe,
               "seconds": seconds}
        path = os.path.join(outdir, f"lambda_{lmbd:g}.png")
        if run.kind == "toy":
            x = x.cpu()
            row.update(sliced_wasserstein=_sw(x, data), sliced_wasserstein_floor=_sw(other, data))
            _save_scatter(x, data, lmbd, opts, run, row, path)
        else:
            save_image(run.to_image(x).cpu(), path, nrow=math.ceil(math.sqrt(x.shape[0])))
        rows.append(row)
    write_table(rows, os.path.join(outdir, "samples.csv"))
    return rows


def write_table(rows, path):
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def format_table(rows):
    """The rows as aligned plain text, one line per row under a header."""
    cells = [[_cell(v) for v in row.values()] for row in rows]
    header = list(rows[0])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(cell, widths)) for cell in cells]
    return "\n".join(lines)


# --- helpers -----------------------------------------------------------------------------------------


def _timed_and_counted(gen_sde, fn, device):
    """Run fn() -> x; return (network evaluations, wall-clock seconds, x)."""
    calls = []
    hook = gen_sde.a.register_forward_hook(lambda *_: calls.append(1))
    try:
        _synchronize(device)
        start = time.perf_counter()
        x = fn()
        _synchronize(device)  # CUDA runs asynchronously: wait for the work before reading the clock
        seconds = time.perf_counter() - start
    finally:
        hook.remove()
    return len(calls), seconds, x


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generator(device, *parts):
    return torch.Generator(device=device).manual_seed(derived_seed(*parts))


def _sw(x, y):
    return sliced_wasserstein(x, y, SW_PROJECTIONS, torch.Generator().manual_seed(SW_SEED)).item()


def _save_scatter(x, data, lmbd, opts, run, row, path):
    steps = f"{opts.num_steps} steps" if opts.num_steps else f"adaptive, {row['nfe']} NFE"
    title = (f"Swiss roll, iteration {run.iteration}: {opts.sampler} sampler, λ={lmbd:g} ({steps})\n"
             f"sliced W2 to fresh data {row['sliced_wasserstein']:.3f} "
             f"(data to data: {row['sliced_wasserstein_floor']:.3f})")
    outside = int((x.abs() > VIEW).any(1).sum())
    label = f"samples, λ={lmbd:g}" + (f" ({outside} outside the view)" if outside else "")
    fig = samples_figure(data, {label: x}, title, lim=VIEW)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _cell(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _join(values):
    return ",".join(f"{v:g}" for v in values)
