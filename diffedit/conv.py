"""A convolution that is fast on the CPU at the UNet's coarsest levels: a CPU speed-up, not part of the method.

oneDNN's fp32 convolution re-lays out its weights into a fresh buffer on every call. Past 32 MiB (glibc's largest
mmap threshold) that buffer is mmap-ed and page-faulted in anew each time, and at SD's 8x8 and 4x4 levels (1280 to
2560 channels, 3x3 kernels: 56 to 113 MiB of weights, 16 to 64 positions per row) this costs more than the
arithmetic. Measured on a 2-core Xeon, torch 2.13 (one process, medians): a 1280 -> 1280 conv on 2 rows of 4x4 took
19 ms in `F.conv2d` against 5 ms as one matmul of the weights with the unfolded 3x3 patches (im2col), 27 against 14
ms at 8x8; with weights of 32 MiB or less oneDNN is as fast or up to 20% faster, and with glibc told not to mmap
(MALLOC_MMAP_THRESHOLD_) `F.conv2d` is as fast as the matmul. From about 512 output positions on, oneDNN's direct
kernel is the faster one again. So the matmul is taken for large fp32 weights on small maps only (`_matmul_pays`).
It sums the same products in another order: it agrees with `F.conv2d` to float rounding (~5e-7 relative per layer),
not bit for bit; every other convolution (the tiny test configs' included) is `F.conv2d` itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Output positions (rows x height x width) up to which a CPU fp32 conv with large weights runs as a matmul. Measured
# (same machine, 1280 channels): 128 positions 13 against 27 ms, 512 positions 48 against 59 ms but 17 against 15
# ms at 960 -> 640 channels, 1280 positions 131 against 102 ms.
SMALL_MAP_POSITIONS = 256
# Weights above glibc's largest mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit) pay the page faults.
LARGE_WEIGHT_BYTES = 32 * 2**20


def conv2d_as_matmul(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int) -> Tensor:
    """`F.conv2d(x, weight, bias, stride, padding)` (one group, no dilation) as (out, in*k*k) @ (in*k*k, positions)."""
    n, _, height, width = x.shape
    k = weight.shape[-1]
    out_h, out_w = (height + 2 * padding - k) // stride + 1, (width + 2 * padding - k) // stride + 1
    patches = F.unfold(x, k, padding=padding, stride=stride)  # (n, in*k*k, out_h*out_w)
    y = weight.flatten(1) @ patches  # one batched matmul over the n rows
    if bias is not None:
        y = y + bias[:, None]
    return y.view(n, -1, out_h, out_w)


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` (same parameters and state-dict names) taking `conv2d_as_matmul` where it pays (module doc)."""

    def forward(self, x: Tensor) -> Tensor:
        if not self._matmul_pays(x):
            return super().forward(x)
        return conv2d_as_matmul(x, self.weight, self.bias, self.stride[0], self.padding[0])  # type: ignore[index]

    def _matmul_pays(self, x: Tensor) -> bool:
        (k, k_w), (s, s_w), (p, p_w) = self.kernel_size, self.stride, self.padding  # type: ignore[misc]
        square = (k, s, p) == (k_w, s_w, p_w)
        plain = square and self.groups == 1 and self.dilation == (1, 1) and self.padding_mode == "zeros"
        large = self.weight.numel() * self.weight.element_size() > LARGE_WEIGHT_BYTES
        if not (plain and large and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4):
            return False
        positions = x.shape[0] * ((x.shape[-2] + 2 * p - k) // s + 1) * ((x.shape[-1] + 2 * p - k) // s + 1)
        return positions <= SMALL_MAP_POSITIONS
