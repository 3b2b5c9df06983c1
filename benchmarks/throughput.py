"""Throughput and peak memory of the image U-Nets: training step, ELBO evaluation and sampling.

    python benchmarks/throughput.py [--datasets mnist cifar] [--batch_sizes 64 16] [--steps 3] [--warmup 1]
        [--sampler_steps 4] [--device auto] [--threads N] [--seed 0] [--json PATH]

For each data set's U-Net (lib/image_task.py: MNIST ch 32, 1.5M parameters; CIFAR-10 DDPM's 35.7M) and
batch size, on x uniform in [0, 1) (dequantised images):
  train    forward, backward and Adam on PluginReverseSDE(VP SDE, unet, T=1).dsm(x).mean() in train mode,
           as lib/training.py runs it: ms per step (and its forward / backward / Adam parts), images/s
  elbo_random_t_slice   .elbo_random_t_slice(x) in eval mode under no_grad, as bits/dim evaluation runs it
           (one forward and one vector-Jacobian product per example): images/s
  elbo     .elbo(x) the same way, when PluginReverseSDE has it
  sampler  lib.samplers.sample_lambda (lambda = 0), one network call per step: steps/s over one call of
           --sampler_steps steps after a one-step warm-up
The other figures are the median of --steps timed calls after --warmup untimed ones (CIFAR-10 at batch 64
takes seconds per call on a 2-core CPU, hence the few). Peak memory is the growth above what was in use
before the timed calls (the weights, and for training Adam's state and the warm-up's gradients, are
already allocated): CUDA's max_memory_allocated, or on a CPU the growth of the peak resident set size
(benchmarks/measure.py). On a CPU shared with other jobs, set OMP_WAIT_POLICY=PASSIVE or use --threads 1
(benchmarks/measure.py says why). The figures also go to benchmarks/results/throughput.json (--json PATH).
"""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from measure import (DATASETS, PeakMemory, add_machine_args, command_line, describe, image_shape,  # noqa: E402
                     machine, mib, synchronize, timed, unet_kwargs)
from report import add_json_arg, write_json  # noqa: E402

from lib.config import ArgumentParser, nonnegative_int, positive_int  # noqa: E402
from lib.models.unet import UNet  # noqa: E402
from lib.samplers import sample_lambda  # noqa: E402
from lib.sdes import PluginReverseSDE, VariancePreservingSDE  # noqa: E402


def median_time(fn, args, device):
    """Median (wall, CPU) seconds of fn() over args.steps calls after args.warmup, and the peak memory."""
    for _ in range(args.warmup):
        fn()
    with PeakMemory(device) as mem:
        times = [timed(fn, device) for _ in range(args.steps)]
    return statistics.median(w for w, _ in times), statistics.median(c for _, c in times), mem.peak


def train_step(gen_sde, optimizer, x, parts, device):
    """One training step; appends the wall seconds of its forward, backward and Adam parts to `parts`."""
    def step():
        synchronize(device)
        t0 = time.perf_counter()
        loss = gen_sde.dsm(x).mean()
        synchronize(device)
        t1 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        synchronize(device)
        t2 = time.perf_counter()
        optimizer.step()
        synchronize(device)
        parts.append((t1 - t0, t2 - t1, time.perf_counter() - t2))

    return step


def bench(dataset, batch, args, device):
    """Print the data set's figures at this batch size and return them (times in seconds, memory in bytes)."""
    torch.manual_seed(args.seed)
    net = UNet(**unet_kwargs(dataset)).to(device)
    gen_sde = PluginReverseSDE(VariancePreservingSDE(), net, 1.0)
    x = torch.rand(batch, *image_shape(dataset), device=device)
    label = f"{dataset:5s} batch {batch:3d}"

    gen_sde.train()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-4)
    parts = []
    wall, cpu, peak = median_time(train_step(gen_sde, optimizer, x, parts, device), args, device)
    f, b, o = (1e3 * statistics.median(p[i] for p in parts[args.warmup:]) for i in range(3))
    print(f"{label}  train                {1e3 * wall:9.1f} ms/step (forward {f:.0f}, backward {b:.0f}, "
          f"Adam {o:.0f})  {batch / wall:8.1f} images/s  CPU {cpu:6.2f} s/step  peak +{mib(peak)}", flush=True)
    figures = {"dataset": dataset, "batch": batch, "parameters": sum(p.numel() for p in net.parameters()),
               "train": {"wall_s_per_step": wall, "forward_s": f / 1e3, "backward_s": b / 1e3, "adam_s": o / 1e3,
                         "images_per_s": batch / wall, "cpu_s_per_step": cpu, "peak_bytes": peak}}
    del optimizer

    gen_sde.eval()
    estimators = ["elbo_random_t_slice"] + (["elbo"] if hasattr(gen_sde, "elbo") else [])
    for name in estimators:
        estimator = getattr(gen_sde, name)

        def evaluate():
            with torch.no_grad():
                estimator(x)

        wall, cpu, peak = median_time(evaluate, args, device)
        print(f"{label}  {name:20s} {batch / wall:9.1f} images/s ({1e3 * wall:.0f} ms/batch)  "
              f"CPU {cpu:6.2f} s/batch  peak +{mib(peak)}", flush=True)
        figures[name] = {"images_per_s": batch / wall, "wall_s_per_batch": wall, "cpu_s_per_batch": cpu,
                         "peak_bytes": peak}

    # One call of --sampler_steps steps after a one-step warm-up: each step is a network call, so the
    # steps within the call already average (a CIFAR-10 batch of 64 takes seconds per step on a CPU).
    y = torch.randn(batch, *image_shape(dataset), device=device)
    sample_lambda(gen_sde, y, 1)
    with PeakMemory(device) as mem:
        wall, cpu = timed(lambda: sample_lambda(gen_sde, y, args.sampler_steps), device)
    n = args.sampler_steps
    print(f"{label}  sampler              {n / wall:9.2f} steps/s ({1e3 * wall / n:.0f} ms/step, "
          f"{batch * n / wall:.1f} images x steps/s)  CPU {cpu / n:6.2f} s/step  peak +{mib(mem.peak)}", flush=True)
    figures["sampler"] = {"steps": n, "steps_per_s": n / wall, "wall_s_per_step": wall / n,
                          "images_x_steps_per_s": batch * n / wall, "cpu_s_per_step": cpu / n, "peak_bytes": mem.peak}
    return figures


def main():
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    p.add_argument("--batch_sizes", type=positive_int, nargs="+", default=[64, 16])
    p.add_argument("--steps", type=positive_int, default=3, help="timed calls per figure (median)")
    p.add_argument("--warmup", type=nonnegative_int, default=1, help="untimed calls before timing")
    p.add_argument("--sampler_steps", type=positive_int, default=4, help="sample_lambda steps in the timed call")
    add_machine_args(p)
    add_json_arg(p, "throughput")
    args = p.parse_args()
    device = machine(args, p)

    print(command_line())
    print(describe(device))
    print(f"median of {args.steps} timed call(s) after {args.warmup} warm-up call(s); peak memory: growth above "
          "what was allocated before the timed calls")
    cases = [bench(dataset, batch, args, device) for dataset in args.datasets for batch in args.batch_sizes]
    write_json("throughput", {"cases": cases}, args, device)


if __name__ == "__main__":
    main()
