"""8-bit pixels to the space the SDE runs in and back, and bits per dimension (docs/math.md section 5).

    k (integer pixels 0..255) -> x = (k + u) / 256, u ~ U[0, 1)          dequantize
    x -> z = logit(alpha + (1 - 2 alpha) x), log|dz/dx| (B,)             to_model_space(x, real=True)
    bpd = -(log p(z) + log|dz/dx|) / (D ln 2) + 8,  D = C H W           bits_per_dim

With real=False the SDE runs on x itself and the log-determinant is 0. `to_image` maps model space back
to [0, 1] for viewing. `batch_bits_per_dim` is the whole path for one batch of images.
"""
import math

import torch

LOGIT_ALPHA = 0.05  # keeps alpha + (1 - 2 alpha) x inside (0, 1), where the logit is finite


def dequantize(k, generator=None, dtype=torch.float32):
    """Uniform dequantisation of 8-bit pixels: x = (k + u) / 256, u ~ U[0, 1) per entry.

    k: integer tensor with values in {0..255}, any shape, e.g. (B, C, H, W) -> x: same shape, ``dtype``,
    on k's device, with k / 256 <= x < (k + 1) / 256. ``generator`` must live on k's device.
    Floating-point input is refused: a [0, 1] image (k / 255) would be silently mis-scaled.
    """
    if k.dtype.is_floating_point or k.dtype.is_complex or k.dtype == torch.bool:
        raise TypeError(f"dequantize expects integer pixel values 0..255 (e.g. uint8), got dtype {k.dtype}")
    if k.dtype != torch.uint8 and k.numel() > 0 and (k.min() < 0 or k.max() > 255):
        raise ValueError(f"dequantize expects pixel values in 0..255, got range [{k.min()}, {k.max()}]")
    k = k.to(dtype)
    u = torch.rand(k.shape, generator=generator, device=k.device, dtype=dtype)
    x = (k + u) / 256
    # In float32, k + u rounds up to k + 1 when u is within half an ulp(k) of 1 (ulp(255) = 2^-16):
    # clamp to the last float below (k + 1) / 256 so the interval stays half-open.
    upper = (k + 1) / 256
    return torch.minimum(x, torch.nextafter(upper, torch.zeros_like(upper)))


def logit_transform(x, alpha=LOGIT_ALPHA):
    """Map dequantized data x in [0, 1) to z = logit(p), p = alpha + (1 - 2 alpha) x.

    x: (B, ...). Returns (z (B, ...), logdet (B,)) with the change-of-variables term
        log|det dz/dx| = sum_i [log(1 - 2 alpha) - log p_i - log(1 - p_i)],
    so that log p_X(x) = log p_Z(z) + logdet.
    """
    p = alpha + (1.0 - 2.0 * alpha) * x
    log_p, log_1mp = torch.log(p), torch.log1p(-p)
    logdet = (math.log1p(-2.0 * alpha) - log_p - log_1mp).flatten(1).sum(1)
    return log_p - log_1mp, logdet


def to_model_space(x, real):
    """Dequantized x in [0, 1) (B, ...) -> (data the SDE runs on (B, ...), log|d data / d x| (B,))."""
    if real:
        return logit_transform(x)
    return x, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)


def to_image(z, real):
    """Inverse of to_model_space for viewing: model space (B, ...) -> [0, 1], same shape."""
    if real:
        z = (torch.sigmoid(z) - LOGIT_ALPHA) / (1 - 2 * LOGIT_ALPHA)
    return z.clamp(0, 1)


def bits_per_dim(log_p, num_dims, logdet=0.0):
    """Bits per dimension of 8-bit data from the model's log-density of its dequantized version, (B,).

    log_p: (B,) log-density in the model's space (z after the logit transform, else x in [0, 1));
    logdet: (B,) log|dz/dx| (0 without the transform); num_dims = C H W. x = (k + u) / 256 puts each
    integer k in a cube of side 1/256, so -log P(k) <= -E_u log p(x) + D log 256 (Jensen), hence
        bpd = -(log_p + logdet) / (D ln 2) + 8,
    an upper bound on the discrete code length.
    """
    return -(log_p + logdet) / (num_dims * math.log(2.0)) + 8.0


@torch.no_grad()
def batch_bits_per_dim(log_likelihood, k, real, generator=None):
    """Bits/dim of each 8-bit image in a batch, (B,) float64: the whole path above.

    k: integer pixels (B, C, H, W) on the model's device; u is drawn from `generator` (on k's device);
    real: whether the run models logit space; log_likelihood(z (B, C, H, W)) -> (B,) nats.
    """
    z, logdet = to_model_space(dequantize(k, generator=generator), real)
    return bits_per_dim(log_likelihood(z), k[0].numel(), logdet).double()


def model_space_statistics(counts, real, nodes=64):
    """Mean, standard deviation and finest scale of dequantized 8-bit data in model space, from its histogram.

    counts: (256,) how often each pixel value occurs in the training set. Each value k is spread uniformly
    over its bin x in [k/256, (k+1)/256) by the dequantisation, and the bin's image in model space is
    integrated by the midpoint rule on `nodes` points. Returns floats (mean, std, bin_std):
        mean, std   of z over all pixels (the data's location and scale, for the network's input scaling);
        bin_std     sqrt(E_k[Var(z | k)]), the root-mean-square spread of z inside one bin: the finest scale the
                    data has, below which added noise changes nothing a model can resolve (in logit space
                    0.004 at mid-grey, 0.02 at 0 or 255; 1 / (256 sqrt 12) = 0.0011 without the logit).
    """
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if counts.shape != (256,) or counts.sum() <= 0:
        raise ValueError(f"expected a histogram of the 256 pixel values, got shape {tuple(counts.shape)}")
    w = counts / counts.sum()  # (256,)
    u = (torch.arange(nodes, dtype=torch.float64) + 0.5) / nodes  # (nodes,)
    x = (torch.arange(256, dtype=torch.float64)[:, None] + u) / 256  # (256, nodes)
    z = to_model_space(x, real)[0]
    bin_mean, bin_var = z.mean(1), z.var(1, unbiased=False)  # (256,) each
    mean = (w * bin_mean).sum()
    var = (w * (bin_var + bin_mean ** 2)).sum() - mean ** 2
    return mean.item(), var.sqrt().item(), (w * bin_var).sum().sqrt().item()
