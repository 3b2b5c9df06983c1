"""The debiasing time distribution q(s) prop. to g^2 / sigma^2 and its uniform sibling, against closed forms."""
import math

import pytest
import torch
from scipy import stats

from lib.sdes import PluginReverseSDE, SubVariancePreservingSDE, VariancePreservingSDE
from lib.time_sampling import SubVPImportanceTimeSampler, UniformTimeSampler, VPImportanceTimeSampler

SCHEDULES = [
    dict(beta_min=0.1, beta_max=20.0, T=1.0, t_epsilon=1e-3),  # the default
    dict(beta_min=0.5, beta_max=12.0, T=1.0, t_epsilon=1e-3),
    dict(beta_min=0.1, beta_max=20.0, T=0.5, t_epsilon=1e-2),
    dict(beta_min=1.0, beta_max=5.0, T=2.0, t_epsilon=1e-4),
    dict(beta_min=3.0, beta_max=3.0, T=1.0, t_epsilon=1e-3),  # constant beta: the quadratic degenerates
]


def unnormalised_q(s, beta_min, beta_max, T, t_epsilon, sub_vp=False):
    """g^2 / sigma^2, flat below t_epsilon, written out independently of the library:
    VP beta / (1 - exp(-B)); sub-VP beta (1 - exp(-2B)) / (1 - exp(-B))^2."""
    s = s.clamp(min=t_epsilon)
    beta = beta_min + (beta_max - beta_min) * s
    B = beta_min * s + 0.5 * (beta_max - beta_min) * s ** 2
    if sub_vp:
        return beta * (1 - torch.exp(-2 * B)) / (1 - torch.exp(-B)) ** 2
    return beta / (1 - torch.exp(-B))


SAMPLERS = [VPImportanceTimeSampler, SubVPImportanceTimeSampler]


def integrate(fn, lo, hi, n=200_001):
    """Trapezoid rule; nodes geometrically spaced when lo > 0 since q is steepest just above t_epsilon."""
    if lo > 0:
        s = torch.logspace(math.log10(lo), math.log10(hi), n, dtype=torch.float64)
    else:
        s = torch.linspace(lo, hi, n, dtype=torch.float64)
    return torch.trapezoid(fn(s), s)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("cfg", SCHEDULES)
def test_density_matches_g2_over_sigma2_and_integrates_to_one(cfg, sampler):
    q = sampler(**cfg)
    eps, T = cfg["t_epsilon"], cfg["T"]
    # Split at t_epsilon where q has a kink; the integrand is steep right above it.
    total = integrate(q.density, 0.0, eps) + integrate(q.density, eps, T)
    assert total.item() == pytest.approx(1.0, abs=1e-6)
    s = torch.linspace(0, T, 1001, dtype=torch.float64)[1:]
    ratio = q.density(s) / unnormalised_q(s, **cfg, sub_vp=sampler is SubVPImportanceTimeSampler)
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-9)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("cfg", SCHEDULES)
def test_cdf_is_the_integral_of_the_density(cfg, sampler):
    q = sampler(**cfg)
    eps, T = cfg["t_epsilon"], cfg["T"]
    for point in [0.5 * eps, 3 * eps, 0.3 * T, T]:
        lo = min(point, eps)
        numeric = integrate(q.density, 0.0, lo) + (integrate(q.density, eps, point) if point > eps else 0.0)
        assert q.cdf(torch.tensor(point, dtype=torch.float64)).item() == pytest.approx(float(numeric), abs=1e-7)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("cfg", SCHEDULES)
def test_cdf_inverts_icdf(cfg, sampler):
    q = sampler(**cfg)
    u = torch.cat([torch.tensor([0.0, 1e-12, 1e-6, 1.0]), torch.linspace(0, 1, 10_001)]).double()
    assert torch.allclose(q.cdf(q.icdf(u)), u, atol=1e-12)
    s = torch.linspace(0, cfg["T"], 1001, dtype=torch.float64)
    assert torch.allclose(q.icdf(q.cdf(s)), s, atol=1e-9)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("cfg", SCHEDULES)
def test_samples_pass_kolmogorov_smirnov_and_stay_in_range(cfg, sampler):
    q = sampler(**cfg)
    s, density = q.sample((20_000,), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert s.min() >= 0 and s.max() <= cfg["T"]
    assert torch.allclose(density, q.density(s))
    ks = stats.kstest(s.numpy(), lambda v: q.cdf(torch.from_numpy(v)).numpy())
    # Under H0, sqrt(n) * D exceeds 1.95 with probability ~0.001.
    assert ks.statistic * len(s) ** 0.5 < 1.95, ks


def test_ks_detects_a_wrong_schedule():
    """The KS check above can fail: samples from (0.1, 20) are rejected under the CDF of (0.5, 12)."""
    s, _ = VPImportanceTimeSampler(0.1, 20.0).sample((20_000,), generator=torch.Generator().manual_seed(0))
    wrong = VPImportanceTimeSampler(0.5, 12.0)
    ks = stats.kstest(s.double().numpy(), lambda v: wrong.cdf(torch.from_numpy(v)).numpy())
    assert ks.statistic * len(s) ** 0.5 > 1.95


def test_each_sde_samples_its_own_importance_density():
    for sde, sampler in ((VariancePreservingSDE(0.5, 12.0), VPImportanceTimeSampler),
                         (SubVariancePreservingSDE(0.5, 12.0), SubVPImportanceTimeSampler)):
        assert type(sde.importance_time_sampler()) is sampler


def test_sde_uses_its_own_parameters_for_the_debiasing_sampler():
    sde = VariancePreservingSDE(beta_min=0.5, beta_max=12.0, T=0.7, t_epsilon=1e-2)
    s = sde.sample_debiasing_t([50_000, 1])
    assert s.shape == (50_000, 1) and s.max() <= 0.7
    q = VPImportanceTimeSampler(0.5, 12.0, 0.7, 1e-2)
    ks = stats.kstest(s.flatten().double().numpy(), lambda v: q.cdf(torch.from_numpy(v)).numpy())
    assert ks.statistic * len(s) ** 0.5 < 1.95


def test_float32_samples_are_never_exactly_zero_variance():
    sde = VariancePreservingSDE()
    s = sde.sample_debiasing_t((100_000,), dtype=torch.float32)
    assert (sde.var(s) > 0).all()


def test_uniform_sampler():
    u = UniformTimeSampler(T=2.0)
    s, density = u.sample((20_000,), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.all(density == 0.5)
    ks = stats.kstest(s.numpy(), stats.uniform(0, 2.0).cdf)
    assert ks.statistic * len(s) ** 0.5 < 1.95


@pytest.mark.parametrize("kwargs", [dict(T=0.0), dict(T=-1.0), dict(beta_min=2.0, beta_max=1.0),
                                    dict(t_epsilon=2.0), dict(beta_min=0.0)])
def test_bad_parameters_are_rejected(kwargs):
    with pytest.raises(ValueError):
        VPImportanceTimeSampler(**kwargs)


# --- stratified draws (the training loss's times) ---------------------------------------------------------


@pytest.mark.parametrize("sampler", [VPImportanceTimeSampler(0.5, 12.0, 1.0, 1e-3),
                                     SubVPImportanceTimeSampler(0.1, 20.0, 1.0, 1e-3), UniformTimeSampler(2.0)])
def test_stratified_times_fall_one_in_each_stratum_and_each_alone_follows_the_density(sampler):
    g = torch.Generator().manual_seed(3)
    n = 16
    s, density = sampler.sample_stratified(n, generator=g, dtype=torch.float64)
    assert s.shape == density.shape == (n,) and torch.equal(density, sampler.density(s))
    strata = torch.floor(sampler.cdf(s) * n).long()
    assert torch.equal(torch.sort(strata).values, torch.arange(n))
    # Position 5 over many batches (KS at the 0.001 level, as above); a fixed order of strata would fail it.
    draws = torch.stack([sampler.sample_stratified(n, generator=g, dtype=torch.float64)[0][5] for _ in range(4000)])
    ks = stats.kstest(draws.numpy(), lambda v: sampler.cdf(torch.from_numpy(v)).numpy())
    assert ks.statistic * len(draws) ** 0.5 < 1.95, ks


def test_a_stratified_batch_mean_has_the_variance_of_stratified_sampling():
    """For h = cdf(s), u = cdf(s) is uniform inside each stratum of width 1/n: the batch mean's variance is
    n * (1/n^2) / 12 / n^2 = 1 / (12 n^3), against 1 / (12 n) for independent draws. Over M = 4000 batches the
    sample variance has relative standard error sqrt(2 / M) (times sqrt(1 + kurtosis excess / 2) < 1 for sums
    of uniforms) = 0.022: 5 of them is 0.11."""
    sampler = VPImportanceTimeSampler()
    g = torch.Generator().manual_seed(4)
    n, m = 16, 4000
    means = torch.stack([sampler.cdf(sampler.sample_stratified(n, generator=g, dtype=torch.float64)[0]).mean()
                         for _ in range(m)])
    assert means.var().item() * 12 * n ** 3 == pytest.approx(1.0, abs=0.11)


def test_the_training_loss_draws_its_times_stratified():
    times = []

    def drift(y, s):
        times.append(s)
        return torch.zeros_like(y)

    for debias in (False, True):
        gen = PluginReverseSDE(VariancePreservingSDE(), drift, 1.0, debias=debias)
        gen.dsm(torch.randn(32, 2, dtype=torch.float64))
        strata = torch.floor(gen.time_sampler.cdf(times[-1].double()) * 32).long()
        assert torch.equal(torch.sort(strata).values, torch.arange(32)), debias
