"""Samplers against closed forms for Gaussian data N(m, s0^2 I), using the exact drift of tests/oracles.py.

With the exact drift every sampler should return the data distribution up to Monte Carlo error,
discretisation bias and the prior mismatch (p_T is N(alpha_T m, v_T I), not N(0, I)).
Tolerances are 4 Monte Carlo standard errors plus a bias budget stated next to each test.
"""
import math

import pytest
import torch

from lib.oracles import GaussianDrift
from lib.samplers import sample_lambda, sample_ode, sample_pc, tweedie_denoise
from lib.sdes import PluginReverseSDE, SubVariancePreservingSDE, VariancePreservingSDE

MEAN = torch.tensor([0.5, -0.3], dtype=torch.float64)
STD = 0.6
# 16000 2-D points: 32000 elements per tensor, below torch's intra-op grain (32768), so every op runs
# on one thread and the timing does not depend on thread contention on a busy machine.
N = 16_000
SE_MEAN = STD / math.sqrt(N)  # 0.0047
SE_STD = STD / math.sqrt(2 * N)  # 0.0034, the large-N standard error of a Gaussian sample std
NUM_STEPS = 500


def gaussian_gen_sde(mean=MEAN, std=STD, T=1.0, sde_cls=VariancePreservingSDE):
    sde = sde_cls(T=T)
    return PluginReverseSDE(sde, GaussianDrift(sde, mean, std), T)


def prior_draw(n=N, seed=0, shape=(2,), dtype=torch.float64):
    return torch.randn(n, *shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def moment_errors(x):
    """Largest per-coordinate |sample mean - m| and |sample std - s0|."""
    return (x.mean(0) - MEAN).abs().max().item(), (x.std(0) - STD).abs().max().item()


def euler_moments(gen_sde, lmbd, num_steps):
    """The exact mean and std of sample_lambda's Euler chain for the Gaussian drift.

    mu_lambda is affine in y: mu = k y + h with k = beta/2 - (1 - lambda/2) g^2 / v and
    h = (1 - lambda/2) g^2 alpha m / v (all at s = T - t_i), so the chain stays Gaussian with
        M' = (1 + k dt) M + h dt,    V' = (1 + k dt)^2 V + (1 - lambda) g^2 dt,   M_0 = 0, V_0 = 1.
    """
    sde, T = gen_sde.base_sde, gen_sde.T
    dt = T / num_steps
    M, V = torch.zeros_like(MEAN), torch.tensor(1.0, dtype=torch.float64)
    for i in range(num_steps):
        s = torch.tensor(T - i * dt, dtype=torch.float64)
        beta, alpha, g2 = sde.beta(s), sde.mean_weight(s), sde.g2(s)
        v = alpha ** 2 * STD ** 2 + sde.var(s)
        k = beta / 2 - (1 - lmbd / 2) * g2 / v
        M = (1 + k * dt) * M + (1 - lmbd / 2) * g2 * alpha * MEAN / v * dt
        V = (1 + k * dt) ** 2 * V + (1 - lmbd) * g2 * dt
    return M, V.sqrt()


# --- Euler-Maruyama of the lambda family ---------------------------------------------------------

# Bias budget of the Euler chain at 500 steps, from euler_moments: at most 0.0017 in the mean
# (lambda = 1: the prior mismatch alpha_T m, carried deterministically to t = T) and 0.0009 in the std.
EULER_BIAS = 0.002


@pytest.mark.parametrize("sde_cls", [VariancePreservingSDE, SubVariancePreservingSDE])
@pytest.mark.parametrize("lmbd", [0.0, 0.5, 1.0])
def test_sample_lambda_reproduces_the_data_mean_and_std(lmbd, sde_cls):
    gen = gaussian_gen_sde(sde_cls=sde_cls)
    M, S = euler_moments(gen, lmbd, NUM_STEPS)
    assert (M - MEAN).abs().max() < EULER_BIAS and abs(S.item() - STD) < EULER_BIAS
    x = sample_lambda(gen, prior_draw(), NUM_STEPS, lmbd, generator=torch.Generator().manual_seed(1))
    err_mean, err_std = moment_errors(x)
    assert err_mean < 4 * SE_MEAN + EULER_BIAS, err_mean
    assert err_std < 4 * SE_STD + EULER_BIAS, err_std
    # The sharper statement: the samples follow the Euler chain's own law.
    assert (x.mean(0) - M).abs().max() < 4 * SE_MEAN
    assert (x.std(0) - S).abs().max() < 4 * SE_STD


def test_trajectory_holds_every_state_from_the_prior_draw_on():
    gen = gaussian_gen_sde(mean=0.2, std=0.5)
    y = prior_draw(3, shape=(1, 4, 4))
    x, states = sample_lambda(gen, y, 7, 0.5, return_trajectory=True, generator=torch.Generator().manual_seed(0))
    assert len(states) == 8
    assert all(state.shape == (3, 1, 4, 4) for state in states)
    assert torch.equal(states[0], y) and torch.equal(states[-1], x)


def test_lambda_one_is_deterministic_given_the_start():
    gen = gaussian_gen_sde()
    y = prior_draw(64)
    x1 = sample_lambda(gen, y, 50, 1.0, generator=torch.Generator().manual_seed(1))
    x2 = sample_lambda(gen, y, 50, 1.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(x1, x2)


def test_stochastic_samplers_reproduce_with_the_same_generator_only():
    gen = gaussian_gen_sde()
    y = prior_draw(64)
    runs = {seed: sample_lambda(gen, y, 50, 0.0, generator=torch.Generator().manual_seed(seed)) for seed in (1, 1, 2)}
    assert torch.equal(sample_lambda(gen, y, 50, generator=torch.Generator().manual_seed(1)), runs[1])
    assert not torch.allclose(runs[1], runs[2])
    pc = [sample_pc(gen, y, 20, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(pc[0], pc[1])


def test_samplers_keep_image_shapes_and_dtype():
    gen = gaussian_gen_sde(mean=0.1, std=0.8)
    y = prior_draw(3, shape=(2, 4, 4), dtype=torch.float32)
    outputs = [sample_lambda(gen, y, 20, 0.0, generator=torch.Generator().manual_seed(0)),
               sample_pc(gen, y, 20, generator=torch.Generator().manual_seed(0)),
               sample_ode(gen, y)[0]]
    for x in outputs:
        assert x.shape == (3, 2, 4, 4) and x.dtype == torch.float32 and torch.isfinite(x).all()


# --- predictor-corrector --------------------------------------------------------------------------

# Bias budget, measured with 400k samples at 500 steps (Monte Carlo se 0.0009 / 0.0007): with one
# Langevin step at snr = 0.16 the std is high by 0.007-0.009 whatever the predictor, and by the same
# at 1000 steps: unadjusted Langevin's stationary bias, relative ~ snr^2 (0.001 at snr = 0.05). Mean
# bias <= 0.002. The reverse-diffusion predictor alone: std +0.003; Euler-Maruyama alone: < 0.001.
PC_BIAS_MEAN, PC_BIAS_STD = 0.003, 0.010


@pytest.mark.parametrize("predictor", ["reverse_diffusion", "euler_maruyama"])
def test_pc_sampler_reproduces_the_data_mean_and_std(predictor):
    gen = gaussian_gen_sde()
    x = sample_pc(gen, prior_draw(), NUM_STEPS, predictor=predictor, generator=torch.Generator().manual_seed(2))
    err_mean, err_std = moment_errors(x)
    assert err_mean < 4 * SE_MEAN + PC_BIAS_MEAN, err_mean
    assert err_std < 4 * SE_STD + PC_BIAS_STD, err_std


def test_pc_sampler_runs_the_predictor_before_the_corrector():
    """Algorithm 1 of Song et al. (2021): predictor from s_i to s_{i+1}, then the corrector at s_{i+1}.

    The drift is evaluated at s_0 (predictor), s_1 (corrector), s_1 (predictor), s_2 (corrector), ...
    A corrector-first loop would start s_0, s_0.
    """
    sde = VariancePreservingSDE()
    drift = GaussianDrift(sde, 0.0, 0.5)
    seen = []

    def recording_drift(y, s):
        seen.append(s[0].item())
        return drift(y, s)

    gen = PluginReverseSDE(sde, recording_drift, 1.0)
    sample_pc(gen, prior_draw(4), 3, n_corrector=1, denoise=False, eps_end=0.25,
              generator=torch.Generator().manual_seed(0))
    assert seen == pytest.approx([1.0, 0.75, 0.75, 0.5, 0.5, 0.25])


# --- probability-flow ODE --------------------------------------------------------------------------


@pytest.mark.parametrize("sde_cls", [VariancePreservingSDE, SubVariancePreservingSDE])
@pytest.mark.parametrize("denoise", [False, True])
def test_ode_sampler_follows_the_closed_form_flow_map(denoise, sde_cls):
    """Along the probability flow of N(m, s0^2 I) data, (y_s - alpha(s) m) / sqrt(v(s)) is constant
    (v = alpha^2 s0^2 + sigma^2; equation (FLOW), derived in test_likelihood.py's docstring), so starting from y at
    s = T the sampler must return x = alpha(e) m + sqrt(v(e) / v(T)) (y - alpha(T) m) at s = e = eps_end,
    and after Tweedie's step E[x | y_e] = m + s0^2 alpha(e) / v(e) (x - alpha(e) m).
    sub-VP's flow is harder for dopri5's error control: at the default tolerance 1e-5 it lands 3e-3 off
    (VP: 4e-6), so it is checked at 1e-8, where it converges to the closed form (9e-9).
    """
    gen = gaussian_gen_sde(sde_cls=sde_cls)
    sde, drift = gen.base_sde, gen.a
    y = prior_draw()
    tol = 1e-5 if sde_cls is VariancePreservingSDE else 1e-8
    x, nfe = sample_ode(gen, y, rtol=tol, atol=tol, denoise=denoise)
    s_T, s_e = torch.tensor(gen.T, dtype=torch.float64), torch.tensor(1e-3, dtype=torch.float64)
    expected = sde.mean_weight(s_e) * MEAN + (drift.marginal_var(s_e) / drift.marginal_var(s_T)).sqrt() * (
        y - sde.mean_weight(s_T) * MEAN)
    if denoise:
        expected = MEAN + STD ** 2 * sde.mean_weight(s_e) / drift.marginal_var(s_e) * (
            expected - sde.mean_weight(s_e) * MEAN)
    assert (x - expected).abs().max() < 1e-4
    assert 10 < nfe < 250
    # Prior mismatch is the only bias: 0.6 alpha_T |m| ~ 0.002 in the mean; v(e) - s0^2 ~ 1e-4 in the std.
    err_mean, err_std = moment_errors(x)
    assert err_mean < 4 * SE_MEAN + 0.002 and err_std < 4 * SE_STD + 0.001


def test_tweedie_denoise_is_the_gaussian_posterior_mean():
    """For x ~ N(m, s0^2), y = alpha x + sigma eps: E[x | y] = m + s0^2 alpha / v (y - alpha m)."""
    gen = gaussian_gen_sde()
    y = prior_draw(8)
    s = torch.full((8,), 0.05, dtype=torch.float64)
    alpha, v = gen.base_sde.mean_weight(s)[:, None], gen.a.marginal_var(s)[:, None]
    expected = MEAN + STD ** 2 * alpha / v * (y - alpha * MEAN)
    assert torch.allclose(tweedie_denoise(gen, y, s), expected)
    assert torch.allclose(tweedie_denoise(gen, y, 0.05), expected)


# --- rejected options -------------------------------------------------------------------------------


def never_called_drift(y, s):
    raise AssertionError("the drift was evaluated before the arguments were checked")


@pytest.mark.parametrize("lmbd", [-0.1, 1.5, float("nan")])
def test_lambda_outside_unit_interval_is_rejected_before_any_work(lmbd):
    gen = PluginReverseSDE(VariancePreservingSDE(), never_called_drift, 1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sample_lambda(gen, prior_draw(4), 10, lmbd)


@pytest.mark.parametrize("num_steps", [0, -3])
def test_nonpositive_num_steps_is_rejected(num_steps):
    gen = PluginReverseSDE(VariancePreservingSDE(), never_called_drift, 1.0)
    with pytest.raises(ValueError, match="num_steps"):
        sample_lambda(gen, prior_draw(4), num_steps)
    with pytest.raises(ValueError, match="num_steps"):
        sample_pc(gen, prior_draw(4), num_steps)


def test_unknown_predictor_is_rejected_with_the_allowed_ones():
    gen = PluginReverseSDE(VariancePreservingSDE(), never_called_drift, 1.0)
    with pytest.raises(ValueError, match="reverse_diffusion, euler_maruyama"):
        sample_pc(gen, prior_draw(4), 10, predictor="ancestral")


@pytest.mark.parametrize("method", ["rk4", "euler", "no_such_solver"])
def test_ode_sampler_rejects_non_adaptive_or_unknown_methods(method):
    gen = PluginReverseSDE(VariancePreservingSDE(), never_called_drift, 1.0)
    with pytest.raises(ValueError, match="dopri5"):
        sample_ode(gen, prior_draw(4), method=method)
