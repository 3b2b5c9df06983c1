"""The U-Net wrapped as a preconditioned drift: the network sees unit-scale inputs and the noise level,
and a known factor carries the drift's scale (after EDM's c_in / c_out / c_noise, Karras et al. 2022).

    a(y, s) = -g(s) / sqrt(sigma^2 + l^2) * [F(c_in (y - alpha mu), c_noise) + skip * c_skip c_in (y - alpha mu)]

    c_in    = 1 / sqrt(alpha^2 sd^2 + sigma^2)           the diffused data's scale: F's input has unit variance
    c_noise = log(sigma^2 + l^2), mapped onto [0, 1]      what F is told about the noise level
    c_skip  = sqrt(sigma^2 + l^2) c_in                   with it, F = 0 is the exact drift of N(mu, sd^2) data

mu, sd: the training set's mean and standard deviation in model space; l: the data's finest scale (the
spread of one dequantisation bin there), all from lib.pixels.model_space_statistics and stored in the
checkpoint's model kwargs. The module is still the drift a (score = a / g), shaped like y.

Why: the raw drift's scale swings by orders of magnitude between s = T and s -> 0, where most of the
ELBO lives (the score grows like 1 / sqrt(sigma^2 + l^2) until the noise reaches the data's finest scale).
With the factor above, F is O(1) at every s, so one set of weights serves every noise level, as in the
toy's MLPDrift. l > 0 matters: with l = 0 (the eps-parameterisation) F must vanish like sigma below l and
g / sigma amplifies whatever error remains (an ELBO of 66 ± 64 bpd on digits where l = 0.03 gave 1.74).
"""
import math

import torch
from torch import nn

from lib.models.unet import UNet
from lib.sdes import as_batch_time, batch_view, build_sde


class PreconditionedUNet(nn.Module):
    """forward(y (B, C, H, W), s (B,)) -> a (B, C, H, W).

    unet: UNet keyword arguments; sde: the SDE's spec (lib.sdes.build_sde), whose alpha, sigma and g the
    factors use; data_mean, data_std, data_scale: mu, sd and l above (floats, model space); skip: add the
    Gaussian drift c_skip term.
    """

    def __init__(self, unet, sde, data_mean, data_std, data_scale, skip=True):
        super().__init__()
        if not (data_std > 0 and data_scale > 0):
            raise ValueError(f"need data_std > 0 and data_scale > 0, got {data_std} and {data_scale}")
        self.net = UNet(**unet)
        self.sde = build_sde(sde)  # a plain attribute: the schedule is configuration, not state
        self.data_mean, self.data_std, self.data_scale = float(data_mean), float(data_std), float(data_scale)
        self.skip = bool(skip)
        # c_noise runs from log(l^2) (s = 0) to log(1 + l^2) (pure noise); the U-Net's time embedding was built
        # for inputs in [0, 1] (it scales them by 1000), so map that range onto [0, 1].
        self._log_floor = math.log(self.data_scale ** 2)
        self._log_span = math.log1p(self.data_scale ** 2) - self._log_floor

    def forward(self, y, s):
        s = as_batch_time(s, y)
        alpha = batch_view(self.sde.mean_weight(s), y)
        var = self.sde.var(s)  # (B,)
        noise = batch_view(var, y) + self.data_scale ** 2  # sigma^2 + l^2
        c_in = torch.rsqrt(alpha ** 2 * self.data_std ** 2 + batch_view(var, y))
        y_in = c_in * (y - alpha * self.data_mean)  # unit-variance input
        c_noise = (torch.log(var + self.data_scale ** 2) - self._log_floor) / self._log_span  # (B,) in [0, 1]
        out = self.net(y_in, c_noise)
        if self.skip:
            out = out + noise.sqrt() * c_in * y_in
        return -self.sde.g(s, y) * torch.rsqrt(noise) * out
