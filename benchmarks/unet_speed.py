"""Training-step speed of the DDPM U-Net against the U-Net as first landed (git a62c2f1), A/B interleaved.

    python benchmarks/unet_speed.py [--cases mnist:64:7 mnist:16:7 cifar:16:3 cifar:64:2] [--warmup 1]
        [--device auto] [--threads N] [--seed 0]

A case is dataset:batch:rounds, the datasets' U-Nets those of lib/image_task.py (MNIST: ch 32, 1.5M
parameters; CIFAR-10: DDPM's 35.7M). A step is what lib/training.py runs: forward, backward and Adam on
PluginReverseSDE(VP SDE, unet, T=1).dsm(x).mean() (its gradient-norm guard and EMA update left out).

The first-landed file is read from git history at run time (`git show a62c2f1:lib/models/unet.py`, by
tests/first_landed.py, which the equivalence test shares), so no copy of it lives in the tree. Both
networks get the same weights through load_state_dict(strict=True) (so the state-dict keys must agree),
perturbed first so that the zero-initialised output layers hide nothing; before any timing the script
checks on 8 examples that their eval-mode outputs, and the loss and gradients of one DSM step on the
same noise, agree to float tolerance (it exits with status 1 if not).

On a CPU shared with other jobs, set OMP_WAIT_POLICY=PASSIVE (see benchmarks/measure.py) or use
--threads 1, whose CPU seconds per step hardly depend on the load.

Timing: after `--warmup` steps of each, the two are stepped alternately, A B, B A, A B, ... for `rounds`
rounds, so load from other processes on a shared machine falls on both alike. Printed: the median
wall-clock ms per step and images/s of each, the speedup (ratio of the medians) and the median of the
per-round ratios, and the median CPU seconds per step (steadier than the wall clock under load when
one thread runs). CIFAR-10 at batch 64 takes seconds per step on a 2-core CPU, hence its few rounds.
"""
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from first_landed import REVISION, FirstLandedUnavailable, load_first_landed_unet_module  # noqa: E402
from measure import DATASETS, add_machine_args, command_line, describe, machine, image_shape, timed, unet_kwargs  # noqa: E402

from lib.config import ArgumentParser, nonnegative_int  # noqa: E402
from lib.models.unet import UNet  # noqa: E402
from lib.sdes import PluginReverseSDE, VariancePreservingSDE  # noqa: E402

OUTPUT_RTOL = 1e-4  # max |difference| / max |output|: float32 rounding through ~50 layers is ~1e-6
GRAD_RTOL = 1e-4  # |difference| / |gradient|, Euclidean norms over all parameters
DEFAULT_CASES = ("mnist:64:7", "mnist:16:7", "cifar:16:3", "cifar:64:2")


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


def check_agreement(old, new, x, seed):
    """Eval outputs and one DSM step's loss and gradients agree; returns printable figures."""
    t = torch.rand(x.shape[0], device=x.device)
    with torch.no_grad():
        out_old, out_new = old.eval()(x, t), new.eval()(x, t)
    out_err = ((out_new - out_old).abs().max() / out_old.abs().max()).item()

    losses, grads = [], []
    for net in (old, new):
        net.train().zero_grad(set_to_none=True)
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
    return ok, (f"outputs agree to {out_err:.1e} (relative max), DSM loss to {loss_err:.1e}, gradients to "
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


def run_case(first_landed_unet, dataset, batch, rounds, args, device):
    old, new = twin_networks(first_landed_unet, dataset, device, args.seed)
    n_old, n_new = (sum(p.numel() for p in m.parameters()) for m in (old, new))
    x = torch.rand(batch, *image_shape(dataset), device=device)  # dequantised images live in [0, 1)
    ok, agreement = check_agreement(old, new, x[:8], args.seed)  # a few examples suffice, and save time
    print(f"{dataset} batch {batch}: {n_new / 1e6:.2f}M parameters (first landed {n_old / 1e6:.2f}M); {agreement}")
    if not ok or n_old != n_new:
        sys.exit(f"unet_speed.py: error: the current U-Net does not reproduce the first-landed one for {dataset} "
                 f"(tolerances: outputs and loss {OUTPUT_RTOL:g}, gradients {GRAD_RTOL:g})")

    steps = {"first landed": training_step(old, x), "now": training_step(new, x)}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    wall = {name: [] for name in steps}
    cpu = {name: [] for name in steps}
    names = list(steps)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            w, c = timed(steps[name], device)
            wall[name].append(w)
            cpu[name].append(c)
    med = {name: statistics.median(v) for name, v in wall.items()}
    paired = statistics.median(a / b for a, b in zip(wall["first landed"], wall["now"]))
    for name in names:
        print(f"  {name:12s} {1e3 * med[name]:8.1f} ms/step  {batch / med[name]:7.1f} images/s  "
              f"CPU {statistics.median(cpu[name]):6.2f} s/step   rounds (ms): "
              + " ".join(f"{1e3 * v:.0f}" for v in wall[name]))
    print(f"  speedup {med['first landed'] / med['now']:.2f}x (ratio of medians), {paired:.2f}x (median of "
          f"per-round ratios), CPU time {statistics.median(cpu['first landed']) / statistics.median(cpu['now']):.2f}x")


def main():
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=case, nargs="+", default=[case(c) for c in DEFAULT_CASES],
                   help=f"dataset:batch:rounds, timed in this order (default: {' '.join(DEFAULT_CASES)})")
    p.add_argument("--warmup", type=nonnegative_int, default=1, help="untimed steps of each network before timing")
    add_machine_args(p)
    args = p.parse_args()
    device = machine(args, p)

    try:
        first_landed_unet = load_first_landed_unet_module().UNet
    except FirstLandedUnavailable as err:
        sys.exit(f"unet_speed.py: error: {err}")

    print(command_line())
    print(describe(device))
    print(f"first landed: git {REVISION}; now: lib/models/unet.py; one step = dsm(x).mean() forward, "
          f"backward, Adam; {args.warmup} warm-up step(s) each, then interleaved rounds")
    for dataset, batch, rounds in args.cases:
        run_case(first_landed_unet, dataset, batch, rounds, args, device)


if __name__ == "__main__":
    main()
