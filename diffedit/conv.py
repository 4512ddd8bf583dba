"""A convolution that is fast on the CPU at the UNet's coarsest levels: a CPU speed-up, not part of the method.

oneDNN's fp32 convolution re-lays out its weights into a fresh buffer on every call. Past 32 MiB (glibc's largest
mmap threshold) that buffer is mmap-ed and page-faulted in anew each time, and at SD's 8x8 and 4x4 levels (1280 to
2560 channels, 3x3 kernels: 56 to 113 MiB of weights, 16 to 64 positions per row) this costs more than the
arithmetic. Measured on a 2-core Xeon, torch 2.13 (one process, medians), as one matmul of the weights with the
unfolded 3x3 patches (im2col) against `F.conv2d`: 1280 -> 1280 channels on 2 rows of 4x4, 5 against 19 ms; on 2
rows of 8x8, 14 against 27 ms. With weights of 32 MiB or less oneDNN is as fast or up to 20% faster, and with glibc
told not to mmap (MALLOC_MMAP_THRESHOLD_, README.md "On a CPU") `F.conv2d` is as fast as the matmul. So the matmul
is taken for large fp32 weights on small maps only (`_matmul_pays`).

It sums the same products in another order: it agrees with `F.conv2d` to float rounding (~5e-7 relative per layer),
not bit for bit. Every other convolution (the tiny test configs' included) is `F.conv2d` itself. The limit counts
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
        large = self.weight.numel() * self.weight.element_size() > LARGE_WEIGHT_BYTES
        if not (large and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4):
            return False
        if isinstance(self.padding, str) or self.groups != 1 or self.dilation != (1, 1):
            return False
        (k, k_w), (s, s_w), (p, p_w) = self.kernel_size, self.stride, self.padding
        if (k, s, p) != (k_w, s_w, p_w) or self.padding_mode != "zeros":
            return False
        positions = x.shape[0] * _out_size(x.shape[-2], k, s, p) * _out_size(x.shape[-1], k, s, p)
        return 0 < positions <= SMALL_MAP_POSITIONS
