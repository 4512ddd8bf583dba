"""Convolutions that are fast on the CPU: speed-ups, not part of the method.

1. `Conv2d` (the UNet's coarsest levels, below) and 2. `upsample_conv` (an upsampler's conv at the input's
resolution, further below).

oneDNN's fp32 convolution re-lays out its weights into a fresh buffer on every call. Past 32 MiB (glibc's largest
mmap threshold) that buffer is mmap-ed and page-faulted in anew each time, and at SD's 8x8 and 4x4 levels (1280 to
2560 channels, 3x3 kernels: 56 to 113 MiB of weights, 16 to 64 positions per row) this costs more than the
arithmetic. Measured on a 2-core Xeon, torch 2.13 (one process, medians), as one matmul of the weights with the
unfolded 3x3 patches (im2col) against `F.conv2d`: 1280 -> 1280 channels on 2 rows of 4x4, 5 against 19 ms; on 2
rows of 8x8, 14 against 27 ms. With weights of 32 MiB or less oneDNN is as fast or up to 20% faster, and with glibc
told not to mmap (MALLOC_MMAP_THRESHOLD_, README.md "On a CPU") `F.conv2d` is as fast as the matmul. So the matmul
is taken for large fp32 weights on small maps only (`_matmul_pays`).

It sums the same products in another order: it agrees with `F.conv2d` to float rounding (~5e-7 relative per layer),
not bit for bit. Every other convolution (the tiny test configs' included) is `F.conv2d` itself, or
`upsample_conv` where its own gate says. The limit counts
the rows of the batch, so a row may take the other path alone than in a batch (1280 channels at 16x16: 256
positions alone, 512 in a pair); on full-size CPU models, results then differ in the last bits with the batch, as
oneDNN's own kernel choices already make them. The output is contiguous (NCHW) whatever the input's layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Output positions (rows x height x width) up to which a CPU fp32 conv with large weights runs as a matmul. Measured
# (same machine, matmul against F.conv2d): 1280 -> 1280 channels at 128 positions 13 against 27 ms, at 512 48 against
# 59 ms, at 1280 131 against 102 ms. 512 did not beat 256 on the whole UNet (7 alternating rounds, 1.68 against
# 1.63 s at batch 2), so the limit stays at 256.
SMALL_MAP_POSITIONS = 256
# Weights above glibc's largest mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit) pay the page faults.
LARGE_WEIGHT_BYTES = 32 * 2**20
# `upsample_conv` is taken on the CPU in fp32 from this many input positions (rows x height x width) and for weights
# between these sizes; see `upsample_conv_pays`.
UPSAMPLE_MIN_POSITIONS = 1024
UPSAMPLE_WEIGHT_BYTES = (2**20, LARGE_WEIGHT_BYTES)
# Which rows (columns) of a 3x3 kernel land on which source pixel after a nearest x2 upsampling, per output parity:
# an even output row 2i sees source rows (i-1, i, i), so its 2-tap kernel is (w0, w1 + w2); an odd one, 2i+1,
# sees (i, i, i+1): (w0 + w1, w2).
_PHASE_TAPS = ((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0))


def _weight_bytes(conv: nn.Conv2d) -> int:
    return conv.weight.numel() * conv.weight.element_size()


def _plain_on_cpu(x: Tensor, conv: nn.Conv2d) -> bool:
    """What both fast paths need: a batched fp32 input on the CPU, and a conv of one group, no dilation, zero padding
    given as numbers (each path then checks its own kernel, stride, sizes)."""
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4):
        return False
    return not isinstance(conv.padding, str) and conv.groups == 1 and conv.dilation == (1, 1) and (
        conv.padding_mode == "zeros")


def _out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return max(0, (size + 2 * padding - kernel) // stride + 1)  # 0: the kernel does not fit (F.conv2d says so)


def conv2d_as_matmul(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int) -> Tensor:
    """`F.conv2d(x, weight, bias, stride, padding)` for a batched input, a square kernel, the same stride and zero
    padding on both axes, one group and no dilation, as (out, in*k*k) @ (in*k*k, positions) per row."""
    n, _, height, width = x.shape
    k = weight.shape[-1]
    patches = F.unfold(x, k, padding=padding, stride=stride)  # (n, in*k*k, out_h*out_w)
    y = weight.flatten(1) @ patches  # one batched matmul over the n rows
    if bias is not None:
        y = y + bias[:, None]
    return y.view(n, -1, _out_size(height, k, stride, padding), _out_size(width, k, stride, padding))


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` (same parameters and state-dict names) taking `conv2d_as_matmul` where it pays (module doc)."""

    def forward(self, x: Tensor) -> Tensor:
        if not self._matmul_pays(x):
            return super().forward(x)
        return conv2d_as_matmul(x, self.weight, self.bias, self.stride[0], self.padding[0])  # type: ignore[index]

    def _matmul_pays(self, x: Tensor) -> bool:
        if not (_weight_bytes(self) > LARGE_WEIGHT_BYTES and _plain_on_cpu(x, self)):
            return False
        (k, k_w), (s, s_w), (p, p_w) = self.kernel_size, self.stride, self.padding
        if (k, s, p) != (k_w, s_w, p_w):
            return False
        positions = x.shape[0] * _out_size(x.shape[-2], k, s, p) * _out_size(x.shape[-1], k, s, p)
        return 0 < positions <= SMALL_MAP_POSITIONS


# ---- 2. an upsampler's conv at the input's resolution ---------------------------------------------------------------
def upsample_conv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)` for a 3x3 kernel,
    without the upsampled map: 4 multiply-adds per output pixel and channel pair instead of 9 (a little more in
    all: each parity is computed over (h + 1) x (w + 1) positions, 0.47 of the work at 32x32).

    Each output pixel (2i + a, 2j + b) of the 3x3 conv over the nearest-upsampled map reads a 2x2 window of x, with
    the kernel's taps that land on the same source pixel summed (`_PHASE_TAPS`). The four parities (a, b) are one
    conv of 2x2 kernels with 4x the output channels over x padded by 1 (the zero padding of the upsampled map is
    x's), and are then interleaved. The same products summed in another order: equal to float rounding (~4e-7
    relative measured at SD's sizes), not bit for bit.
    """
    n, channels, h, w = x.shape
    out_channels = weight.shape[0]
    taps = torch.tensor(_PHASE_TAPS, dtype=weight.dtype, device=weight.device)  # (parity, 2 taps, 3 rows)
    phases = torch.einsum("apk,oikl,bql->aboipq", taps, weight, taps)  # (a, b, out, in, 2, 2)
    y = F.conv2d(F.pad(x, (1, 1, 1, 1)), phases.reshape(4 * out_channels, channels, 2, 2),
                 None if bias is None else bias.repeat(4))
    y = y.view(n, 2, 2, out_channels, h + 1, w + 1)
    out = x.new_empty(n, out_channels, h, 2, w, 2)
    for a in (0, 1):  # parity a reads rows (i - 1, i) for a = 0 and (i, i + 1) for a = 1: y's rows a .. a + h
        for b in (0, 1):
            out[:, :, :, a, :, b] = y[:, a, b, :, a:a + h, b:b + w]
    return out.view(n, out_channels, 2 * h, 2 * w)


def upsample_conv_pays(x: Tensor, conv: nn.Conv2d) -> bool:
    """Whether `upsample_conv` beats upsampling then convolving: on the CPU in fp32, for a plain 3x3 conv with
    weights of 1 to 32 MiB, from 1024 input positions. Measured on a 2-core Xeon, torch 2.13 (medians): the SD VAE
    decoder's upsamplers at a 256 x 256 image, 512 channels at 32x32 69 -> 50 ms, 512 at 64x64 267 -> 152 ms, 256 at
    128x128 301 -> 167 ms; the UNet's 640 channels at 2 rows of 32x32 226 -> 129 ms. Smaller maps lose (512 channels
    at 16x16 17 -> 24 ms, the kernels' combination costing more than the product saves) and so do larger weights
    (1280 channels: 56 MiB, the page faults of `Conv2d`'s note). The floor of 1 MiB keeps the tiny test configs
    (at most 144 KiB) on the plain path, bit for bit; SD's smallest upsampler (256 channels) has 2.3 MiB. As for
    `Conv2d`, the positions count the batch's rows: the UNet's 640-channel upsampler at a 384 px image has 576
    positions alone and 1152 in the edit's pair, so a row's last bits may differ alone and in a batch."""
    if not (_plain_on_cpu(x, conv) and conv.weight.dtype == x.dtype):
        return False
    lo, hi = UPSAMPLE_WEIGHT_BYTES
    geometry = conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
    return geometry and lo <= _weight_bytes(conv) <= hi and x.shape[0] * x.shape[-2] * x.shape[-1] >= (
        UPSAMPLE_MIN_POSITIONS)
