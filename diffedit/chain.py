"""The whole of DiffEdit in one call: mask (§3.2) -> DDIM encoding (§3.1) -> masked decoding (§3.3).

`edit_image` is exactly the three stages of edit.py with the paper's defaults: z0 encoded once and shared by the
mask and the inversion, the source prompt as the edit's negative, a fresh generator seeded with `seed` for each
stage (so each stage's draws depend on the seed alone), each prompt through the text encoder once. The CLI, the
demo, the toy benchmark, bench and the notebooks all call it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._inputs import OutputType, StageAttentionHook
from .edit import EditResult, Inversion, MaskResult, edit, generate_mask, invert
from .image import ImageInput, to_tensor
from .model import StableDiffusion
from .text import PromptInput


@dataclass(frozen=True, eq=False)
class EditImageResult:
    edit: EditResult  # .images: the edited pictures
    mask: MaskResult
    inversion: Inversion


def edit_image(
    model: StableDiffusion, image: ImageInput, source_prompt: PromptInput, target_prompt: PromptInput, *,
    seed: int = 0, steps: int = 50, num_maps: int = 10, mask_strength: float = 0.5, threshold_ratio: float = 3.0,
    guidance: float = 7.5, strength: float = 0.8, invert_guidance: float = 1.0,
    negative_prompt: PromptInput | None = None, eta: float = 0.0, clip_skip: int = 0,
    inversion: Inversion | None = None, paste_background: bool = False, output_type: OutputType = "pil",
    attention_hook: StageAttentionHook | None = None, diffusers_compat: bool = False, progress: bool = True,
) -> EditImageResult:
    """Edit `image` from `source_prompt` (R, what it shows) to `target_prompt` (Q, what it should show).

    `negative_prompt` of the edit defaults to R (the paper's recipe). `inversion=` reuses a saved encoding of this
    image (its steps and strength are then the inversion's). diffusers_compat=True chains diffusers' stages as its
    pipeline does, with the image's posterior sampled anew for the inversion (one encoder pass all the same).
    """
    pixels = to_tensor(image, model.config.vae.downsample_factor)
    generator = lambda: torch.Generator().manual_seed(seed)  # noqa: E731  (CPU: the same bits on any device)
    start = dict(image=pixels) if inversion is None else dict(latents=inversion.z0)
    mask = generate_mask(model, source_prompt=source_prompt, target_prompt=target_prompt, num_maps=num_maps,
                         encode_strength=mask_strength, threshold_ratio=threshold_ratio,
                         steps=steps if inversion is None else inversion.steps, guidance=guidance, clip_skip=clip_skip,
                         generator=generator(), attention_hook=attention_hook, diffusers_compat=diffusers_compat,
                         progress=progress, **start)
    if inversion is None:
        z0 = dict(posterior=mask.posterior) if diffusers_compat else dict(latents=mask.latents)  # one VAE pass
        inversion = invert(model, strength=strength, steps=steps, guidance=invert_guidance, clip_skip=clip_skip,
                           generator=generator(), attention_hook=attention_hook, diffusers_compat=diffusers_compat,
                           progress=progress, **z0)
    # The mask's encodings of R and Q are the edit's prompts, unless diffusers' clip_skip rule encodes the
    # negative differently (compat.negative_clip_skip).
    negative = mask.source_embeddings if clip_skip == 0 or not diffusers_compat else source_prompt
    negative = negative if negative_prompt is None else negative_prompt
    result = edit(model, inversion, mask, mask.target_embeddings, negative_prompt=negative, guidance=guidance, eta=eta,
                  clip_skip=clip_skip, generator=generator(), attention_hook=attention_hook, output_type=output_type,
                  background_image=pixels if paste_background else None, diffusers_compat=diffusers_compat,
                  progress=progress)
    return EditImageResult(result, mask, inversion)
