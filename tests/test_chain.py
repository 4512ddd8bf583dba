"""edit_image (the chain once) and the research hooks of the three stages, on a TINY random model."""

from __future__ import annotations

import pytest
import torch

from diffedit import edit, edit_image, generate_mask, invert

from .conftest import seeded

STEPS = 6
SOURCE, TARGET = "a bowl of fruits", "a bowl of pears"
MODEL_SEED, IMAGE_COUNT, IMAGE_SEED = 11, 1, 4  # conftest's `model` and `images`


@pytest.mark.parametrize("compat", [False, True])
def test_edit_image_equals_the_three_calls(model, images, compat: bool) -> None:
    kw = dict(steps=STEPS, diffusers_compat=compat, progress=False)
    mask = generate_mask(model, images, SOURCE, TARGET, num_maps=3, generator=seeded(5), **kw)
    start = dict(posterior=mask.posterior) if compat else dict(image=images)  # compat: diffusers samples anew
    inversion = invert(model, generator=seeded(5), **start, **kw)
    edited = edit(model, inversion, mask, TARGET, negative_prompt=SOURCE, eta=0.3, generator=seeded(5),
                  output_type="pt", diffusers_compat=compat, progress=False)
    chained = edit_image(model, images, SOURCE, TARGET, seed=5, num_maps=3, eta=0.3, output_type="pt", **kw)
    assert torch.equal(chained.mask.latent_mask, mask.latent_mask)
    assert torch.equal(chained.inversion.latents, inversion.latents)
    assert torch.equal(chained.edit.latents, edited.latents) and torch.equal(chained.edit.images, edited.images)


def test_hook_sees_every_cross_attention_layer_at_every_step(model, images) -> None:
    inversion = invert(model, images, steps=STEPS, progress=False)
    mask = torch.ones(1, 1, 8, 8)
    calls: list[tuple[str, int, tuple[int, ...]]] = []

    def record(probs: torch.Tensor, is_cross: bool, place: str, step: int) -> None:
        if is_cross:
            calls.append((place, step, tuple(probs.shape)))

    edit(model, inversion, mask, TARGET, negative_prompt=SOURCE, output_type="latent", attention_hook=record,
         progress=False)
    # the UNet's cross-attention modules, counted from the network itself (independently of the hook)
    places = sorted(name for name, m in model.unet.named_modules() if name.endswith("cross_attn"))
    steps = len(inversion.timesteps)
    assert places and len(calls) == len(places) * steps
    for step in range(steps):
        seen = sorted(p for p, s, _ in calls if s == step)
        assert len(seen) == len(places)
    assert all(shape[0] == 2 and shape[-1] == 77 for _, _, shape in calls)  # [uncond; cond] rows, 77 keys


def test_hook_returning_none_is_bit_identical_and_a_replacing_hook_changes_the_output(model, images) -> None:
    inversion = invert(model, images, steps=STEPS, progress=False)
    mask = torch.ones(1, 1, 8, 8)
    kw = dict(negative_prompt=SOURCE, output_type="latent", progress=False)
    plain = edit(model, inversion, mask, TARGET, **kw).latents
    read_only = edit(model, inversion, mask, TARGET, attention_hook=lambda *a: None, **kw).latents
    assert torch.equal(plain, read_only)

    def uniform_cross(probs: torch.Tensor, is_cross: bool, place: str, step: int) -> torch.Tensor | None:
        return torch.full_like(probs, 1 / probs.shape[-1]) if is_cross else None  # attend to every token alike

    replaced = edit(model, inversion, mask, TARGET, attention_hook=uniform_cross, **kw).latents
    assert not torch.allclose(plain, replaced, atol=1e-4)
    for stage in (lambda h: generate_mask(model, images, SOURCE, TARGET, num_maps=1, steps=STEPS, generator=seeded(),
                                          attention_hook=h, progress=False).difference,
                  lambda h: invert(model, images, steps=STEPS, attention_hook=h, progress=False).latents):
        assert torch.equal(stage(None), stage(lambda *a: None))
        assert not torch.allclose(stage(None), stage(uniform_cross), atol=1e-5)


def test_mask_callback_gets_each_maps_difference(model, images) -> None:
    maps: list[torch.Tensor] = []
    mask = generate_mask(model, images, SOURCE, TARGET, num_maps=4, steps=STEPS, generator=seeded(2), progress=False,
                         callback=lambda info: maps.append(info["difference"]), maps_per_call=1)  # calls as below
    assert len(maps) == 4 and all(m.shape == (1, 1, 8, 8) for m in maps)
    # D is the mean of the maps (§3.2); one map alone is a one-sample call with the same first noise draw
    torch.testing.assert_close(torch.stack(maps).mean(0), mask.difference, rtol=1e-6, atol=0)
    one = generate_mask(model, images, SOURCE, TARGET, num_maps=1, steps=STEPS, generator=seeded(2), progress=False)
    assert torch.equal(one.difference, maps[0])


def test_sizes_that_are_not_multiples_of_the_unet_downsampling_edit(model) -> None:
    """18 x 22 pixels on TINY (VAE factor 2, UNet factor 2): 9 x 11 latents, odd, once refused (the same case as
    72 x 88 pixels with the toy model or 9 x 11 latents with SD)."""
    images = torch.rand(1, 3, 18, 22, generator=seeded(6))
    result = edit_image(model, images, SOURCE, TARGET, steps=STEPS, num_maps=2, output_type="pt", progress=False)
    assert result.edit.images.shape == (1, 3, 18, 22) and result.mask.latent_mask.shape == (1, 1, 9, 11)
    outside = (result.mask.latent_mask == 0).expand_as(result.edit.latents)
    assert outside.any()  # §3.3: the last blend restores z0 exactly outside the mask
    assert torch.equal(result.edit.latents[outside], result.inversion.z0[outside])
