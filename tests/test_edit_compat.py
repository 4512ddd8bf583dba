"""diffusers_compat=True reproduces diffusers 0.42's StableDiffusionDiffEditPipeline, stage by stage.

Both sides hold the same weights (our tiny random model's state dicts mapped to diffusers' names through
weights_convert.diffusers), the same CLIPTextModel object and tokenizer, DDIM schedulers configured with
SD's settings spelled out, and generators seeded identically for each call. Each side runs its own chain
mask -> inversion -> edit, except that diffusers' edit gets our inversion latents: a guided (7.5) random network
amplifies the 1e-7-level rounding differences of the inversion into the 1e-4 range over a few steps, which
would say nothing about the edit. Required: the binary masks are identical; inverted latents and edited
images agree to 1e-5 relative (max |ours - diffusers| / max |diffusers|, float32 CPU).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffedit import InversionRegulariser, edit, generate_mask, invert

from ._reference import diffusers_pipeline, relative_error
from .conftest import make_tiny_model

RTOL = 1e-5
STEPS = 6  # mask at t = 501 (strength 0.5), inversion / edit over 4 of the 6 steps (strength 0.8)


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def pair(request: pytest.FixtureRequest, tokenizer_dir: Path):
    model = make_tiny_model(tokenizer_dir, request.param, seed=5)
    return model, diffusers_pipeline(model)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# diffusers' default weights (20) are tuned for 64x64 latents; on 8x8 ones they blow the inversion up (on both
# sides alike), so the regulariser is tested with weights that keep the numbers finite.
REGULARISER = dict(lambda_auto_corr=1.0, lambda_kl=1.0, num_auto_corr_rolls=3)  # diffusers' keywords, ours alike

CASES = {
    # batch, images per prompt, edit eta, inversion guidance, regulariser steps, the mask's two negative prompts
    "b1": (1, 1, 0.0, 1.0, 0, (None, None)),  # both negatives "": our compat mask skips diffusers' 4th row group
    "b1-cfg-inversion-regulariser": (1, 1, 0.0, 3.0, 1, (["blurry"], ["a photo"])),  # distinct: all 4 row groups
    "b2-two-per-prompt-eta": (2, 2, 0.5, 1.0, 1, (None, None)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_chain_matches_diffusers(pair, case: str) -> None:
    model, pipe = pair
    batch, per_prompt, eta, inv_guidance, reg_steps, (source_negative, target_negative) = CASES[case]
    images = torch.rand(batch, 3, 16, 16, generator=seeded(1))
    sources = ["a bowl of fruits", "a red circle"][:batch]
    targets = ["a bowl of pears", "a blue square"][:batch]

    # 1. mask
    theirs = pipe.generate_mask(
        image=images, source_prompt=sources, target_prompt=targets, num_maps_per_mask=3,
        mask_encode_strength=0.5, num_inference_steps=STEPS, guidance_scale=7.5, generator=seeded(2),
        source_negative_prompt=source_negative, target_negative_prompt=target_negative, output_type="np",
    )
    ours = generate_mask(model, images, sources, targets, num_maps=3, encode_strength=0.5, steps=STEPS,
                         guidance=7.5, source_negative_prompt=source_negative, target_negative_prompt=target_negative,
                         generator=seeded(2), diffusers_compat=True, progress=False)
    assert np.array_equal(ours.latent_mask[:, 0].numpy(), theirs)
    assert 0 < theirs.mean() < 1  # a mask with both values, so the blend below is tested

    # 2. inversion, from the image (diffusers' posterior sample included), then from identical latents
    reg = dict(num_reg_steps=reg_steps, **REGULARISER)
    theirs_inv = pipe.invert(prompt=sources, image=images, num_inference_steps=STEPS, inpaint_strength=0.8,
                             guidance_scale=inv_guidance, generator=seeded(3), **reg).latents
    regulariser = InversionRegulariser(**reg) if reg_steps else None
    ours_inv = invert(model, images, sources, steps=STEPS, strength=0.8, guidance=inv_guidance,
                      generator=seeded(3), regulariser=regulariser, diffusers_compat=True, progress=False)
    assert ours_inv.latents.shape == theirs_inv.shape
    image_err = relative_error(ours_inv.latents, theirs_inv)
    # The VAE encoders agree to ~1e-6 at batch 2 (bit for bit at batch 1); the inversion grows that ~10x.
    assert image_err < 10 * RTOL
    # the mask's posterior instead of a second encoder pass: the same z0 draw, so the same bits
    from_mask = invert(model, None, sources, posterior=ours.posterior, steps=STEPS, strength=0.8,
                       guidance=inv_guidance, generator=seeded(3), regulariser=regulariser, diffusers_compat=True,
                       progress=False)
    assert torch.equal(from_mask.latents, ours_inv.latents) and torch.equal(from_mask.z0, ours_inv.z0)
    z0 = ours_inv.z0  # diffusers takes 4-channel "images" as latents, as they are
    theirs_inv = pipe.invert(prompt=sources, image=z0, num_inference_steps=STEPS, inpaint_strength=0.8,
                             guidance_scale=inv_guidance, generator=seeded(3), **reg).latents
    ours_inv = invert(model, latents=z0, prompt=sources, steps=STEPS, strength=0.8, guidance=inv_guidance,
                      generator=seeded(3), regulariser=regulariser, diffusers_compat=True, progress=False)
    inv_err = relative_error(ours_inv.latents, theirs_inv)
    assert inv_err < RTOL

    # 3. masked decoding: the final latents, then the decoded images
    def theirs_edit(output_type: str):
        return pipe(
            prompt=targets, mask_image=torch.from_numpy(theirs).float()[:, None], image_latents=ours_inv.latents,
            inpaint_strength=0.8, num_inference_steps=STEPS, guidance_scale=7.5, negative_prompt=sources,
            num_images_per_prompt=per_prompt, eta=eta, generator=seeded(4), output_type=output_type,
        ).images

    ours_out = edit(model, ours_inv, ours, targets, negative_prompt=sources, guidance=7.5, eta=eta,
                    num_images_per_prompt=per_prompt, generator=seeded(4), output_type="np",
                    diffusers_compat=True, progress=False)
    latent_err = relative_error(ours_out.latents, theirs_edit("latent"))
    theirs_out = theirs_edit("np")
    assert ours_out.images.shape == theirs_out.shape == (batch * per_prompt, 16, 16, 3)
    err = relative_error(torch.from_numpy(ours_out.images), torch.from_numpy(theirs_out))
    print(f"\n{model.config.schedule.prediction_type} {case}: inversion {image_err:.1e} from the image, "
          f"{inv_err:.1e} from latents; edit latents {latent_err:.1e}, images {err:.1e}", end=" ")
    assert latent_err < RTOL and err < RTOL  # (the images: the VAE decoders agree to ~5e-6 at batch 4)
