"""The DDPM U-Net (Ho, Jain & Abbeel 2020, their CIFAR-10 architecture), conditioned on forward time s.

    UNet(input_channels, input_height, ch, ...)(x, t) -> tensor shaped like x
    x: (B, C, H, W) with C = input_channels, H = W = input_height
    t: (B,) forward diffusion time in [0, T], T about 1 (a float or 0-d tensor is broadcast to (B,))

With ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,) this is DDPM's 35.7M-parameter
CIFAR-10 model. The last layer of every residual branch and the output conv start at zero, so the network
is the zero function at initialisation (as in DDPM).

Speed (benchmarks/unet_speed.py): convolutions take 65-75% of a float32 training step on a CPU, so
what is left is fewer multiply-adds and fewer temporaries. The upsampling conv runs as an equivalent
stride-2 transposed conv (Upsample: 16 instead of 36 multiply-adds per input pixel and channel pair, no
4x larger intermediate), and the time shift and residual sums are added into the conv outputs in place.
Parameters, state-dict keys and outputs (to float rounding) are those of the plain formulation. Every
layer keeps a channels_last input channels_last (the attention's reshapes included), so
`model.to(memory_format=torch.channels_last)` runs the whole network in that layout, which oneDNN's
convolutions use without reordering (train_img.py --channels_last).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels):
    """GroupNorm with DDPM's 32 groups (hence channels must be a multiple of 32)."""
    return nn.GroupNorm(32, channels, eps=1e-6)


def zero_init(module):
    """Zero a layer's weight and bias so the branch it ends starts as the zero map."""
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of forward time followed by DDPM's two-layer MLP: (B,) -> (B, 4 ch)."""

    def __init__(self, ch, time_scale=1000.0):
        super().__init__()
        # The sinusoids were designed for integer steps 0..999: their frequencies run from 1 down to 1e-4,
        # so on s in [0, 1] every phase moves by at most 1 radian and times close together are nearly
        # indistinguishable. Scaling s by 1000 puts it back on the range the frequencies were built for.
        self.time_scale = time_scale
        half = ch // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / (half - 1))
        self.register_buffer("freqs", freqs, persistent=False)  # (ch / 2,); derived, not state
        self.dense0 = nn.Linear(ch, 4 * ch)
        self.dense1 = nn.Linear(4 * ch, 4 * ch)

    def sinusoid(self, t):
        """(B,) -> (B, ch): [sin(1000 t f_k), cos(1000 t f_k)]."""
        args = (self.time_scale * t)[:, None] * self.freqs  # (B, ch / 2)
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)

    def forward(self, t):
        return self.dense1(F.silu(self.dense0(self.sinusoid(t))))


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv -> + time projection -> GroupNorm -> SiLU -> dropout -> conv, plus a skip.

    forward(x (B, in_ch, H, W), temb_act (B, temb_ch)) -> (B, out_ch, H, W); temb_act is the time embedding
    already passed through SiLU (done once per forward in UNet rather than once per block).
    """

    def __init__(self, in_ch, out_ch, temb_ch, dropout=0.0, conv_shortcut=False):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        if in_ch == out_ch:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Conv2d(in_ch, out_ch, 3 if conv_shortcut else 1, padding=1 if conv_shortcut else 0)

    def forward(self, x, temb_act):
        # In place on fresh conv outputs: autograd keeps a conv's input, never its output, so this is
        # safe and saves a temporary the size of the activation per sum.
        h = self.conv1(F.silu(self.norm1(x)))
        h.add_(self.temb_proj(temb_act)[:, :, None, None])  # (B, out_ch, 1, 1): same shift at every pixel
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h.add_(self.shortcut(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual add: (B, C, H, W) -> same."""

    def __init__(self, channels):
        super().__init__()
        self.norm = group_norm(channels)
        # q, k and v are three 1x1 projections; one conv with 3C outputs computes them in a single pass.
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(2, 3)  # (B, 3, HW, C)
        q, k, v = qkv.unbind(1)  # each (B, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, HW, C), softmax(q k^T / sqrt(C)) v
        h = h.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halve H and W: 3x3 stride-2 conv, or 2x2 average pooling. (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels, with_conv):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if with_conv else None

    def forward(self, x):
        return self.conv(x) if self.conv is not None else F.avg_pool2d(x, 2)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour, then optionally a 3x3 conv. (B, C, H, W) -> (B, C, 2H, 2W).

    With the conv, both steps run as one stride-2 transposed conv (same result, same parameters):
    output pixel 2i + r (r = 0, 1) of the upsampled-then-convolved row sees upsampled rows
    2i + r - 1, 2i + r, 2i + r + 1, i.e. input rows i - 1, i, i for r = 0 and i, i, i + 1 for r = 1,
    so its taps (w0, w1, w2) collapse to (w0, w1 + w2) on rows (i - 1, i) and to (w0 + w1, w2) on rows
    (i, i + 1). Laid out as a transposed-conv kernel (padding 1) that is (w2, w1 + w2, w0 + w1, w0) along
    each axis: 16 multiply-adds per input pixel and channel pair instead of 36, and the 4x larger
    upsampled tensor is never built.
    """

    def __init__(self, channels, with_conv):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if with_conv else None

    def forward(self, x):
        if self.conv is None:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        kernel = _fold_taps(_fold_taps(self.conv.weight, 2), 3)  # (C_out, C_in, 4, 4)
        return F.conv_transpose2d(x, kernel.transpose(0, 1), self.conv.bias, stride=2, padding=1)


def _fold_taps(w, dim):
    """3 taps (w0, w1, w2) along dim -> the 4 taps (w2, w1 + w2, w0 + w1, w0) of Upsample's kernel."""
    w0, w1, w2 = w.unbind(dim)
    return torch.stack([w2, w1 + w2, w0 + w1, w0], dim)


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class UNet(nn.Module):
    """The DDPM U-Net: forward(x (B, C, H, W), t (B,)) -> (B, output_channels, H, W).

    ch_mult[i] sets the width ch * ch_mult[i] of resolution level i (level 0 is input_height, each
    later level halves it); attention follows each residual block at the resolutions in attn_resolutions
    (a listed resolution the network never reaches simply adds no attention, as in DDPM).
    """

    def __init__(self, input_channels, input_height, ch, output_channels=None, ch_mult=(1, 2, 4, 8),
                 num_res_blocks=2, attn_resolutions=(16,), dropout=0., resamp_with_conv=True):
        super().__init__()
        output_channels = input_channels if output_channels is None else output_channels
        _check_positive_int("input_channels", input_channels)
        _check_positive_int("output_channels", output_channels)
        _check_positive_int("input_height", input_height)
        _check_positive_int("ch", ch)
        if ch % 32:
            raise ValueError(f"ch must be a multiple of 32 (GroupNorm uses 32 groups), got ch={ch}")
        ch_mult = tuple(ch_mult)
        if not ch_mult:
            raise ValueError("ch_mult must list at least one channel multiplier, got an empty sequence")
        for m in ch_mult:
            _check_positive_int("every ch_mult entry", m)
        factor = 2 ** (len(ch_mult) - 1)
        if input_height % factor:
            raise ValueError(f"input_height must be divisible by 2**(len(ch_mult)-1) = {factor} so every "
                             f"downsampling halves it exactly, got input_height={input_height}")
        if isinstance(num_res_blocks, bool) or not isinstance(num_res_blocks, int) or num_res_blocks < 0:
            raise ValueError(f"num_res_blocks must be a non-negative integer, got {num_res_blocks!r}")
        attn_resolutions = tuple(attn_resolutions)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
        self.input_channels, self.input_height = input_channels, input_height
        self.output_channels = output_channels

        temb_ch = 4 * ch
        self.time_embed = TimeEmbedding(ch)
        self.conv_in = nn.Conv2d(input_channels, ch, 3, padding=1)

        # Down path; skip_chs records the channels of every tensor pushed onto the skip stack.
        res, block_in = input_height, ch
        skip_chs = [ch]
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            level = nn.Module()
            level.blocks, level.attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                level.blocks.append(ResBlock(block_in, ch * mult, temb_ch, dropout))
                block_in = ch * mult
                level.attns.append(AttnBlock(block_in) if res in attn_resolutions else nn.Identity())
                skip_chs.append(block_in)
            level.downsample = None  # the deepest level keeps its resolution
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(block_in, resamp_with_conv)
                res //= 2
                skip_chs.append(block_in)
            self.down.append(level)

        self.mid_block1 = ResBlock(block_in, block_in, temb_ch, dropout)
        self.mid_attn = AttnBlock(block_in)
        self.mid_block2 = ResBlock(block_in, block_in, temb_ch, dropout)

        # Up path, built deepest level first; each block consumes one skip connection.
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(ch_mult))):
            level = nn.Module()
            level.blocks, level.attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.blocks.append(ResBlock(block_in + skip_chs.pop(), ch * mult, temb_ch, dropout))
                block_in = ch * mult
                level.attns.append(AttnBlock(block_in) if res in attn_resolutions else nn.Identity())
            level.upsample = None  # the top level is back at input_height
            if i != 0:
                level.upsample = Upsample(block_in, resamp_with_conv)
                res *= 2
            self.up.append(level)

        self.norm_out = group_norm(block_in)
        self.conv_out = zero_init(nn.Conv2d(block_in, output_channels, 3, padding=1))

    def _check_inputs(self, x, t):
        """Validate x and return t as a (B,) tensor of x's dtype (a float or 0-d tensor is expanded)."""
        expected = (self.input_channels, self.input_height, self.input_height)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        B = x.shape[0]
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.dim() == 0 or tuple(t.shape) == (1,):
            return t.reshape(1).expand(B)
        if tuple(t.shape) != (B,):
            raise ValueError(f"t must have shape (B,) = ({B},) or be a scalar, got {tuple(t.shape)}")
        return t

    def forward(self, x, t):
        t = self._check_inputs(x, t)
        # SiLU of the embedding is what every ResBlock projects; take it once here.
        temb_act = F.silu(self.time_embed(t))  # (B, 4 ch)

        hs = [self.conv_in(x)]
        for level in self.down:
            for block, attn in zip(level.blocks, level.attns):
                hs.append(attn(block(hs[-1], temb_act)))
            if level.downsample is not None:
                hs.append(level.downsample(hs[-1]))

        h = hs[-1]
        h = self.mid_block2(self.mid_attn(self.mid_block1(h, temb_act)), temb_act)

        for level in self.up:
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(torch.cat([h, hs.pop()], dim=1), temb_act))  # concat along channels
            if level.upsample is not None:
                h = level.upsample(h)

        return self.conv_out(F.silu(self.norm_out(h)))
