"""diffusers 0.42's StableDiffusionDiffEditPipeline numbers, defects included, for `diffusers_compat=True`.

Each stage of edit.py branches here once. What diffusers does differently (DESIGN.md lists why each is a defect):
- its mask map: one VAE posterior *sample* per map (the image encoded n times), its batch layout, its guidance
  applied in the reverse direction, and no per-image threshold (`binarize(per_image=False)`);
- its clip_skip rule: the prompt's layer is skipped, never the negative prompt's;
- its inversion: z0 a posterior sample; its regulariser converts v with the wrong level and input, with one KL
  over the batch, and it fails for v-models with guidance at batch > 1 (refused here);
- its edit: masks tiled over the images of a prompt (m0, m1, m0, m1) instead of repeated per row.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .ddim import add_noise, eps_from_v
from .image import ImageInput, to_tensor
from .model import StableDiffusion
from .noise import randn
from .regulariser import InversionRegulariser, PenaltyTerms, kl_loss
from .rows import batch_rows, to_rows
from .text import PromptEmbeddings
from .vae import DiagonalGaussian


def negative_clip_skip(clip_skip: int) -> int:
    """diffusers applies clip_skip to the prompt only; its negative prompt always takes the last layer."""
    return 0


def sample_z0(
    model: StableDiffusion, *, image: ImageInput | None, latents: Tensor | None, posterior: DiagonalGaussian | None,
    generator: torch.Generator | None, repeat: int = 1,
) -> tuple[Tensor, DiagonalGaussian | None]:
    """z0 as diffusers makes it: a posterior sample drawn with `generator` (latents are taken as they are).

    diffusers encodes the image once per sample; one encoder pass with the posterior repeated draws the same numbers.
    Returns z0 (`repeat` consecutive rows per image) and the posterior, for a later stage to sample again.
    """
    if latents is not None:
        return latents.repeat_interleave(repeat, 0), None
    if posterior is None:
        posterior = model.encode_posterior(to_tensor(image, model.config.vae.downsample_factor))
    return model.posterior_latents(posterior, generator, sample=True, repeat=repeat), posterior


def mask_map(
    model: StableDiffusion, *, z0: Tensor, t: int, prompts: tuple[PromptEmbeddings, ...], num_maps: int,
    guidance: float, generator: torch.Generator | None,
) -> Tensor:
    """The map of diffusers' generate_mask from its z0 samples (`num_maps` consecutive rows per image) and the
    stage's (source, source negative, target, target negative) prompts: its batch layout (a shared image tiled), its
    swapped guidance, raw outputs (v for v-models), averaged over maps and channels."""
    src, src_neg, tgt, tgt_neg = prompts
    n_images = len(z0) // num_maps
    rows = batch_rows(images=n_images, source_prompt=len(src), target_prompt=len(tgt))
    z = torch.cat([z0] * (rows // n_images))
    x = add_noise(model.schedule, z, randn(z.shape, generator, z), t)
    rep = lambda e: to_rows(e, rows).map(lambda v: v.repeat_interleave(num_maps, 0))  # noqa: E731
    out = lambda groups: model.unet_output(torch.cat([x] * len(groups)), t, PromptEmbeddings.cat(groups))  # noqa: E731
    if guidance > 1:  # the halves of each pair are swapped: it guides *away* from the prompt, towards ""
        if to_rows(src_neg, rows).equal(to_rows(tgt_neg, rows)):  # both "" (the default): the same rows twice,
            out_neg_src, out_src, out_uncond = out([rep(src), rep(src_neg), rep(tgt)]).chunk(3)  # so 3 of 4 suffice
            out_tgt = out_src  # (diffusers' names, swapped as its guidance is: this is the negative's output)
        else:
            out_neg_src, out_src, out_uncond, out_tgt = out([rep(src), rep(src_neg), rep(tgt), rep(tgt_neg)]).chunk(4)
        out_src = out_neg_src + guidance * (out_src - out_neg_src)
        out_tgt = out_uncond + guidance * (out_tgt - out_uncond)
    else:  # (diffusers itself fails without guidance)
        out_src, out_tgt = out([rep(src), rep(tgt)]).chunk(2)
    return (out_tgt - out_src).abs().reshape(rows, num_maps, *out_tgt.shape[-3:]).mean([1, 2])[:, None]


def checked_regulariser_terms(
    model: StableDiffusion, reg: InversionRegulariser | None, *, guided: bool, rows: int
) -> Callable[..., PenaltyTerms]:
    """`regulariser_terms` below, for invert(): refused where diffusers' own code fails."""
    if reg is not None and guided and rows > 1 and _is_v(model):
        raise ValueError("diffusers' inversion regulariser fails for v-models with guidance at batch > 1")
    return regulariser_terms


def regulariser_terms(model: StableDiffusion, *, x: Tensor, t_cur: int, t_next: int, guided: bool) -> PenaltyTerms:
    """diffusers' terms of the inversion regulariser: v converted with abar(t_next) (the level moved to, not the
    level of `x`) against the CFG-doubled input, and one KL over the whole batch."""
    x_in, abar = (torch.cat([x, x]) if guided else x), model.schedule.abar(t_next)
    return ((lambda o: eps_from_v(o, x_in, abar)) if _is_v(model) else (lambda o: o)), kl_loss


def tile_mask(mask: Tensor, rows: int, images_per_row: int) -> Tensor:
    """diffusers' mask layout for k images per prompt: tiled (m0, m1, m0, m1), so with k > 1 masks land on the wrong
    images (ours repeats each row's mask for its own images)."""
    return torch.cat([to_rows(mask, rows)] * images_per_row)


def _is_v(model: StableDiffusion) -> bool:
    return model.config.schedule.prediction_type == "v_prediction"
