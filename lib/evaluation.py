"""Evaluating a trained model: likelihood estimators, per-example loops over test data, summaries with
standard errors, and a distance between samples and data.

An estimator is a callable x (B, ...) -> (B,): an estimate of log p(x) in nats, x in the space the SDE
runs in. Two kinds:
  * the ELBO, a lower bound, by name (``ELBO_ESTIMATORS`` maps each command-line name to the
    PluginReverseSDE method), optionally averaged over independent draws per example (``repeated_mean``);
  * the exact likelihood along the probability-flow ODE (``ODELikelihood``), which records the NFE.

Images: per-example bits/dim over a (sharded) test set (``test_set_bits_per_dim``, through
lib.pixels.batch_bits_per_dim), the same path for training-time evaluation and for evaluate.py.
"""
import functools
import math

import torch

from lib.distributed import gather_in_order
from lib.likelihood import ode_log_likelihood
from lib.pixels import batch_bits_per_dim
from lib.rng import derived_seed
from lib.sdes import ELBO_TIMES

class NonFiniteError(Exception):
    """A model's likelihood or samples came out non-finite; the message is one line saying what to do."""


# Command-line name -> PluginReverseSDE method; each returns a per-example ELBO (B,) in nats.
ELBO_ESTIMATORS = {"elbo": "elbo", "random_t_slice": "elbo_random_t_slice"}


def elbo_estimator(gen_sde, name="elbo", repeats=1, num_times=ELBO_TIMES):
    """The ELBO estimator `name` of gen_sde as a callable x (B, ...) -> (B,), averaging `repeats` draws;
    num_times: the stratified times per example of PluginReverseSDE.elbo (the slice has one)."""
    if name not in ELBO_ESTIMATORS:
        raise ValueError(f"unknown ELBO estimator {name!r}; allowed: {', '.join(ELBO_ESTIMATORS)}")
    method = getattr(gen_sde, ELBO_ESTIMATORS[name])
    if name == "elbo":
        method = functools.partial(method, num_times=num_times)
    if repeats == 1:
        return method
    return lambda x: repeated_mean(method, x, repeats)


def stratified_elbo(gen_sde, num_times):
    """x (B, ...) -> (ELBO (B,), the variance of that estimate (B,)) by PluginReverseSDE.elbo with num_times >= 4
    stratified times per example.

    One draw per stratum leaves each stratum's variance to be inferred from its neighbours. The K terms t_k
    (PluginReverseSDE.elbo_terms) are independent, with means that drift smoothly with k, so second differences
    t_k-1 - 2 t_k + t_k+1 cancel a locally linear drift and have variance 6 sigma^2 where the sigma's are alike:
    Var(mean) ~ (1/K^2) * n * mean_k((t_k-1 - 2 t_k + t_k+1)^2 / 6) over the n strata on each side of t_epsilon
    (where the terms jump). Measured on a trained digit model, K = 8, 16, 32: within 25% of the actual variance.
    """
    if num_times < 4:
        raise ValueError(f"num_times must be >= 4 to estimate the variance, got {num_times}")
    below = gen_sde.elbo_strata(num_times)[1]

    def estimate(x):
        terms = gen_sde.elbo_terms(x, num_times)  # (B, K)
        variance = torch.zeros_like(terms[:, 0])
        for part in (terms[:, :below], terms[:, below:]):  # each side of t_epsilon on its own
            n = part.shape[1]
            if n >= 3:
                second = part[:, :-2] - 2 * part[:, 1:-1] + part[:, 2:]
                variance = variance + n * second.pow(2).mean(1) / 6
            elif n == 2:
                variance = variance + (part[:, 0] - part[:, 1]).pow(2)
        return terms.mean(1), variance / num_times ** 2

    return estimate


# Rows (example x repeat) per estimator call for flat data (B, D): a row of the toy's 2-D points costs the MLP
# little, and few large calls keep its in-run evaluation (64 draws of 2000 points) fast.
FLAT_ROWS_PER_CALL = 50_000


def repeated_mean(estimate, x, repeats, chunk=None):
    """The mean of `repeats` independent estimates per example, (B,).

    The repeats are rows of a tiling of x (B, ...) (example i at rows i, i + B, ...), built call by call so
    that one call of `estimate` serves several repeats; at most `chunk` rows go into one call. Peak memory is
    that of one call, whatever `repeats` is. Default chunk: one batch (B rows) for images (B, C, H, W), whose
    network and backward pass cost memory per row; max(B, FLAT_ROWS_PER_CALL) for flat data (B, D).
    """
    B = x.shape[0]
    if chunk is None:
        chunk = B if x.dim() > 2 else max(B, FLAT_ROWS_PER_CALL)
    rows, parts = repeats * B, []
    for start in range(0, rows, chunk):
        parts.append(estimate(x[torch.arange(start, min(start + chunk, rows), device=x.device) % B]))
    return torch.cat(parts).view(repeats, B).mean(0)


class ODELikelihood:
    """x (B, ...) -> log p(x) (B,) along the probability-flow ODE (lib.likelihood.ode_log_likelihood).

    vtype=None: exact divergence (low dimension); 'rademacher' / 'gaussian': one Hutchinson probe per
    example and solve, drawn from `generator` (on x's device). Appends each solve's NFE to `.nfe` and its
    number of examples to `.sizes`. One solve per call: memory is that of the batch.
    """

    def __init__(self, gen_sde, rtol=1e-5, atol=1e-5, method="dopri5", vtype=None, generator=None):
        self.gen_sde, self.rtol, self.atol, self.method = gen_sde, rtol, atol, method
        self.vtype, self.generator = vtype, generator
        self.nfe, self.sizes = [], []

    def __call__(self, x):
        log_p, nfe = ode_log_likelihood(self.gen_sde, x, rtol=self.rtol, atol=self.atol, method=self.method,
                                        vtype=self.vtype, generator=self.generator)
        self.nfe.append(nfe)
        self.sizes.append(x.shape[0])
        return log_p

    def mean_nfe(self):
        """The mean NFE per example: each solve's NFE weighted by its batch size, so that a short last batch
        counts for its few examples, not as much as a full one."""
        return sum(n * b for n, b in zip(self.nfe, self.sizes)) / sum(self.sizes)


def test_set_bits_per_dim(log_likelihood, loader, real, device, seed=(0,), rank=0, world_size=1, with_noise=False):
    """Per-example bits/dim over this rank's test batches, gathered from every rank: (N,) float64 on the CPU.

    with_noise: log_likelihood returns (log p (B,), its estimator's variance (B,)) (e.g. stratified_elbo), and
    the result is (bits/dim (N,), the variance of each image's bits/dim estimate (N,)).

    loader: lib.image_data.test_loader for (rank, world_size), yielding (k, label) batches; its i-th
    batch is global batch j = rank + i * world_size. real: whether the model runs in logit space.
    Batch j draws its dequantisation noise from a
    generator seeded by (*seed, j, 1) and reseeds torch's global RNG (the ELBO's times, noise and probes)
    from (*seed, j, 0), so every example gets the same value whatever the number of ranks and whatever
    batches come before it. seed: a tuple of non-negative integers (e.g. (seed, stream, iteration)).
    """
    parts, noise = [], []

    def value(z):
        if not with_noise:
            return log_likelihood(z)
        log_p, variance = log_likelihood(z)
        noise.append(variance.double() / (z[0].numel() * math.log(2.0)) ** 2)  # nats^2 -> (bits/dim)^2
        return log_p

    for i, (k, _) in enumerate(loader):
        j = rank + i * world_size
        torch.manual_seed(derived_seed(*seed, j, 0))
        g = torch.Generator(device=device).manual_seed(derived_seed(*seed, j, 1))
        parts.append((j, batch_bits_per_dim(value, k.to(device), real, g)))
    if world_size == 1 and not parts:
        raise ValueError("the test loader yielded no images")
    bpd = gather_in_order(parts, world_size)
    if not with_noise:
        return bpd
    return bpd, gather_in_order([(j, v) for (j, _), v in zip(parts, noise)], world_size)


test_set_bits_per_dim.__test__ = False  # not a test: keeps pytest from collecting it where a test imports it


def mean_and_stderr(values):
    """Mean and standard error std / sqrt(N) (sample std, N - 1) as floats.

    values: a tensor of any shape, or a sequence of tensors / numbers (e.g. per-batch results),
    all pooled. One value gives a nan standard error.
    """
    if isinstance(values, torch.Tensor):
        flat = values.reshape(-1)
    else:
        parts = [torch.as_tensor(v).reshape(-1) for v in values]
        flat = torch.cat(parts) if parts else torch.empty(0)
    flat = flat.detach().double()
    n = flat.numel()
    if n == 0:
        raise ValueError("mean_and_stderr needs at least one value")
    stderr = (flat.std() / math.sqrt(n)).item() if n > 1 else float("nan")
    return flat.mean().item(), stderr


def summarize(name, values, reference=None):
    """{name: mean, name_std_err: std / sqrt(N)} of per-example values (N,); with `reference` (N,), e.g.
    the true log-likelihood of the same examples, also the paired gap values - reference
    ({name}_gap, {name}_gap_std_err), whose standard error is small when the two move together."""
    values = values.double().cpu()
    mean, se = mean_and_stderr(values)
    out = {name: mean, f"{name}_std_err": se}
    if reference is not None:
        gap, gap_se = mean_and_stderr(values - reference.double().cpu())
        out.update({f"{name}_gap": gap, f"{name}_gap_std_err": gap_se})
    return out


def summary_with_noise(name, values, noise=None, reference=None):
    """summarize(name, values, reference), and with noise (N,), each value's estimator variance, also
    {name}_estimator_std_err = sqrt(mean(noise) / N): how much of the standard error of the mean over examples
    is the estimator's own noise (the rest is the spread of the examples themselves)."""
    report = summarize(name, values, reference)
    if noise is not None:
        report[f"{name}_estimator_std_err"] = (noise.double().mean() / noise.numel()).sqrt().item()
    return report


def sliced_wasserstein(x, y, num_projections=256, generator=None, p=2):
    """Sliced p-Wasserstein distance between the empirical distributions of x (N, D) and y (M, D), 0-d tensor.

    SW_p = (E_theta W_p^p(theta . x, theta . y))^(1/p), theta uniform on the unit sphere, averaged over
    `num_projections` directions drawn from `generator` (a CPU generator; fix its seed for a
    reproducible metric). The 1-D distances are exact: W_p^p = int_0^1 |F^-1(u) - G^-1(u)|^p du
    with both quantile functions piecewise constant, integrated over the union of their breakpoints,
    so N and M may differ. Computed in float64 on x's device.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"expected point sets (N, D) and (M, D), got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] == 0 or y.shape[0] == 0:
        raise ValueError("sliced_wasserstein needs at least one point in each set")
    n, m = x.shape[0], y.shape[0]
    theta = torch.randn(x.shape[1], num_projections, generator=generator, dtype=torch.float64)
    theta = (theta / theta.norm(dim=0)).to(x.device)  # (D, L), unit columns
    px = torch.sort(x.double() @ theta, dim=0).values  # (N, L), sorted: the quantile function's values
    py = torch.sort(y.to(x.device).double() @ theta, dim=0).values  # (M, L)
    # k / n is correctly rounded, so breakpoints shared by both grids (1/2 = 2/4) coincide exactly.
    u = torch.unique(torch.cat([torch.arange(1, n + 1, dtype=torch.float64) / n,
                                torch.arange(1, m + 1, dtype=torch.float64) / m])).to(x.device)  # (K,), ends at 1
    widths = torch.diff(u, prepend=u.new_zeros(1))
    mid = u - widths / 2
    ix = (mid * n).long().clamp(max=n - 1)
    iy = (mid * m).long().clamp(max=m - 1)
    cost = ((px[ix] - py[iy]).abs().pow(p) * widths[:, None]).sum(0)  # (L,) W_p^p per direction
    return cost.mean().pow(1.0 / p)
