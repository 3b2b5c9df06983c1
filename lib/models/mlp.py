"""An MLP drift network a(y, s) for flat data (toy 2-D points and any (B, D) tensor).

    MLPDrift(dim=2, width=256, depth=3, ...)(y, s) -> a, shaped like y
    y: (B, D) state of the forward (inference) VP SDE at forward time s
    s: (B,) forward time in [0, T]

The module is the inference DRIFT a(y, s) of lib/sdes.py, not the score (score = a / g). What the
hidden layers actually predict is set by ``output``:

    "drift"          a = F(y, s)
    "eps"            a = -g(s) / sigma(s) * F(y, s)                       (noise prediction, DDPM)
    "preconditioned" a = -g(s) / sqrt(sigma(s)^2 + local_std^2) * F(y, s)

Why "preconditioned": the ELBO gap is 1/2 int E|a - a*|^2 ds and most of it sits at small s, where the
data (here a thin swiss roll of noise scale local_std) makes the score of order 1 / local_std. With the
factor above, F = -score * sqrt(sigma^2 + local_std^2) is O(1) at every s, so one set of weights serves
every noise level; "eps" (local_std = 0) instead forces F -> 0 like sigma as s -> 0, which the network
can only do approximately, and 1 / sigma amplifies the remainder. The constructor takes only plain
numbers and strings, so a checkpoint's {"name", "kwargs"} rebuilds it; beta_min/beta_max must match
the SDE the model is trained with (they set g and sigma).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

TIME_EMBEDS = ("sinusoid", "log_sigma")
CONDITIONINGS = ("concat", "film")
OUTPUTS = ("drift", "eps", "preconditioned")
NORMS = ("none", "layer")


def _check_choice(value, allowed, name):
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")
    return value


def sinusoid(u, dim, min_freq, max_freq):
    """(B,) -> (B, dim): [sin(f_k u), cos(f_k u)] with dim / 2 frequencies geometric in [min_freq, max_freq]."""
    half = dim // 2
    freqs = torch.exp(torch.linspace(math.log(min_freq), math.log(max_freq), half, device=u.device, dtype=u.dtype))
    args = u[:, None] * freqs  # (B, dim / 2)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class Block(nn.Module):
    """One hidden layer, optionally residual: h (B, W), temb (B, E) -> (B, W).

    FiLM: the time embedding sets a per-unit scale and shift of the pre-activation, so each noise
    level can re-purpose units (a concatenated time input can only shift them).
    """

    def __init__(self, width, temb_dim, conditioning, residual, norm):
        super().__init__()
        self.conditioning = conditioning
        self.residual = residual
        self.norm = nn.LayerNorm(width) if norm == "layer" else nn.Identity()
        self.linear = nn.Linear(width, width)
        self.film = nn.Linear(temb_dim, 2 * width) if conditioning == "film" else None
        if residual:
            self.out = nn.Linear(width, width)
            # Start each residual branch at zero so the initial network is a shallow, well-conditioned map.
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, h, temb):
        z = self.linear(self.norm(h))
        if self.film is not None:
            scale, shift = self.film(temb).chunk(2, dim=1)  # (B, W) each
            z = z * (1 + scale) + shift
        z = F.silu(z)
        return h + self.out(z) if self.residual else z


class MLPDrift(nn.Module):
    """Time-conditioned MLP for the VP-SDE drift a(y, s): y (B, D), s (B,) -> (B, D).

    Args (all plain types, so the kwargs round-trip through JSON):
        dim: data dimension D.
        width: hidden units per layer.
        depth: hidden blocks after the input layer (depth=2 without residual is a 3-hidden-layer MLP).
        time_embed: "sinusoid" (DDPM sinusoids of time_scale * s) or "log_sigma" (sinusoids of
            log(sigma^2(s) + local_std^2), which spreads out the small-s region where the likelihood is decided).
        time_dim: number of sinusoidal features (even).
        time_scale: multiplies s for "sinusoid"; the DDPM frequencies were built for steps 0..999.
        conditioning: "concat" (embedding concatenated to y at the input) or "film" (scale/shift per block).
        residual: residual blocks with zero-initialised branches.
        norm: "none" or "layer" (LayerNorm before each block's linear layer).
        output: "drift", "eps" or "preconditioned" (see the module docstring).
        local_std: the noise floor of "preconditioned" (the data's small-scale spread).
        y_fourier, y_fourier_scale, y_fourier_seed: number of random Fourier features [sin, cos](2 pi y W),
            W ~ N(0, scale^2), appended to y (0: none); the seed makes W a function of the kwargs.
        beta_min, beta_max: the VP schedule, needed for g and sigma by "eps"/"preconditioned"/"log_sigma".
    """

    def __init__(self, dim=2, width=128, depth=2, time_embed="log_sigma", time_dim=64, time_scale=1000.0,
                 conditioning="concat", residual=False, norm="none", output="preconditioned", local_std=0.05,
                 y_fourier=0, y_fourier_scale=4.0, y_fourier_seed=0, beta_min=0.1, beta_max=20.0):
        super().__init__()
        self.dim = int(dim)
        self.time_embed = _check_choice(time_embed, TIME_EMBEDS, "time_embed")
        self.conditioning = _check_choice(conditioning, CONDITIONINGS, "conditioning")
        self.output = _check_choice(output, OUTPUTS, "output")
        _check_choice(norm, NORMS, "norm")
        if time_dim % 2:
            raise ValueError(f"time_dim must be even, got {time_dim}")
        if width < 1 or depth < 1:
            raise ValueError(f"width and depth must be >= 1, got width={width}, depth={depth}")
        if local_std < 0:
            raise ValueError(f"local_std must be >= 0, got {local_std}")
        if y_fourier < 0 or y_fourier_scale <= 0:
            raise ValueError(f"need y_fourier >= 0 and y_fourier_scale > 0, got {y_fourier}, {y_fourier_scale}")
        self.time_dim = int(time_dim)
        self.time_scale = float(time_scale)
        self.local_std = float(local_std)
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

        temb_dim = width
        if conditioning == "film":
            self.temb = nn.Sequential(nn.Linear(self.time_dim, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        else:
            # Concatenating the raw sinusoids costs one (D + time_dim) x width layer; a separate embedding MLP
            # would double the cost of a small network for no measured gain (benchmarks/toy_study.py).
            self.temb = None
        # Random Fourier features of y (Tancik et al. 2020): an MLP on raw coordinates is slow to fit functions
        # that vary on a scale much finer than the data's extent (the score near s = 0 varies on local_std).
        # Drawn from their own seeded generator, so the kwargs alone rebuild them; kept in the state dict too.
        gen = torch.Generator().manual_seed(int(y_fourier_seed))
        self.register_buffer("y_freqs", float(y_fourier_scale) * torch.randn(self.dim, int(y_fourier), generator=gen))
        in_dim = self.dim + 2 * int(y_fourier) + (self.time_dim if conditioning == "concat" else 0)
        self.inp = nn.Linear(in_dim, width)
        self.blocks = nn.ModuleList(Block(width, temb_dim, conditioning, residual, norm) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width) if norm == "layer" else nn.Identity()
        self.head = nn.Linear(width, self.dim)

    def beta(self, s):
        return self.beta_min + (self.beta_max - self.beta_min) * s

    def sigma2(self, s):
        """sigma^2(s) = 1 - exp(-B(s)) of the VP SDE, via expm1 (no float32 underflow at small s)."""
        B = self.beta_min * s + 0.5 * (self.beta_max - self.beta_min) * s ** 2
        return -torch.expm1(-B)

    def time_features(self, s):
        """(B,) -> (B, time_dim)."""
        if self.time_embed == "sinusoid":
            return sinusoid(self.time_scale * s, self.time_dim, 1e-4, 1.0)
        # Noise below the data's own spread local_std barely changes p_s, so the embedding flattens there:
        # u = log(sigma^2 + local_std^2) runs from log(local_std^2) (-6 for 0.05) to ~0, with periods ~0.8 to ~50.
        u = torch.log(self.sigma2(s) + max(self.local_std, 1e-3) ** 2)
        return sinusoid(u, self.time_dim, 1.0 / 8, 8.0)

    def net(self, y, s):
        """The raw network output F(y, s): (B, D)."""
        feats = self.time_features(s)  # (B, time_dim)
        if self.y_freqs.shape[1]:
            proj = 2 * math.pi * y @ self.y_freqs  # (B, y_fourier)
            y = torch.cat([y, torch.sin(proj), torch.cos(proj)], dim=1)  # (B, D + 2 y_fourier)
        if self.temb is None:
            h, act_temb = self.inp(torch.cat([y, feats], dim=1)), None
        else:
            h, act_temb = self.inp(y), F.silu(self.temb(feats))  # (B, W), (B, W)
        h = F.silu(h)
        for block in self.blocks:
            h = block(h, act_temb)
        return self.head(self.final_norm(h))

    def output_scale(self, s):
        """The factor c(s) in a = c(s) F(y, s): (B,)."""
        if self.output == "drift":
            return torch.ones_like(s)
        floor = 0.0 if self.output == "eps" else self.local_std ** 2
        return -self.beta(s).sqrt() / (self.sigma2(s) + floor).sqrt()

    def forward(self, y, s):
        if y.dim() != 2 or s.shape != (y.shape[0],):
            raise ValueError(f"expected y (B, D) and s (B,), got {tuple(y.shape)} and {tuple(s.shape)}")
        return self.output_scale(s)[:, None] * self.net(y, s)  # (B, 1) broadcasts over D
