"""Training-step speed of the DDPM U-Net against the U-Net as first landed (git a62c2f1), A/B interleaved.

    python benchmarks/unet_speed.py [--cases mnist:64:9 mnist:16:9 cifar:16:5 cifar:64:3] [--warmup 1]
        [--device auto] [--threads N] [--seed 0] [--json PATH]

A case is dataset:batch:rounds, the datasets' U-Nets those of lib/image_task.py (MNIST: ch 32, 1.5M
parameters; CIFAR-10: DDPM's 35.7M). A step is what lib/training.py runs: forward, backward and Adam on
PluginReverseSDE(VP SDE, unet, T=1).dsm(x).mean() (its gradient-norm guard and EMA update left out).
Three networks are timed: the first-landed one, the current one, and the current one converted to
channels_last memory format (train_img.py --channels_last=True).

The first-landed file is read from git history at run time (`git show a62c2f1:lib/models/unet.py`), so
no copy of it lives in the tree and the script needs a clone with its history: without one it stops with
a one-line error (tests/test_unet.py checks the same equivalence against a golden fixture,
tests/data/unet_first_landed.pt, and needs no history). Both networks get the same weights through
load_state_dict(strict=True) (so the state-dict keys must agree), perturbed first so that the
zero-initialised output layers hide nothing; before any timing the script
checks on 8 examples that their eval-mode outputs, and the loss and gradients of one DSM step on the
same noise, agree to float tolerance (it exits with status 1 if not); the channels_last network takes that
step in eval mode, since it draws its dropout masks in another memory order.

On a CPU shared with other jobs, set OMP_WAIT_POLICY=PASSIVE (see benchmarks/measure.py) or use
--threads 1, whose CPU seconds per step hardly depend on the load.

Timing: after `--warmup` steps of each, the three are stepped in turn, A B C, B C A, C A B, ... for
`rounds` rounds, so load from other processes on a shared machine falls on all alike. Printed: the
median wall-clock ms per step and images/s of each, its speedup over the first-landed one (ratio of the
medians) and the median of the per-round ratios, and the median CPU seconds per step (steadier than the
wall clock under load when one thread runs). CIFAR-10 at batch 64 takes seconds per step on a 2-core CPU,
hence its few rounds.

Convolution floor (CPU): the current U-Net's step is profiled in both memory formats (NCHW and
channels_last, the one oneDNN runs without reordering) and the time spent inside convolution operators,
forward and backward, is printed. No fp32 rewrite that keeps these convolutions can step faster than
that, so first-landed ms / floor ms bounds the speedup any such rewrite can reach.

The figures also go to benchmarks/results/unet_speed.json (--json PATH).
"""
import argparse
import copy
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile

# The profiler behind the convolution floor otherwise prints its start/stop events and a failed GPU
# probe to stderr; read before torch loads.
os.environ.setdefault("KINETO_LOG_LEVEL", "99")

import torch  # noqa: E402

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

from measure import (DATASETS, add_machine_args, command_line, describe, image_shape, machine,  # noqa: E402
                     timed, unet_kwargs)
from report import add_json_arg, write_json  # noqa: E402

from lib.config import ArgumentParser, nonnegative_int  # noqa: E402
from lib.models.unet import UNet  # noqa: E402
from lib.sdes import PluginReverseSDE, VariancePreservingSDE  # noqa: E402

OUTPUT_RTOL = 1e-4  # max |difference| / max |output|: float32 rounding through ~50 layers is ~1e-6
GRAD_RTOL = 1e-4  # |difference| / |gradient|, Euclidean norms over all parameters
DEFAULT_CASES = ("mnist:64:9", "mnist:16:9", "cifar:16:5", "cifar:64:3")
REVISION = "a62c2f1:lib/models/unet.py"  # the U-Net as first landed


def load_first_landed_unet():
    """The first-landed U-Net class, from `git show REVISION`; exits with a one-line error without git history."""
    try:
        source = subprocess.run(["git", "-C", REPO, "show", REVISION], capture_output=True, text=True,
                                check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        lines = (getattr(err, "stderr", None) or str(err)).strip().splitlines()
        sys.exit(f"unet_speed.py: error: cannot read the first-landed U-Net with `git show {REVISION}` "
                 f"({lines[-1] if lines else 'no output'}); it needs a clone of the repository with its history")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "unet_first_landed.py")
        with open(path, "w") as f:
            f.write(source)
        spec = importlib.util.spec_from_file_location("unet_first_landed", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module.UNet


def case(text):
    """'dataset:batch:rounds' -> (dataset, batch, rounds)."""
    parts = text.split(":")
    try:
        if len(parts) != 3 or parts[0] not in DATASETS:
            raise ValueError
        batch, rounds = int(parts[1]), int(parts[2])
        if batch < 1 or rounds < 1:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected dataset:batch:rounds with dataset in {{{', '.join(DATASETS)}}} and positive integers, "
            f"e.g. mnist:64:7; got {text!r}") from None
    return parts[0], batch, rounds


def twin_networks(first_landed_unet, dataset, device, seed):
    """(first landed, current) U-Nets of the dataset's configuration holding the same perturbed weights."""
    torch.manual_seed(seed)
    old = first_landed_unet(**unet_kwargs(dataset))
    with torch.no_grad():
        for p in old.parameters():
            p.add_(0.02 * torch.randn_like(p))  # wake the zero-initialised layers
    new = UNet(**unet_kwargs(dataset))
    new.load_state_dict(old.state_dict(), strict=True)
    return old.to(device), new.to(device)


def check_agreement(old, new, x, seed, dropout=True):
    """Eval outputs and one DSM step's loss and gradients agree; returns printable figures.

    dropout=False takes that step in eval mode: a channels_last network draws its dropout masks in its
    own memory order, so the same seed gives it other (equally valid) masks.
    """
    t = torch.rand(x.shape[0], device=x.device)
    with torch.no_grad():
        out_old, out_new = old.eval()(x, t), new.eval()(x, t)
    out_err = ((out_new - out_old).abs().max() / out_old.abs().max()).item()

    losses, grads = [], []
    for net in (old, new):
        net.train(dropout).zero_grad(set_to_none=True)
        torch.manual_seed(seed)  # the same s, noise and dropout masks for both
        loss = PluginReverseSDE(VariancePreservingSDE(), net, 1.0).dsm(x).mean()
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad for p in net.parameters()])
    loss_err = abs(losses[1] - losses[0]) / abs(losses[0])
    # Over the whole gradient: some tensors' gradients are rounding noise around an exact zero (a
    # per-channel shift just before a GroupNorm with one channel per group is normalised away).
    g_old, g_new = (torch.cat([g.flatten() for g in gs]) for gs in grads)
    grad_err = ((g_new - g_old).norm() / g_old.norm()).item()
    old.zero_grad(set_to_none=True)
    new.zero_grad(set_to_none=True)
    ok = out_err <= OUTPUT_RTOL and loss_err <= OUTPUT_RTOL and grad_err <= GRAD_RTOL
    errors = {"output_rel_max": out_err, "dsm_loss_rel": loss_err, "gradient_rel_norm": grad_err}
    return ok, errors, (f"outputs agree to {out_err:.1e} (relative max), DSM loss to {loss_err:.1e}, gradients to "
                        f"{grad_err:.1e} (relative norm)")


def training_step(net, x):
    gen_sde = PluginReverseSDE(VariancePreservingSDE(), net, 1.0).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-4)

    def step():
        loss = gen_sde.dsm(x).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def convolution_ms(net, x, steps=2):
    """CPU milliseconds per training step spent inside convolution operators (forward and backward)."""
    step = training_step(net, x)
    step()  # warm-up: oneDNN builds its kernels on first use
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    # Self times, so that nested calls (conv2d -> convolution -> mkldnn_convolution) count once.
    us = sum(e.self_cpu_time_total for e in prof.key_averages() if "conv" in e.key.lower())
    return us / 1e3 / steps


def print_convolution_floor(net, x, first_landed_ms):
    """Print the step's convolution time in both memory formats and the speedup bound it implies; return them."""
    floor = {"NCHW": convolution_ms(net, x)}
    cl = torch.channels_last
    floor["channels_last"] = convolution_ms(copy.deepcopy(net).to(memory_format=cl), x.to(memory_format=cl))
    best = min(floor.values())
    print("  convolutions alone (profiled, now): "
          + ", ".join(f"{name} {ms:.1f} ms/step" for name, ms in floor.items())
          + f"; a 1.5x step would take {first_landed_ms / 1.5:.1f} ms, so keeping these convolutions "
            f"bounds the speedup at {first_landed_ms / best:.2f}x")
    return {"convolution_s_per_step": {name: ms / 1e3 for name, ms in floor.items()},
            "speedup_bound": first_landed_ms / best}


def run_case(first_landed_unet, dataset, batch, rounds, args, device):
    """Check, time and print one case; return its figures (times in seconds)."""
    old, new = twin_networks(first_landed_unet, dataset, device, args.seed)
    new_cl = copy.deepcopy(new).to(memory_format=torch.channels_last)
    n_old, n_new = (sum(p.numel() for p in m.parameters()) for m in (old, new))
    x = torch.rand(batch, *image_shape(dataset), device=device)  # dequantised images live in [0, 1)
    figures = {"dataset": dataset, "batch": batch, "rounds": rounds, "parameters": n_new,
               "first_landed_parameters": n_old, "agreement": {}}
    for name, net, dropout in (("now", new, True), ("now, channels_last", new_cl, False)):
        ok, figures["agreement"][name], agreement = check_agreement(old, net, x[:8], args.seed, dropout)  # 8 suffice
        print(f"{dataset} batch {batch}, {name}: {n_new / 1e6:.2f}M parameters (first landed {n_old / 1e6:.2f}M); "
              f"{agreement}")
        if not ok or n_old != n_new:
            sys.exit(f"unet_speed.py: error: the current U-Net ({name}) does not reproduce the first-landed one "
                     f"for {dataset} (tolerances: outputs and loss {OUTPUT_RTOL:g}, gradients {GRAD_RTOL:g})")

    steps = {"first landed": training_step(old, x), "now": training_step(new, x),
             "now, channels_last": training_step(new_cl, x)}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    wall = {name: [] for name in steps}
    cpu = {name: [] for name in steps}
    names = list(steps)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
            w, c = timed(steps[name], device)
            wall[name].append(w)
            cpu[name].append(c)
    med = {name: statistics.median(v) for name, v in wall.items()}
    base = "first landed"
    figures["networks"] = {}
    for name in names:
        fig = figures["networks"][name] = {"wall_s_per_step": med[name], "images_per_s": batch / med[name],
                                           "cpu_s_per_step": statistics.median(cpu[name]), "rounds_wall_s": wall[name]}
        line = (f"  {name:18s} {1e3 * med[name]:8.1f} ms/step  {batch / med[name]:7.1f} images/s  "
                f"CPU {statistics.median(cpu[name]):6.2f} s/step")
        if name != base:
            paired = statistics.median(a / b for a, b in zip(wall[base], wall[name]))
            line += f"  speedup {med[base] / med[name]:.2f}x (per-round median {paired:.2f}x)"
            fig.update(speedup=med[base] / med[name], per_round_median_speedup=paired)
        print(line + "   rounds (ms): " + " ".join(f"{1e3 * v:.0f}" for v in wall[name]))
    figures["convolution_floor"] = print_convolution_floor(new, x, 1e3 * med[base]) if device.type == "cpu" else None
    return figures


def main():
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=case, nargs="+", default=[case(c) for c in DEFAULT_CASES],
                   help=f"dataset:batch:rounds, timed in this order (default: {' '.join(DEFAULT_CASES)})")
    p.add_argument("--warmup", type=nonnegative_int, default=1, help="untimed steps of each network before timing")
    add_machine_args(p)
    add_json_arg(p, "unet_speed")
    args = p.parse_args()
    device = machine(args, p)
    first_landed_unet = load_first_landed_unet()

    print(command_line())
    print(describe(device))
    print(f"first landed: git {REVISION}; now: lib/models/unet.py; one step = dsm(x).mean() forward, "
          f"backward, Adam; {args.warmup} warm-up step(s) each, then interleaved rounds")
    cases = [run_case(first_landed_unet, dataset, batch, rounds, args, device) for dataset, batch, rounds in args.cases]
    write_json("unet_speed", {"first_landed": REVISION, "cases": cases}, args, device)


if __name__ == "__main__":
    main()
