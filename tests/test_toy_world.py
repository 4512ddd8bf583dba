"""The shapes world (diffedit/toy/world.py) and the shipped toy model (diffedit/toy/weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffedit.toy import TOY_CONFIG, WEIGHTS, load_toy_model
from diffedit.toy.world import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    heldout_edit_pairs,
    heldout_scene,
    render,
    render_background,
    to_tensor,
    training_scene,
)

# Bounds measured on the shipped model (seed-0 run, 75 min on CPU), with a margin:
# VAE reconstruction of held-out scenes: 31.2 dB mean over these 32 (30.6 over 256, worst 25.1).
VAE_PSNR_BOUND_DB = 28.0
SCENES = [training_scene(0, i) for i in range(40)] + [heldout_scene(i) for i in range(10)]


# ---- the world -----------------------------------------------------------------------------------
def test_scenes_are_deterministic_by_seed():
    for i in range(10):
        assert training_scene(3, i) == training_scene(3, i)
        a, b = render(training_scene(3, i)), render(training_scene(3, i))
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert [training_scene(3, i) for i in range(10)] != [training_scene(4, i) for i in range(10)]
    assert heldout_edit_pairs(8) == heldout_edit_pairs(8)


def test_heldout_scenes_are_not_training_scenes():
    training = {training_scene(seed, i) for seed in (0, 1) for i in range(500)}
    heldout = [heldout_scene(i) for i in range(100)] + [p.source for p in heldout_edit_pairs(32)]
    assert not training.intersection(heldout)


def _fill_ratio(mask: np.ndarray) -> float:
    """Area of a mask over the area of its bounding box: circle ~0.79, square 1, triangle ~0.5."""
    ys, xs = np.nonzero(mask)
    return mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))


@pytest.mark.parametrize("scene", SCENES, ids=lambda s: s.caption.replace(" ", "_"))
def test_caption_agrees_with_the_rendered_objects(scene):
    image, masks = render(scene)
    words = scene.caption.split(" and ")
    assert 1 <= len(words) == len(scene.objects) == len(masks) <= 3
    xs = []
    for phrase, mask in zip(words, masks):
        _, colour, shape = phrase.split(" ")
        assert colour in COLOURS and shape in SHAPES
        # every pixel inside the ground-truth mask has the caption's colour
        assert np.all(image[mask] == np.array(COLOURS[colour], dtype=np.uint8))
        # and the mask has the caption's shape
        fill = _fill_ratio(mask)
        expected = {"circle": (0.72, 0.86), "square": (0.99, 1.0), "triangle": (0.45, 0.62)}[shape]
        assert expected[0] <= fill <= expected[1], (shape, fill)
        xs.append(np.nonzero(mask)[1].mean())
    assert xs == sorted(xs), "objects are captioned left to right"


@pytest.mark.parametrize("scene", SCENES, ids=lambda s: s.caption.replace(" ", "_"))
def test_masks_are_disjoint_and_cover_the_objects(scene):
    image, masks = render(scene)
    assert masks.dtype == bool and masks.shape == (len(scene.objects), 64, 64)
    assert masks.sum(0).max() <= 1, "objects never overlap"
    assert all(m.sum() > 100 for m in masks), "every object is visible"
    outside = ~masks.any(0)
    background = np.round(render_background(scene.background)).astype(np.uint8)
    assert np.array_equal(image[outside], background[outside]), "outside the masks there is only background"
    # no object colour outside the masks (backgrounds are greys and beige, far from every object colour)
    palette = np.array(list(COLOURS.values()), dtype=float)
    distance = np.abs(image[outside].astype(float)[:, None, :] - palette[None]).max(-1)
    assert distance.min() > 60


def test_backgrounds_are_light_and_textured():
    kinds = {(s.background.colour, s.background.texture) for s in (training_scene(0, i) for i in range(300))}
    assert {c for c, _ in kinds} == set(BACKGROUNDS) and {t for _, t in kinds} == {"flat", "gradient", "stripes"}


def test_heldout_edit_pairs_differ_only_inside_the_edited_object():
    pairs = heldout_edit_pairs(32)
    assert {p.kind for p in pairs} == {"colour", "shape"}
    for pair in pairs:
        (src, src_masks), (tgt, tgt_masks) = render(pair.source), render(pair.target)
        changed = (src != tgt).any(-1)
        assert changed.any(), pair
        assert not changed[~pair.mask].any(), "background and other objects are identical"
        assert np.array_equal(src_masks[pair.index] | tgt_masks[pair.index], pair.mask)
        old, new = pair.source.objects[pair.index], pair.target.objects[pair.index]
        if pair.kind == "colour":
            assert old.colour != new.colour and old.shape == new.shape
            assert pair.source.caption != pair.target.caption
        else:
            assert old.shape != new.shape and old.colour == new.colour
        assert (old.x, old.y, old.radius) == (new.x, new.y, new.radius)


def test_single_object_edit_pairs():
    pairs = heldout_edit_pairs(8, max_objects=1)
    assert all(len(p.source.objects) == 1 for p in pairs)
    assert pairs[0].kind == "colour"


# ---- the shipped model ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_model():
    return load_toy_model()


def test_shipped_model_loads_strictly_with_the_toy_architecture(toy_model):
    from diffedit.model import load

    model = load(WEIGHTS)  # strict: every tensor consumed, every shape checked
    assert model.config == TOY_CONFIG
    assert model.provenance["source"] == "trained by diffedit.toy.train"
    assert 0.05 < model.config.vae.scaling_factor < 20
    assert len(model.tokenizer) == TOY_CONFIG.text.vocab_size
    assert model.tokenizer.pad_token == "<|endoftext|>"
    size = sum(p.stat().st_size for p in WEIGHTS.rglob("*") if p.is_file())
    assert size < 8 * 2**20
    for name, tensor in toy_model.unet.state_dict().items():
        assert torch.isfinite(tensor).all(), name


def test_vae_reconstructs_world_images(toy_model):
    images = to_tensor(np.stack([render(heldout_scene(i))[0] for i in range(32)]))
    recon = toy_model.decode_latents(toy_model.encode_image(images))
    mse = (recon - images).pow(2).flatten(1).mean(1)
    psnr = (-10 * torch.log10(mse)).mean().item()
    assert psnr > VAE_PSNR_BOUND_DB, psnr
    latents = toy_model.encode_image(images)
    assert latents.shape == (32, 4, 16, 16)
    assert 0.6 < latents.std().item() < 1.5, "the scaling factor gives latents of about unit variance"


def dominant_object_colour(image: np.ndarray) -> tuple[str | None, int]:
    """The object colour (COLOURS) that most pixels of a uint8 (H, W, 3) image are nearest to, and how many;
    pixels nearer to a background colour are not counted."""
    names = list(COLOURS) + list(BACKGROUNDS)
    palette = np.array(list(COLOURS.values()) + list(BACKGROUNDS.values()), dtype=float)
    nearest = np.argmin(((image.reshape(-1, 3)[:, None].astype(float) - palette[None]) ** 2).sum(-1), axis=1)
    counts = np.bincount(nearest, minlength=len(names))[: len(COLOURS)]
    return (names[int(counts.argmax())] if counts.max() > 0 else None), int(counts.max())


# "a <colour> <shape>" at guidance 5, 50 DDIM steps: the prompted colour dominates in 4 of these 4 samples for
# every colour and shape, and in 180 of 192 over 16 seeds (the misses are images with no object at all).
GENERATION_SEEDS = 4
GENERATION_MIN_CORRECT = 3


@pytest.mark.parametrize("colour", ["red", "blue"])
def test_generates_the_prompted_colour(toy_model, colour):
    from diffedit.toy.train import sample

    prompts = [f"a {colour} circle"] * GENERATION_SEEDS
    images = sample(toy_model, prompts, torch.Generator().manual_seed(0), steps=50, guidance=5.0)
    pixels = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    found = [dominant_object_colour(p) for p in pixels]
    correct = sum(name == colour and count >= 60 for name, count in found)  # an object of >= 60 px
    assert correct >= GENERATION_MIN_CORRECT, found


def test_batches_rendered_by_workers_are_the_inline_ones():
    # the GPU path of train.py renders each step's scenes in DataLoader processes: the same scenes, in order
    from diffedit.toy.train import batches

    inline, ahead = batches(3, 100, 4, workers=0), batches(3, 100, 4, workers=1)
    for _ in range(3):
        (a, captions_a), (b, captions_b) = next(inline), next(ahead)
        assert torch.equal(a, b) and captions_a == captions_b and a.shape == (4, 3, 64, 64)
    assert not torch.equal(next(inline)[0], a)  # steps move through the stream


def stream_offsets(monkeypatch) -> list[int]:
    """The scene offsets that train.py's phases open their streams at, recorded as they do."""
    from diffedit.toy import train

    offsets: list[int] = []
    real = train.batches
    monkeypatch.setattr(train, "batches", lambda seed, offset, *a: offsets.append(offset) or real(seed, offset, *a))
    return offsets


def test_continued_unet_training_keeps_the_vae_and_goes_on_with_new_scenes(tmp_path, monkeypatch):
    # `train --unet-from MODEL` runs phase (b) only: the UNet and the text encoder move, the VAE is the model's,
    # the provenance adds up the steps, and the scenes are those after the ones the model was trained on
    from diffedit.model import load
    from diffedit.toy import train

    offsets = stream_offsets(monkeypatch)
    out = tmp_path / "continued"
    train.main(["--unet-from", str(WEIGHTS), "--out", str(out), "--work", str(tmp_path / "work"), "--unet-steps", "2",
          "--unet-batch", "2", "--unet-lr", "1e-3"])
    before, after = load(WEIGHTS), load(out)
    assert after.config == before.config
    assert after.provenance["unet_steps"] == before.provenance["unet_steps"] + 2
    assert after.provenance["unet_continued"][-1]["steps"] == 2
    seen = before.provenance["unet_steps"] * before.provenance["settings"]["unet_batch"]  # scenes phase (b) used
    assert offsets == [train.UNET_STREAM + seen]
    for name, tensor in before.vae.state_dict().items():
        assert torch.equal(tensor, after.vae.state_dict()[name]), name
    moved = [n for n, t in before.unet.state_dict().items() if not torch.equal(t, after.unet.state_dict()[n])]
    assert len(moved) > len(before.unet.state_dict()) // 2
    assert (tmp_path / "work" / "samples_final.png").is_file()


def test_continued_training_of_a_model_this_script_did_not_train(tmp_path, monkeypatch):
    # no provenance of ours (a converted or hand-made model): the stream starts at its beginning, no KeyError
    from diffedit.model import load
    from diffedit.toy import train

    foreign = load(WEIGHTS)
    foreign.provenance = {}
    foreign.save(tmp_path / "foreign")
    offsets = stream_offsets(monkeypatch)
    train.main(["--unet-from", str(tmp_path / "foreign"), "--out", str(tmp_path / "out"), "--work", str(tmp_path / "w"),
                "--unet-steps", "1", "--unet-batch", "2"])
    assert offsets == [train.UNET_STREAM]
    assert load(tmp_path / "out").provenance["unet_steps"] == 1
