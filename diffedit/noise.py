"""Gaussian noise drawn where the generator lives, so that a seed means the same bits on every device."""

from __future__ import annotations

import torch
from torch import Tensor


def randn(shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None, like: Tensor) -> Tensor:
    """N(0, 1) noise of `shape` in `like`'s dtype, on `like`'s device.

    Drawn on the generator's device (CPU for `torch.Generator()`) and then moved: CUDA and CPU generators give
    different streams for one seed, so drawing on the model's device would tie the result to it.
    """
    device = generator.device if generator is not None else like.device
    # non_blocking: the copy to a GPU does not make the host wait for the GPU's queue (no sync inside the loops)
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=like.dtype).to(like.device,
                                                                                            non_blocking=True)
