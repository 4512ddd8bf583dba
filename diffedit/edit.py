"""DiffEdit: mask generation, DDIM encoding and masked decoding, top to bottom.

Reference: Couairon, Verbeek, Schwenk, Cord 2022, "DiffEdit: Diffusion-based semantic image editing with
mask guidance", arXiv 2210.11427. §3.2: the mask from the contrast of two noise estimates; §3.1 / §3.3:
DDIM encoding of the input to ratio r, then DDIM decoding with the query, where the latent outside the
mask is replaced at every step by the input's own encoding at the same noise level.

    mask = generate_mask(model, image, "a bowl of fruits", "a bowl of pears")
    inversion = invert(model, latents=mask.latents)        # the VAE encodes the image once
    result = edit(model, inversion, mask, "a bowl of pears", negative_prompt="a bowl of fruits")

Batches are rows (rows.py): the images (or latents), the prompts and the masks of a call each have 1 or N entries.
A prompt is a string, a list of strings, or the PromptEmbeddings of `model.encode_prompt`. `attention_hook(probs,
is_cross, place, step)` sees (and may replace) every attention map of every step. `diffusers_compat=True`
reproduces diffusers 0.42's StableDiffusionDiffEditPipeline numbers, its defects included (compat.py).
The checks, the prompt plumbing and the speed-ups live in _inputs.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm  # plain text bars: the same in terminals and notebooks, no widget dependency

from . import compat
from ._inputs import Callback, OutputType, StageAttentionHook, at_step, background, check_edit
from ._inputs import check_stage, edit_mask, encode_z0, mask_prompts, noise_difference, output_images, prompt_pair
from ._inputs import map_calls, noised_maps, stage_timesteps
from .ddim import add_noise, ddim_inverse_step, ddim_step
from .image import ImageInput, MaskInput, mask_to_pil
from .model import StableDiffusion
from .noise import randn
from .regulariser import InversionRegulariser, regularise, regulariser_terms
from .rows import batch_rows, per_image, to_rows
from .text import PromptEmbeddings, PromptInput
from .vae import DiagonalGaussian


@dataclass(frozen=True, eq=False)
class MaskResult:
    latent_mask: Tensor  # (N, 1, h, w) float in {0, 1}; 1 = the region to edit
    difference: Tensor  # (N, 1, h, w) the continuous map D that was thresholded (mean |eps_Q - eps_R|)
    image_mask: list[Image.Image]  # the mask at image resolution (nearest), mode L, 255 = edit: for any inpainter
    latents: Tensor | None  # z0 of the input images, one per image; None in compat mode (it samples per map)
    timestep: int  # the noise level of the maps
    threshold_ratio: float
    posterior: DiagonalGaussian | None = None  # the image's VAE posterior, for invert(posterior=...) in compat mode
    source_embeddings: PromptEmbeddings | None = None  # R and Q encoded (the mask's clip_skip): pass them on as the
    target_embeddings: PromptEmbeddings | None = None  # next stages' prompts, and the text encoder runs once each


@dataclass(frozen=True, eq=False)
class Inversion:
    z0: Tensor  # (N, 4, h, w) the scaled VAE latents of the inputs
    latents: Tensor  # (N, K, 4, h, w): latents[:, i] is the encoding at noise level timesteps[i]
    timesteps: tuple[int, ...]  # descending: 781, 761, ..., 1 for strength 0.8 of 50 steps
    steps: int
    strength: float
    prediction_type: str
    guidance: float
    diffusers_compat: bool

    def save(self, path: str | os.PathLike[str], **made_from: str) -> None:
        """A .safetensors file (atomic): the tensors, the settings and `made_from` as JSON metadata (no pickle)."""
        from .files import save_inversion

        save_inversion(self, path, **made_from)

    @staticmethod
    def load(path: str | os.PathLike[str]) -> "Inversion":
        from .files import load_inversion

        return load_inversion(path)[0]


@dataclass(frozen=True, eq=False)
class EditResult:
    images: list[Image.Image] | np.ndarray | Tensor  # N * num_images_per_prompt, row by row
    latents: Tensor  # the final latents


@torch.no_grad()
def generate_mask(
    model: StableDiffusion, image: ImageInput | None = None, source_prompt: PromptInput | None = None,
    target_prompt: PromptInput | None = None, *, latents: Tensor | None = None, num_maps: int = 10,
    encode_strength: float = 0.5, threshold_ratio: float = 3.0, steps: int = 50, guidance: float = 7.5,
    source_negative_prompt: PromptInput | None = None, target_negative_prompt: PromptInput | None = None,
    generator: torch.Generator | None = None, clip_skip: int = 0, callback: Callback | None = None,
    attention_hook: StageAttentionHook | None = None, diffusers_compat: bool = False, progress: bool = True,
    maps_per_call: int | None = None,
) -> MaskResult:
    """§3.2: where do the noise estimates under the target prompt Q and the source prompt R disagree?

    z0 (from `image`, or `latents=` as they are) is noised to the level of `encode_strength` of `steps`
    with `num_maps` independent noises; D = mean over maps and channels of |eps_Q - eps_R| (each guided by
    its negative prompt, "" by default); M = 1[D > threshold_ratio / 2 * mean(D)] for each image.
    `callback(dict(i, t, difference))` gets each map's own difference (default mode).

    `maps_per_call` maps share a UNet call (None: as many as fit, `_inputs.map_calls`); the noises are drawn map by
    map all the same, so only the last float bits depend on it. With an `attention_hook`, one map a call.
    """
    per_call = {} if maps_per_call is None else dict(maps_per_call=(maps_per_call, 1, "int"))
    check_stage(model, steps=steps, guidance=guidance, generator=generator, diffusers_compat=diffusers_compat,
                callback=callback, attention_hook=attention_hook, num_maps=(num_maps, 1, "int"),
                threshold_ratio=(threshold_ratio, 0.0, ">"), **per_call)
    t = stage_timesteps(model, steps=steps, strength=encode_strength, name="encode_strength")[0]  # 0.5 of 50: 481
    prompts = mask_prompts(model, source=source_prompt, target=target_prompt, source_negative=source_negative_prompt,
                           target_negative=target_negative_prompt, guidance=guidance, clip_skip=clip_skip,
                           diffusers_compat=diffusers_compat)
    (src, _, tgt, _), posterior = prompts, None
    if diffusers_compat:  # diffusers' map: one posterior sample per map, its batch layout, its swapped guidance
        samples, posterior = encode_z0(model, image=image, latents=latents, generator=generator,
                                       diffusers_compat=True, repeat=num_maps)
        diff = compat.mask_map(model, z0=samples, t=t, prompts=prompts, num_maps=num_maps, guidance=guidance,
                               generator=generator)
        z0 = latents  # (diffusers has no single z0: each map samples its own)
    else:
        z0, _ = encode_z0(model, image=image, latents=latents)  # the posterior mean, shared with invert()
        rows = batch_rows(images=len(z0), source_prompt=len(src), target_prompt=len(tgt))
        z, diff = to_rows(z0, rows), torch.zeros(rows, 1, *z0.shape[-2:], device=z0.device)
        with tqdm(total=num_maps, desc="mask", unit="map", disable=not progress) as bar:
            for maps in map_calls(z, num_maps, maps_per_call=maps_per_call, hooked=attention_hook is not None):
                x = noised_maps(model, z, t, generator, len(maps))  # DDPM eq. 4, a fresh noise per map
                d = noise_difference(model, x, t, prompts, rows=rows, guidance=guidance, maps=len(maps),
                                     attention_hook=at_step(attention_hook, maps[0]))  # |eps_Q - eps_R|, channel mean
                for i, d_i in zip(maps, d.chunk(len(maps))):
                    diff += d_i / num_maps  # ... and the mean over maps
                    if callback is not None:
                        callback(dict(i=i, t=t, difference=d_i))
                bar.update(len(maps))
    mask = binarize(diff, threshold_ratio, per_image=not diffusers_compat)
    image_size = tuple(s * model.config.vae.downsample_factor for s in mask.shape[-2:])
    return MaskResult(mask, diff, mask_to_pil(mask, image_size), z0, t, threshold_ratio, posterior, src, tgt)


def binarize(difference: Tensor, threshold_ratio: float = 3.0, per_image: bool = True) -> Tensor:
    """§3.2: clip D at rho * mean(D), rescale to [0, 1], threshold at 0.5, i.e. M = 1[D > rho/2 * mean(D)].

    per_image=True takes each image's own mean, and a zero map (source == target) gives an empty mask;
    per_image=False is diffusers': one mean over the batch, and a zero map gives 0/0 = NaN -> all ones.
    """
    mean = difference.mean(dim=(1, 2, 3), keepdim=True) if per_image else difference.mean()
    clip = mean * threshold_ratio
    scaled = torch.minimum(difference.clamp(min=0), clip) / clip
    if per_image:
        return ((scaled > 0.5) & (clip > 0)).float()
    return torch.where(scaled <= 0.5, 0.0, 1.0)


@torch.no_grad()
def invert(
    model: StableDiffusion, image: ImageInput | None = None, prompt: PromptInput = "", *,
    latents: Tensor | None = None, posterior: DiagonalGaussian | None = None, strength: float = 0.8,
    steps: int = 50, guidance: float = 1.0, negative_prompt: PromptInput | None = None,
    generator: torch.Generator | None = None, clip_skip: int = 0, regulariser: InversionRegulariser | None = None,
    callback: Callback | None = None, attention_hook: StageAttentionHook | None = None,
    diffusers_compat: bool = False, progress: bool = True,
) -> Inversion:
    """§3.1: DDIM encoding of z0 (from `image`, `latents=`, or `posterior=mask.posterior`, which compat mode
    samples without a second encoder pass) up to ratio `strength`, every latent kept.

    The paper encodes unconditionally (the default: prompt "", guidance 1; strong guidance breaks DDIM
    inversion). `regulariser=InversionRegulariser(...)` (diffusers', after pix2pix-zero; off by default) pulls each
    noise estimate towards i.i.d. N(0, 1).
    """
    check_stage(model, steps=steps, guidance=guidance, generator=generator, diffusers_compat=diffusers_compat,
                callback=callback, attention_hook=attention_hook, regulariser=regulariser)
    ts = stage_timesteps(model, steps=steps, strength=strength, name="strength")  # 781, 761, ..., 1
    cond, uncond = prompt_pair(model, prompt, negative_prompt, what="prompt", guidance=guidance, clip_skip=clip_skip,
                               diffusers_compat=diffusers_compat)
    z0, _ = encode_z0(model, image=image, latents=latents, posterior=posterior, generator=generator,
                      diffusers_compat=diffusers_compat)  # the posterior mean (compat: a sample)
    rows = batch_rows(images=len(z0), prompt=len(cond))
    z0, cond, uncond = to_rows(z0, rows), to_rows(cond, rows), to_rows(uncond, rows) if guidance > 1 else None
    terms = (compat.checked_regulariser_terms(model, regulariser, guided=uncond is not None, rows=rows)
             if diffusers_compat else regulariser_terms)  # diffusers': its own conversions, refused where it fails
    x, trajectory = z0, []
    levels = [-1, *reversed(ts)]  # -1: the clean latent's level (abar = the schedule's final alpha)
    for i, (t_cur, t_next) in enumerate(tqdm(list(zip(levels[:-1], levels[1:])), desc="invert", disable=not progress)):
        # the noise estimate at the level moved to, as in every SD inversion
        out = model.unet_output(x, t_next, cond, uncond, guidance, at_step(attention_hook, i))
        if regulariser is not None:
            out = regularise(regulariser, out, terms(model, x=x, t_cur=t_cur, t_next=t_next,
                                                     guided=uncond is not None), generator)
        step = ddim_inverse_step(model.schedule, out, x, t_cur, t_next)  # DDIM eq. 12 run upwards
        x = step.x
        trajectory.append(x)
        if callback is not None:
            callback(dict(i=i, t=t_next, x=x, pred_x0=step.pred_x0))
    return Inversion(z0, torch.stack(trajectory[::-1], 1), tuple(ts), steps, float(strength),
                     model.config.schedule.prediction_type, float(guidance), diffusers_compat)


@torch.no_grad()
def noise_inversion(
    model: StableDiffusion, latents: Tensor, *, strength: float = 0.8, steps: int = 50,
    generator: torch.Generator | None = None,
) -> Inversion:
    """The ablation "without encoding" (§4.2, Fig. 6): z0 noised with ONE random draw at every level,
    x_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) n, in place of the DDIM encoding.

    With an all-ones mask, `edit` from this is SDEdit (Meng et al. 2022); with DiffEdit's mask it is DiffEdit
    without encoding (the background follows the noised input, as in blended / RePaint-style inpainting).
    """
    check_stage(model, steps=steps, guidance=1.0, generator=generator, diffusers_compat=False)
    ts = stage_timesteps(model, steps=steps, strength=strength, name="strength")
    z0, _ = encode_z0(model, image=None, latents=latents)
    noise = randn(z0.shape, generator, z0)
    levels = torch.stack([add_noise(model.schedule, z0, noise, t) for t in ts], 1)
    return Inversion(z0, levels, tuple(ts), steps, float(strength), model.config.schedule.prediction_type, 1.0, False)


@torch.no_grad()
def edit(
    model: StableDiffusion, inversion: Inversion, mask: MaskResult | MaskInput, prompt: PromptInput | None = None, *,
    negative_prompt: PromptInput | None = None, guidance: float = 7.5, eta: float = 0.0,
    num_images_per_prompt: int = 1, generator: torch.Generator | None = None, clip_skip: int = 0,
    callback: Callback | None = None, attention_hook: StageAttentionHook | None = None,
    output_type: OutputType = "pil", background_image: ImageInput | None = None,
    diffusers_compat: bool = False, progress: bool = True,
) -> EditResult:
    """§3.3: DDIM decoding from x_r with the query; outside the mask the latent follows the input's encoding.

    `mask` is a MaskResult or any binary mask (PIL, numpy, tensor) at latent or image resolution.
    negative_prompt defaults to "" (unconditional); the paper's recipe passes the source prompt R.
    Steps and strength are the inversion's own, so they cannot disagree.

    `background_image` (off by default; not in the paper, nor in diffusers): the input image(s), whose pixels the
    output takes outside the mask (the latent mask upsampled, nearest). The latents there are z0's exactly, but
    the decoder sees the whole picture (GroupNorm statistics, attention), so an edited region shifts the decoded
    colours of the untouched ones; this pastes the input back instead. `EditResult.latents` are what was decoded.
    """
    ts = check_edit(model, inversion, guidance=guidance, generator=generator, diffusers_compat=diffusers_compat,
                    callback=callback, attention_hook=attention_hook, eta=eta,
                    num_images_per_prompt=num_images_per_prompt, output_type=output_type,
                    background_image=background_image)  # the inversion's levels
    size, k = tuple(inversion.z0.shape[-2:]), num_images_per_prompt
    mask = edit_mask(mask, size).to(model.device)
    cond, uncond = prompt_pair(model, prompt, negative_prompt, what="prompt", guidance=guidance, clip_skip=clip_skip,
                               diffusers_compat=diffusers_compat)
    rows = batch_rows(inversion=len(inversion.z0), mask=len(mask), prompt=len(cond))
    original = background(model, background_image, latent_size=size, rows=rows, images_per_row=k)
    cond, uncond = per_image(cond, rows, k), per_image(uncond, rows, k) if guidance > 1 else None
    mask = (compat.tile_mask(mask, rows, k) if diffusers_compat else per_image(mask, rows, k)).to(model.dtype)
    x_at = {t: per_image(inversion.latents[:, i].to(model.device), rows, k) for i, t in enumerate(ts)}  # by level
    x_at[-1] = per_image(inversion.z0.to(model.device), rows, k)  # past the last step: z0 itself
    x = x_at[ts[0]].clone()  # x_r
    for i, (t_cur, t_next) in enumerate(tqdm(list(zip(ts, [*ts[1:], -1])), desc="edit", disable=not progress)):
        out = model.unet_output(x, t_cur, cond, uncond, guidance, at_step(attention_hook, i))
        step = ddim_step(model.schedule, out, x, t_cur, t_next, eta=eta, generator=generator)  # DDIM eq. 12
        # §3.3: y <- M y + (1 - M) x_inv, with the input's encoding at the level y now has (t_next). diffusers
        # takes the level it stepped *from* (one step noisier), and so ends at x_1 instead of z0.
        x_inv = x_at[t_cur] if diffusers_compat else x_at[t_next]
        x = step.x * mask + x_inv * (1 - mask)
        if callback is not None:
            callback(dict(i=i, t=t_cur, x=x, pred_x0=step.pred_x0))
    return EditResult(output_images(model, x, mask=mask, original=original, output_type=output_type), x)
