"""lib/pixels.py, the whole bits/dim path of 8-bit images (docs/math.md section 5): dequantisation
(k + u) / 256, the logit transform and its log-determinant, bits per dimension, and the batch path."""
import math

import pytest
import torch

from lib.pixels import (LOGIT_ALPHA, batch_bits_per_dim, bits_per_dim, dequantize, logit_transform, to_image,
                        to_model_space)

DTYPE = torch.float64


# --- dequantisation ---------------------------------------------------------------------

def test_dequantize_stays_inside_the_bin_of_k():
    k = torch.arange(256, dtype=torch.uint8).repeat(4000).view(1000, 1, 32, 32)  # every value, 4000 times
    x = dequantize(k, generator=torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and x.shape == k.shape
    kf = k.double()
    assert torch.all(x.double() >= kf / 256) and torch.all(x.double() < (kf + 1) / 256)


def test_dequantize_edge_of_the_bin_stays_half_open():
    # 255 + u rounds to 256 in float32 when u > 1 - 2^-17: some of these 2^21 draws (about 16) hit it
    k = torch.full((1 << 21,), 255, dtype=torch.uint8)
    u = torch.rand(k.shape, generator=torch.Generator().manual_seed(1))
    assert ((k + u) / 256 == 1.0).any()  # the naive formula would leave the bin [255/256, 1)
    x = dequantize(k, generator=torch.Generator().manual_seed(1))
    assert x.max().item() < 1.0


def test_dequantize_noise_has_mean_one_half():
    k = torch.randint(0, 256, (64, 3, 32, 32), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    u = dequantize(k, generator=torch.Generator().manual_seed(3)).double() * 256 - k.double()
    # u ~ U[0, 1): mean 1/2, sd 1/sqrt(12); the sample mean of n draws is within 5 standard errors
    n = u.numel()
    assert abs(u.mean().item() - 0.5) < 5 / math.sqrt(12 * n)
    assert abs(u.var().item() - 1 / 12) < 0.01


def test_dequantize_is_reproducible_from_the_generator():
    k = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    a = dequantize(k, generator=torch.Generator().manual_seed(7))
    b = dequantize(k, generator=torch.Generator().manual_seed(7))
    c = dequantize(k, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dequantize_accepts_wider_integers_and_refuses_floats():
    k = torch.tensor([0, 17, 255], dtype=torch.int64)
    assert torch.equal((dequantize(k) * 256).floor().long(), k)
    with pytest.raises(TypeError, match="integer"):
        dequantize(k.float() / 255)
    with pytest.raises(ValueError, match="0..255"):
        dequantize(torch.tensor([256]))


# --- logit transform and bits per dimension (docs/math.md section 5) ------------------------------------


def test_logit_transform_maps_to_the_logit_and_back():
    x = torch.rand(4, 1, 3, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    z, _ = logit_transform(x, alpha=0.05)
    assert torch.allclose(z, torch.logit(0.05 + 0.9 * x))
    assert torch.allclose((torch.sigmoid(z) - 0.05) / 0.9, x)


@pytest.mark.parametrize("alpha", [0.05, 1e-6])
def test_logit_logdet_is_the_log_determinant_of_the_autograd_jacobian(alpha):
    x = torch.rand(3, 2, 2, 2, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    _, logdet = logit_transform(x, alpha)
    for i in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: logit_transform(v[None], alpha)[0][0], x[i])  # (2,2,2,2,2,2)
        sign, expected = torch.linalg.slogdet(jac.reshape(8, 8))
        assert sign > 0 and logdet[i].item() == pytest.approx(expected.item(), rel=1e-12)


def test_bpd_of_the_uniform_density_on_the_unit_cube_is_exactly_8():
    """p(x_tilde) = 1 on [0, 1)^D: log p = 0, so bpd = 0 / (D ln 2) + 8."""
    num_dims = 3 * 32 * 32
    assert torch.equal(bits_per_dim(torch.zeros(5, dtype=DTYPE), num_dims), torch.full((5,), 8.0, dtype=DTYPE))


def test_bpd_of_the_uniform_density_seen_through_the_logit_is_exactly_8():
    """If x_tilde is uniform, z = logit(...) has density p_Z(z) = 1 / |dz/dx|: log p_Z = -logdet, bpd = 8."""
    x = torch.rand(6, 1, 4, 4, dtype=DTYPE, generator=torch.Generator().manual_seed(2))
    _, logdet = logit_transform(x)
    assert torch.allclose(bits_per_dim(-logdet, 16, logdet), torch.full((6,), 8.0, dtype=DTYPE), atol=1e-12)


def test_bpd_counts_bits_per_dimension_and_the_log_determinant():
    """Density 2^-D on the cube (half a bit less likely per dimension): bpd = 9; a logdet of D ln 2 gives 8 back."""
    D = 10
    log_p = torch.tensor([-D * math.log(2.0)], dtype=DTYPE)
    assert bits_per_dim(log_p, D).item() == pytest.approx(9.0, rel=1e-14)
    assert bits_per_dim(log_p, D, torch.tensor([D * math.log(2.0)], dtype=DTYPE)).item() == pytest.approx(8.0)


# --- model space and the batch path ---------------------------------------------------------------


@pytest.mark.parametrize("real", [True, False])
def test_to_image_inverts_to_model_space(real):
    x = torch.rand(5, 3, 4, 4, dtype=DTYPE, generator=torch.Generator().manual_seed(4))
    z, logdet = to_model_space(x, real)
    assert torch.allclose(to_image(z, real), x, atol=1e-12)
    if not real:
        assert torch.equal(z, x) and torch.equal(logdet, torch.zeros(5, dtype=DTYPE))


def test_model_space_uses_the_library_alpha():
    x = torch.rand(2, 1, 3, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(to_model_space(x, True)[0], torch.logit(LOGIT_ALPHA + (1 - 2 * LOGIT_ALPHA) * x))


@pytest.mark.parametrize("real", [True, False])
def test_batch_bpd_of_the_uniform_density_on_the_pixel_cube_is_exactly_8(real):
    """A model whose density is uniform on [0, 1)^D in x has log p_Z(z) = -log|dz/dx|: every image scores 8 bpd,
    whatever its dequantisation noise, so the dequantisation, the transform and the offset all meet here."""
    k = torch.randint(0, 256, (6, 3, 4, 4), generator=torch.Generator().manual_seed(6), dtype=torch.uint8)

    def uniform_in_x(z):
        return logit_transform(to_image(z.double(), True), LOGIT_ALPHA)[1].neg() if real else torch.zeros(z.shape[0])

    bpd = batch_bits_per_dim(uniform_in_x, k, real, torch.Generator().manual_seed(7))
    assert bpd.dtype == torch.float64 and bpd.shape == (6,)
    assert torch.allclose(bpd, torch.full((6,), 8.0, dtype=DTYPE), atol=1e-4)


def test_batch_bpd_scores_the_dequantized_image_with_its_generator():
    """The log-likelihood sees x = (k + u) / 256 with u from the given generator, in model space."""
    k = torch.randint(0, 256, (3, 1, 2, 2), generator=torch.Generator().manual_seed(8), dtype=torch.uint8)
    seen = []
    batch_bits_per_dim(lambda z: seen.append(z) or torch.zeros(z.shape[0]), k, True, torch.Generator().manual_seed(9))
    expected = logit_transform(dequantize(k, generator=torch.Generator().manual_seed(9)))[0]
    assert torch.equal(seen[0], expected)
