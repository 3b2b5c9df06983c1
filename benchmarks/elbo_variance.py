"""Variance and cost of the two ELBO estimators on a sharp Gaussian mixture whose ELBO is known.

    python benchmarks/elbo_variance.py [--shape 3 32 32] [--components 32] [--std 2] [--error 0.2]
        [--examples 8] [--repeats 4000] [--chunk 2000] [--time_batch 512] [--time_rounds 15]
        [--unet_batch 32] [--unet_rounds 5] [--threads 2] [--dtype float32] [--device cpu] [--seed 0]

Data: (1/K) sum_k N(mu_k, c^2 I), c = std / 256, with centres mu_k smooth random 8-bit images (4x4 Gaussian
noise upsampled bicubically, squashed into [0, 1] and put on pixel centres (k + 1/2) / 256): sharp and
multimodal, like dequantised images. Diffused, it stays a mixture, so the exact drift a = g grad log p_s is
known, and so is the expected ELBO of the exact drift, log p_0(x) + E[log N(Y_T; 0, I) - log p_T(Y_T) | x]
(the prior-mismatch term by Monte Carlo over Y_T, no network involved).

Drifts: exact; "perturbed" = the exact drift of the mixture with c over-estimated by 25% (a slightly
over-smoothed model) plus error * alpha(s) * a fixed random 3x3 convolution of it (correlated, anisotropic
errors that fade where p_s is pure noise, as a trained network's do); "poor" = half the exact drift (a
network early in training).

For each drift, on `--examples` points x each repeated `--repeats` times: the per-example variance of
PluginReverseSDE.elbo_random_t_slice and .elbo (variance over repeats, averaged over the points, with its
standard error), the time per example (best of interleaved rounds on `--time_batch` examples, eval
mode under no_grad, as bits/dim evaluation runs), variance x time, and the ratio. The two means are compared
with each other and with the oracle. The slice's estimates are heavy-tailed (rare draws of s near 0
dominate), so its sample variance is skewed and usually falls short of the true one: the printed ratios
are conservative. The last section times both estimators with a U-Net drift (lib/models/unet.py, MNIST
widths, on --shape), where the network's cost dominates as in real use. The defaults take about 1.5
minutes on 2 CPU cores. The figures also go to benchmarks/results/elbo_variance.json (--json PATH).
"""
import argparse
import contextlib
import functools
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from report import add_json_arg, write_json  # noqa: E402

from lib.models.unet import UNet  # noqa: E402
from lib.oracles import IsotropicGaussianMixture  # noqa: E402
from lib.sdes import PluginReverseSDE, VariancePreservingSDE, as_batch_time, batch_view  # noqa: E402


ESTIMATORS = ("elbo_random_t_slice", "elbo")


def smooth_8bit_centres(k, shape, generator):
    """(k, C, H, W) smooth random images on 8-bit pixel centres (k + 1/2) / 256."""
    c, h, w = shape
    low = torch.randn(k, c, 4, 4, generator=generator, dtype=torch.float64)
    img = torch.sigmoid(2 * torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False))
    return (torch.round(img * 255) + 0.5) / 256


class PerturbedDrift(torch.nn.Module):
    """a~(y, s) = b(y, s) + error * alpha(s) * conv3x3(b(y, s)), b the exact drift of a wider mixture.

    The kernel is fixed and random, scaled to about unit gain: an anisotropic error with off-diagonal
    Jacobian entries (the Hutchinson probe then has something to miss), fading where p_s is pure noise.
    """

    def __init__(self, mixture, channels, error, generator):
        super().__init__()
        self.mixture, self.error = mixture, error
        kernel = torch.randn(channels, channels, 3, 3, generator=generator, dtype=torch.float64)
        self.register_buffer("kernel", kernel / math.sqrt(9 * channels))

    def forward(self, y, s):
        b = self.mixture(y, s)
        alpha = batch_view(self.mixture.sde.mean_weight(as_batch_time(s, y)), y)
        return b + self.error * alpha * torch.nn.functional.conv2d(b, self.kernel.to(y.dtype), padding=1)


def oracle_elbo(mixture, x, T, n_mc, generator):
    """E[ELBO(x)] for the exact drift: log p_0(x) + E[log N(Y_T; 0, I) - log p_T(Y_T) | x], (B,) float64,
    and the Monte Carlo standard error of the second term, (B,)."""
    sde = mixture.sde
    t = torch.full((n_mc,), T, dtype=torch.float64, device=x.device)
    alpha, std = sde.mean_weight(t[:1]).item(), sde.var(t[:1]).sqrt().item()
    out, se = [], []
    for xi in x.double():
        noise = torch.randn((n_mc, *xi.shape), generator=generator, dtype=torch.float64)  # CPU generator
        y = alpha * xi + std * noise.to(x.device)
        gap = sde.prior_log_prob(y) - mixture.log_prob(y, t)
        out.append(gap.mean())
        se.append(gap.std() / math.sqrt(n_mc))
    zero = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    return mixture.log_prob(x.double(), zero) + torch.stack(out), torch.stack(se)


def bits_per_dim(log_p, dim):
    """-log p / (D ln 2) + 8: x lives on [0, 1] at 8-bit resolution (docs/math.md section 5)."""
    return -log_p / (dim * math.log(2)) + 8


def repeated_estimates(estimator, x, repeats, chunk):
    """(repeats, B) float64: the estimator applied to x repeated, in chunks of about `chunk` examples."""
    per_chunk = max(1, chunk // x.shape[0])
    rows = []
    with torch.no_grad():
        for start in range(0, repeats, per_chunk):
            r = min(per_chunk, repeats - start)
            xr = x.repeat(r, *([1] * (x.dim() - 1)))
            rows.append(estimator(xr).double().view(r, x.shape[0]))
    return torch.cat(rows)


def variance_with_se(est):
    """Per-example variance over repeats averaged over examples, and its standard error (4th moments)."""
    R = est.shape[0]
    centred = est - est.mean(0)
    var = centred.pow(2).sum(0) / (R - 1)  # (B,)
    m4 = centred.pow(4).mean(0)
    se = ((m4 - var ** 2).clamp(min=0) / R).sqrt()
    return var.mean().item(), se.pow(2).sum().sqrt().item() / est.shape[1], var


def time_per_example(estimators, x, rounds):
    """Seconds per example of each estimator (a dict of callables), best of `rounds` interleaved rounds (as
    timeit: other jobs on a shared machine only ever add time)."""
    times = {name: [] for name in estimators}
    with torch.no_grad():
        for _ in range(3):  # warm-up: the first calls of a process pay for fresh memory (page faults)
            for f in estimators.values():
                f(x)
        for _ in range(rounds):
            for name, f in estimators.items():
                if x.is_cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                f(x)
                if x.is_cuda:
                    torch.cuda.synchronize()
                times[name].append((time.perf_counter() - t0) / x.shape[0])
    return {name: min(v) for name, v in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=3, default=[3, 32, 32], metavar=("C", "H", "W"))
    p.add_argument("--components", type=int, default=32, help="mixture components K")
    p.add_argument("--std", type=float, default=2.0, help="component std in units of 1/256")
    p.add_argument("--error", type=float, default=0.2, help="convolutional error of the perturbed drift")
    p.add_argument("--examples", type=int, default=8, help="data points x")
    p.add_argument("--repeats", type=int, default=4000, help="estimates per data point and estimator")
    p.add_argument("--chunk", type=int, default=2000, help="examples per estimator call in the variance runs")
    p.add_argument("--time_batch", type=int, default=512, help="examples per timed call")
    p.add_argument("--time_rounds", type=int, default=15, help="timed rounds with the mixture drifts; the best counts")
    p.add_argument("--unet_rounds", type=int, default=5, help="timed rounds with the U-Net; the best counts")
    p.add_argument("--unet_batch", type=int, default=32, help="examples per timed call with the U-Net (0: skip)")
    p.add_argument("--mc", type=int, default=4096, help="Monte Carlo samples of Y_T per point for the oracle")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None, help="also measure a trained image model (train_img.py checkpoint)")
    p.add_argument("--dataroot", default=None, help="its data (default: the run's --dataroot)")
    p.add_argument("--images", type=int, default=16, help="test images of the trained-model section")
    p.add_argument("--trained_repeats", type=int, default=16, help="draws per image in the trained-model section")
    add_json_arg(p, "elbo_variance")
    args = p.parse_args()
    for name in ("components", "examples", "repeats", "chunk", "time_batch", "time_rounds", "unet_rounds", "mc",
                 "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.repeats < 2 or args.std <= 0 or args.error < 0 or args.unet_batch < 0:
        p.error("need --repeats >= 2, --std > 0, --error >= 0 and --unet_batch >= 0")
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    print("command: python " + " ".join(sys.argv))
    print(f"torch {torch.__version__}, {args.threads} threads, device {device}, {args.dtype}")
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    sde = VariancePreservingSDE()
    D = math.prod(args.shape)
    c = args.std / 256
    centres = smooth_8bit_centres(args.components, args.shape, gen)
    exact = IsotropicGaussianMixture(sde, centres, c).to(device)
    wide = IsotropicGaussianMixture(sde, centres, 1.25 * c).to(device)
    drifts = {
        "exact": exact,
        "perturbed": PerturbedDrift(wide, args.shape[0], args.error, gen).to(device),
        "poor": lambda y, s: 0.5 * exact(y, s),
    }
    comp = torch.randint(0, args.components, (args.examples,), generator=gen)
    x = (centres[comp] + c * torch.randn(args.examples, *args.shape, generator=gen, dtype=torch.float64))
    x = x.to(device=device, dtype=dtype)
    print(f"data: {args.components}-component mixture, std {args.std}/256, shape {tuple(args.shape)} (D = {D}); "
          f"{args.examples} points x {args.repeats} repeats per estimator; VP beta (0.1, 20), T = 1, t_eps = 1e-3")
    oracle, oracle_se = oracle_elbo(exact, x, sde.T, args.mc, gen.manual_seed(args.seed + 1))
    print(f"oracle E[ELBO] of the exact drift: {bits_per_dim(oracle.mean().item(), D):.4f} bits/dim "
          f"(mean over the points; prior-mismatch Monte Carlo s.e. {oracle_se.max().item():.3f} nats)")
    figures = {"dimension": D, "oracle_elbo_bits_per_dim": bits_per_dim(oracle.mean().item(), D),
               "oracle_max_stderr_nats": oracle_se.max().item(), "drifts": {}}

    gens = {name: PluginReverseSDE(sde, drift, sde.T).eval() for name, drift in drifts.items()}
    estimators = {(name, k): one_time(g, k) for name, g in gens.items() for k in ESTIMATORS}
    est = {}
    for key, f in estimators.items():
        torch.manual_seed(args.seed + 2)
        est[key] = repeated_estimates(f, x, args.repeats, args.chunk)
    xt = x.repeat(math.ceil(args.time_batch / args.examples), *([1] * len(args.shape)))[:args.time_batch]
    secs = time_per_example(estimators, xt, args.time_rounds)  # all six interleaved: load hits them alike

    summary = {}
    for name in drifts:
        print(f"\n{name} drift")
        print(f"  {'estimator':20s} {'variance (nats^2)':>24s} {'time/example':>13s} {'var x time':>11s}  "
              f"{'mean - oracle (nats)':>22s}")
        if name != "exact":
            print("  (the oracle is the exact drift's expected ELBO: here mean - oracle is this drift's ELBO loss)")
        var, vt = {}, {}
        fig = figures["drifts"][name] = {}
        for k in ESTIMATORS:
            e, t = est[name, k], secs[name, k]
            var[k], se, _ = variance_with_se(e)
            vt[k] = var[k] * t
            err = e.mean(0) - oracle
            err_se = (e.var(0) / args.repeats + oracle_se ** 2).sum().sqrt().item() / args.examples
            print(f"  {k:20s} {var[k]:12.4g} +- {se:9.3g} {t * 1e6:10.1f} us {vt[k]:11.4g}  "
                  f"{err.mean().item():+10.1f} +- {err_se:7.1f}")
            fig[k] = {"variance_nats2": var[k], "variance_stderr": se, "seconds_per_example": t,
                      "variance_x_time": vt[k], "mean_minus_oracle_nats": err.mean().item(),
                      "mean_minus_oracle_stderr": err_se}
        new, old = est[name, "elbo"], est[name, "elbo_random_t_slice"]
        diff = (new.mean(0) - old.mean(0)).mean().item()
        diff_se = ((new.var(0) + old.var(0)) / args.repeats).sum().sqrt().item() / args.examples
        summary[name] = var["elbo_random_t_slice"] / var["elbo"]
        print(f"  variance ratio {summary[name]:.1f}x, "
              f"time ratio {secs[name, 'elbo_random_t_slice'] / secs[name, 'elbo']:.2f}x, "
              f"variance x time ratio {vt['elbo_random_t_slice'] / vt['elbo']:.1f}x (target >= 5)")
        print(f"  means: elbo - elbo_random_t_slice = {diff:+.1f} +- {diff_se:.1f} nats (z = {diff / diff_se:+.2f}); "
              f"ELBO {bits_per_dim(new.mean().item(), D):.4f} bits/dim")
        fig.update(variance_ratio=summary[name], time_ratio=secs[name, "elbo_random_t_slice"] / secs[name, "elbo"],
                   variance_x_time_ratio=vt["elbo_random_t_slice"] / vt["elbo"], elbo_minus_slice_nats=diff,
                   elbo_minus_slice_stderr=diff_se, elbo_bits_per_dim=bits_per_dim(new.mean().item(), D))

    figures["unet"] = None
    C, H, W = args.shape
    if args.unet_batch and H != W:
        print("\nU-Net timing skipped: the U-Net needs square images")
    elif args.unet_batch:
        unet = UNet(C, H, ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(16,)).to(device, dtype).eval()
        gen_sde = PluginReverseSDE(sde, unet, sde.T).eval()
        xt = x.repeat(math.ceil(args.unet_batch / args.examples), 1, 1, 1)[:args.unet_batch]
        secs = time_per_example({k: one_time(gen_sde, k) for k in ESTIMATORS}, xt, args.unet_rounds)
        t_ratio = secs["elbo_random_t_slice"] / secs["elbo"]
        print(f"\nU-Net drift (ch=32, ch_mult=(1, 2, 2), {sum(p.numel() for p in unet.parameters())} parameters), "
              f"batch {args.unet_batch}, eval mode under no_grad")
        print(f"  time/example: elbo_random_t_slice {secs['elbo_random_t_slice'] * 1e3:.2f} ms, "
              f"elbo {secs['elbo'] * 1e3:.2f} ms: time ratio {t_ratio:.2f}x")
        for name, var_ratio in summary.items():
            print(f"  with the {name} drift's variance ratio {var_ratio:.1f}x: variance x time ratio "
                  f"{var_ratio * t_ratio:.1f}x")
        figures["unet"] = {"parameters": sum(p.numel() for p in unet.parameters()), "batch": args.unet_batch,
                           "seconds_per_example": secs, "time_ratio": t_ratio,
                           "variance_x_time_ratio": {name: r * t_ratio for name, r in summary.items()}}
    if args.checkpoint:
        figures["trained"] = trained_model(args)
    write_json("elbo_variance", figures, args, device)


def one_time(gen_sde, name):
    """The estimator `name` with one time per example: the mixture sections compare one draw with one draw."""
    if name == "elbo":
        return lambda x: gen_sde.elbo(x, num_times=1)
    return getattr(gen_sde, name)


TRAINED_TIMES = (1, 8, 16, 32)


def trained_model(args):
    """Per-image noise of the estimators on a trained image model (a train_img.py checkpoint), in bits/dim.

    The first --images test images, each dequantised once (fixed u) and moved to model space as in training;
    --trained_repeats independent draws per image of: the random t slice, and .elbo with 1, 8, 16 and 32
    stratified times. Per-image std (RMS over images) in bpd, time per image (eval mode, no_grad), cost in
    slices, and efficiency against the slice (variance x time, larger is better). The means agree (z-score).
    """
    from lib.image_files import cifar10_checksums
    from lib.pixels import dequantize, to_model_space
    from lib.saved_run import open_run

    run = open_run(args.checkpoint, torch.device("cpu"))
    gen_sde, task = run.gen_sde, run.task
    folder = os.path.join(args.dataroot or task.args.dataroot, "cifar10")
    checks = cifar10_checksums(folder) if task.args.dataset == "cifar" else contextlib.nullcontext()
    with checks:
        test_set = task.datasets(args.dataroot)[1]
    k = torch.stack([test_set[i][0] for i in range(args.images)])  # (N, C, H, W) uint8
    z, _ = to_model_space(dequantize(k, generator=torch.Generator().manual_seed(args.seed)), task.args.real)
    to_bpd = 1 / (z[0].numel() * math.log(2))
    estimators = {"elbo_random_t_slice": gen_sde.elbo_random_t_slice}
    estimators.update({f"elbo, {K} times": functools.partial(gen_sde.elbo, num_times=K) for K in TRAINED_TIMES})
    torch.manual_seed(args.seed + 3)
    draws = {name: repeated_estimates(f, z, args.trained_repeats, args.images * 8).mul(to_bpd)
             for name, f in estimators.items()}  # (R, N): -ELBO in bits/dim up to the offset
    secs = time_per_example(estimators, z, args.unet_rounds)
    slice_name = "elbo_random_t_slice"
    ref_var, ref_mean = draws[slice_name].var(0).mean(), draws[slice_name].mean(0)
    print(f"\ntrained model {args.checkpoint} (iteration {run.iteration}, {task.args.dataset}, logit space "
          f"{task.args.real}): {args.images} test images, dequantisation fixed, {args.trained_repeats} draws each")
    print(f"  {'estimator':22s} {'std/image (bpd)':>16s} {'ms/image':>9s} {'cost (slices)':>14s} "
          f"{'efficiency':>11s} {'mean - slice mean (bpd)':>25s}")
    out = {}
    for name, d in draws.items():
        var = d.var(0).mean()
        diff = (d.mean(0) - ref_mean).mean().item()
        diff_se = ((d.var(0) + draws[slice_name].var(0)) / args.trained_repeats).mean().sqrt().item() / math.sqrt(
            args.images)
        cost = secs[name] / secs[slice_name]
        efficiency = (ref_var * secs[slice_name] / (var * secs[name])).item()
        out[name] = {"std_per_image_bpd": var.sqrt().item(), "seconds_per_image": secs[name], "cost_in_slices": cost,
                     "efficiency_vs_slice": efficiency, "bpd_minus_slice": -diff, "bpd_minus_slice_se": diff_se}
        print(f"  {name:22s} {var.sqrt().item():16.4f} {secs[name] * 1e3:9.1f} {cost:14.2f} {efficiency:11.1f} "
              f"{-diff:+14.4f} ± {diff_se:.4f}")
    return out


if __name__ == "__main__":
    main()
