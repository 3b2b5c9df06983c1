"""MLPDrift: the preconditioned drift network a(y, s) for flat data."""
import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lib.models.mlp import MLPDrift
from lib.sdes import VariancePreservingSDE

TOY_CHECKPOINT = Path(__file__).parent / "data" / "v1" / "toy_checkpoint.pt"

# Fixed probe points for the checkpoint tests: s covers 0, the small-s region and T = 1.
PROBE_Y = [[0.0, 0.0], [1.0, -0.5], [-1.2, 0.3], [0.4, 1.1], [2.0, -2.0], [-0.7, -0.9]]
PROBE_S = [0.0, 1e-4, 1e-2, 0.1, 0.5, 1.0]
# a(PROBE_Y, PROBE_S) of the toy checkpoint's EMA weights in float64, computed with the module as it was
# before the unreachable options were pruned (the pruned module reproduces them bit for bit).
PRE_PRUNING_OUTPUT = [
    [0.018936810259893834, -0.3652391667738902],
    [0.036993499262497856, -0.356082407467895],
    [0.03256954534269223, -0.512540288517119],
    [-0.013815775940270702, -0.22445589452578163],
    [0.005818777235433282, -0.2427214389204778],
    [-0.029740251588758586, -0.3312123563478099],
]


def build(seed=0, **kwargs):
    torch.manual_seed(seed)
    return MLPDrift(**kwargs)


def load_toy_checkpoint():
    return torch.load(TOY_CHECKPOINT, weights_only=True)


def toy_net(weights="ema_state"):
    state = load_toy_checkpoint()
    net = MLPDrift(**state["model"]["kwargs"])
    net.load_state_dict(state[weights])  # strict
    return net.eval()


# --- shapes and input validation -------------------------------------------------------------------

@pytest.mark.parametrize("dim", [1, 2, 5])
def test_output_shape_matches_input(dim):
    net = build(dim=dim, width=16, depth=1)
    assert net(torch.randn(7, dim), torch.rand(7)).shape == (7, dim)


def test_batch_of_one_keeps_its_shape():
    net = build()
    assert net(torch.randn(1, 2), torch.rand(1)).shape == (1, 2)


@pytest.mark.parametrize("y_shape, s_shape", [
    ((4, 2), (4, 1)),     # time with a trailing axis
    ((4, 2), ()),         # scalar time
    ((4, 2), (3,)),       # one time too few
    ((4, 2, 1), (4,)),    # y not flat
    ((2,), (1,)),         # y without a batch axis
    ((4, 3), (4,)),       # wrong data dimension
])
def test_rejects_inputs_of_wrong_shape(y_shape, s_shape):
    net = build(dim=2)
    with pytest.raises(ValueError, match=r"expected y \(B, 2\) and s \(B,\)"):
        net(torch.randn(y_shape), torch.rand(s_shape))


@pytest.mark.parametrize("kwargs, match", [
    (dict(width=0), r"width must be an integer >= 1"),
    (dict(depth=0), r"depth must be an integer >= 1"),
    (dict(depth=1.5), r"depth must be an integer >= 1"),
    (dict(dim=0), r"dim must be an integer >= 1"),
    (dict(local_std=-1.0), r"local_std must be >= 0"),
    (dict(local_std=float("nan")), r"local_std must be >= 0"),
    (dict(time_dim=7), r"time_dim must be an even integer >= 2"),
    (dict(time_dim=0), r"time_dim must be an even integer >= 2"),
    (dict(beta_min=0.0), r"beta_min"),
    (dict(beta_min=5.0, beta_max=1.0), r"beta_min <= beta_max"),
])
def test_rejects_bad_constructor_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MLPDrift(**kwargs)


@pytest.mark.parametrize("removed", [
    dict(time_embed="sinusoid"), dict(time_scale=1000.0), dict(conditioning="film"), dict(residual=True),
    dict(norm="layer"), dict(output="eps"), dict(y_fourier=8), dict(y_fourier_scale=4.0), dict(y_fourier_seed=0),
])
def test_removed_options_are_refused_not_ignored(removed):
    # A checkpoint asking for a removed variant must fail to build, not silently build another network.
    with pytest.raises(TypeError):
        MLPDrift(**removed)


# --- the output scale and the schedule --------------------------------------------------------------

@pytest.mark.parametrize("local_std", [0.05, 0.0])
def test_output_is_minus_g_over_noise_floored_sigma_times_network(local_std):
    sde = VariancePreservingSDE(beta_min=0.2, beta_max=15.0)  # not the defaults: the net must use its kwargs
    net = build(beta_min=0.2, beta_max=15.0, local_std=local_std).double()
    s = torch.tensor([1e-6, 1e-4, 1e-2, 0.1, 0.5, 1.0], dtype=torch.float64)
    y = torch.randn(6, 2, dtype=torch.float64)
    g = sde.g(s, y)  # (B, 1)
    sigma2 = sde.var(s)[:, None]
    expected = -g / (sigma2 + local_std ** 2).sqrt() * net.net(y, s)
    torch.testing.assert_close(net(y, s), expected)
    # The DSM residual a sigma / g + eps is then eps - F sigma / sqrt(sigma^2 + local_std^2): with
    # local_std = 0 exactly noise prediction.
    eps = torch.randn_like(y)
    ratio = sigma2.sqrt() / (sigma2 + local_std ** 2).sqrt()
    torch.testing.assert_close(net(y, s) * sigma2.sqrt() / g + eps, eps - ratio * net.net(y, s))


def test_output_scale_is_finite_at_s_zero_and_order_one_over_local_std():
    net = build(local_std=0.05, beta_min=0.1)
    c0 = net.output_scale(torch.zeros(3))
    torch.testing.assert_close(c0, torch.full((3,), -math.sqrt(0.1) / 0.05))
    assert torch.isfinite(net(torch.randn(3, 2), torch.zeros(3))).all()


def test_schedule_is_the_sdes_and_adds_no_state():
    net = MLPDrift(beta_min=0.2, beta_max=15.0)
    assert isinstance(net.sde, VariancePreservingSDE)
    assert (net.sde.beta_min, net.sde.beta_max) == (0.2, 15.0)
    assert not any(isinstance(m, VariancePreservingSDE) for m in net.modules())
    assert all(k.startswith(("inp.", "blocks.", "head.")) for k in net.state_dict())
    # float32 at tiny s: the SDE's expm1 keeps sigma^2 > 0, so the time features still see s.
    s = torch.tensor([0.0, 1e-7])
    u = net.time_features(s)
    assert not torch.equal(u[0], u[1])


def test_time_conditioning_resolves_nearby_times():
    # s = 0.10 and 0.11 differ by 1% of [0, T]; an embedding of unscaled s barely separates them.
    net = build()
    y = torch.randn(16, 2)
    raw = lambda s: net.net(y, torch.full((16,), s))  # noqa: E731
    rel = (raw(0.10) - raw(0.11)).norm() / raw(0.10).norm()
    assert rel > 1e-3


# --- structure ------------------------------------------------------------------------------------

def test_is_a_per_example_function():
    # No batch coupling: each row of the output depends only on its own (y, s).
    net = build(width=32, depth=2).double()
    y = torch.randn(9, 2, dtype=torch.float64, requires_grad=True)
    s = torch.rand(9, dtype=torch.float64)
    out = net(y, s)
    rows = torch.cat([net(y[i:i + 1], s[i:i + 1]) for i in range(9)])
    torch.testing.assert_close(out, rows)
    perm = torch.randperm(9)
    torch.testing.assert_close(net(y[perm], s[perm]), out[perm])
    (grad,) = torch.autograd.grad(out[3].sum(), y)
    assert grad[3].abs().sum() > 0
    assert torch.all(grad[torch.arange(9) != 3] == 0)


def test_gradients_reach_every_parameter_and_the_input():
    net = build(width=32, depth=3)
    y = torch.randn(8, 2, requires_grad=True)
    s = torch.rand(8)
    s[0] = 0.0
    net(y, s).pow(2).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


def test_constructor_round_trips_through_json():
    kw = dict(dim=3, width=24, depth=2, local_std=0.03, beta_min=0.2, beta_max=15.0, time_dim=16)
    net = build(**kw)
    rebuilt = MLPDrift(**json.loads(json.dumps({"name": "mlp", "kwargs": kw}))["kwargs"])
    rebuilt.load_state_dict(net.state_dict())  # strict: same parameter names and shapes
    assert rebuilt.inp.in_features == 3 + 16 and len(rebuilt.blocks) == 2
    y, s = torch.randn(5, 3), torch.rand(5)
    torch.testing.assert_close(rebuilt(y, s), net(y, s))


def test_deepcopy_keeps_the_function():
    # EMA keeps a deep copy of the drift; the SDE attribute must come along.
    net = build()
    y, s = torch.randn(4, 2), torch.rand(4)
    torch.testing.assert_close(copy.deepcopy(net)(y, s), net(y, s))


# --- checkpoints written before the pruning ---------------------------------------------------------

@pytest.mark.parametrize("weights", ["ema_state", "model_state"])
def test_legacy_toy_checkpoint_loads_strictly(weights):
    state = load_toy_checkpoint()
    legacy = state[weights]
    assert tuple(legacy["y_freqs"].shape) == (2, 0)  # the file really is a pre-pruning one
    net = MLPDrift(**state["model"]["kwargs"])
    result = net.load_state_dict(legacy)  # strict
    assert not result.missing_keys and not result.unexpected_keys
    assert "y_freqs" in legacy  # the caller's dict is left alone
    assert set(net.state_dict()) == set(legacy) - {"y_freqs"}
    for k, v in net.state_dict().items():
        assert torch.equal(v, legacy[k]), k


def test_state_dict_without_the_legacy_buffer_loads_strictly():
    state = load_toy_checkpoint()
    weights = {k: v for k, v in state["ema_state"].items() if k != "y_freqs"}
    MLPDrift(**state["model"]["kwargs"]).load_state_dict(weights)


@pytest.mark.parametrize("strict", [True, False])
def test_non_empty_fourier_buffer_is_refused(strict):
    state = load_toy_checkpoint()
    weights = dict(state["ema_state"], y_freqs=torch.randn(2, 8))
    net = MLPDrift(**state["model"]["kwargs"])
    with pytest.raises(RuntimeError, match=r"y_freqs has shape \(2, 8\).*y_fourier=8"):
        net.load_state_dict(weights, strict=strict)


def test_legacy_buffer_is_handled_under_a_prefix():
    # The drift nested in another module (PluginReverseSDE holds it as `a`): keys carry a prefix.
    state = load_toy_checkpoint()
    outer = torch.nn.Module()
    outer.a = MLPDrift(**state["model"]["kwargs"])
    outer.load_state_dict({"a." + k: v for k, v in state["ema_state"].items()})


def reference_forward(weights, kwargs, y, s):
    """The toy network written out with plain torch ops from the state dict tensors: y (B, D), s (B,) -> (B, D)."""
    beta_min, beta_max, local_std = kwargs["beta_min"], kwargs["beta_max"], kwargs["local_std"]
    time_dim = weights["inp.weight"].shape[1] - y.shape[1]
    beta = beta_min + (beta_max - beta_min) * s
    sigma2 = 1 - torch.exp(-(beta_min * s + 0.5 * (beta_max - beta_min) * s ** 2))
    u = torch.log(sigma2 + max(local_std, 1e-3) ** 2)
    k = torch.arange(time_dim // 2, dtype=s.dtype)
    freqs = (1 / 8) * 64.0 ** (k / (time_dim // 2 - 1))  # geometric from 1/8 to 8
    feats = torch.cat([torch.sin(u[:, None] * freqs), torch.cos(u[:, None] * freqs)], dim=1)
    h = F.silu(torch.cat([y, feats], dim=1) @ weights["inp.weight"].T + weights["inp.bias"])
    i = 0
    while f"blocks.{i}.linear.weight" in weights:
        h = F.silu(h @ weights[f"blocks.{i}.linear.weight"].T + weights[f"blocks.{i}.linear.bias"])
        i += 1
    out = h @ weights["head.weight"].T + weights["head.bias"]
    return -(beta.sqrt() / (sigma2 + local_std ** 2).sqrt())[:, None] * out


def test_toy_checkpoint_matches_a_forward_pass_written_by_hand():
    state = load_toy_checkpoint()
    kwargs = state["model"]["kwargs"]
    weights = {k: v.double() for k, v in state["ema_state"].items()}
    net = toy_net().double()
    gen = torch.Generator().manual_seed(0)
    y = 1.5 * torch.randn(64, 2, generator=gen, dtype=torch.float64)
    s = torch.rand(64, generator=gen, dtype=torch.float64)
    s[:4] = torch.tensor([0.0, 1e-4, 0.5, 1.0])  # the ends and the small-s region
    with torch.no_grad():
        torch.testing.assert_close(net(y, s), reference_forward(weights, kwargs, y, s))


def test_toy_checkpoint_reproduces_the_pre_pruning_outputs():
    net = toy_net().double()
    # The probes are float32 numbers (1e-4 and 0.1 are not exact), widened as when they were recorded.
    y, s = torch.tensor(PROBE_Y).double(), torch.tensor(PROBE_S).double()
    expected = torch.tensor(PRE_PRUNING_OUTPUT, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(net(y, s), expected, rtol=1e-10, atol=1e-12)
        # The float32 model (as trained and evaluated) agrees to float32 precision.
        out32 = toy_net()(y.float(), s.float())
    torch.testing.assert_close(out32, expected.float(), rtol=1e-5, atol=1e-6)
