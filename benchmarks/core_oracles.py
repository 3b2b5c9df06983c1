"""Print the core library's oracle figures: Gaussian-data ELBO bias, DSM z-scores, time-sampler KS statistics.

    python benchmarks/core_oracles.py [--reps 20000] [--dsm_samples 1000000] [--seed 0]

Everything is compared with a closed form (lib/oracles.py); the unit tests assert the same
properties with smaller samples. Each z is one draw of N(0, 1) when all is well, so among the dozen
printed a |z| near 3 turns up now and then: the DSM z = +2.89 once printed for beta=(0.1, 20),
debias=True was one (150 further seeds of 2e5 samples: mean z +0.03, sd 0.94, Kolmogorov-Smirnov p = 0.79
against N(0, 1); the closed form agrees with scipy's quad and with the midpoint rule in u = CDF(s),
printed as "check", to 1e-10). The figures also go to benchmarks/results/core_oracles.json (--json PATH).
"""
import argparse
import math
import os
import sys

import torch
from scipy import stats

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from report import add_json_arg, write_json  # noqa: E402

from lib.oracles import GaussianDrift, expected_dsm_given_s, expected_elbo  # noqa: E402
from lib.sdes import PluginReverseSDE, VariancePreservingSDE  # noqa: E402

SCHEDULES = [(0.1, 20.0), (0.5, 12.0)]


def elbo_bias(beta, vtype, reps, estimator="elbo_random_t_slice", d=2, mean=0.5, std=0.6):
    sde = VariancePreservingSDE(*beta)
    gen = PluginReverseSDE(sde, GaussianDrift(sde, mean, std), sde.T, vtype=vtype).eval()
    x = mean + std * torch.randn(16, d, dtype=torch.float64)
    elbo = getattr(gen, estimator)(x.repeat(reps, 1)).view(reps, 16)
    err = (elbo - expected_elbo(sde, x, mean, std)) / d
    return err.mean().item(), err.std().item() / math.sqrt(err.numel())


def dsm_z(beta, debias, n, d=2, mean=0.5, std=0.3):
    sde = VariancePreservingSDE(*beta)
    gen = PluginReverseSDE(sde, GaussianDrift(sde, mean, std), sde.T, debias=debias)
    loss = gen.dsm(mean + std * torch.randn(n, d, dtype=torch.float64))
    s = torch.cat([torch.linspace(0, sde.t_epsilon, 2001, dtype=torch.float64)[:-1],
                   torch.logspace(math.log10(sde.t_epsilon), math.log10(sde.T), 200_001, dtype=torch.float64)])
    expected = torch.trapezoid(expected_dsm_given_s(sde, s, d, std) * gen.time_sampler.density(s), s).item()
    # Cross-check free of the density's steepness: E = int_0^1 E[dsm | s = icdf(u)] du, midpoint rule in u.
    u = (torch.arange(2_000_000, dtype=torch.float64) + 0.5) / 2_000_000
    in_u = expected_dsm_given_s(sde, gen.time_sampler.icdf(u), d, std).mean().item()
    return loss.mean().item(), expected, in_u, (loss.mean().item() - expected) / (loss.std().item() / math.sqrt(n))


def ks(beta, T, t_eps, n):
    q = VariancePreservingSDE(*beta, T=T, t_epsilon=t_eps).importance_time_sampler()
    s, _ = q.sample((n,), dtype=torch.float64)
    res = stats.kstest(s.numpy(), lambda v: q.cdf(torch.from_numpy(v)).numpy())
    return res.statistic, res.pvalue


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=20_000, help="ELBO repeats per data point (16 points)")
    p.add_argument("--dsm_samples", type=int, default=1_000_000, help="DSM losses averaged per configuration")
    p.add_argument("--seed", type=int, default=0)
    add_json_arg(p, "core_oracles")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    figures = {"elbo_bias_nats_per_dim": [], "dsm": [], "time_sampler_ks": []}

    print("ELBO minus closed form, Gaussian data, d=2, nats/dim")
    for estimator in ("elbo_random_t_slice", "elbo"):
        for beta in SCHEDULES:
            for vtype in ("rademacher", "gaussian"):
                bias, se = elbo_bias(beta, vtype, args.reps, estimator)
                figures["elbo_bias_nats_per_dim"].append(dict(estimator=estimator, beta=beta, vtype=vtype, bias=bias,
                                                              stderr=se, z=bias / se))
                print(f"  {estimator:19s}  beta={beta}  {vtype:10s}  bias {bias:+.5f} +- {se:.5f}  "
                      f"(z = {bias / se:+.2f})")
    print(f"DSM mean loss vs closed form, {args.dsm_samples:.0e} samples "
          "(closed form: trapezoid in s; check: midpoint in u = CDF(s))")
    for beta in SCHEDULES:
        for debias in (False, True):
            got, want, in_u, z = dsm_z(beta, debias, args.dsm_samples)
            figures["dsm"].append(dict(beta=beta, debias=debias, samples=args.dsm_samples, mean=got, closed_form=want,
                                       check_minus_closed_form=in_u - want, z=z))
            print(f"  beta={beta}  debias={debias!s:5s}  mean {got:.5f}  closed form {want:.7f} "
                  f"(check {in_u - want:+.1e})  z = {z:+.2f}")
    print("Debiasing time sampler, Kolmogorov-Smirnov against the closed-form CDF, 1e5 samples")
    for beta, T, t_eps in [((0.1, 20.0), 1.0, 1e-3), ((0.5, 12.0), 1.0, 1e-3), ((0.1, 20.0), 0.5, 1e-2)]:
        D, pval = ks(beta, T, t_eps, 100_000)
        print(f"  beta={beta}  T={T}  t_eps={t_eps}  D = {D:.5f}  p = {pval:.3f}")
        figures["time_sampler_ks"].append(dict(beta=beta, T=T, t_epsilon=t_eps, samples=100_000, D=D, p=pval))
    write_json("core_oracles", figures, args)


if __name__ == "__main__":
    main()
