"""The DDPM U-Net: shapes, zero start, DDPM's parameter count, time resolved on [0, 1], argument checks,
and its faster forward (fused upsampling, in-place sums, channels_last) equal to the plain computation and
to the U-Net as first landed."""
import copy
import functools
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lib.models.unet import AttnBlock, ResBlock, UNet, Upsample

MNIST = dict(input_channels=1, input_height=28, ch=32, ch_mult=(1, 2, 2), attn_resolutions=(16,))
# The CIFAR-10 layout at ch=32 instead of 128, to stay fast; the full width is only constructed.
CIFAR_SMALL = dict(input_channels=3, input_height=32, ch=32, ch_mult=(1, 2, 2, 2), attn_resolutions=(16,),
                   dropout=0.1)
CIFAR = dict(CIFAR_SMALL, ch=128)
CONFIGS = {"mnist": MNIST, "cifar": CIFAR_SMALL}


def image_batch(cfg, batch_size=2, dtype=torch.float32):
    return torch.randn(batch_size, cfg["input_channels"], cfg["input_height"], cfg["input_height"], dtype=dtype)


def perturb_(model, std=0.05):
    """Add Gaussian noise to every parameter, so the zero-initialised layers no longer hide anything."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", CONFIGS)
def test_output_shape_equals_input_shape(name):
    torch.manual_seed(0)
    cfg = CONFIGS[name]
    x = image_batch(cfg)
    assert UNet(**cfg)(x, torch.rand(2)).shape == x.shape


def test_output_channels_may_differ_from_input_channels():
    torch.manual_seed(0)
    model = UNet(3, 16, ch=32, output_channels=5, ch_mult=(1, 2), attn_resolutions=(8,))
    assert model(torch.randn(2, 3, 16, 16), torch.rand(2)).shape == (2, 5, 16, 16)


def test_output_is_exactly_zero_at_initialisation():
    torch.manual_seed(0)
    model = UNet(**CIFAR_SMALL)
    out = model(image_batch(CIFAR_SMALL), torch.rand(2))
    assert torch.count_nonzero(out) == 0


def test_cifar10_configuration_has_ddpm_parameter_count():
    torch.manual_seed(0)
    n = sum(p.numel() for p in UNet(**CIFAR).parameters())
    assert round(n / 1e5) / 10 == 35.7, n  # Ho et al. (2020), Appendix B: 35.7M parameters


@pytest.mark.parametrize("name, resolutions", [
    ("mnist", [7]),  # 28 -> 14 -> 7 never reaches 16: only the middle block attends, as in DDPM
    ("cifar", [16, 16, 4, 16, 16, 16]),  # down level 16 (2 blocks), middle (4x4), up level 16 (3 blocks)
])
def test_attention_only_at_listed_resolutions_and_in_the_middle(name, resolutions):
    torch.manual_seed(0)
    cfg = CONFIGS[name]
    model = UNet(**cfg)
    seen = []
    for module in model.modules():
        if isinstance(module, AttnBlock):
            module.register_forward_hook(lambda mod, inputs, out: seen.append(inputs[0].shape[-1]))
    model(image_batch(cfg), torch.rand(2))
    assert seen == resolutions


def test_time_embedding_resolves_nearby_times_on_unit_interval():
    torch.manual_seed(0)
    ch = MNIST["ch"]
    emb = UNet(**MNIST).time_embed.sinusoid(torch.tensor([0.10, 0.11]))  # (2, ch)
    # Unscaled, every frequency is <= 1, and each (sin, cos) pair moves by at most its phase change,
    # so ||emb(0.10) - emb(0.11)|| <= 0.01 * sqrt(ch / 2): too little for the network to tell them apart.
    unscaled_bound = 0.01 * math.sqrt(ch / 2)
    assert (emb[0] - emb[1]).norm() > 10 * unscaled_bound


def test_output_depends_on_time_at_unit_scale():
    torch.manual_seed(0)
    model = perturb_(UNet(**MNIST)).eval()
    x = image_batch(MNIST)
    with torch.no_grad():
        out_a = model(x, torch.full((2,), 0.10))
        out_b = model(x, torch.full((2,), 0.11))
    # About 5% here; with t fed unscaled into the sinusoids it is about 0.02%.
    assert (out_a - out_b).norm() / out_a.norm() > 1e-2


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = perturb_(UNet(**CIFAR_SMALL)).train()  # CIFAR layout: it has attention blocks to reach
    out = model(image_batch(CIFAR_SMALL), torch.rand(2))
    (out * torch.randn_like(out)).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or torch.count_nonzero(p.grad) == 0]
    assert not missing


@pytest.mark.parametrize("t", [0.3, torch.tensor(0.3), torch.tensor([0.3])])
def test_scalar_time_is_broadcast_over_the_batch(t):
    torch.manual_seed(0)
    model = perturb_(UNet(**MNIST)).eval()
    x = image_batch(MNIST, batch_size=3)
    with torch.no_grad():
        assert torch.equal(model(x, t), model(x, torch.full((3,), 0.3)))


def test_batch_of_one_keeps_its_batch_dimension():
    torch.manual_seed(0)
    x = image_batch(MNIST, batch_size=1)
    assert UNet(**MNIST)(x, torch.rand(1)).shape == (1, 1, 28, 28)


def test_input_height_not_divisible_raises():
    with pytest.raises(ValueError, match=r"input_height must be divisible by 2\*\*\(len\(ch_mult\)-1\) = 8"):
        UNet(3, 28, ch=32, ch_mult=(1, 2, 2, 2))


def test_ch_not_multiple_of_32_raises():
    with pytest.raises(ValueError, match="ch must be a multiple of 32"):
        UNet(1, 28, ch=48, ch_mult=(1, 2, 2))


@pytest.mark.parametrize("shape", [(2, 3, 28, 28), (2, 1, 32, 32), (2, 1, 28, 14), (1, 28, 28)])
def test_wrong_input_shape_raises(shape):
    torch.manual_seed(0)
    model = UNet(**MNIST)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, 28, 28\)"):
        model(torch.randn(shape), torch.rand(shape[0]))


@pytest.mark.parametrize("t_shape", [(3,), (2, 1), (2, 1, 1, 1)])
def test_wrong_time_shape_raises(t_shape):
    torch.manual_seed(0)
    model = UNet(**MNIST)
    with pytest.raises(ValueError, match=r"t must have shape \(B,\)"):
        model(image_batch(MNIST), torch.rand(t_shape))


def test_eval_mode_is_deterministic():
    torch.manual_seed(0)
    model = perturb_(UNet(**CIFAR_SMALL)).eval()  # dropout 0.1 must be off
    x, t = image_batch(CIFAR_SMALL), torch.rand(2)
    with torch.no_grad():
        assert torch.equal(model(x, t), model(x, t))


def test_dropout_is_active_in_train_mode():
    torch.manual_seed(0)
    model = perturb_(UNet(**CIFAR_SMALL)).train()
    x, t = image_batch(CIFAR_SMALL), torch.rand(2)
    with torch.no_grad():
        assert not torch.equal(model(x, t), model(x, t))


def test_float64_model_runs_and_agrees_with_float32():
    torch.manual_seed(0)
    model = perturb_(UNet(**MNIST)).eval()
    x, t = image_batch(MNIST), torch.rand(2)
    with torch.no_grad():
        out32 = model(x, t)
        out64 = model.double()(x.double(), t.double())
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), out32, rtol=1e-3, atol=1e-4)


# --- the faster forward equals the plain computation ---------------------------------------------


def test_upsample_equals_nearest_neighbour_then_conv():
    torch.manual_seed(0)
    up = Upsample(32, with_conv=True).double()
    x = torch.randn(2, 32, 5, 7, dtype=torch.float64)  # odd, unequal sides: every border case
    expected = up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    torch.testing.assert_close(up(x), expected, rtol=1e-12, atol=1e-12)


def test_upsample_gradients_equal_those_of_nearest_neighbour_then_conv():
    torch.manual_seed(0)
    up = Upsample(32, with_conv=True).double()
    x = torch.randn(2, 32, 4, 4, dtype=torch.float64, requires_grad=True)
    weights = (x, up.conv.weight, up.conv.bias)
    probe = torch.randn(2, 32, 8, 8, dtype=torch.float64)
    got = torch.autograd.grad((up(x) * probe).sum(), weights)
    expected = torch.autograd.grad((up.conv(F.interpolate(x, scale_factor=2.0)) * probe).sum(), weights)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_upsample_has_second_derivatives():
    # The ELBO's Hutchinson divergence is differentiated again in training mode (create_graph=True).
    torch.manual_seed(0)
    up = Upsample(2, with_conv=True).double()  # few channels: gradgradcheck differentiates numerically
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    w = up.conv.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda x, w: functional_call(up, {"conv.weight": w}, (x,)), (x, w))


def test_upsample_without_conv_is_nearest_neighbour():
    x = torch.randn(2, 32, 3, 3)
    assert torch.equal(Upsample(32, with_conv=False)(x), x.repeat_interleave(2, 2).repeat_interleave(2, 3))


def test_resblock_equals_ddpm_formula():
    torch.manual_seed(0)
    block = perturb_(ResBlock(32, 64, temb_ch=128)).double()
    x = torch.randn(2, 32, 6, 6, dtype=torch.float64)
    temb_act = torch.randn(2, 128, dtype=torch.float64)
    h = block.conv1(F.silu(block.norm1(x))) + block.temb_proj(temb_act)[:, :, None, None]
    expected = block.shortcut(x) + block.conv2(F.silu(block.norm2(h)))
    torch.testing.assert_close(block(x, temb_act), expected, rtol=1e-12, atol=1e-12)


def test_channels_last_input_gives_the_contiguous_output():
    torch.manual_seed(0)
    cfg = dict(CIFAR_SMALL, ch_mult=(1, 2), input_height=16, attn_resolutions=(8,), dropout=0.0)
    model = perturb_(UNet(**cfg)).double().eval()
    x, t = image_batch(cfg, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x, t)
        got = model(x.contiguous(memory_format=torch.channels_last), t)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_channels_last_network_keeps_every_activation_channels_last_and_computes_the_same():
    torch.manual_seed(0)
    cfg = dict(CIFAR_SMALL, ch_mult=(1, 2), input_height=16, attn_resolutions=(8,), dropout=0.0)
    model = perturb_(UNet(**cfg)).double()
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    layouts = []
    for m in cl_model.modules():
        if isinstance(m, (nn.Conv2d, nn.GroupNorm)):
            m.register_forward_hook(lambda mod, inputs, out: layouts.append(
                inputs[0].is_contiguous(memory_format=torch.channels_last)))
    x, t = image_batch(cfg, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
    outs = []
    for net in (model, cl_model):
        out = net(x, t)
        out.square().sum().backward()
        outs.append(out)
    assert outs[1].is_contiguous(memory_format=torch.channels_last) and len(layouts) > 30 and all(layouts[1:])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-12)
    for p, q in zip(cl_model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-12)


# A small configuration with every kind of layer: attention at 8, a 1x1-conv shortcut, both resamplings.
TINY = dict(input_channels=3, input_height=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
            dropout=0.1)


# --- the U-Net as first landed (git a62c2f1), kept as a golden fixture -------------------------------

FIRST_LANDED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "unet_first_landed.pt")
# Float64 against float64: the current U-Net adds in another order (the upsampling runs as a transposed
# conv, the residual and time sums in place), and other CPUs or torch versions pick other convolution
# kernels, so agreement is to rounding: 1.7e-15 of the largest value here, bit for bit without the
# upsampling conv. rtol 1e-10 leaves four orders of magnitude for that; any float32 step (output and
# gradients then off by ~1e-6) or real change fails. atol is 1e-12 of the largest reference value of the
# tensor's kind: some parameter gradients are rounding noise around an exact zero (a per-channel bias
# or time shift just before a GroupNorm with one channel per group is normalised away).
RTOL, ATOL = 1e-10, 1e-12


@functools.lru_cache(maxsize=1)
def first_landed():
    """tests/data/unet_first_landed.pt: what the U-Net as first landed computes, for the tests below.

    Made once (torch 2.14.1, CPU) with the first-landed file, `git show a62c2f1:lib/models/unet.py`, loaded
    as a module:
      * torch.manual_seed(0); UNet(input_channels=3, input_height=8, ch=32, ch_mult=(1, 2), num_res_blocks=0,
        attn_resolutions=(4,), dropout=0.1, resamp_with_conv=True).double(); every parameter += 0.05 *
        randn_like (perturb_), then rounded to float32 values, so the state dict is stored in float32
        exactly, as checkpoints are. The resamp_with_conv=False network gets the same tensors (it only
        lacks the two resampling convs).
      * Then, from the same random stream, x = randn(2, 3, 8, 8) and t = rand(2), float64.
      * For each resamp_with_conv, in eval mode (dropout masks would tie the fixture to torch's random
        stream) and float64: the output, and the gradients of (output ** 2).sum() with respect to x and
        to every parameter (by name).
      * The state-dict key -> shape maps of the first-landed MNIST and CIFAR-10 (ch 128) configurations.
    The layout is the smallest with every kind of layer: both resamplings, attention (in the middle and at
    4x4), ResBlocks with and without a 1x1 shortcut, and a 64-channel ResBlock, in which the time embedding
    counts (at 32 channels GroupNorm's 32 groups hold one channel each and cancel a per-channel time
    shift). GroupNorm's 32 groups keep ch >= 32, hence ~5 MB, mostly float64 gradients.
    """
    if not os.path.exists(FIRST_LANDED):
        pytest.fail(f"{FIRST_LANDED} is missing: it holds the first-landed U-Net's state dict, outputs and "
                    "gradients that the current U-Net must reproduce", pytrace=False)
    return torch.load(FIRST_LANDED, weights_only=True)


def test_state_dict_keys_and_shapes_are_those_of_the_first_landed_unet():
    # Checkpoints written by the first-landed U-Net must load unchanged (and the reverse).
    shapes = first_landed()["state_dict_shapes"]
    assert set(shapes) == {"mnist", "cifar"}
    for name, entry in shapes.items():
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            new = {k: list(v.shape) for k, v in UNet(**entry["config"]).state_dict().items()}
        assert new == entry["shapes"], name


@pytest.mark.parametrize("resamp_with_conv", [True, False])
def test_outputs_and_gradients_equal_those_of_the_first_landed_unet(resamp_with_conv):
    ref = first_landed()
    case, = [c for c in ref["cases"] if c["config"]["resamp_with_conv"] == resamp_with_conv]
    model = UNet(**case["config"]).double()
    model.load_state_dict(case["state_dict"], strict=True)  # same keys and shapes: old checkpoints load
    x = ref["x"].clone().requires_grad_(True)
    out = model.eval()(x, ref["t"])
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(out.square().sum(), [x, *params])
    want = case["output"]
    torch.testing.assert_close(out, want, rtol=RTOL, atol=ATOL * want.abs().max().item())
    want = case["input_grad"]
    torch.testing.assert_close(grads[0], want, rtol=RTOL, atol=ATOL * want.abs().max().item())
    assert sorted(names) == sorted(case["param_grads"])
    scale = max(g.abs().max().item() for g in case["param_grads"].values())
    for name, got in zip(names, grads[1:]):
        torch.testing.assert_close(got, case["param_grads"][name], rtol=RTOL, atol=ATOL * scale,
                                   msg=lambda m, name=name: f"gradient of {name}: {m}")


def test_runs_under_bfloat16_autocast_close_to_float32():
    torch.manual_seed(0)
    model = perturb_(UNet(**dict(TINY, dropout=0.0)))
    x, t = image_batch(TINY), torch.rand(2)
    expected = model(x, t)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = model(x, t)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # bf16 keeps 8 bits of mantissa: a relative error of a few 1e-3 per layer, a few 1e-2 at the end.
    assert (out.float() - expected).norm() / expected.norm() < 5e-2
