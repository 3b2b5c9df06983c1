"""The 2-D swiss roll: sampler statistics against closed forms, and the quadrature
log density against independent references (Monte Carlo over t, adaptive
Gauss-Kronrod quadrature, normalisation on a grid, a 4x finer rule)."""
import math

import numpy as np
import pytest
import torch
from scipy import integrate

from lib.swiss_roll import (
    T_MAX,
    T_MIN,
    diffused_swiss_roll_score,
    quadrature_rule,
    sample_swiss_roll,
    swiss_roll_log_density,
)

A, B = 1.5 * math.pi, 4.5 * math.pi  # written out again, independently of the library


def curve(t):
    """c(t) = (t cos t, t sin t) / 10 for a float64 tensor t -> (..., 2)."""
    return torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=-1) / 10.0


def unit_normal(t):
    """Unit normal to the curve at t (c'(t) rotated by 90 degrees)."""
    d = torch.stack([torch.cos(t) - t * torch.sin(t), torch.sin(t) + t * torch.cos(t)], dim=-1)
    d = d / d.norm(dim=-1, keepdim=True)
    return torch.stack([-d[..., 1], d[..., 0]], dim=-1)


def unit_tangent(t):
    d = torch.stack([torch.cos(t) - t * torch.sin(t), torch.sin(t) + t * torch.cos(t)], dim=-1)
    return d / d.norm(dim=-1, keepdim=True)


def assert_max_abs_diff(a, b, tol):
    """max |a - b| <= tol with matching shapes (torch.testing pulls in torch.distributed: slow import)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err <= tol, f"max |diff| = {err:.3e} > {tol:.1e}"


def test_constants():
    assert T_MIN == pytest.approx(A, abs=1e-15) and T_MAX == pytest.approx(B, abs=1e-15)


# ----------------------------------------------------------------------------- sampler


def test_sampler_shape_dtype_reproducible_and_no_global_rng():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    x1 = sample_swiss_roll(1000, generator=torch.Generator().manual_seed(7))
    x2 = sample_swiss_roll(1000, generator=torch.Generator().manual_seed(7))
    x3 = sample_swiss_roll(1000, generator=torch.Generator().manual_seed(8))
    assert x1.shape == (1000, 2) and x1.dtype == torch.float32
    assert torch.isfinite(x1).all()
    assert torch.equal(x1, x2)
    assert not torch.allclose(x1, x3)
    # The global torch RNG was not consumed when a generator was given.
    assert torch.equal(torch.get_rng_state(), state)
    assert sample_swiss_roll(0, generator=torch.Generator().manual_seed(0)).shape == (0, 2)
    # noise = 0 puts every point exactly on the curve, inside radius [A, B] / 10.
    r = sample_swiss_roll(5000, noise=0.0, generator=torch.Generator().manual_seed(1)).double().norm(dim=1)
    assert r.min() >= A / 10 - 1e-6 and r.max() <= B / 10 + 1e-6


def closed_form_moments(noise):
    """E[x_0], E[x_1], E[|x|^2] for t ~ U[A, B], x = (c(t) * 10 + noise * eps) / 10.

    Antiderivatives: int t cos t = t sin t + cos t; int t sin t = sin t - t cos t;
    int t^2 = t^3 / 3. The noise is zero-mean and adds 2 noise^2 to E|10 x|^2.
    """
    L = B - A
    e_tcos = ((B * math.sin(B) + math.cos(B)) - (A * math.sin(A) + math.cos(A))) / L
    e_tsin = ((math.sin(B) - B * math.cos(B)) - (math.sin(A) - A * math.cos(A))) / L
    e_t2 = (B ** 3 - A ** 3) / (3 * L)
    return e_tcos / 10, e_tsin / 10, (e_t2 + 2 * noise ** 2) / 100


@pytest.mark.parametrize("noise", [0.1, 0.5, 2.0])
def test_sampler_moments_match_closed_form(noise):
    """Sample means of x_0, x_1, |x|^2 within 5 standard errors of the closed forms.

    With n = 1e6 the standard errors are about 1e-3 for E|x|^2 and 7e-4 for the
    means (e.g. E[x_0] = 0.2, E[x_1] = 2 / (30 pi) = 0.0212, E|x|^2 = 0.9623 +
    noise^2 / 50); noise = 2 moves E|x|^2 by 0.08 = 80 standard errors, and a wrong
    t range moves the means by far more, so both would be caught.
    """
    n = 1_000_000
    x = sample_swiss_roll(n, noise=noise, generator=torch.Generator().manual_seed(2024)).double()
    m0, m1, m2 = closed_form_moments(noise)
    assert m0 == pytest.approx(0.2, abs=1e-12)  # sanity of the antiderivatives: 6 pi / 3 pi / 10
    assert m1 == pytest.approx(2 / (30 * math.pi), abs=1e-12)
    stats = [(x[:, 0], m0), (x[:, 1], m1), (x.square().sum(dim=1), m2)]
    for values, expected in stats:
        se = values.std().item() / math.sqrt(n)
        z = (values.mean().item() - expected) / se
        assert abs(z) < 5.0, (noise, values.mean().item(), expected, z)


# ----------------------------------------------------------------------------- density


def test_invalid_noise_raises():
    x = torch.zeros(3, 2)
    for bad in [0.0, -0.5, float("nan"), float("inf")]:
        with pytest.raises(ValueError, match=r"\(0, inf\)"):
            swiss_roll_log_density(x, noise=bad)
    with pytest.raises(ValueError):
        sample_swiss_roll(10, noise=-0.1)
    with pytest.raises(ValueError):
        swiss_roll_log_density(torch.zeros(3, 3))


def test_density_shapes_dtypes_chunking_and_far_points():
    g = torch.Generator().manual_seed(3)
    x = sample_swiss_roll(300, generator=g)
    ref = swiss_roll_log_density(x)
    assert ref.shape == (300,) and ref.dtype == torch.float64
    # float32 and float64 inputs, chunking, and leading shapes give the same numbers.
    assert_max_abs_diff(swiss_roll_log_density(x.double()), ref, 1e-12)
    assert_max_abs_diff(swiss_roll_log_density(x, chunk_size=7), ref, 1e-12)
    assert_max_abs_diff(swiss_roll_log_density(x.reshape(3, 100, 2)), ref.reshape(3, 100), 1e-12)
    # Far from the roll: finite and very negative, no underflow to -inf.
    far = swiss_roll_log_density(torch.tensor([[5.0, 5.0], [-20.0, 3.0]]), noise=0.1)
    assert torch.isfinite(far).all() and (far < -1e4).all()
    # The weights integrate constants exactly: sum w = B - A.
    _, log_w = quadrature_rule(0.5)
    assert log_w.exp().sum().item() == pytest.approx(B - A, rel=1e-13)


def near_roll_points(noise, n_points, seed):
    """Points on and within ~2 tau of the roll, spread along its whole length."""
    rng = np.random.default_rng(seed)
    tau = noise / 10
    t0 = torch.linspace(A + 0.3, B - 0.3, n_points, dtype=torch.float64)
    offsets = torch.from_numpy(rng.uniform(-2.0, 2.0, size=n_points)) * tau
    offsets[::4] = 0.0  # exactly on the curve
    return curve(t0) + offsets[:, None] * unit_normal(t0)


@pytest.mark.parametrize("noise", [0.5, 1.0])
def test_log_density_matches_monte_carlo(noise):
    """log p against log of a plain Monte Carlo mean over t ~ U[A, B].

    p_hat = mean_j N(x; c(t_j), tau^2 I) with M = 1e6 draws; by the delta method
    log p_hat has standard error se(p_hat) / p_hat. On and near the roll roughly
    1% of the draws land inside the Gaussian bump, so this is ~1% for noise 0.5
    (less for 1.0). We require |z| < 4.5 for every one of the 20 points, i.e. an
    error of a few percent in p anywhere along the roll would be caught.
    """
    tau = noise / 10
    M = 1_000_000
    g = torch.Generator().manual_seed(99)
    t = A + (B - A) * torch.rand(M, generator=g, dtype=torch.float64)
    c = curve(t)
    x = near_roll_points(noise, 20, seed=5)
    truth = swiss_roll_log_density(x, noise=noise)
    zs, diffs = [], []
    for i in range(x.shape[0]):
        f = torch.exp(-(x[i] - c).square().sum(dim=1) / (2 * tau ** 2)) / (2 * math.pi * tau ** 2)
        p_hat = f.mean().item()
        se_log = f.std().item() / math.sqrt(M) / p_hat
        diff = math.log(p_hat) - truth[i].item()
        diffs.append(diff)
        zs.append(diff / se_log)
    zs = np.array(zs)
    print(f"noise={noise}: MC max|diff|={np.abs(diffs).max():.2e} nats, max|z|={np.abs(zs).max():.2f}")
    assert np.abs(zs).max() < 4.5, zs


def quad_log_density(x, noise):
    """log p(x) by scipy's adaptive Gauss-Kronrod (QUADPACK), written independently.

    The integrand is rescaled by its maximum over a dense t grid (log space), and
    [A, B] is cut into pieces about 4 bump widths wide (at the outer end) so that
    QUADPACK cannot step over a bump.
    """
    tau = noise / 10
    x0, x1 = float(x[0]), float(x[1])

    def f(t):
        return ((x0 - t * math.cos(t) / 10) ** 2 + (x1 - t * math.sin(t) / 10) ** 2) / (2 * tau ** 2)

    tt = np.linspace(A, B, 400_001)
    f_min = (((x0 - tt * np.cos(tt) / 10) ** 2 + (x1 - tt * np.sin(tt) / 10) ** 2) / (2 * tau ** 2)).min()
    width = 4 * tau * 10 / math.sqrt(1 + B ** 2)
    edges = np.linspace(A, B, int(math.ceil((B - A) / width)) + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        val, _ = integrate.quad(lambda t: math.exp(f_min - f(t)), lo, hi, epsabs=0.0, epsrel=1e-11, limit=200)
        total += val
    return math.log(total) - f_min - math.log(B - A) - math.log(2 * math.pi * tau ** 2)


@pytest.mark.parametrize("noise", [0.1, 0.5])
def test_log_density_matches_adaptive_quadrature(noise):
    """To 1e-6 nats, on the roll, between the arms, off the ends and well outside."""
    tau = noise / 10
    t_on = torch.tensor([A + 0.01, 7.0, 10.3, B - 0.02], dtype=torch.float64)
    pts = [curve(t_on) + tau * unit_normal(t_on) * torch.tensor([[0.5], [-1.0], [0.0], [1.5]], dtype=torch.float64)]
    ends = torch.tensor([A, B], dtype=torch.float64)
    # Beyond either end along the tangent: the integrand is a steep truncated exponential.
    pts.append(curve(ends) + torch.tensor([[-0.3], [0.25]], dtype=torch.float64) * unit_tangent(ends))
    pts.append(torch.tensor([[0.0, 0.0], [0.31, -0.2], [1.6, 1.6], [-1.9, 0.4]], dtype=torch.float64))
    x = torch.cat(pts)
    ours = swiss_roll_log_density(x, noise=noise)
    ref = torch.tensor([quad_log_density(xi, noise) for xi in x], dtype=torch.float64)
    print(f"noise={noise}: max|ours - QUADPACK| = {(ours - ref).abs().max().item():.2e} nats")
    assert_max_abs_diff(ours, ref, 1e-6)


@pytest.mark.parametrize("noise", [0.3, 0.5, 1.0])
def test_density_integrates_to_one(noise):
    """Riemann sum of p on a grid with spacing h = tau / 1.5 over the roll's bounding box +- 12 tau.

    p is a measure convolved with N(0, tau^2 I), so its Fourier transform decays
    like exp(-tau^2 |k|^2 / 2) and the Riemann sum's aliasing error is about
    exp(-2 pi^2 tau^2 / h^2) = exp(-44) ~ 1e-19; the mass outside the box is below
    exp(-72). The sum therefore equals the integral of the *computed* density up to
    ~1e-18, and its distance from 1 measures the quadrature's normalisation error
    (tolerance 1e-6; a density off by a constant factor, or missing part of the
    roll, fails by orders of magnitude).
    """
    tau = noise / 10
    h = tau / 1.5
    c = curve(torch.linspace(A, B, 100_001, dtype=torch.float64))
    lo = c.min(dim=0).values - 12 * tau
    hi = c.max(dim=0).values + 12 * tau
    gx = torch.arange(lo[0].item(), hi[0].item() + h, h, dtype=torch.float64)
    gy = torch.arange(lo[1].item(), hi[1].item() + h, h, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="ij"), dim=-1).reshape(-1, 2)
    total = swiss_roll_log_density(grid, noise=noise).exp().sum().item() * h * h
    print(f"noise={noise}: grid integral = {total:.12f} (|1 - I| = {abs(total - 1):.1e})")
    assert abs(total - 1.0) < 1e-6


@pytest.mark.parametrize("noise", [0.1, 0.5])
def test_default_rule_agrees_with_4x_finer_rule(noise):
    """Default rule vs 4x the panels, to 1e-5 nats, on a grid of [-2, 2]^2 plus samples."""
    g = torch.linspace(-2.0, 2.0, 41, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), dim=-1).reshape(-1, 2)
    samples = sample_swiss_roll(500, noise=noise, generator=torch.Generator().manual_seed(11)).double()
    x = torch.cat([grid, samples])
    coarse = swiss_roll_log_density(x, noise=noise)
    fine = swiss_roll_log_density(x, noise=noise, refine=4)
    t_c, _ = quadrature_rule(noise)
    t_f, _ = quadrature_rule(noise, refine=4)
    assert t_f.numel() > 2.5 * t_c.numel()
    diff = (coarse - fine).abs().max().item()
    print(f"noise={noise}: {t_c.numel()} vs {t_f.numel()} nodes, max|diff| = {diff:.2e} nats")
    assert diff < 1e-5


# ----------------------------------------------------------------------------- diffused score


@pytest.mark.parametrize("alpha, var", [(1.0, 0.0), (0.9, 0.05), (0.3, 0.9)])
def test_diffused_score_is_the_gradient_of_the_diffused_log_density(alpha, var):
    """alpha x + sqrt(var) eps is alpha times a swiss roll of noise 10 sqrt(tau^2 + var / alpha^2), so
    log p_s(y) = log p_{noise'}(y / alpha) - 2 log alpha; compare the score with its central differences."""
    noise = 0.5
    noise_eff = 10 * math.sqrt((noise / 10) ** 2 + var / alpha ** 2)
    y = sample_swiss_roll(64, noise, torch.Generator().manual_seed(3)).double() * alpha
    y = y + 0.1 * torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    h = 1e-5
    fd = torch.stack([(swiss_roll_log_density((y + h * e) / alpha, noise_eff)
                       - swiss_roll_log_density((y - h * e) / alpha, noise_eff)) / (2 * h)
                      for e in torch.eye(2, dtype=torch.float64)], dim=1)
    score = diffused_swiss_roll_score(y, torch.full((64,), alpha), torch.full((64,), var), noise)
    assert_max_abs_diff(score, fd, 1e-4 * fd.abs().max().item())
