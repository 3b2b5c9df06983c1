"""The DDPM U-Net: shapes, zero start, DDPM's parameter count, time resolved on [0, 1], argument checks."""
import math

import pytest
import torch

from lib.models.unet import AttnBlock, UNet

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
