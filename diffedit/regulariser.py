"""The inversion regulariser of diffusers' DiffEdit pipeline (after pix2pix-zero, Parmar et al. 2023, arXiv
2302.03027, §3.2 "noise regularization"): before each DDIM encoding step, a few gradient steps pull the noise
estimate towards i.i.d. N(0, 1) with an auto-correlation penalty (over a pyramid of scales) and a KL penalty.

Off by default (`invert(..., regulariser=None)`), as in diffusers; not part of DiffEdit itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .ddim import to_x0_and_eps
from .model import StableDiffusion


@dataclass(frozen=True)
class InversionRegulariser:
    """The penalties' weights and how many gradient steps to take (pix2pix-zero's defaults: 20, 20, 5, 5)."""

    lambda_auto_corr: float = 20.0  # weight of the auto-correlation penalty
    lambda_kl: float = 20.0  # weight of the KL(N(mean, var) || N(0, 1)) penalty
    num_reg_steps: int = 5  # gradient steps per DDIM step
    num_auto_corr_rolls: int = 5  # random rolls averaged into each auto-correlation gradient

    def __post_init__(self) -> None:
        for name in ("lambda_auto_corr", "lambda_kl"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
                raise ValueError(f"InversionRegulariser.{name} must be a number >= 0, got {value!r}")
        for name, low in (("num_reg_steps", 1), ("num_auto_corr_rolls", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"InversionRegulariser.{name} must be an integer >= {low}, got {value!r}")


ToEps = Callable[[Tensor], Tensor]  # the model's raw output -> the noise estimate the penalties see
PenaltyTerms = tuple[ToEps, Callable[[Tensor], Tensor]]  # (to_eps, the KL penalty)


def regulariser_terms(model: StableDiffusion, *, x: Tensor, t_cur: int, t_next: int, guided: bool) -> PenaltyTerms:
    """The penalties see the noise estimate the DDIM step will use (read at `x`'s own level t_cur), and each image's
    KL on its own. (diffusers' terms differ: compat.regulariser_terms.)"""
    schedule = model.schedule
    return (lambda o: to_x0_and_eps(o, x, schedule.abar(t_cur), schedule.prediction_type)[1]), kl_loss_per_image


def regularise(
    reg: InversionRegulariser, out: Tensor, terms: PenaltyTerms, generator: torch.Generator | None
) -> Tensor:
    """`out` (the raw UNet output) after `reg.num_reg_steps` gradient steps on the penalties of `to_eps(out)`."""
    to_eps, kl = terms
    with torch.enable_grad():
        for _ in range(reg.num_reg_steps):
            if reg.lambda_auto_corr > 0:
                for _ in range(reg.num_auto_corr_rolls):
                    var = out.detach().clone().requires_grad_(True)
                    (grad,) = torch.autograd.grad(auto_corr_loss(to_eps(var), generator), var)
                    out = out - reg.lambda_auto_corr * (grad / reg.num_auto_corr_rolls)
            if reg.lambda_kl > 0:
                var = out.detach().clone().requires_grad_(True)
                (grad,) = torch.autograd.grad(kl(to_eps(var)), var)
                out = out - reg.lambda_kl * grad
            out = out.detach()
    return out


def auto_corr_loss(eps: Tensor, generator: torch.Generator | None) -> Tensor:
    """Squared auto-correlation of each noise map with a random roll of itself, over a pyramid of scales."""
    loss = torch.zeros((), dtype=eps.dtype, device=eps.device)
    for i in range(eps.shape[0]):
        for j in range(eps.shape[1]):
            noise = eps[i : i + 1, j : j + 1]
            while True:
                roll = torch.randint(noise.shape[2] // 2, (1,), generator=generator).item()
                loss = loss + (noise * torch.roll(noise, shifts=roll, dims=2)).mean() ** 2
                loss = loss + (noise * torch.roll(noise, shifts=roll, dims=3)).mean() ** 2
                if noise.shape[2] <= 8:
                    break
                noise = torch.nn.functional.avg_pool2d(noise, kernel_size=2)
    return loss


def kl_loss(eps: Tensor) -> Tensor:
    """KL(N(mean, var) || N(0, 1)) of all of `eps` up to constants, as diffusers writes it."""
    return eps.var() + eps.mean() ** 2 - 1 - torch.log(eps.var() + 1e-7)


def kl_loss_per_image(eps: Tensor) -> Tensor:
    """The KL penalty of each image on its own, summed: one image's statistics do not pull on another's."""
    return sum((kl_loss(row) for row in eps), torch.zeros((), dtype=eps.dtype, device=eps.device))
