"""DiffEdit's default (paper-faithful) behaviour: each fix of diffusers' defects, batching, determinism, bad input.

All on a TINY random model with 16x16 images (8x8 latents) and a handful of DDIM steps.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image

from diffedit import EditResult, Inversion, InversionRegulariser, PromptEmbeddings, edit, generate_mask, invert
from diffedit.ddim import ddim_step, timesteps
from diffedit.edit import binarize
from diffedit.image import mask_to_pil, overlay, side_by_side, to_mask, to_tensor
from diffedit.vae import DiagonalGaussian

from ._reference import relative_error
from .conftest import make_tiny_model, seeded

STEPS = 6  # the mask at t = 333 (strength 0.5); inversion and edit over 499, 333, 167, 1 (strength 0.8)
FAST = dict(steps=STEPS, progress=False)
MODEL_SEED, IMAGE_COUNT, IMAGE_SEED = 2, 2, 0  # conftest's `model` and `images`


@pytest.fixture(scope="module")
def inversion(model, images) -> Inversion:
    return invert(model, images, **FAST)


# ---- the fixes ----------------------------------------------------------------------------------------------
def test_empty_mask_returns_z0_exactly(model, inversion) -> None:
    empty = torch.zeros(2, 1, 8, 8)
    out = edit(model, inversion, empty, "a bowl of pears", output_type="latent", progress=False)
    assert torch.equal(out.latents, inversion.z0)
    # diffusers ends one level short, at the inversion's x_1
    compat = edit(model, inversion, empty, "a bowl of pears", output_type="latent", diffusers_compat=True,
                  progress=False)
    assert torch.equal(compat.latents, inversion.latents[:, -1]) and not torch.equal(compat.latents, inversion.z0)


def test_blend_uses_the_noise_level_of_the_step_output(model, inversion) -> None:
    mask = (torch.rand(2, 1, 8, 8, generator=seeded(1)) > 0.5).float()
    seen: list[dict] = []
    out = edit(model, inversion, mask, "a bowl of pears", negative_prompt="a bowl of fruits", output_type="latent",
               callback=seen.append, progress=False)
    # property: after the step from timesteps[i], the unmasked latent is the inversion's at timesteps[i + 1]
    levels = [*list(inversion.latents.unbind(1))[1:], inversion.z0]
    assert [s["t"] for s in seen] == list(inversion.timesteps)
    for s, expected in zip(seen, levels):
        assert torch.equal(s["x"] * (1 - mask), expected * (1 - mask))
        assert set(s) == {"i", "t", "x", "pred_x0"}
    # an independent re-computation of §3.3 with the DDIM step
    cond, uncond = model.encode_prompt(["a bowl of pears"] * 2), model.encode_prompt(["a bowl of fruits"] * 2)
    ts = list(inversion.timesteps)
    x = inversion.latents[:, 0]
    for t_cur, t_next, background in zip(ts, [*ts[1:], -1], levels):
        y = ddim_step(model.schedule, model.unet_output(x, t_cur, cond, uncond, 7.5), x, t_cur, t_next).x
        x = y * mask + background * (1 - mask)
    assert torch.equal(out.latents, x)


def test_threshold_is_per_image(model, images) -> None:
    result = generate_mask(model, images, "a bowl of fruits", "a bowl of pears", num_maps=2, generator=seeded(),
                           **FAST)
    d = result.difference
    assert d.shape == result.latent_mask.shape == (2, 1, 8, 8)
    paper = (d > 3.0 / 2 * d.mean(dim=(1, 2, 3), keepdim=True)).float()  # M = 1[D > rho/2 mean(D)], per image
    assert (result.latent_mask != paper).sum() <= 1  # (a value exactly at the threshold may round either way)
    assert set(result.latent_mask.unique().tolist()) <= {0.0, 1.0}
    # scaling the other image's map changes nothing for this one; with diffusers' batch-wide mean it empties it
    scaled = torch.cat([d[:1], 100 * d[1:]])
    assert torch.equal(binarize(scaled)[0], binarize(d)[0]) and binarize(d)[0].sum() > 0
    assert binarize(scaled, per_image=False)[0].sum() == 0


def test_identical_prompts_give_an_empty_mask(model, images) -> None:
    kwargs = dict(num_maps=2, generator=seeded(), **FAST)
    same = generate_mask(model, images, "a red circle", "a red circle", **kwargs)
    assert torch.equal(same.difference, torch.zeros_like(same.difference))
    assert same.latent_mask.sum() == 0
    compat = generate_mask(model, images, "a red circle", "a red circle", diffusers_compat=True, **kwargs)
    assert compat.latent_mask.min() == 1  # diffusers: 0 / 0 -> all ones


def test_pil_output_and_image_masks(model, inversion, images) -> None:
    mask = generate_mask(model, images, "a bowl of fruits", "a bowl of pears", num_maps=2, generator=seeded(),
                         **FAST)
    assert [m.size for m in mask.image_mask] == [(16, 16)] * 2 and mask.image_mask[0].mode == "L"
    assert np.array_equal(np.asarray(mask.image_mask[1]) > 0, mask.latent_mask[1, 0].repeat_interleave(2, 0)
                          .repeat_interleave(2, 1).numpy() > 0)
    out = edit(model, inversion, mask, "a bowl of pears", progress=False)
    assert isinstance(out, EditResult) and len(out.images) == 2
    assert all(isinstance(im, Image.Image) and im.size == (16, 16) and im.mode == "RGB" for im in out.images)
    from_pil_masks = edit(model, inversion, mask.image_mask, "a bowl of pears", progress=False)  # image size
    assert torch.equal(from_pil_masks.latents, out.latents)
    np_out = edit(model, inversion, mask, "a bowl of pears", output_type="np", progress=False).images
    as_uint8 = np.stack([np.asarray(i) for i in out.images]) / 255
    assert np_out.shape == (2, 16, 16, 3) and np.allclose(np_out, as_uint8, atol=1 / 255)


def test_masks_stay_paired_with_their_images(model, inversion) -> None:
    masks = torch.stack([torch.zeros(1, 8, 8), torch.ones(1, 8, 8)])  # keep image 0, repaint image 1
    out = edit(model, inversion, masks, ["a red circle", "a blue square"], num_images_per_prompt=2, eta=1.0,
               generator=seeded(), output_type="latent", progress=False)
    assert out.latents.shape == (4, 4, 8, 8)
    for row in (0, 1):  # both samples of image 0 are image 0's latent
        assert torch.equal(out.latents[row], inversion.z0[0])
    for row in (2, 3):
        assert not torch.allclose(out.latents[row], inversion.z0[1])
    assert not torch.equal(out.latents[2], out.latents[3])  # eta > 0: two different samples
    # diffusers tiles the masks (m0, m1, m0, m1): image 0's second sample is repainted
    compat = edit(model, inversion, masks, ["a red circle", "a blue square"], num_images_per_prompt=2,
                  output_type="latent", diffusers_compat=True, progress=False)
    assert torch.equal(compat.latents[0], inversion.latents[0, -1])
    assert not torch.allclose(compat.latents[1], inversion.latents[0, -1])


def test_background_image_is_pasted_outside_the_mask(model, inversion, images) -> None:
    masks = torch.zeros(2, 1, 8, 8)
    masks[0, :, 2:5, 3:7] = 1
    masks[1, :, 4:, :] = 1
    kw = dict(eta=1.0, num_images_per_prompt=2, output_type="pt", progress=False)
    plain = edit(model, inversion, masks, ["a red circle", "a blue square"], generator=seeded(), **kw)
    pasted = edit(model, inversion, masks, ["a red circle", "a blue square"], background_image=images,
                  generator=seeded(), **kw)
    assert torch.equal(pasted.latents, plain.latents)  # the same denoising; only the decoded pixels differ
    inside = masks.repeat_interleave(2, 0).repeat_interleave(2, -1).repeat_interleave(2, -2).bool()
    inside = inside.expand(-1, 3, -1, -1)
    assert torch.equal(pasted.images[inside], plain.images[inside])  # the edit where the mask is
    originals = images.repeat_interleave(2, 0)  # rows 0, 1 are image 0's two samples, rows 2, 3 image 1's
    assert torch.equal(pasted.images[~inside], originals[~inside])  # the input's own pixels elsewhere
    assert not torch.allclose(plain.images[~inside], originals[~inside], atol=1e-3)  # (the decoder alone: not so)
    one = edit(model, inversion, masks, ["a red circle", "a blue square"], generator=seeded(), background_image=[
        Image.fromarray((images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))], **kw)
    assert one.images.shape == (4, 3, 16, 16)  # one picture for every row


def test_mask_and_inversion_share_one_encoding(model, images) -> None:
    mask = generate_mask(model, images, "a bowl of fruits", "a bowl of pears", num_maps=2, generator=seeded(),
                         **FAST)
    assert torch.equal(mask.latents, model.encode_image(images))  # the posterior mean, once
    a, b = invert(model, latents=mask.latents, **FAST), invert(model, images, **FAST)
    assert torch.equal(a.z0, b.z0) and torch.equal(a.latents, b.latents)
    assert a.latents.shape == (2, 4, 4, 8, 8) and a.timesteps == tuple(timesteps(model.schedule, STEPS, 0.8))


@pytest.mark.parametrize("compat", [False, True])
def test_mask_encodes_each_distinct_prompt_once(model, images, monkeypatch, compat: bool) -> None:
    encoded = []
    original = model.encode_prompt
    monkeypatch.setattr(model, "encode_prompt", lambda p, clip_skip=0: encoded.append(p) or original(p, clip_skip))
    generate_mask(model, images, "a cat", "a dog", num_maps=1, diffusers_compat=compat, **FAST)
    # compat: one "" for both negatives (diffusers' map uses them); default: they cancel, so they are never encoded
    expected = ["a cat", "a dog", [""]] if compat else ["a cat", "a dog"]
    assert sorted(map(str, encoded)) == sorted(map(str, expected))


def test_the_mask_hands_on_its_prompt_embeddings(model, images) -> None:
    mask = generate_mask(model, images, ["a cat", "a dog"], ["a red cat", "a red dog"], num_maps=1, generator=seeded(),
                         **FAST)
    assert torch.equal(mask.source_embeddings.tokens, model.encode_prompt(["a cat", "a dog"]).tokens)
    inversion = invert(model, latents=mask.latents, **FAST)
    by_text = edit(model, inversion, mask, ["a red cat", "a red dog"], negative_prompt=["a cat", "a dog"],
                   generator=seeded(), output_type="latent", progress=False)
    handed_on = edit(model, inversion, mask, mask.target_embeddings, negative_prompt=mask.source_embeddings,
                     generator=seeded(), output_type="latent", progress=False)
    assert torch.equal(by_text.latents, handed_on.latents)


def test_one_image_several_prompts(model, images) -> None:
    mask = generate_mask(model, images[:1], "a bowl of fruits", ["a bowl of pears", "a red circle"], num_maps=2,
                         generator=seeded(), **FAST)
    assert mask.latent_mask.shape == (2, 1, 8, 8) and mask.latents.shape == (1, 4, 8, 8)
    inv = invert(model, latents=mask.latents, **FAST)
    out = edit(model, inv, mask, ["a bowl of pears", "a red circle"], output_type="pt", progress=False)
    assert out.images.shape == (2, 3, 16, 16)


def test_embeddings_instead_of_prompts(model, images, inversion) -> None:
    kw = dict(output_type="latent", progress=False)
    by_text = edit(model, inversion, torch.ones(1, 1, 8, 8), "a red circle", negative_prompt="a blue square", **kw)
    by_embeddings = edit(model, inversion, torch.ones(1, 1, 8, 8), model.encode_prompt("a red circle"), **kw,
                         negative_prompt=model.encode_prompt("a blue square"))
    assert torch.equal(by_text.latents, by_embeddings.latents)
    unconditional = invert(model, images, model.encode_prompt(["", ""]), **FAST)
    assert torch.equal(unconditional.latents, inversion.latents)


def test_same_seed_same_bits(model, images) -> None:
    def run(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        mask = generate_mask(model, images, "a bowl of fruits", "a bowl of pears", num_maps=2,
                             generator=seeded(seed), **FAST)
        inv = invert(model, latents=mask.latents, generator=seeded(seed), **FAST)
        out = edit(model, inv, mask, "a bowl of pears", eta=0.5, generator=seeded(seed), output_type="pt",
                   progress=False)
        return mask.difference, out.images

    first, again, other = run(1), run(1), run(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])


def test_regulariser_runs_for_v_models_at_batch_two(tokenizer_dir: Path, images) -> None:
    v_model = make_tiny_model(tokenizer_dir, "v_prediction", seed=4)
    reg = InversionRegulariser(lambda_auto_corr=1.0, lambda_kl=1.0, num_reg_steps=1)
    kwargs = dict(guidance=2.0, regulariser=reg, generator=seeded(), **FAST)
    inv = invert(v_model, images, ["a red circle", "a blue square"], **kwargs)
    plain = invert(v_model, images, ["a red circle", "a blue square"], **{**kwargs, "regulariser": None})
    assert torch.isfinite(inv.latents).all() and not torch.equal(inv.latents, plain.latents)
    with pytest.raises(ValueError, match="diffusers"):  # diffusers crashes here: nothing to reproduce
        invert(v_model, images, ["a red circle", "a blue square"], diffusers_compat=True, **kwargs)


def test_inversion_file_round_trip(inversion, tmp_path: Path) -> None:
    path = tmp_path / "inv.safetensors"
    inversion.save(path)
    loaded = Inversion.load(path)
    assert torch.equal(loaded.latents, inversion.latents) and torch.equal(loaded.z0, inversion.z0)
    assert dataclasses.replace(loaded, z0=None, latents=None).__dict__ == dataclasses.replace(
        inversion, z0=None, latents=None).__dict__
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="inversion file"):
        Inversion.load(tmp_path / "bad.safetensors")


def test_long_prompts_warn(model, inversion) -> None:
    with pytest.warns(UserWarning, match="truncated"):
        edit(model, inversion, torch.zeros(1, 1, 8, 8), "a photo of " * 40, output_type="latent", progress=False)


# ---- bad input ---------------------------------------------------------------------------------------------
def _bad_calls(model: Any, images: Any, inversion: Any) -> dict[str, tuple[type[Exception], str, Callable[[], Any]]]:
    """Each case: the exception type, the whole message (plain text, not a pattern), the call."""
    ok_mask = torch.zeros(2, 1, 8, 8)
    m = lambda **kw: generate_mask(model, **{"image": images, "source_prompt": "a", "target_prompt": "b",  # noqa: E731
                                             "num_maps": 1, **FAST, **kw})
    i = lambda **kw: invert(model, **{"image": images, **FAST, **kw})  # noqa: E731
    e = lambda **kw: edit(model, **{"inversion": inversion, "mask": ok_mask, "prompt": "a",  # noqa: E731
                                    "progress": False, **kw})
    replaced = lambda **kw: e(inversion=dataclasses.replace(inversion, **kw))  # noqa: E731
    return {
        "model type": (TypeError, "model must be a StableDiffusion (diffedit.load), got str",
                       lambda: generate_mask("model", images, "a", "b")),
        "image type": (TypeError,
                       "images must be a PIL image, a numpy array, a tensor or a non-empty list of them, got str",
                       lambda: m(image="picture.png")),
        "image shape": (ValueError, "image tensors must be (3, H, W) or (B, 3, H, W), got (2, 1, 16, 16)",
                        lambda: m(image=torch.rand(2, 1, 16, 16))),
        "image range": (ValueError, "image tensors must hold finite values in [0, 1]", lambda: m(image=images * 2)),
        "image and latents": (ValueError, "give an image, latents= or posterior=, exactly one of them",
                              lambda: i(latents=torch.zeros(2, 4, 8, 8))),
        "no image": (ValueError, "give an image, latents= or posterior=, exactly one of them", lambda: i(image=None)),
        "latents shape": (ValueError, "latents must be a float (B, 4, h, w) tensor, got torch.Size([2, 3, 8, 8])",
                          lambda: i(image=None, latents=torch.zeros(2, 3, 8, 8))),
        "image and posterior": (ValueError, "give an image, latents= or posterior=, exactly one of them",
                                lambda: i(posterior=DiagonalGaussian(*torch.zeros(2, 2, 4, 8, 8)))),
        "posterior type": (TypeError, "posterior must be a DiagonalGaussian (a MaskResult's .posterior), not Tensor",
                           lambda: i(image=None, posterior=torch.zeros(2, 4, 8, 8))),
        "prompt type": (TypeError, "a prompt must be a string or a list of strings, got int",
                        lambda: m(source_prompt=3)),
        "embeddings shape": (ValueError, "prompt embeddings must have tokens of shape (B, tokens, 32), got (1, 77, 5)",
                             lambda: e(prompt=PromptEmbeddings(torch.zeros(1, 77, 5)))),
        "embeddings not finite": (ValueError, "prompt embeddings hold NaN, Inf or non-float values",
                                  lambda: e(prompt=PromptEmbeddings(torch.full((1, 77, 32), torch.nan)))),
        "batch sizes": (ValueError, "batch sizes must be 1 or equal: images=2, source_prompt=1, target_prompt=3",
                        lambda: m(target_prompt=["a", "b", "c"])),
        "negative batch": (ValueError, "3 negative prompts for 2 prompts (prompt)",
                           lambda: e(prompt=["a", "b"], negative_prompt=["a", "b", "c"])),
        "steps": (ValueError, "steps must be an integer >= 1, got 0", lambda: i(steps=0)),
        "strength": (ValueError, "strength must be a number in [0.0, 1.0], got 1.5", lambda: i(strength=1.5)),
        "no step": (ValueError, "strength=0.1 of 6 steps leaves no step: int(steps * strength) must be >= 1",
                    lambda: i(strength=0.1)),
        "guidance": (ValueError, "guidance must be a number >= 1.0, got 0.5", lambda: m(guidance=0.5)),
        "num_maps": (ValueError, "num_maps must be an integer >= 1, got 0", lambda: m(num_maps=0)),
        "maps_per_call": (ValueError, "maps_per_call must be an integer >= 1, got 0", lambda: m(maps_per_call=0)),
        "threshold": (ValueError, "threshold_ratio must be a number > 0.0, got 0", lambda: m(threshold_ratio=0)),
        "encode_strength": (ValueError, "encode_strength must be a number in [0.0, 1.0], got -0.1",
                            lambda: m(encode_strength=-0.1)),
        "regulariser": (ValueError, "InversionRegulariser.num_reg_steps must be an integer >= 1, got -1",
                        lambda: i(regulariser=InversionRegulariser(num_reg_steps=-1))),
        "regulariser type": (TypeError, "regulariser must be an InversionRegulariser or None, got dict",
                             lambda: i(regulariser=dict(num_reg_steps=1))),
        "generator": (TypeError, "generator must be a torch.Generator or None, got int", lambda: i(generator=0)),
        "callback": (TypeError, "callback must be callable or None, got str", lambda: e(callback="print")),
        "attention hook": (TypeError, "attention_hook must be callable or None, got str",
                           lambda: e(attention_hook="print")),
        "compat flag": (TypeError, "diffusers_compat must be True or False, got 'yes'",
                        lambda: e(diffusers_compat="yes")),
        "eta": (ValueError, "eta must be a number in [0.0, 1.0], got -1.0", lambda: e(eta=-1.0)),
        "eta above 1": (ValueError, "eta must be a number in [0.0, 1.0], got 5.0", lambda: e(eta=5.0)),
        "images per prompt": (ValueError, "num_images_per_prompt must be an integer >= 1, got 0",
                              lambda: e(num_images_per_prompt=0)),
        "output type": (ValueError, "output_type must be 'pil', 'np', 'pt' or 'latent', got 'jpg'",
                        lambda: e(output_type="jpg")),
        "inversion type": (TypeError, "inversion must be the Inversion returned by invert(), got Tensor",
                           lambda: e(inversion=inversion.latents)),
        "steps and strength": (ValueError,
                               "inconsistent inversion: timesteps (499, 333)..., latents (2, 4, 4, 8, 8), z0 (2, 4, "
                               "8, 8) for 8 steps of strength 0.8",
                               lambda: replaced(steps=STEPS + 2)),
        "latents vs timesteps": (ValueError,
                                 "inconsistent inversion: timesteps (499, 333)..., latents (2, 3, 4, 8, 8), z0 (2, 4, "
                                 "8, 8) for 6 steps of strength 0.8",
                                 lambda: replaced(latents=inversion.latents[:, 1:])),
        "prediction type": (ValueError, "the inversion was made by a v_prediction model, this one is epsilon",
                            lambda: replaced(prediction_type="v_prediction")),
        "inversion not finite": (ValueError, "the inversion holds NaN or Inf latents",
                                 lambda: replaced(z0=inversion.z0 * torch.nan)),
        "latents not finite": (ValueError, "latents hold NaN or Inf values",
                               lambda: i(image=None, latents=torch.full((2, 4, 8, 8), torch.inf))),
        "mask values": (ValueError, "mask values must be 0 or 1 (binarise the mask first)",
                        lambda: e(mask=torch.full((2, 1, 8, 8), 0.5))),
        "mask shape": (ValueError, "a mask must be (h, w), (B, h, w) or (B, 1, h, w), got (2, 3, 8, 8)",
                       lambda: e(mask=torch.zeros(2, 3, 8, 8))),
        "mask type": (TypeError, "a mask must be a PIL image, a numpy array or a tensor, got str",
                      lambda: e(mask="mask.png")),
        "mask batch": (ValueError, "batch sizes must be 1 or equal: inversion=2, mask=3, prompt=1",
                       lambda: e(mask=torch.zeros(3, 1, 8, 8))),
        "background with latents": (ValueError,
                                    "background_image is pasted into decoded images: it needs output_type 'pil', 'np' "
                                    "or 'pt'",
                                    lambda: e(background_image=images, output_type="latent")),
        "background size": (ValueError,
                            "background_image is (24, 24) pixels, the inversion's images (16, 16): pass the image "
                            "that was inverted",
                            lambda: e(background_image=torch.rand(2, 3, 24, 24))),
        "background batch": (ValueError, "background_image has 3 images for 2 rows: give 1 or 2",
                             lambda: e(background_image=torch.rand(3, 3, 16, 16))),
        "background type": (TypeError,
                            "images must be a PIL image, a numpy array, a tensor or a non-empty list of them, got str",
                            lambda: e(background_image="input.png")),
    }


BAD = list(_bad_calls(None, None, None))


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_rejected_clearly(model, images, inversion, case: str) -> None:
    """Each refusal: its exception type and its whole one-line message, as written out in _bad_calls."""
    error, message, call = _bad_calls(model, images, inversion)[case]
    with pytest.raises(error, match=f"^{re.escape(message)}$") as info:
        call()
    assert type(info.value) is error and str(info.value) == message


# ---- image.py ----------------------------------------------------------------------------------------------
def test_images_from_any_format() -> None:
    rgba = Image.new("RGBA", (16, 8), (255, 0, 0, 128))
    gray = Image.new("L", (16, 8), 128)
    batch = to_tensor([rgba, gray])
    assert batch.shape == (2, 3, 8, 16) and batch.dtype == torch.float32
    assert torch.allclose(batch[0, :, 0, 0], torch.tensor([1.0, 0, 0]))
    assert torch.allclose(batch[1], torch.tensor(128 / 255))
    array = np.full((8, 16, 3), 255, np.uint8)
    assert torch.equal(to_tensor(array), torch.ones(1, 3, 8, 16))
    with pytest.warns(UserWarning, match=r"image size 20 x 13 \(width x height\) is not a multiple of 8: resized to "
                                         r"16 x 8"):
        assert to_tensor(Image.new("RGB", (20, 13))).shape == (1, 3, 8, 16)
    with pytest.raises(ValueError, match="same size"):
        to_tensor([rgba, Image.new("RGB", (8, 8))])
    with pytest.raises(TypeError):
        to_tensor(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def test_user_masks_are_resized_to_latents() -> None:
    big = Image.new("L", (64, 64), 0)
    big.paste(255, (32, 0, 64, 64))  # right half
    mask = to_mask(big, (8, 8))
    assert mask.shape == (1, 1, 8, 8) and mask[0, 0, :, 4:].min() == 1 and mask[0, 0, :, :4].max() == 0
    assert torch.equal(to_mask(np.ones((2, 16, 16), np.float32), (8, 8)), torch.ones(2, 1, 8, 8))
    with pytest.raises(ValueError, match="0 or 1"):
        to_mask(torch.full((16, 16), 0.3), (8, 8))
    with pytest.raises(ValueError, match="255"):
        to_mask(Image.new("L", (16, 16), 100), (8, 8))


def test_figures() -> None:
    image = Image.new("RGB", (16, 16), (0, 0, 255))
    mask = mask_to_pil(torch.ones(1, 1, 8, 8), (16, 16))[0]
    tinted = overlay(image, mask)
    assert all(abs(a - b) <= 1 for a, b in zip(tinted.getpixel((0, 0)), (128, 0, 128)))
    assert overlay(image, mask_to_pil(torch.zeros(1, 1, 8, 8))[0]).getpixel((3, 3)) == (0, 0, 255)
    figure = side_by_side([image, tinted, image], gap=2)
    assert figure.size == (3 * 16 + 2 * 2, 16)


def test_noise_inversion_noises_z0_with_one_draw(tiny_model) -> None:
    """The "without encoding" ablation: every level is z0 noised with the same random draw (DDPM eq. 4)."""
    from diffedit import noise_inversion
    from diffedit.ddim import add_noise

    z0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    inv = noise_inversion(tiny_model, z0, strength=0.5, steps=10, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(1))
    assert inv.timesteps == (401, 301, 201, 101, 1)  # the last half of 10 leading steps
    for i, t in enumerate(inv.timesteps):
        torch.testing.assert_close(inv.latents[:, i], add_noise(tiny_model.schedule, z0, noise, t), rtol=0, atol=0)
    assert torch.equal(inv.z0, z0)
    # edit accepts it like any inversion; with an empty mask the result is z0 exactly
    out = edit(tiny_model, inv, torch.zeros(2, 1, 8, 8), "a red circle", output_type="latent", progress=False)
    assert torch.equal(out.latents, z0)


def test_mask_with_a_shared_negative_skips_the_unconditional_rows(tiny_model) -> None:
    """eps~_Q - eps~_R = g (eps_Q - eps_R) when both guided estimates share one unconditional estimate: the
    mask evaluates only the conditional rows. Checked against the full guided computation, written out."""
    from diffedit.ddim import add_noise

    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    result = generate_mask(tiny_model, None, "a bowl of fruits", "a bowl of pears", latents=z0, num_maps=3, steps=10,
                           guidance=5.0, generator=torch.Generator().manual_seed(1), progress=False,
                           maps_per_call=1)  # one map a call, as the reference: the identity alone is measured
    g = torch.Generator().manual_seed(1)
    src, tgt, empty = (tiny_model.encode_prompt(p) for p in ("a bowl of fruits", "a bowl of pears", ""))
    reference = torch.zeros(1, 1, 8, 8)
    for _ in range(3):
        x = add_noise(tiny_model.schedule, z0, torch.randn(z0.shape, generator=g), result.timestep)
        eps_q = tiny_model.noise_estimate(x, result.timestep, tgt, empty, 5.0)
        eps_r = tiny_model.noise_estimate(x, result.timestep, src, empty, 5.0)
        reference += (eps_q - eps_r).abs().mean(1, keepdim=True) / 3
    err = ((result.difference - reference).abs().max() / reference.abs().max()).item()
    assert err <= 1e-5, err


def test_mask_maps_in_one_call_equal_maps_one_by_one(tiny_model) -> None:
    """maps_per_call batches the maps' rows into fewer UNet calls; the noises are the same draws, so the map agrees
    with one map a call up to the UNet's batch-size-dependent rounding (1e-5 relative, fp32 CPU), and the per-map
    callback sees the same maps in the same order."""
    z0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    runs = {}
    for per_call in (1, 3, None):  # None: all 5 maps (20 rows) in one call, the default
        seen: list[tuple[int, torch.Tensor]] = []
        result = generate_mask(tiny_model, None, ["a red circle", "a bowl of fruits"], "a blue square", latents=z0,
                               num_maps=5, steps=10, generator=torch.Generator().manual_seed(1), progress=False,
                               maps_per_call=per_call, callback=lambda d: seen.append((d["i"], d["difference"])))
        runs[per_call] = (result, seen)
    one, seen_one = runs[1]
    for per_call in (3, None):
        result, seen = runs[per_call]
        assert [i for i, _ in seen] == [i for i, _ in seen_one] == [0, 1, 2, 3, 4]
        assert max(relative_error(d, d1) for (_, d), (_, d1) in zip(seen, seen_one)) <= 1e-5
        assert relative_error(result.difference, one.difference) <= 1e-5
        margin = (one.difference - 1.5 * one.difference.mean((1, 2, 3), keepdim=True)).abs() > 1e-4
        assert torch.equal(result.latent_mask[margin], one.latent_mask[margin])
