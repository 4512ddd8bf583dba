"""Properties of the three stages that the other tests leave open (issue 16, item 14), each against an independent
reference: diffusers' StableDiffusionDiffEditPipeline on the same weights, a computation written out here from
the model's networks, the same call made row by row, or the arguments the command line hands to the library.

On the TINY random model of conftest (16x16 images, 8x8 latents, float32 CPU). Tolerances: binary masks are
compared exactly (away from the threshold where a computation written differently could round either way);
latents and maps to RTOL = 1e-5 relative (max |ours - reference| / max |reference|), the level at which a batched
UNet call and separate calls, or two implementations of the same sums, agree in float32 (a guided edit over several
steps and the images decoded from it: EDIT_RTOL and IMAGE_RTOL below, with why); bit for bit where both sides
compute the very same thing (a stage given the same single row).
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

import diffedit.cli as cli
from diffedit import edit, edit_image, generate_mask, invert
from diffedit.ddim import timesteps
from diffedit.image import to_pil
from diffedit.noise import randn

from ._reference import diffusers_pipeline, relative_error
from .conftest import seeded

MODEL_SEED, IMAGE_COUNT, IMAGE_SEED = 5, 1, 1  # conftest's `model` and `images`
STEPS = 6  # the mask at strength 0.5 of 6 steps; inversion and edit over 4 of them (strength 0.8)
RTOL = 1e-5  # maps and latents of one UNet call or one stage (seen: <= 5e-6 between a batch of rows and one row)
# A guided (7.5) edit on a random UNet amplifies the rounding differences of batched rows over its steps (seen:
# 1.6e-5; test_edit_compat sees the same growth), and the random VAE decoder amplifies its input's relative
# differences about 10x (and alone differs by ~5e-6 between a batch of 2 and of 1).
EDIT_RTOL = 10 * RTOL
IMAGE_RTOL = 10 * EDIT_RTOL
SOURCES = ["a bowl of fruits", "a red circle", "a photo of apples"]
TARGETS = ["a bowl of pears", "a blue square", "a photo of a red bowl"]


def decided(difference: Tensor, threshold_ratio: float) -> Tensor:
    """Where the map is clearly on one side of §3.2's threshold rho / 2 * mean(D) (per image): more than 1e-4
    of the threshold away, so that two computations of D within RTOL must put the same value in the mask."""
    threshold = threshold_ratio / 2 * difference.mean(dim=(1, 2, 3), keepdim=True)
    return (difference - threshold).abs() > 1e-4 * threshold


# ---- a tape for the mask's noise --------------------------------------------------------------------------------
class NoiseTape:
    """Stands in for the stages' `randn`: records every draw, or, given `replay`, hands those tensors out in turn
    (checking each requested shape), so that a call can be given exactly the noise another call drew."""

    def __init__(self) -> None:
        self.draws: list[Tensor] = []
        self.replay: list[Tensor] | None = None

    def __call__(self, shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
        if self.replay is not None:
            noise = self.replay.pop(0)
            assert tuple(noise.shape) == tuple(shape), (noise.shape, shape)
            return noise.to(like.device, like.dtype)
        noise = randn(shape, generator, like)
        self.draws.append(noise.clone())
        return noise

    def replay_row(self, row: int) -> None:
        """From now on, hand out row `row` of each recorded draw: what that row of the recorded call got."""
        self.replay = [d[row:row + 1] for d in self.draws]


@pytest.fixture
def tape(monkeypatch: pytest.MonkeyPatch) -> NoiseTape:
    recorder = NoiseTape()
    for module in ("diffedit.edit", "diffedit._inputs"):  # the stages' draws: the mask's maps are drawn in _inputs
        monkeypatch.setattr(importlib.import_module(module), "randn", recorder)
    return recorder


# ---- (a) clip_skip through the three stages, against diffusers ------------------------------------------------------
@pytest.fixture
def pipe(model: Any) -> Any:
    """diffusers' pipeline on the model's weights. Its clip_skip reaches the final norm through
    `text_encoder.text_model`, a level transformers 5 removed: aliased for the test (outside nn.Module's
    registration, as test_text does), and removed again, since the model's own file names look for it."""
    encoder = model.text_encoder
    aliased = not hasattr(encoder, "text_model")
    if aliased:
        object.__setattr__(encoder, "text_model", encoder)
    yield diffusers_pipeline(model)
    if aliased:
        object.__delattr__(encoder, "text_model")


def test_clip_skip_through_the_three_stages_matches_diffusers(model: Any, pipe: Any, images: Tensor) -> None:
    """diffusers_compat=True with clip_skip=k (1), each stage against diffusers on the same weights, inputs and seeds.

    diffusers' generate_mask and invert take no clip_skip: they get the prompt embeddings made by diffusers' own
    encode_prompt(clip_skip=k) (its negatives, "" here, then take the last layer, as its __call__ does for
    negative_prompt); its __call__ takes clip_skip itself. Masks identical; inverted latents (from the image, batch 1)
    and edit latents (diffusers run on our mask and inversion) within RTOL. And clip_skip matters here: each
    stage's output with clip_skip=0 is far (> 1e-3) from its output with clip_skip=k."""
    sources, targets = SOURCES[:1], TARGETS[:1]
    clip_skip = 1  # TINY's text encoder has 2 layers: skip the last one

    def their_embeddings(prompts: list[str]) -> Tensor:
        return pipe.encode_prompt(prompts, "cpu", 1, False, clip_skip=clip_skip)[0]

    theirs_mask = pipe.generate_mask(image=images, source_prompt_embeds=their_embeddings(sources),
                                     target_prompt_embeds=their_embeddings(targets), num_maps_per_mask=3,
                                     mask_encode_strength=0.5, num_inference_steps=STEPS, guidance_scale=7.5,
                                     generator=seeded(2), output_type="np")

    def our_mask(skip: int) -> Any:
        return generate_mask(model, images, sources, targets, num_maps=3, encode_strength=0.5, steps=STEPS,
                             guidance=7.5, clip_skip=skip, generator=seeded(2), diffusers_compat=True, progress=False)

    ours_mask = our_mask(clip_skip)
    assert np.array_equal(ours_mask.latent_mask[:, 0].numpy(), theirs_mask)
    assert 0 < theirs_mask.mean() < 1  # both values: the edit's blend is tested below
    assert relative_error(our_mask(0).difference, ours_mask.difference) > 1e-3

    theirs_inv = pipe.invert(prompt_embeds=their_embeddings(sources), image=images, num_inference_steps=STEPS,
                             inpaint_strength=0.8, guidance_scale=3.0, generator=seeded(3)).latents

    def our_inversion(skip: int) -> Any:
        return invert(model, images, sources, steps=STEPS, strength=0.8, guidance=3.0, clip_skip=skip,
                      generator=seeded(3), diffusers_compat=True, progress=False)

    ours_inv = our_inversion(clip_skip)
    assert ours_inv.latents.shape == theirs_inv.shape
    assert relative_error(ours_inv.latents, theirs_inv) < RTOL
    assert relative_error(our_inversion(0).latents, ours_inv.latents) > 1e-3

    theirs_edit = pipe(prompt=targets, negative_prompt=sources, clip_skip=clip_skip,
                       mask_image=torch.from_numpy(theirs_mask).float()[:, None], image_latents=ours_inv.latents,
                       inpaint_strength=0.8, num_inference_steps=STEPS, guidance_scale=7.5, generator=seeded(4),
                       output_type="latent").images

    def our_edit(skip: int) -> Tensor:
        return edit(model, ours_inv, ours_mask, targets, negative_prompt=sources, guidance=7.5, clip_skip=skip,
                    generator=seeded(4), output_type="latent", diffusers_compat=True, progress=False).latents

    ours_edit = our_edit(clip_skip)
    assert relative_error(ours_edit, theirs_edit) < RTOL
    assert relative_error(our_edit(0), ours_edit) > 1e-3


# ---- (b) the default mask with distinct negative prompts, written out ---------------------------------------------
def test_default_mask_with_distinct_negatives_is_the_guided_contrast(model: Any, tape: NoiseTape) -> None:
    """§3.2 with each prompt guided by its own negative, in the standard classifier-free direction (from the
    negative towards the prompt: eps~ = eps(neg) + g (eps(prompt) - eps(neg))), computed here from the UNet on the
    noise the stage drew: D = mean over maps and channels of |eps~_Q - eps~_R|, M = 1[D > rho / 2 * mean(D)] per
    image. D within RTOL, M identical where decided. The case is one where the direction and the negatives matter:
    diffusers' swapped direction, or one shared negative (g |eps_Q - eps_R|), gives a map > 1e-2 away."""
    images = torch.rand(2, 3, 16, 16, generator=seeded(3))
    sources, targets = SOURCES[:2], TARGETS[:2]
    source_negatives, target_negatives = ["a photo of apples", "a red square"], ["a blue circle", "a photo"]
    num_maps, guidance, rho = 3, 7.5, 3.0
    result = generate_mask(model, images, sources, targets, num_maps=num_maps, encode_strength=0.5, steps=STEPS,
                           guidance=guidance, threshold_ratio=rho, source_negative_prompt=source_negatives,
                           target_negative_prompt=target_negatives, generator=seeded(0), progress=False)

    t = timesteps(model.schedule, STEPS, 0.5)[0]  # the first level of strength 0.5 of the schedule
    assert result.timestep == t
    assert len(tape.draws) == num_maps and all(d.shape == (2, 4, 8, 8) for d in tape.draws)
    z0 = model.encode_image(images)  # the posterior mean
    abar = float(model.schedule.alphas_cumprod[t])

    def unet(x: Tensor, prompts: list[str]) -> Tensor:  # an epsilon model: the UNet's output is the noise
        return model.unet(x, t, model.encode_prompt(prompts).tokens)

    maps: dict[str, Tensor] = {k: torch.zeros(2, 1, 8, 8) for k in ("paper", "swapped", "shared")}
    for noise in tape.draws:
        x = abar**0.5 * z0 + (1 - abar) ** 0.5 * noise  # DDPM's q(x_t | x_0)
        e_r, e_r_neg, e_q, e_q_neg = (unet(x, p) for p in (sources, source_negatives, targets, target_negatives))
        guided = {
            "paper": (e_q_neg + guidance * (e_q - e_q_neg), e_r_neg + guidance * (e_r - e_r_neg)),
            "swapped": (e_q + guidance * (e_q_neg - e_q), e_r + guidance * (e_r_neg - e_r)),
            "shared": (guidance * e_q, guidance * e_r),
        }
        for name, (q, r) in guided.items():
            maps[name] += (q - r).abs().mean(1, keepdim=True) / num_maps
    difference = maps["paper"]
    mask = (difference > rho / 2 * difference.mean(dim=(1, 2, 3), keepdim=True)).float()

    assert relative_error(result.difference, difference) < RTOL
    sure = decided(difference, rho)
    assert sure.float().mean() > 0.95 and torch.equal(result.latent_mask[sure], mask[sure])
    assert 0 < mask.mean() < 1
    assert relative_error(maps["swapped"], difference) > 1e-2 and relative_error(maps["shared"], difference) > 1e-2


# ---- (c) one image, several prompts: each row is the single-prompt call ---------------------------------------------
def test_mask_rows_of_one_image_and_several_prompts_are_the_single_prompt_masks(model: Any, images: Tensor,
                                                                               tape: NoiseTape) -> None:
    """generate_mask(one image, 3 prompt pairs) row r == generate_mask(the image, pair r) given row r's noise:
    the map within RTOL (one batched UNet call against separate ones), the mask identical where decided, z0 (the
    same single image encoded either way) bit for bit."""
    kw: dict[str, Any] = dict(num_maps=2, steps=STEPS, generator=seeded(0), progress=False)
    batched = generate_mask(model, images, SOURCES, TARGETS, **kw)
    assert batched.latent_mask.shape == (3, 1, 8, 8) and len(tape.draws) == 2
    for row, (source, target) in enumerate(zip(SOURCES, TARGETS)):
        tape.replay_row(row)
        single = generate_mask(model, images, source, target, **kw)
        assert tape.replay == []  # every recorded draw was used
        assert relative_error(single.difference, batched.difference[row:row + 1]) < RTOL, row
        sure = decided(single.difference, single.threshold_ratio)
        assert sure.float().mean() > 0.95
        assert torch.equal(single.latent_mask[sure], batched.latent_mask[row:row + 1][sure]), row
        assert torch.equal(single.latents, batched.latents)


def test_edit_image_rows_of_one_image_and_several_prompts_are_the_single_prompt_edits(model: Any, images: Tensor,
                                                                                     tape: NoiseTape) -> None:
    """edit_image(one image, 2 prompt pairs) row r == edit_image(the image, pair r) given row r's mask noise
    (eta 0: the edit draws none): the inversion (one row either way: the image, unconditionally) bit for bit,
    the maps within RTOL and masks identical where decided, edit latents within EDIT_RTOL, images within IMAGE_RTOL."""
    kw: dict[str, Any] = dict(seed=3, steps=STEPS, num_maps=2, output_type="pt", progress=False)
    sources, targets = SOURCES[:2], TARGETS[:2]
    batched = edit_image(model, images, sources, targets, **kw)
    assert batched.edit.latents.shape == (2, 4, 8, 8)
    for row, (source, target) in enumerate(zip(sources, targets)):
        tape.replay_row(row)
        single = edit_image(model, images, source, target, **kw)
        assert torch.equal(single.inversion.latents, batched.inversion.latents)
        assert relative_error(single.mask.difference, batched.mask.difference[row:row + 1]) < RTOL, row
        sure = decided(single.mask.difference, single.mask.threshold_ratio)
        assert sure.float().mean() > 0.95
        assert torch.equal(single.mask.latent_mask[sure], batched.mask.latent_mask[row:row + 1][sure]), row
        assert relative_error(single.edit.latents, batched.edit.latents[row:row + 1]) < EDIT_RTOL, row
        assert relative_error(single.edit.images, batched.edit.images[row:row + 1]) < IMAGE_RTOL, row


# ---- (d) every command-line flag reaches the library ----------------------------------------------------------------
class Reached(Exception):
    """Raised by the stand-in for the library function: the command got that far, with these arguments."""


@pytest.fixture(scope="module")
def cli_files(model: Any, images: Tensor, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-flags")
    model.save(root / "model")
    to_pil(images)[0].save(root / "in.png")
    (root / "manifest.jsonl").write_text("")
    return {"model": root / "model", "image": root / "in.png", "manifest": root / "manifest.jsonl"}


def reached(monkeypatch: pytest.MonkeyPatch, name: str, argv: list[str]) -> tuple[tuple, dict[str, Any]]:
    """The positional and keyword arguments with which `diffedit ARGV` calls cli.NAME (the call is not run)."""
    calls: list[tuple[tuple, dict[str, Any]]] = []

    def stand_in(*args: Any, **kwargs: Any) -> None:
        calls.append((args, kwargs))
        raise Reached

    monkeypatch.setattr(cli, name, stand_in)
    with pytest.raises(Reached):
        cli.main(argv)
    assert len(calls) == 1
    return calls[0]


# command, the library function it calls, a flag, its value on the command line, the function's keyword, the value
# that must arrive there
FLAGS = [
    ("edit", "edit_image", "--threshold", "2.25", "threshold_ratio", 2.25),
    ("edit", "edit_image", "--mask-strength", "0.375", "mask_strength", 0.375),
    ("edit", "edit_image", "--eta", "0.625", "eta", 0.625),
    ("edit", "edit_image", "--invert-guidance", "1.75", "invert_guidance", 1.75),
    ("edit", "edit_image", "--negative", "a red circle", "negative_prompt", "a red circle"),
    ("edit", "edit_image", "--guidance", "5.5", "guidance", 5.5),
    ("edit", "edit_image", "--num-maps", "3", "num_maps", 3),
    ("edit", "edit_image", "--strength", "0.5", "strength", 0.5),
    ("edit", "edit_image", "--steps", "12", "steps", 12),
    ("edit", "edit_image", "--seed", "42", "seed", 42),
    ("edit", "edit_image", "--compat", None, "diffusers_compat", True),
    ("edit", "edit_image", "--paste-background", None, "paste_background", True),
    ("mask", "generate_mask", "--threshold", "2.25", "threshold_ratio", 2.25),
    ("mask", "generate_mask", "--mask-strength", "0.375", "encode_strength", 0.375),
    ("mask", "generate_mask", "--guidance", "5.5", "guidance", 5.5),
    ("mask", "generate_mask", "--num-maps", "3", "num_maps", 3),
    ("mask", "generate_mask", "--steps", "12", "steps", 12),
    ("mask", "generate_mask", "--seed", "42", "generator", 42),  # a generator: its seed
    ("mask", "generate_mask", "--compat", None, "diffusers_compat", True),
]


@pytest.mark.parametrize("command, function, flag, text, keyword, value", FLAGS,
                         ids=[f"{f[0]} {f[2]}" for f in FLAGS])
def test_every_flag_reaches_its_library_call(cli_files: dict[str, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch, command: str, function: str, flag: str,
                                             text: str | None, keyword: str, value: Any) -> None:
    """`diffedit COMMAND ... FLAG VALUE` calls FUNCTION (edit_image, generate_mask) with keyword=VALUE (a generator:
    its seed), and every other argument as without the flag (whose default differs from VALUE, so that the flag is
    seen to change it)."""
    argv = [command, "--model", str(cli_files["model"]), "--image", str(cli_files["image"]), "--source", SOURCES[0],
            "--target", TARGETS[0], "--out", str(tmp_path / "out.png"), "--quiet"]

    def named(kwargs: dict[str, Any]) -> dict[str, Any]:
        return {k: v.initial_seed() if isinstance(v, torch.Generator) else v for k, v in kwargs.items()}

    base_args, base = reached(monkeypatch, function, argv)
    args, given = reached(monkeypatch, function, [*argv, flag] + ([] if text is None else [text]))
    base, given = named(base), named(given)
    assert args[2:] == base_args[2:] == (SOURCES[0], TARGETS[0])
    assert given[keyword] == value and base[keyword] != value
    assert {k: v for k, v in given.items() if k != keyword} == {k: v for k, v in base.items() if k != keyword}


RUN_FLAGS = [
    ("--threshold", "2.25", "threshold", 2.25),
    ("--mask-strength", "0.375", "mask_strength", 0.375),
    ("--eta", "0.625", "eta", 0.625),
    ("--invert-guidance", "1.75", "invert_guidance", 1.75),
    ("--negative", "a red circle", "negative", "a red circle"),
    ("--guidance", "5.5", "guidance", 5.5),
    ("--num-maps", "3", "num_maps", 3),
    ("--strength", "0.5", "strength", 0.5),
    ("--steps", "12", "steps", 12),
    ("--paste-background", None, "paste_background", True),
]


@pytest.mark.parametrize("flag, text, field, value", RUN_FLAGS, ids=[f[0] for f in RUN_FLAGS])
def test_every_run_flag_reaches_the_edit_settings(cli_files: dict[str, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch, flag: str, text: str | None,
                                                  field: str, value: Any) -> None:
    """`diffedit run ... FLAG VALUE` hands run_dataset settings whose field is VALUE, the others as without it."""
    argv = ["run", str(cli_files["manifest"]), "--model", str(cli_files["model"]), "--out", str(tmp_path / "run"),
            "--quiet"]
    (base_options,), _ = reached(monkeypatch, "run_dataset", argv)
    (options,), _ = reached(monkeypatch, "run_dataset", [*argv, flag] + ([] if text is None else [text]))
    assert getattr(options.settings, field) == value and getattr(base_options.settings, field) != value
    assert options.settings == dataclasses.replace(base_options.settings, **{field: value})
    assert dataclasses.replace(options, settings=base_options.settings) == base_options


@pytest.mark.parametrize("command", ["edit", "mask", "invert", "run"])
def test_compile_flag_reaches_load(cli_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   command: str) -> None:
    """--compile asks `load` for a compiled UNet (edit, mask, invert) or the run's options for one (run), and is
    off without the flag."""
    if command == "run":
        argv = ["run", str(cli_files["manifest"]), "--model", str(cli_files["model"]), "--out", str(tmp_path / "run")]
        (base,), _ = reached(monkeypatch, "run_dataset", [*argv, "--quiet"])
        (given,), _ = reached(monkeypatch, "run_dataset", [*argv, "--quiet", "--compile"])
        assert (base.compile, given.compile) == (False, True)
        assert dataclasses.replace(given, compile=False) == base
        return
    prompts = ["--source", SOURCES[0], "--target", TARGETS[0]] if command != "invert" else []
    out = tmp_path / ("out.safetensors" if command == "invert" else "out.png")
    argv = [command, "--model", str(cli_files["model"]), "--image", str(cli_files["image"]), *prompts, "--out",
            str(out), "--quiet"]
    _, base = reached(monkeypatch, "load", argv)
    _, given = reached(monkeypatch, "load", [*argv, "--compile"])
    assert (base["compile"], given["compile"]) == (False, True)
    assert {k: v for k, v in given.items() if k != "compile"} == {k: v for k, v in base.items() if k != "compile"}
