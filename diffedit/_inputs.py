"""The stages' plumbing, so that edit.py shows the paper: input checks (one call per stage), prompts -> embeddings,
z0, timesteps, outputs, and the default mask's speed-up. Every helper is keyword-only past its first arguments."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from . import compat
from .ddim import add_noise, timesteps
from .image import ImageInput, to_mask, to_numpy, to_pil, to_tensor
from .model import AttentionHook, StableDiffusion
from .noise import randn
from .regulariser import InversionRegulariser
from .rows import per_image, tile, to_rows
from .text import PromptEmbeddings, PromptInput, as_prompt_list
from .vae import DiagonalGaussian

Callback = Callable[[dict[str, Any]], None]
# A stage's attention hook: (probs, is_cross, place, step) -> None (read) or probabilities of the same shape (replace).
# probs is (batch, heads, queries, keys); with guidance the batch is [unconditional rows; conditional rows].
StageAttentionHook = Callable[[Tensor, bool, str, int], Tensor | None]
OutputType = Literal["pil", "np", "pt", "latent"]


# ---- checks: one call per stage ---------------------------------------------------------------------------------
def check_stage(
    model: StableDiffusion, *, steps: int, guidance: float, generator: torch.Generator | None, diffusers_compat: bool,
    callback: Callback | None = None, attention_hook: StageAttentionHook | None = None,
    regulariser: InversionRegulariser | None = None, **numbers: Any,
) -> None:
    """The arguments every stage shares, then `numbers`: name=(value, low, kind) with kind "int", ">=" or ">"."""
    check_regulariser(regulariser)
    if not isinstance(model, StableDiffusion):
        raise TypeError(f"model must be a StableDiffusion (diffedit.load), got {type(model).__name__}")
    check_int(steps, "steps", 1)
    check_number(guidance, "guidance", low=1.0)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if not isinstance(diffusers_compat, bool):
        raise TypeError(f"diffusers_compat must be True or False, got {diffusers_compat!r}")
    if diffusers_compat and model.config.unet.added_conditioning:
        raise ValueError("diffusers_compat=True (--compat) reproduces diffusers' StableDiffusionDiffEditPipeline, "
                         "which has no SDXL version: leave it off (the default) on an SDXL model")
    for value, name in ((callback, "callback"), (attention_hook, "attention_hook")):
        if value is not None and not callable(value):
            raise TypeError(f"{name} must be callable or None, got {type(value).__name__}")
    for name, (value, low, kind) in numbers.items():
        if kind == "int":
            check_int(value, name, low)
        else:
            check_number(value, name, low=low, open_low=kind == ">")


def check_int(value: Any, name: str, low: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def check_number(value: Any, name: str, *, low: float | None = None, high: float | None = None,
                 open_low: bool = False) -> None:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    ok = ok and bool(np.isfinite(value))
    if ok and low is not None:
        ok = value > low if open_low else value >= low
    if not ok or (high is not None and value > high):
        bounds = f"{'>' if open_low else '>='} {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be a number {bounds}, got {value!r}")


def check_regulariser(regulariser: InversionRegulariser | None) -> None:
    if regulariser is not None and not isinstance(regulariser, InversionRegulariser):
        raise TypeError(f"regulariser must be an InversionRegulariser or None, got {type(regulariser).__name__}")


def check_output(output_type: str, background_image: ImageInput | None) -> None:
    if output_type not in ("pil", "np", "pt", "latent"):
        raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
    if background_image is not None and output_type == "latent":
        raise ValueError("background_image is pasted into decoded images: it needs output_type 'pil', 'np' or 'pt'")


def check_edit(
    model: StableDiffusion, inversion: Any, *, guidance: float, generator: torch.Generator | None,
    diffusers_compat: bool, callback: Callback | None, attention_hook: StageAttentionHook | None, eta: float,
    num_images_per_prompt: int, output_type: str, background_image: ImageInput | None,
) -> list[int]:
    """edit()'s one check call: the inversion (its levels are returned), the shared arguments, the output."""
    ts = check_inversion(model, inversion)
    check_stage(model, steps=inversion.steps, guidance=guidance, generator=generator, diffusers_compat=diffusers_compat,
                callback=callback, attention_hook=attention_hook,
                num_images_per_prompt=(num_images_per_prompt, 1, "int"))
    # DDIM eq. 16: eta 0 is DDIM, 1 is DDPM's posterior variance; above 1, sigma_t can exceed sqrt(1 - abar_prev) and
    # the direction term's square root is of a negative number (NaN pictures).
    check_number(eta, "eta", low=0.0, high=1.0)
    check_output(output_type, background_image)
    return ts


def stage_timesteps(model: StableDiffusion, *, steps: int, strength: float, name: str) -> list[int]:
    """The descending levels a stage visits: `strength` of the `steps`-step schedule (at least one)."""
    check_number(strength, name, low=0.0, high=1.0)
    ts = timesteps(model.schedule, steps, strength)
    if not ts:
        raise ValueError(f"{name}={strength} of {steps} steps leaves no step: int(steps * {name}) must be >= 1")
    return ts


def check_inversion(model: StableDiffusion, inversion: Any) -> list[int]:
    """The inversion's levels, after checking that it was made by a model like this one and is consistent."""
    from .edit import Inversion  # the result type lives with the paper

    if not isinstance(inversion, Inversion):
        raise TypeError(f"inversion must be the Inversion returned by invert(), got {type(inversion).__name__}")
    if inversion.prediction_type != model.config.schedule.prediction_type:
        raise ValueError(f"the inversion was made by a {inversion.prediction_type} model, this one is "
                         f"{model.config.schedule.prediction_type}")
    ts = stage_timesteps(model, steps=inversion.steps, strength=inversion.strength, name="strength")
    z0, latents = inversion.z0, inversion.latents
    shape_ok = latents.ndim == 5 and latents.shape[:2] == (len(z0), len(ts)) and latents.shape[2:] == z0.shape[1:]
    if tuple(ts) != tuple(inversion.timesteps) or not shape_ok:
        raise ValueError(f"inconsistent inversion: timesteps {inversion.timesteps[:2]}..., latents "
                         f"{tuple(latents.shape)}, z0 {tuple(z0.shape)} for {inversion.steps} steps of strength "
                         f"{inversion.strength}")
    if not (torch.isfinite(z0).all() and torch.isfinite(latents).all()):
        raise ValueError("the inversion holds NaN or Inf latents")
    return ts


# ---- inputs -----------------------------------------------------------------------------------------------------
def encode_z0(
    model: StableDiffusion, *, image: ImageInput | None, latents: Tensor | None,
    posterior: DiagonalGaussian | None = None, generator: torch.Generator | None = None,
    diffusers_compat: bool = False, repeat: int = 1,
) -> tuple[Tensor, DiagonalGaussian | None]:
    """§3.1: the input -> z0, the scaled VAE latent: the posterior mean (deterministic; compat: a posterior sample,
    `repeat` rows per image, as diffusers draws them), or `latents` as they are. Returns z0 and the posterior."""
    if sum(x is not None for x in (image, latents, posterior)) != 1:
        raise ValueError("give an image, latents= or posterior=, exactly one of them")
    if posterior is not None and not isinstance(posterior, DiagonalGaussian):
        raise TypeError(f"posterior must be a DiagonalGaussian (a MaskResult's .posterior), not "
                        f"{type(posterior).__name__}")
    if latents is not None:
        c = model.config.vae.latent_channels
        ok = isinstance(latents, Tensor) and latents.is_floating_point() and latents.ndim == 4
        if not ok or latents.shape[1] != c:
            raise ValueError(f"latents must be a float (B, {c}, h, w) tensor, got {getattr(latents, 'shape', latents)}")
        if not torch.isfinite(latents).all():
            raise ValueError("latents hold NaN or Inf values")
        latents = latents.to(model.device, model.dtype)
    if diffusers_compat:
        return compat.sample_z0(model, image=image, latents=latents, posterior=posterior, generator=generator,
                                repeat=repeat)
    if latents is not None:
        return latents, None
    if posterior is None:
        posterior = model.encode_posterior(to_tensor(image, model.config.vae.downsample_factor))
    return model.posterior_latents(posterior), posterior


def embed(model: StableDiffusion, prompt: PromptInput | None, *, what: str, clip_skip: int,
          cache: dict | None = None) -> PromptEmbeddings:
    """A prompt argument (text, list of texts, or PromptEmbeddings) -> checked embeddings on the model's device.

    `cache` (a dict shared by the calls of one stage) encodes each distinct prompt list once."""
    if isinstance(prompt, PromptEmbeddings):
        return model.check_embeddings(prompt, f"{what} embeddings")
    if prompt is None:
        raise ValueError(f"{what} is missing: give a string, a list of strings or PromptEmbeddings")
    key = (tuple(as_prompt_list(prompt)), clip_skip)
    if cache is None or key not in cache:
        encoded = model.encode_prompt(prompt, clip_skip)
        if cache is None:
            return encoded
        cache[key] = encoded
    return cache[key]


def prompt_pair(
    model: StableDiffusion, prompt: PromptInput | None, negative: PromptInput | None, *, what: str, guidance: float,
    clip_skip: int, diffusers_compat: bool, cache: dict | None = None,
) -> tuple[PromptEmbeddings, PromptEmbeddings | None]:
    """(cond, uncond), as many rows of each; the negative defaults to "" for every prompt.

    Without guidance (<= 1) a default negative is never used, so it is not encoded: uncond is None.
    """
    cond = embed(model, prompt, what=what, clip_skip=clip_skip, cache=cache)
    if negative is None:
        if guidance <= 1:
            return cond, None
        negative = [""] * len(cond)
    skip = compat.negative_clip_skip(clip_skip) if diffusers_compat else clip_skip
    uncond = embed(model, negative, what=f"negative of {what}", clip_skip=skip, cache=cache)
    if len(uncond) not in (1, len(cond)):
        raise ValueError(f"{len(uncond)} negative prompts for {len(cond)} prompts ({what})")
    return cond, to_rows(uncond, len(cond))


MaskPrompts = tuple[PromptEmbeddings, PromptEmbeddings | None, PromptEmbeddings, PromptEmbeddings | None]


def mask_prompts(
    model: StableDiffusion, *, source: PromptInput | None, target: PromptInput | None,
    source_negative: PromptInput | None, target_negative: PromptInput | None, guidance: float, clip_skip: int,
    diffusers_compat: bool,
) -> MaskPrompts:
    """(R, R's negative, Q, Q's negative). Both negatives left at "": in the default mode they cancel
    (`noise_difference`), so they are not encoded at all (None); diffusers' map uses them, so compat encodes "" once
    for both."""
    defaults = source_negative is None and target_negative is None
    pair_guidance = guidance if diffusers_compat or not defaults else 1.0  # 1: default negatives not encoded
    cache: dict = {}
    kw = dict(guidance=pair_guidance, clip_skip=clip_skip, diffusers_compat=diffusers_compat, cache=cache)
    src, src_neg = prompt_pair(model, source, source_negative, what="source_prompt", **kw)
    tgt, tgt_neg = prompt_pair(model, target, target_negative, what="target_prompt", **kw)
    return src, src_neg, tgt, tgt_neg


def edit_mask(mask: Any, latent_size: tuple[int, ...]) -> Tensor:
    """A MaskResult, or any binary mask (PIL, numpy, tensor) at latent or image resolution -> (N, 1, h, w) {0, 1}."""
    from .edit import MaskResult

    latent = mask.latent_mask if isinstance(mask, MaskResult) else to_mask(mask, latent_size)
    if tuple(latent.shape[-2:]) != latent_size:
        raise ValueError(f"the mask is {tuple(latent.shape[-2:])} latents, the inversion {latent_size}")
    return latent


def background(model: StableDiffusion, image: ImageInput | None, *, latent_size: tuple[int, ...], rows: int,
               images_per_row: int) -> Tensor | None:
    """edit()'s background_image, checked against the inversion before any work, as one (3, H, W) picture in [0, 1]
    per output image (`rows.per_image`)."""
    if image is None:
        return None
    original = to_tensor(image, model.config.vae.downsample_factor)
    size = tuple(s * model.config.vae.downsample_factor for s in latent_size)
    if tuple(original.shape[-2:]) != size:
        raise ValueError(f"background_image is {tuple(original.shape[-2:])} pixels, the inversion's images {size}: "
                         "pass the image that was inverted")
    if len(original) not in (1, rows):
        raise ValueError(f"background_image has {len(original)} images for {rows} rows: give 1 or {rows}")
    return per_image(original.to(model.device), rows, images_per_row)


# ---- the default mask's speed-up ----------------------------------------------------------------------------------
def noise_difference(
    model: StableDiffusion, x: Tensor, t: int, prompts: MaskPrompts, *, rows: int, guidance: float,
    attention_hook: AttentionHook | None, maps: int = 1,
) -> Tensor:
    """Mean over channels of |eps~_Q - eps~_R| at the noised latents x (maps * rows, C, h, w: `maps` noise draws of
    the rows, one after another), each estimate guided by its own negative: (maps * rows, 1, h, w).

    The identity that halves the work: with one negative u for both prompts (the default "") or no guidance,
        eps~_Q - eps~_R = (u + g (eps_Q - u)) - (u + g (eps_R - u)) = g (eps_Q - eps_R),
    so only the two conditional rows are evaluated, and the difference is scaled by g.
    """
    src, src_neg, tgt, tgt_neg = (None if p is None else tile(to_rows(p, rows), maps) for p in prompts)
    shared = src_neg is None or src_neg.equal(tgt_neg)
    uncond = None if shared else PromptEmbeddings.cat([src_neg, tgt_neg])
    cond = PromptEmbeddings.cat([src, tgt])  # R and Q side by side: one batched UNet call
    eps_src, eps_tgt = model.noise_estimate(torch.cat([x, x]), t, cond, uncond, guidance, attention_hook).chunk(2)
    return (guidance if shared else 1.0) * (eps_tgt - eps_src).abs().float().mean(1, keepdim=True)


MAP_CALL_LATENT_PIXELS = 20 * 64 * 64  # 10 maps of SD's 512 x 512 (2 rows each): the default UNet call of the mask


def maps_in_one_call(z: Tensor, num_maps: int) -> int:
    """How many of the mask's maps (each `len(z)` rows of the latents z, and R and Q: 2 len(z) rows) one UNet call
    takes by default: all that fit in MAP_CALL_LATENT_PIXELS, at least one."""
    per_map = 2 * len(z) * z.shape[-2] * z.shape[-1]
    return max(1, min(num_maps, MAP_CALL_LATENT_PIXELS // per_map))


def map_calls(z: Tensor, num_maps: int, *, maps_per_call: int | None, hooked: bool) -> list[range]:
    """The mask's maps 0 .. num_maps - 1 grouped into UNet calls: `maps_per_call` a call (None: as many as 20 rows of
    64 x 64 latents hold, so all 10 at SD's 512 x 512, 2 at SDXL's 1024 x 1024), one a call with an attention hook,
    so that the hook's step is the map."""
    per_call = 1 if hooked else maps_in_one_call(z, num_maps) if maps_per_call is None else maps_per_call
    return [range(first, min(first + per_call, num_maps)) for first in range(0, num_maps, per_call)]


def noised_maps(model: StableDiffusion, z: Tensor, t: int, generator: torch.Generator | None, maps: int) -> Tensor:
    """`maps` copies of z noised to level t (DDPM eq. 4), one after another, each with its own noise; the noises are
    drawn map by map, so grouping maps into one call does not change them."""
    noise = torch.cat([randn(z.shape, generator, z) for _ in range(maps)])
    return add_noise(model.schedule, tile(z, maps), noise, t)


def at_step(hook: StageAttentionHook | None, step: int) -> AttentionHook | None:
    """The UNet's hook (probs, is_cross, place) for one step of a stage's loop."""
    return None if hook is None else (lambda probs, is_cross, place: hook(probs, is_cross, place, step))


# ---- outputs ------------------------------------------------------------------------------------------------------
def output_images(
    model: StableDiffusion, x: Tensor, *, mask: Tensor, original: Tensor | None, output_type: OutputType
) -> Any:
    """§3.3's last step: the VAE decodes the latents; optionally the input's own pixels outside the mask."""
    if output_type == "latent":
        return x
    images = model.decode_latents(x)
    if original is not None:  # the decoded pixels where the latent was edited, the input's elsewhere
        inside = torch.nn.functional.interpolate(mask.to(images.dtype), size=images.shape[-2:], mode="nearest")
        images = images * inside + original.to(images.dtype) * (1 - inside)
    if output_type in ("np", "pil"):
        return to_numpy(images) if output_type == "np" else to_pil(images)
    return images
