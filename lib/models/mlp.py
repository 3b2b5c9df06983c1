"""The MLP drift network a(y, s) for flat data (toy 2-D points and any (B, D) tensor).

    MLPDrift(dim=2, width=256, depth=3, local_std=0.05)(y, s) -> a
    y: (B, D) state of the forward (inference) VP SDE at forward time s
    s: (B,) forward time in [0, T]
    a: (B, D)

The module is the inference DRIFT a(y, s) of lib/sdes.py, not the score (score = a / g). It is
"preconditioned": the hidden layers predict F(y, s) and

    a = -g(s) / sqrt(sigma^2(s) + local_std^2) * F(y, s)

with g and sigma^2 from the run's SDE (lib.sdes, VP by default). Why: the ELBO gap is
1/2 int E|a - a*|^2 ds and most of it sits at small s, where the data (here a thin swiss roll of noise
scale local_std) makes the score of order 1 / local_std. With the factor above, F = -score *
sqrt(sigma^2 + local_std^2) is O(1) at every s, so one set of weights serves every noise level. The
eps-parameterisation (local_std = 0) instead forces F -> 0 like sigma as s -> 0, which the network can
only do approximately, and 1 / sigma amplifies the remainder.

Time enters as sinusoids of u = log(sigma^2(s) + local_std^2) rather than of s: the likelihood is
decided at small s, which a function of s squeezes into a sliver of [0, T] and u spreads out. The
features are concatenated to y at the input; the rest is a plain SiLU MLP.

This is the configuration lib/toy_task.py builds. FiLM conditioning, residual blocks, LayerNorm,
sinusoids of raw s, the "drift"/"eps" outputs and random Fourier features of y were removed as
unreachable. Checkpoints from before that still load: their state dicts differ only by an empty
``y_freqs`` buffer (no Fourier features), which loading drops.

The constructor takes only plain numbers, so a checkpoint's {"name", "kwargs"} rebuilds it;
beta_min/beta_max must match the SDE the model is trained with (they set g and sigma).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from lib.sdes import build_sde


def sinusoid(u, dim, min_freq, max_freq):
    """(B,) -> (B, dim): [sin(f_k u), cos(f_k u)] with dim / 2 frequencies geometric in [min_freq, max_freq]."""
    half = dim // 2
    freqs = torch.exp(torch.linspace(math.log(min_freq), math.log(max_freq), half, device=u.device, dtype=u.dtype))
    args = u[:, None] * freqs  # (B, dim / 2)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class Block(nn.Module):
    """One hidden layer: h (B, W) -> silu(linear(h)) (B, W).

    A module of its own only so that parameter names (blocks.<i>.linear.*) match existing checkpoints.
    """

    def __init__(self, width):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, h):
        return F.silu(self.linear(h))


class MLPDrift(nn.Module):
    """Preconditioned, log-sigma-conditioned MLP for the VP-SDE drift a(y, s): y (B, D), s (B,) -> (B, D).

    Args (all plain numbers, so the kwargs round-trip through JSON):
        dim: data dimension D.
        width: hidden units per layer.
        depth: hidden blocks after the input layer (depth=2 is a 3-hidden-layer MLP).
        local_std: the data's small-scale spread: the noise floor of the output scale and of the time
            embedding (see the module docstring).
        beta_min, beta_max: the schedule, which sets g and sigma.
        time_dim: number of sinusoidal time features (even).
        sde: the SDE's name in lib.sdes.SDES ('vp', or 'subvp'), the one the model is trained with.
    """

    def __init__(self, dim=2, width=128, depth=2, local_std=0.05, beta_min=0.1, beta_max=20.0, time_dim=64,
                 sde="vp"):
        super().__init__()
        for name, value in (("dim", dim), ("width", width), ("depth", depth)):
            if value < 1 or value != int(value):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if time_dim < 2 or time_dim != int(time_dim) or time_dim % 2:
            raise ValueError(f"time_dim must be an even integer >= 2 (sin and cos per frequency), got {time_dim!r}")
        if not local_std >= 0:  # also refuses NaN
            raise ValueError(f"local_std must be >= 0, got {local_std!r}")
        self.dim = int(dim)
        self.time_dim = int(time_dim)
        self.local_std = float(local_std)
        # A plain attribute (an SDE is not a Module): it holds only floats, so it adds nothing to the state
        # dict and follows .to() / .double() for free. It also validates the betas.
        self.sde = build_sde({"name": sde, "beta_min": beta_min, "beta_max": beta_max})

        # Concatenating the raw sinusoids costs one (D + time_dim) x width layer; a separate time-embedding
        # MLP would double the cost of a small network.
        self.inp = nn.Linear(self.dim + self.time_dim, int(width))
        self.blocks = nn.ModuleList(Block(int(width)) for _ in range(int(depth)))
        self.head = nn.Linear(int(width), self.dim)

    def time_features(self, s):
        """(B,) -> (B, time_dim)."""
        # Noise below the data's own spread local_std barely changes p_s, so the embedding flattens there:
        # u = log(sigma^2 + local_std^2) runs from log(local_std^2) (-6 for 0.05) to ~0, with periods ~0.8
        # to ~50. The 1e-3 floor keeps u finite at s = 0 when local_std = 0.
        u = torch.log(self.sde.var(s) + max(self.local_std, 1e-3) ** 2)
        return sinusoid(u, self.time_dim, 1.0 / 8, 8.0)

    def net(self, y, s):
        """The raw network output F(y, s): y (B, D), s (B,) -> (B, D)."""
        h = F.silu(self.inp(torch.cat([y, self.time_features(s)], dim=1)))  # (B, W)
        for block in self.blocks:
            h = block(h)
        return self.head(h)

    def output_scale(self, s):
        """The factor c(s) = -g(s) / sqrt(sigma^2(s) + local_std^2) in a = c(s) F(y, s): (B,) -> (B,)."""
        return -self.sde.g2(s).sqrt() / (self.sde.var(s) + self.local_std ** 2).sqrt()

    def forward(self, y, s):
        """y (B, D), s (B,) -> a (B, D)."""
        if y.dim() != 2 or y.shape[1] != self.dim or s.shape != (y.shape[0],):
            raise ValueError(f"expected y (B, {self.dim}) and s (B,), got {tuple(y.shape)} and {tuple(s.shape)}")
        return self.output_scale(s)[:, None] * self.net(y, s)  # (B, 1) broadcasts over D

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Checkpoints written before the pruning carry a buffer y_freqs (D, y_fourier) of random Fourier
        # features of y; it is empty (y_fourier = 0) for every configuration this module still computes.
        # Drop an empty one so such checkpoints load strictly; refuse a non-empty one, whose weights
        # expect inputs this module no longer builds.
        legacy = state_dict.pop(prefix + "y_freqs", None)
        if legacy is not None and legacy.numel():
            error_msgs.append(
                f"{prefix}y_freqs has shape {tuple(legacy.shape)}: the checkpoint was trained with "
                f"y_fourier={legacy.shape[-1]} random Fourier features of y, which MLPDrift no longer supports "
                "(only y_fourier=0 checkpoints load)")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
