"""The noise schedule of Stable Diffusion and DDIM sampling / inversion as pure functions.

References:
  - Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models" (DDPM), arXiv 2006.11239.
  - Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models" (DDIM), arXiv 2010.02502 — eq. 12 is
    the update below; its deterministic (eta = 0) form run backwards is "DDIM encoding" / inversion.
  - Salimans & Ho 2022, "Progressive Distillation", arXiv 2202.00512 — the v parametrisation (SD 2.x 768).

Notation: abar_t = prod_{s<=t} (1 - beta_s) ("alphas_cumprod"); a latent at noise level t is
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.
Everything here is a function of explicit timesteps (t_cur, t_next), never of a loop counter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from .configs import PredictionType, ScheduleConfig
from .noise import randn

# The denoiser a sampler calls: (x, t) -> the model's raw output at level t (eps, or v for v-models), guided or not.
Denoiser = Callable[[Tensor, int], Tensor]
Callback = Callable[[dict[str, Any]], None]  # gets dict(i, t, x, pred_x0) after every step, k-diffusion style


@dataclass(frozen=True)
class NoiseSchedule:
    """abar_t for t = 0 .. T-1 (float32, as SD was trained and as every reference computes it)."""

    alphas_cumprod: Tensor
    final_alpha: Tensor  # abar used for "timestep -1" (the level after the last DDIM step)
    prediction_type: PredictionType
    num_train_timesteps: int
    steps_offset: int

    @staticmethod
    def from_config(config: ScheduleConfig) -> "NoiseSchedule":
        T = config.num_train_timesteps
        if config.beta_schedule == "scaled_linear":
            # LDM's schedule: linear in sqrt(beta) (Rombach et al. 2022, configs of SD).
            betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, T, dtype=torch.float32) ** 2
        elif config.beta_schedule == "linear":
            betas = torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float32)
        else:
            raise ValueError(f"unknown beta_schedule {config.beta_schedule!r}")
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        final = torch.tensor(1.0) if config.final_alpha_is_one else alphas_cumprod[0]
        return NoiseSchedule(alphas_cumprod, final, config.prediction_type, T, config.steps_offset)

    def abar(self, t: int) -> Tensor:
        """abar_t, with t < 0 meaning "past the last step" (the final alpha)."""
        if t >= self.num_train_timesteps:
            raise ValueError(f"timestep {t} is outside the schedule (0 .. {self.num_train_timesteps - 1})")
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha


def timesteps(schedule: NoiseSchedule, steps: int, strength: float = 1.0) -> list[int]:
    """The descending DDIM timesteps of a `steps`-step sampler, of which the last `strength` fraction is kept.

    "Leading" spacing with SD's offset of one: 50 steps -> 981, 961, ..., 21, 1. Starting part-way
    (SDEdit / DiffEdit's encoding ratio) keeps the last int(steps * strength) of them, so strength 0.5 of
    50 steps starts at t = 481 and strength 0.8 at t = 781.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= schedule.num_train_timesteps:
        raise ValueError(f"steps must be an integer in [1, {schedule.num_train_timesteps}], got {steps!r}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength!r}")
    ratio = schedule.num_train_timesteps // steps
    full = [i * ratio + schedule.steps_offset for i in reversed(range(steps))]
    kept = min(int(steps * strength), steps)
    return full[steps - kept :]


def step_size(schedule: NoiseSchedule, steps: int) -> int:
    """Distance between consecutive DDIM timesteps."""
    return schedule.num_train_timesteps // steps


def _expand(value: Tensor, like: Tensor) -> Tensor:
    """A coefficient in `like`'s dtype: one for the batch stays a 0-d CPU tensor, which a CUDA kernel takes as an
    argument (no host-to-device copy, which would wait for the GPU); per-sample ones broadcast over (C, H, W)."""
    if value.ndim == 0:
        return value.to(like.dtype)
    return value.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(schedule: NoiseSchedule, x0: Tensor, noise: Tensor, t: int | Tensor) -> Tensor:
    """Forward process q(x_t | x0) (DDPM eq. 4): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.

    t: one level for the whole batch (an int or a 0-d tensor) or one per sample ((B,) tensor)."""
    t = torch.as_tensor(t, dtype=torch.long)
    if t.ndim > 0:
        t = t.reshape(-1).cpu()  # the schedule lives on the CPU
    abar = schedule.alphas_cumprod[t]
    return _expand(abar**0.5, x0) * x0 + _expand((1 - abar) ** 0.5, x0) * noise


def to_x0_and_eps(
    prediction: Tensor, x: Tensor, abar: Tensor, prediction_type: PredictionType
) -> tuple[Tensor, Tensor]:
    """The network's output at level abar -> (predicted x0, predicted noise)."""
    beta = 1 - abar
    if prediction_type == "epsilon":
        # DDIM eq. 12, "predicted x0": (x_t - sqrt(1 - abar) eps) / sqrt(abar)
        return (x - beta**0.5 * prediction) / abar**0.5, prediction
    if prediction_type == "v_prediction":
        # v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022, §4), solved for x0 and eps.
        return abar**0.5 * x - beta**0.5 * prediction, abar**0.5 * prediction + beta**0.5 * x
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def eps_from_v(v: Tensor, x: Tensor, abar: Tensor) -> Tensor:
    return to_x0_and_eps(v, x, abar, "v_prediction")[1]


def v_from_eps_and_x0(eps: Tensor, x0: Tensor, abar: Tensor) -> Tensor:
    """The v target for training a v-model: v = sqrt(abar) eps - sqrt(1 - abar) x0."""
    return abar**0.5 * eps - (1 - abar) ** 0.5 * x0


@dataclass(frozen=True)
class StepOutput:
    x: Tensor  # the latent at the next level
    pred_x0: Tensor  # the model's estimate of the clean latent, useful for figures


def ddim_step(
    schedule: NoiseSchedule,
    prediction: Tensor,
    x: Tensor,
    t_cur: int,
    t_next: int,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> StepOutput:
    """One DDIM update (Song et al. 2021, eq. 12) from level t_cur to the less noisy level t_next.

    t_next < 0 means the final step (abar = the schedule's final alpha). eta = 0 is deterministic DDIM;
    eta = 1 is DDPM's posterior variance. The fresh noise for eta > 0 is drawn with `generator`
    (shape and dtype of `prediction`), or given as `noise`.
    """
    if t_next >= t_cur:
        raise ValueError(f"ddim_step goes down in noise: t_next ({t_next}) must be < t_cur ({t_cur})")
    if not 0 <= eta <= 1:  # above 1, sigma_t^2 can exceed 1 - abar_next: the square root below of a negative number
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    abar_cur, abar_next = schedule.abar(t_cur), schedule.abar(t_next)
    x0, eps = to_x0_and_eps(prediction, x, abar_cur, schedule.prediction_type)
    # sigma_t of DDIM eq. 16: eta * sqrt((1 - abar_next) / (1 - abar_cur)) * sqrt(1 - abar_cur / abar_next)
    variance = (1 - abar_next) / (1 - abar_cur) * (1 - abar_cur / abar_next)
    std = eta * variance**0.5
    # eq. 12: sqrt(abar_next) x0 + sqrt(1 - abar_next - sigma^2) eps + sigma z
    x_next = abar_next**0.5 * x0 + (1 - abar_next - std**2) ** 0.5 * eps
    if eta > 0:
        if noise is not None and generator is not None:
            raise ValueError("give either a generator or the noise, not both")
        if noise is None:
            noise = randn(prediction.shape, generator, prediction)
        x_next = x_next + std * noise
    return StepOutput(x_next, x0)


def ddim_inverse_step(
    schedule: NoiseSchedule, prediction: Tensor, x: Tensor, t_cur: int, t_next: int
) -> StepOutput:
    """One step of DDIM encoding (inversion): eq. 12 with eta = 0 run from level t_cur up to t_next > t_cur.

    As in every SD inversion, the network is evaluated at t_next, the level being moved to (its output
    at the true current level is not available without a second evaluation); t_cur < 0 is the clean
    latent's level, taken as the schedule's final alpha (abar[0] for SD) so that inversion mirrors
    sampling exactly.
    """
    if t_next <= t_cur:
        raise ValueError(f"ddim_inverse_step goes up in noise: t_next ({t_next}) must be > t_cur ({t_cur})")
    abar_cur, abar_next = schedule.abar(t_cur), schedule.abar(t_next)
    x0, eps = to_x0_and_eps(prediction, x, abar_cur, schedule.prediction_type)
    return StepOutput(abar_next**0.5 * x0 + (1 - abar_next) ** 0.5 * eps, x0)


@torch.no_grad()
def ddim_sample(
    schedule: NoiseSchedule,
    denoiser: Denoiser,
    x: Tensor,
    levels: list[int],
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """DDIM sampling (Song et al. 2021, eq. 12): from x at levels[0] down through `levels`, then to the clean latent.

    `levels` is descending, e.g. `timesteps(schedule, 50)`; `denoiser(x, t)` returns the model's raw output (read
    by the schedule's prediction type, so eps- and v-models share the loop).
    """
    pairs = list(zip(levels, [*levels[1:], -1]))
    for i, (t_cur, t_next) in enumerate(tqdm(pairs, desc="sample", disable=not progress)):
        step = ddim_step(schedule, denoiser(x, t_cur), x, t_cur, t_next, eta=eta, generator=generator)
        x = step.x
        if callback is not None:
            callback(dict(i=i, t=t_cur, x=x, pred_x0=step.pred_x0))
    return x
