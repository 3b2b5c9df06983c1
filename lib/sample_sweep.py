"""The λ sweep behind sample.py: draw samples from a trained run with each sampler setting, time them,
count the network evaluations, save a figure per setting and a table.

Samplers (lib/samplers.py) and what λ means for each:
  em   Euler-Maruyama of the plug-in reverse SDE family, one run per λ in [0, 1] (0: reverse SDE,
       1: probability-flow ODE), `num_steps` equal steps: the λ sweep.
  pc   predictor-corrector: the reverse SDE (λ = 0) with Langevin corrector steps; λ is 0 by construction.
  ode  the probability-flow ODE (λ = 1) with an adaptive solver; λ is 1 by construction.

Every setting starts from the same prior draw (stream SAMPLE_PRIOR of --seed, lib/rng.py), so the λ columns
compare like with like; the sampler's own noise comes from stream SAMPLE_NOISE of (seed, λ), so a λ gives
the same samples whichever list it is part of. NFE is counted on the network itself (a forward hook), for
every sampler. What a figure shows, and the quality figures beside it, are the run's task's (save_samples).

Every setting is drawn, and checked to be finite, before anything is written; each file is then written
atomically, the table last, so a failure never leaves a half-written file or a table of a partial sweep.
"""
import csv
import io
import os
import time

import torch

from lib.evaluation import NonFiniteError
from lib.files import atomic_path, cannot_write, write_text
from lib.rng import Stream, generator
from lib.samplers import sample_lambda, sample_ode, sample_pc


def lambdas(opts):
    """The λ of each sampler run: the --lmbd list for em; pc is λ = 0 and ode λ = 1 by construction."""
    return {"em": getattr(opts, "lmbd", None), "pc": [0.0], "ode": [1.0]}[opts.sampler]


def draw(gen_sde, y, opts, lmbd, generator):
    """One sampler run from the prior draw y (B, ...): returns x (B, ...)."""
    if opts.sampler == "em":
        return sample_lambda(gen_sde, y, opts.num_steps, lmbd, generator=generator)
    if opts.sampler == "pc":
        return sample_pc(gen_sde, y, opts.num_steps, snr=opts.snr, n_corrector=opts.n_corrector,
                         predictor=opts.predictor, denoise=opts.denoise, generator=generator)
    return sample_ode(gen_sde, y, rtol=opts.rtol, atol=opts.atol, denoise=opts.denoise)[0]


def sweep(run, opts, device, outdir):
    """Sample with every λ of the sampler; write one figure per λ and samples.csv into outdir; return the rows.

    run: a lib.saved_run.SavedRun on `device`. Row keys: lambda, sampler, steps, nfe, seconds, and whatever
    quality figures the run's task computes on the samples (toy: sliced_wasserstein and its floor).
    NonFiniteError (nothing written) if a setting's samples are not finite; WriteError if a file cannot be written.
    """
    y = torch.randn(opts.num_samples, *run.task.sample_shape, device=device,
                    generator=generator(opts.seed, Stream.SAMPLE_PRIOR, device=device))
    steps = getattr(opts, "num_steps", None) or "adaptive"
    drawn = []
    for lmbd in lambdas(opts):
        g = generator(opts.seed, Stream.SAMPLE_NOISE, round(lmbd * 1e6), device=device)
        nfe, seconds, x = _timed_and_counted(run.gen_sde, lambda: draw(run.gen_sde, y, opts, lmbd, g), device)
        bad = int((~torch.isfinite(x.flatten(1)).all(1)).sum())
        if bad:
            raise NonFiniteError(f"the {opts.sampler} sampler at λ={lmbd:g} gave {bad} of {x.shape[0]} samples with "
                                 f"non-finite values: the network in {opts.checkpoint} gives non-finite outputs or "
                                 "the sampler is unstable; try an earlier checkpoint or more --num_steps")
        drawn.append((lmbd, {"lambda": lmbd, "sampler": opts.sampler, "steps": steps, "nfe": nfe, "seconds": seconds},
                      x.cpu()))
    rows = []
    hint = "free space or pick another --outdir"
    try:
        os.makedirs(outdir, exist_ok=True)
    except OSError as err:
        raise cannot_write(outdir, err, hint) from None
    for lmbd, row, x in drawn:
        how = f"{steps} steps" if steps != "adaptive" else f"adaptive, {row['nfe']} NFE"
        title = f"iteration {run.iteration}: {opts.sampler} sampler, λ={lmbd:g} ({how})"
        path = os.path.join(outdir, f"lambda_{lmbd:g}.png")
        try:
            with atomic_path(path) as tmp:
                row.update(run.task.save_samples(x, tmp, title, opts.seed))
        except OSError as err:
            raise cannot_write(path, err, hint) from None
        rows.append(row)
    path = os.path.join(outdir, "samples.csv")
    try:
        write_table(rows, path)
    except OSError as err:
        raise cannot_write(path, err, hint) from None
    return rows


def write_table(rows, path):
    """rows as CSV at `path`, written atomically."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, text.getvalue())


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


def _cell(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
