"""Cost of one training step of train_img.py configurations, interleaved on this machine.

    python benchmarks/step_cost.py [--data digits] [--configs today defaults] [--rounds 20] [--warmup 2]
        [--threads 1] [--workdir DIR] [--json PATH]

The configurations and data are time_to_bpd.py's. Each network is built as train_img.py builds it (its
ImageTask from the same flags, so the preconditioned U-Net gets the training set's statistics), and a step
is what lib/training.py runs: PluginReverseSDE(...).dsm(x).mean() forward and backward, then Adam. After
--warmup untimed steps of each, the configurations step in turn, rotating the order every round, so load
from other processes falls on all alike. Printed: the median wall-clock and CPU seconds per step of each
and its ratio to the first configuration's (the median of the per-round ratios). With one thread the CPU
seconds hardly depend on the load of a shared machine.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from report import add_json_arg, command_line, write_json  # noqa: E402
from time_to_bpd import CONFIGS, DATA, TODAY, _checksums  # noqa: E402

import train_img  # noqa: E402
from lib.image_task import ImageTask  # noqa: E402
from lib.models import build_drift  # noqa: E402
from lib.sdes import PluginReverseSDE, build_sde  # noqa: E402


def build_step(data, config, dataroot):
    """A closure running one training step of `config` on a fixed batch of the training set's shape."""
    extra = DATA[data]["flags"] + (TODAY + CONFIGS[config] if CONFIGS[config] is not None else [])
    args = train_img.parse_args([f"--dataset={DATA[data]['dataset']}", f"--dataroot={dataroot}", "--debias=True",
                                 "--device=cpu", *extra])
    task = ImageTask(args)
    with _checksums(data, dataroot):
        model = task.model
    torch.manual_seed(0)
    drift = build_drift(model["name"], model["kwargs"])
    gen_sde = PluginReverseSDE(build_sde(task.sde), drift, args.T0, debias=True)
    optimizer = torch.optim.Adam(drift.parameters(), lr=args.lr)
    x = torch.randn(args.batch_size, *task.info.shape)

    def step():
        optimizer.zero_grad(set_to_none=True)
        gen_sde.dsm(x).mean().backward()
        optimizer.step()
    return step


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=tuple(DATA), default="digits")
    p.add_argument("--configs", nargs="+", choices=tuple(CONFIGS), default=["today", "defaults"])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each configuration")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", default=None, help="holds the data (default: a temporary folder)")
    add_json_arg(p, "step_cost")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dataroot = os.path.join(args.workdir or tempfile.mkdtemp(prefix="step_cost_"), args.data, "data")
    print(f"command: {command_line()}\ntorch {torch.__version__}, {torch.get_num_threads()} threads")
    if not os.path.isdir(dataroot):
        print(f"{args.data}: {DATA[args.data]['write'](dataroot)} training / test images")
    steps = {config: build_step(args.data, config, dataroot) for config in args.configs}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    wall = {config: [] for config in steps}
    cpu = {config: [] for config in steps}
    order = list(steps)
    for r in range(args.rounds):
        for config in order[r % len(order):] + order[:r % len(order)]:
            w, c = time.perf_counter(), time.process_time()
            steps[config]()
            wall[config].append(time.perf_counter() - w)
            cpu[config].append(time.process_time() - c)
    first = order[0]
    figures = {}
    print(f"\n{args.data}: seconds per training step (median of {args.rounds}, interleaved)")
    print(f"  {'configuration':24s} {'wall s':>8s} {'CPU s':>8s} {'CPU vs ' + first:>14s}")
    for config in order:
        ratio = statistics.median(c / c0 for c, c0 in zip(cpu[config], cpu[first]))
        figures[config] = {"wall_seconds": statistics.median(wall[config]),
                           "cpu_seconds": statistics.median(cpu[config]), "cpu_ratio_vs_first": ratio}
        print(f"  {config:24s} {figures[config]['wall_seconds']:8.3f} {figures[config]['cpu_seconds']:8.3f} "
              f"{ratio:14.3f}")
    write_json("step_cost", {args.data: figures}, args)


if __name__ == "__main__":
    main()
