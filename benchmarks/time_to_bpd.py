"""Test bits/dim per unit of compute on real images: train_img.py itself, configuration against configuration.

    python benchmarks/time_to_bpd.py [--data digits photos] [--iterations 1500] [--snapshot 500]
        [--configs today precond ...] [--num_times 32] [--threads 2] [--workdir DIR] [--json PATH]

Data (benchmarks/real_images.py, written in MNIST's and CIFAR-10's layouts): `digits`, scikit-learn's digits
at 28x28 (1500 training, 297 test images; the MNIST configuration, batch 64); `photos`, 32x32 patches of
scikit-image's photographs (3000 / 300; the CIFAR-10 layout with a small U-Net, --ch=32, batch 32).

Each configuration is train_img.py's flags on top of today's (sdeflow-light's recipe with --debias=True:
raw drift, VP, Adam 1e-4 constant, EMA 0.9999, no clipping). It trains --snapshot iterations, keeps that
checkpoint, resumes to --iterations (a constant learning rate makes the snapshot exactly a shorter run), and
times both. Each checkpoint's EMA model is then scored on the whole test set by PluginReverseSDE.elbo with
--num_times stratified times per image, twice with independent draws: the mean bits/dim with its standard
error over images, the estimator's own noise (from the two draws' difference), and the paired difference to
`today` on the same images and dequantisation (whose standard error is what resolves 0.02 bpd).
--weights=raw scores the trained weights instead of their EMA (what the EMA is worth).
A later call with the same --workdir reuses the checkpoints it kept (with their recorded times, in a .json
beside each) and trains only configurations and lengths it has not run.
"""
import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from real_images import write_digits, write_photos  # noqa: E402
from report import add_json_arg, command_line, write_json  # noqa: E402

import train_img  # noqa: E402
from lib.checkpoint import load_checkpoint  # noqa: E402
from lib.evaluation import elbo_estimator, mean_and_stderr, test_set_bits_per_dim  # noqa: E402
from lib.image_data import test_loader  # noqa: E402
from lib.image_files import cifar10_checksums  # noqa: E402
from lib.saved_run import open_run  # noqa: E402

TODAY = ["--precond=False", "--sde=vp", "--lr=1e-4", "--warmup=0", "--ema_decay=0.9999", "--grad_clip=0"]
CONFIGS = {
    "today": [],
    "precond": ["--precond=True"],
    "subvp": ["--sde=subvp"],
    "lr2e-4": ["--lr=2e-4", "--warmup=100"],
    "lr5e-4": ["--lr=5e-4"],
    "clip1": ["--grad_clip=1"],
    "ema0.999": ["--ema_decay=0.999"],
    "precond+subvp": ["--precond=True", "--sde=subvp"],
    "precond+lr2e-4": ["--precond=True", "--lr=2e-4", "--warmup=100"],
    "precond+lr5e-4": ["--precond=True", "--lr=5e-4", "--warmup=100"],
    "precond+lr5e-4+warmup0": ["--precond=True", "--lr=5e-4"],
    "precond+lr5e-4+dropout0.1": ["--precond=True", "--lr=5e-4", "--dropout=0.1"],
    "precond+lr5e-4+warmup0+seed1": ["--precond=True", "--lr=5e-4", "--seed=1"],
    "precond+lr1e-3": ["--precond=True", "--lr=1e-3", "--warmup=100"],
    "precond+dropout0": ["--precond=True", "--dropout=0"],
    "precond+lr5e-4+dropout0": ["--precond=True", "--lr=5e-4", "--warmup=100", "--dropout=0"],
    "precond+clip1": ["--precond=True", "--grad_clip=1"],
    "precond+ema0.999": ["--precond=True", "--ema_decay=0.999"],
    "defaults": None,  # train_img.py's own defaults (with --debias=True): what the mission command trains
}
DATA = {
    "digits": {"dataset": "mnist", "write": write_digits, "flags": ["--batch_size=64"]},
    "photos": {"dataset": "cifar", "write": write_photos, "flags": ["--batch_size=32", "--ch=32"]},
}


def train(data, config, iterations, saveroot, dataroot):
    """Run train_img.py for `config` up to `iterations` (resuming when the run exists); returns wall and CPU
    seconds of this call."""
    extra = DATA[data]["flags"] + (TODAY + CONFIGS[config] if CONFIGS[config] is not None else [])
    argv = [f"--dataset={DATA[data]['dataset']}", f"--dataroot={dataroot}", f"--saveroot={saveroot}",
            f"--expname={config}", "--debias=True", f"--num_iterations={iterations}", "--print_every=100000",
            "--sample_every=100000", "--checkpoint_every=100000", "--num_samples=4", "--num_steps=10",
            "--num_workers=0", "--num_eval=16", "--device=cpu", *extra]
    wall, cpu = time.perf_counter(), time.process_time()
    with _checksums(data, dataroot):
        train_img.main(argv)
    return time.perf_counter() - wall, time.process_time() - cpu


def score(checkpoint, data, dataroot, num_times, weights="ema", seeds=(0, 1)):
    """Per-image bits/dim of the checkpoint's EMA model (or its trained weights, weights="raw") on the whole
    test set, one (N,) tensor per seed."""
    run = open_run(checkpoint, torch.device("cpu"))
    if weights == "raw":
        run.gen_sde.a.load_state_dict(load_checkpoint(checkpoint)["model_state"])
    estimate = elbo_estimator(run.gen_sde, "elbo", num_times=num_times)
    with _checksums(data, dataroot):
        test_set = run.task.datasets(dataroot)[1]
    draws = []
    for seed in seeds:
        loader = test_loader(test_set, 100)
        draws.append(test_set_bits_per_dim(estimate, loader, run.task.args.real, torch.device("cpu"), seed=(seed,)))
    return draws


def summary(draws, reference=None):
    """Mean bpd ± its standard error, the estimator's per-image std, and the paired difference to `reference`."""
    bpd = (draws[0] + draws[1]) / 2
    mean, se = mean_and_stderr(bpd)
    noise = ((draws[0] - draws[1]).var() / 2).sqrt().item()  # one draw's per-image std
    out = {"bpd": mean, "bpd_std_err": se, "estimator_std_per_image": noise}
    if reference is not None:
        diff, diff_se = mean_and_stderr(bpd - reference)
        out.update(diff_vs_today=diff, diff_vs_today_std_err=diff_se)
    return out


@contextlib.contextmanager
def _checksums(data, dataroot):
    if DATA[data]["dataset"] == "cifar":
        with cifar10_checksums(os.path.join(dataroot, "cifar10")):
            yield
    else:
        yield


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", choices=tuple(DATA), default=["digits"])
    p.add_argument("--configs", nargs="+", choices=tuple(CONFIGS), default=["today", "defaults"])
    p.add_argument("--iterations", type=int, default=1500)
    p.add_argument("--snapshot", type=int, default=500, help="also score the checkpoint at this iteration (0: no)")
    p.add_argument("--num_times", type=int, default=32, help="stratified times per image of the precise ELBO")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema",
                   help="score the EMA weights (what train_img.py evaluates) or the trained weights themselves")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workdir", default=None, help="data and runs (default: a temporary folder)")
    add_json_arg(p, "time_to_bpd")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = args.workdir or tempfile.mkdtemp(prefix="time_to_bpd_")
    print(f"command: {command_line()}\ntorch {torch.__version__}, {torch.get_num_threads()} threads; work in {workdir}")
    results = {}
    for data in args.data:
        dataroot = os.path.join(workdir, data, "data")
        if not os.path.isdir(dataroot):
            print(f"{data}: {DATA[data]['write'](dataroot)} training / test images")
        saveroot = os.path.join(workdir, data, "runs")
        stops = [s for s in (args.snapshot, args.iterations) if s > 0]
        rows = {}
        for config in args.configs:
            rows[config] = {}
            seconds = [0.0, 0.0]
            for stop in stops:
                kept = os.path.join(saveroot, f"{config}_{stop}.pt")
                if os.path.exists(kept + ".json"):  # kept by an earlier call: the run may have gone past `stop`
                    with open(kept + ".json") as f:
                        rows[config][stop] = json.load(f)
                    seconds = [rows[config][stop]["wall_seconds"], rows[config][stop]["cpu_seconds"]]
                    continue
                wall, cpu = train(data, config, stop, saveroot, dataroot)
                seconds = [seconds[0] + wall, seconds[1] + cpu]
                shutil.copy(os.path.join(saveroot, config, "checkpoint.pt"), kept)
                rows[config][stop] = {"wall_seconds": seconds[0], "cpu_seconds": seconds[1], "checkpoint": kept}
                with open(kept + ".json", "w") as f:
                    json.dump(rows[config][stop], f)
        for stop in stops:
            reference = None
            for config in args.configs:
                draws = score(rows[config][stop]["checkpoint"], data, dataroot, args.num_times, args.weights)
                if config == "today":
                    reference = (draws[0] + draws[1]) / 2
                rows[config][stop].update(summary(draws, reference if config != "today" else None))
        results[data] = rows
        print(f"\n{data}: test bits/dim (PluginReverseSDE.elbo, {args.num_times} stratified times x 2 draws per image)")
        print(f"  {'configuration':18s} {'iterations':>10s} {'bpd':>16s} {'vs today':>18s} {'est. std/img':>12s} "
              f"{'wall s':>8s} {'CPU s':>8s}")
        for config, by_stop in rows.items():
            for stop, r in by_stop.items():
                vs = (f"{r['diff_vs_today']:+.3f} ± {r['diff_vs_today_std_err']:.3f}" if "diff_vs_today" in r
                      else "")
                print(f"  {config:18s} {stop:10d} {r['bpd']:8.3f} ± {r['bpd_std_err']:.3f} {vs:>18s} "
                      f"{r['estimator_std_per_image']:12.3f} {r['wall_seconds']:8.0f} {r['cpu_seconds']:8.0f}")
    write_json("time_to_bpd", results, args)


if __name__ == "__main__":
    main()
