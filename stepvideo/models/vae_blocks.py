"""Building blocks of the Step-Video Video-VAE v2: causal 3D convolutions, per-frame group
norm, ResNet and attention blocks, and the space/time resampling layers.

Every block works on channel-first video ``[B, C, T, H, W]`` (T = frames). The key names of
the modules (``conv``, ``norm1``, ``nin_shortcut`` ...) are those of the official checkpoint;
see ``docs/vae.md`` and ``../shared/spec/VAE_SPEC.md`` §11 for the full key tree.

Causality: every temporal convolution pads zero frames in *front* of the clip only, so frame
``t`` of any output depends on input frames ``<= t``. A ResNet block's "zero frames after
norm + SiLU" (upstream's ``CausalConvAfterNorm``) is exactly a causal convolution applied to
``SiLU(GN(x))``, so one :class:`CausalConv3d` covers all three upstream conv flavours.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

# A convolution whose input or output has at least this many elements is computed in time
# pieces (numerically identical; keeps each kernel call below 32-bit indexing limits).
LARGE_TENSOR_NUMEL = 2 ** 30
_PIECE_NUMEL = 2 ** 28

IntOr3 = Union[int, Tuple[int, int, int]]


def _triple(value: IntOr3) -> Tuple[int, int, int]:
    return (value, value, value) if isinstance(value, int) else tuple(value)


# ----------------------------------------------------------------------------------------
# Normalisation and convolution
# ----------------------------------------------------------------------------------------

class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm (32 groups, eps 1e-5, affine) on video ``[B, C, T, H, W]``.

    ``per_frame=True`` (VAE v2): statistics per (sample, frame, group) over
    ``C/32 x H x W``. ``per_frame=False`` (v1): over ``C/32 x T x H x W``. This is an
    instance property; nothing global is switched.
    """

    def __init__(self, num_channels: int, per_frame: bool = True, num_groups: int = 32, eps: float = 1e-5):
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm needs channels divisible by {num_groups} groups, got {num_channels}")
        super().__init__(num_groups, num_channels, eps=eps, affine=True)
        self.per_frame = per_frame

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.per_frame:
            return super().forward(x)
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)                   # [B*T, C, H, W]
        frames = F.group_norm(frames, self.num_groups, self.weight, self.bias, self.eps)
        return frames.view(b, t, c, h, w).transpose(1, 2)                     # [B, C, T, H, W]


def _conv3d_time_pieces(x: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    """``conv(x)`` computed over pieces of the (already padded) time axis into one output."""
    kt, kh, kw = conv.kernel_size
    st, sh, sw = conv.stride
    dt, dh, dw = conv.dilation
    _, ph, pw = conv.padding
    b, _, t_in, h, w = x.shape
    t_out = (t_in - dt * (kt - 1) - 1) // st + 1
    h_out = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    w_out = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = x.new_empty(b, conv.out_channels, t_out, h_out, w_out)
    biggest = max(x.numel(), out.numel())
    pieces = min(t_out, max(4, math.ceil(biggest / _PIECE_NUMEL)))
    step = t_out // pieces
    for i in range(pieces):
        o0 = i * step
        o1 = t_out if i == pieces - 1 else o0 + step
        i0, i1 = o0 * st, (o1 - 1) * st + dt * (kt - 1) + 1   # input frames this piece reads
        out[:, :, o0:o1] = conv(x[:, :, i0:i1])
    return out


class CausalConv3d(nn.Module):
    """Causal 3D convolution (upstream ``CausalConv`` / ``CausalConvChannelLast`` /
    ``CausalConvAfterNorm``); key ``<name>.conv.{weight,bias}``.

    An int ``kernel_size`` k means ``(k, k, k)``; an int ``stride`` s means ``(s, 1, 1)``
    (temporal only). Time is padded with ``dilation*(k_t-1) + max(1-stride_t, 0)`` zero
    frames in front; height/width symmetrically with ``k//2``.

    Forward ``x [B, C_in, T, H, W]`` (+ optional ``residual`` of the output shape) ->
    ``[B, C_out, T', H', W']``.
    """

    def __init__(self, chan_in: int, chan_out: int, kernel_size: IntOr3, stride: IntOr3 = 1,
                 dilation: int = 1, bias: bool = True):
        super().__init__()
        kernel = _triple(kernel_size)
        stride = (stride, 1, 1) if isinstance(stride, int) else tuple(stride)
        self.time_pad = dilation * (kernel[0] - 1) + max(1 - stride[0], 0)
        self.conv = nn.Conv3d(chan_in, chan_out, kernel, stride=stride, dilation=dilation,
                              padding=(0, kernel[1] // 2, kernel[2] // 2), bias=bias)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.time_pad:
            x = F.pad(x, (0, 0, 0, 0, self.time_pad, 0))                      # zero frames in front
        if x.numel() >= LARGE_TENSOR_NUMEL:
            y = _conv3d_time_pieces(x, self.conv)
        else:
            y = self.conv(x)
        return y if residual is None else y.add_(residual)


class Conv2dPerFrame(nn.Conv2d):
    """A 2D convolution applied to every frame of ``[B, C, T, H, W]`` (key ``weight (O, I, kh, kw)``).

    Computed as a 3D convolution with a depth-1 kernel, which avoids moving frames into the
    batch axis.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv3d(x, self.weight.unsqueeze(2), self.bias, stride=(1, *self.stride),
                        padding=(0, *self.padding))


# ----------------------------------------------------------------------------------------
# ResNet and attention blocks
# ----------------------------------------------------------------------------------------

class ResnetBlock3D(nn.Module):
    """``y = conv2(SiLU(GN2(h))) + shortcut(x)`` with ``h = conv1(SiLU(GN1(x)))``.

    Both convs are causal 3x3x3 (two zero frames in front, inserted after norm + SiLU);
    ``nin_shortcut`` is a 1x1x1 conv present only when ``in != out``.
    ``x [B, in, T, H, W] -> [B, out, T, H, W]``.
    """

    def __init__(self, in_channels: int, out_channels: int, per_frame_norm: bool = True):
        super().__init__()
        self.norm1 = FrameGroupNorm(in_channels, per_frame_norm)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.norm2 = FrameGroupNorm(out_channels, per_frame_norm)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        self.nin_shortcut = CausalConv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return self.conv2(F.silu(self.norm2(h), inplace=True), residual=shortcut)


class CausalAttnBlock(nn.Module):
    """Single-head self-attention of width C, causal over the flattened ``(t, h, w)`` raster.

    Token ``i = (t*H + h)*W + w`` attends to tokens ``j <= i`` only (inside a frame a pixel
    sees only the pixels before it). q/k/v/proj_out are 1x1x1 convs on ``GN_f(x)`` (no SiLU).
    ``x [B, C, T, H, W] -> [B, C, T, H, W]`` (residual included).
    """

    def __init__(self, channels: int, per_frame_norm: bool = True):
        super().__init__()
        self.norm = FrameGroupNorm(channels, per_frame_norm)
        self.q = CausalConv3d(channels, channels, 1)
        self.k = CausalConv3d(channels, channels, 1)
        self.v = CausalConv3d(channels, channels, 1)
        self.proj_out = CausalConv3d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        a = self.norm(x)

        def tokens(conv: CausalConv3d) -> torch.Tensor:
            return conv(a).flatten(2).transpose(1, 2).unsqueeze(1)            # [B, 1, T*H*W, C]

        q, k, v = tokens(self.q), tokens(self.k), tokens(self.v)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)           # [B, 1, L, C]
        o = o.squeeze(1).transpose(1, 2).reshape(b, c, t, h, w)               # [B, C, T, H, W]
        return self.proj_out(o, residual=x)


class MidBlock3D(nn.Module):
    """``block_2(attn_1(block_1(x)))`` at constant width; ``[B, C, T, H, W]`` in and out."""

    def __init__(self, channels: int, per_frame_norm: bool = True):
        super().__init__()
        self.block_1 = ResnetBlock3D(channels, channels, per_frame_norm)
        self.attn_1 = CausalAttnBlock(channels, per_frame_norm)
        self.block_2 = ResnetBlock3D(channels, channels, per_frame_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


# ----------------------------------------------------------------------------------------
# Resampling inside the trunk
# ----------------------------------------------------------------------------------------

class Downsample2D(nn.Module):
    """Per-frame spatial /2 (encoder level 0): pad right/bottom by 1, 3x3 conv stride 2.
    Key ``<name>.conv.weight (C, C, 3, 3)``. ``[B, C, T, H, W] -> [B, C, T, H/2, W/2]``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2dPerFrame(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Downsample3D(nn.Module):
    """Causal 3x3x3 conv with stride 2 in T, H and W (encoder levels 1, 2).
    Key ``<name>.conv.conv.*``. ``[B, C, T, H, W] -> [B, C, (T-1)//2+1, H/2, W/2]``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, stride=(2, 2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample2D(nn.Module):
    """Per-frame nearest x2 in H, W then a 3x3 conv (decoder level 1).
    Key ``<name>.conv.weight (C, C, 3, 3)``. ``[B, C, T, H, W] -> [B, C, T, 2H, 2W]``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2dPerFrame(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest"))


class Res3DBlockUpsample(nn.Module):
    """Refinement after the 3D upsampling: ``SiLU(GN2(conv2(SiLU(GN1(conv1(x))))) + x) + x``
    (the input is added twice, before and after the SiLU). ``[B, C, T, H, W]`` in and out."""

    def __init__(self, channels: int, per_frame_norm: bool = True):
        super().__init__()
        # attribute order = checkpoint order: conv1, norm1, conv2, norm2
        self.conv1 = CausalConv3d(channels, channels, 3)
        self.norm1 = FrameGroupNorm(channels, per_frame_norm)
        self.conv2 = CausalConv3d(channels, channels, 3)
        self.norm2 = FrameGroupNorm(channels, per_frame_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(self.conv1(x)), inplace=True)
        h = self.norm2(self.conv2(h)).add_(x)
        return F.silu(h, inplace=True).add_(x)


class Upsample3D(nn.Module):
    """Nearest x2 jointly in T, H, W (output frame i reads frame i//2), then
    :class:`Res3DBlockUpsample` (key ``<name>.conv3d.*``).
    ``[B, C, T, H, W] -> [B, C, 2T, 2H, 2W]``."""

    def __init__(self, channels: int, per_frame_norm: bool = True):
        super().__init__()
        self.conv3d = Res3DBlockUpsample(channels, per_frame_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3d(F.interpolate(x, scale_factor=2, mode="nearest"))


# ----------------------------------------------------------------------------------------
# Space-time pixel (un)shuffle: the v2 patchify / unpatchify layers
# ----------------------------------------------------------------------------------------

def space_time_unshuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Pack ``factor^3`` neighbours into channels, after ``factor-1`` zero frames in front.

    ``[B, C, D, H, W] -> [B, C*f^3, (D+f-1)/f, H/f, W/f]`` with
    ``out[c*f^3 + a*f^2 + b*f + d, t, y, x] = padded[c, f*t + a, f*y + b, f*x + d]``.
    """
    f = factor
    if f == 1:
        return x
    x = F.pad(x, (0, 0, 0, 0, f - 1, 0))
    b, c, d, h, w = x.shape
    if d % f or h % f or w % f:
        raise ValueError(f"unshuffle by {f} needs padded frames, height and width divisible by {f}, "
                         f"got {d}x{h}x{w}")
    x = x.view(b, c, d // f, f, h // f, f, w // f, f)                        # [B, C, t, a, y, b, x, d]
    x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)                                     # [B, C, a, b, d, t, y, x]
    return x.reshape(b, c * f ** 3, d // f, h // f, w // f)


def space_time_shuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Inverse packing of :func:`space_time_unshuffle`, then drop the first ``f-1`` frames.

    ``[B, C*f^3, D, H, W] -> [B, C, f*D - f + 1, f*H, f*W]``.
    """
    f = factor
    if f == 1:
        return x
    b, cf, d, h, w = x.shape
    c = cf // f ** 3
    x = x.view(b, c, f, f, f, d, h, w)                                        # [B, C, a, b, d, t, y, x]
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)                                     # [B, C, t, a, y, b, x, d]
    x = x.reshape(b, c, d * f, h * f, w * f)
    return x[:, :, f - 1:]


class ConvPixelUnshuffleDown3D(nn.Module):
    """Causal conv ``in -> out/f^3`` (key ``<name>.conv.conv.*``), then :func:`space_time_unshuffle`
    (the zero frame is inserted after the conv). ``[B, in, D, H, W] -> [B, out, (D+f-1)/f, H/f, W/f]``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, factor: int = 2):
        super().__init__()
        if out_channels % factor ** 3:
            raise ValueError(f"patchify output channels {out_channels} must be divisible by {factor ** 3}")
        self.factor = factor
        self.conv = CausalConv3d(in_channels, out_channels // factor ** 3, kernel_size)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = space_time_unshuffle(self.conv(x), self.factor)
        return y if residual is None else y.add_(residual)


class PixelUnshuffleChannelAveraging3D(nn.Module):
    """Parameter-free shortcut: :func:`space_time_unshuffle`, then the mean of every group of
    ``g = in*f^3/out`` consecutive channels. ``[B, in, D, H, W] -> [B, out, ...]``."""

    def __init__(self, in_channels: int, out_channels: int, factor: int):
        super().__init__()
        if (in_channels * factor ** 3) % out_channels:
            raise ValueError(f"channel averaging needs in*f^3 = {in_channels * factor ** 3} divisible by "
                             f"out = {out_channels}")
        self.factor = factor
        self.out_channels = out_channels
        self.group = in_channels * factor ** 3 // out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = space_time_unshuffle(x, self.factor)
        if self.group == 1:
            return x
        b, _, d, h, w = x.shape
        return x.view(b, self.out_channels, self.group, d, h, w).mean(dim=2)


class ConvPixelShuffleUp3D(nn.Module):
    """Causal conv ``in -> out*f^3`` (key ``<name>.conv.conv.*``), then :func:`space_time_shuffle`.
    ``[B, in, D, H, W] -> [B, out, f*D-f+1, f*H, f*W]``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, factor: int = 2):
        super().__init__()
        self.factor = factor
        self.conv = CausalConv3d(in_channels, out_channels * factor ** 3, kernel_size)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = space_time_shuffle(self.conv(x), self.factor)
        return y if residual is None else y.add_(residual)


class ChannelDuplicatingPixelShuffle3D(nn.Module):
    """Parameter-free shortcut: repeat every channel ``r = out*f^3/in`` times consecutively,
    then :func:`space_time_shuffle`. ``[B, in, D, H, W] -> [B, out, f*D-f+1, f*H, f*W]``."""

    def __init__(self, in_channels: int, out_channels: int, factor: int):
        super().__init__()
        if (out_channels * factor ** 3) % in_channels:
            raise ValueError(f"channel duplication needs out*f^3 = {out_channels * factor ** 3} divisible by "
                             f"in = {in_channels}")
        self.factor = factor
        self.repeats = out_channels * factor ** 3 // in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.repeats > 1:
            x = x.repeat_interleave(self.repeats, dim=1)
        return space_time_shuffle(x, self.factor)
