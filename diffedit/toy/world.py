"""The shapes world: procedural 64x64 scenes of coloured shapes with captions and ground-truth masks.

A scene is one to three non-overlapping objects (circle, square or triangle; red, green, blue or yellow)
on a plain or lightly textured background (grey, white or beige; flat, a soft gradient or faint stripes).
The caption lists the objects left to right: "a red circle and a blue square". Every scene is a plain
dataclass, so an edit's ground truth ("the same scene with the circle blue") is rendered from an edited
description with `render`. Everything is deterministic: a scene is a function of its numpy Generator.

Training scenes come from `training_scene(seed, index)`, the held-out edit pairs from `heldout_edit_pairs()`;
their generators are seeded with different SeedSequence entropies, so the two never share a stream.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

SIZE = 64  # images are SIZE x SIZE RGB
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 75, 215),
    "yellow": (235, 205, 35),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (150, 150, 150), "white": (235, 235, 235), "beige": (225, 210, 180)
}
TEXTURES = ("flat", "gradient", "stripes")
WORDS = ["a", "and", *COLOURS, *SHAPES]  # every word a caption can use (the tokenizer's vocabulary)
MIN_RADIUS, MAX_RADIUS = 8, 13  # half the side of an object's bounding box, in pixels

_TRAIN, _HELDOUT = 0, 1  # SeedSequence tags: training and held-out scenes never share a generator stream


@dataclass(frozen=True)
class Obj:
    shape: str  # one of SHAPES
    colour: str  # one of COLOURS
    x: float  # centre, pixels
    y: float
    radius: float  # half the side of the bounding box; circle radius, square half-side, triangle half-base


@dataclass(frozen=True)
class Background:
    colour: str  # one of BACKGROUNDS
    texture: str  # one of TEXTURES
    angle: float  # direction of the gradient / stripes, radians
    strength: float  # amplitude of the texture, in 0..255 levels
    period: float  # stripe period in pixels


@dataclass(frozen=True)
class Scene:
    background: Background
    objects: tuple[Obj, ...]  # sorted left to right; objects never overlap

    @property
    def caption(self) -> str:
        return " and ".join(f"a {o.colour} {o.shape}" for o in self.objects)


def random_scene(rng: np.random.Generator, max_objects: int = 3) -> Scene:
    """One to `max_objects` objects at random, placed by rejection so that their boxes keep apart."""
    background = Background(
        colour=str(rng.choice(list(BACKGROUNDS))),
        texture=str(rng.choice(TEXTURES)),
        angle=float(rng.uniform(0, 2 * np.pi)),
        strength=float(rng.uniform(8, 24)),
        period=float(rng.uniform(8, 16)),
    )
    count = int(rng.integers(1, max_objects + 1))
    objects: list[Obj] = []
    for _ in range(200):  # attempts; a crowded draw simply ends with fewer objects
        if len(objects) == count:
            break
        r = float(rng.uniform(MIN_RADIUS, MAX_RADIUS))
        x, y = (float(v) for v in rng.uniform(r + 1, SIZE - r - 1, size=2))
        if all(max(abs(x - o.x), abs(y - o.y)) > r + o.radius + 2 for o in objects):
            objects.append(Obj(str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), x, y, r))
    return Scene(background, tuple(sorted(objects, key=lambda o: o.x)))


def training_scene(seed: int, index: int) -> Scene:
    """The `index`-th training scene of the stream `seed`."""
    return random_scene(np.random.default_rng([_TRAIN, seed, index]))


def heldout_scene(index: int) -> Scene:
    """The `index`-th held-out scene (for evaluation; no training stream produces it)."""
    return random_scene(np.random.default_rng([_HELDOUT, 0, index]))


def object_mask(obj: Obj, size: int = SIZE) -> np.ndarray:
    """(size, size) bool: the pixels whose centres lie inside the object."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = xx - obj.x, yy - obj.y
    if obj.shape == "circle":
        return dx**2 + dy**2 <= obj.radius**2
    if obj.shape == "square":
        half = 0.85 * obj.radius  # a little smaller than the box, so a square looks no bigger than a circle
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if obj.shape == "triangle":  # upright isosceles, base and apex on the box's edges
        top, r = obj.y - obj.radius, obj.radius
        t = (yy - top) / (2 * r)  # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)
    raise ValueError(f"unknown shape {obj.shape!r}")


def render_background(bg: Background, size: int = SIZE) -> np.ndarray:
    """(size, size, 3) float image in 0..255."""
    base = np.array(BACKGROUNDS[bg.colour], dtype=np.float64)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    along = np.cos(bg.angle) * (xx - 0.5) + np.sin(bg.angle) * (yy - 0.5)  # in about [-0.7, 0.7]
    if bg.texture == "flat":
        offset = np.zeros_like(along)
    elif bg.texture == "gradient":
        offset = bg.strength * 1.4 * along
    elif bg.texture == "stripes":
        offset = 0.5 * bg.strength * np.sin(2 * np.pi * along * size / bg.period)
    else:
        raise ValueError(f"unknown texture {bg.texture!r}")
    return np.clip(base + offset[..., None], 0, 255)


def render(scene: Scene, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(image (size, size, 3) uint8, masks (n_objects, size, size) bool), masks in `scene.objects` order."""
    image = render_background(scene.background, size)
    masks = np.zeros((len(scene.objects), size, size), dtype=bool)
    for i, obj in enumerate(scene.objects):  # no overlaps, so the order does not matter
        masks[i] = object_mask(obj, size)
        image[masks[i]] = COLOURS[obj.colour]
    return np.round(image).astype(np.uint8), masks


def to_tensor(images: np.ndarray):  # -> torch.Tensor
    """uint8 (..., H, W, 3) -> float (..., 3, H, W) in [0, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).movedim(-1, -3).float() / 255


@dataclass(frozen=True)
class EditPair:
    kind: str  # "colour" or "shape"
    source: Scene
    target: Scene  # the same scene with one object changed
    index: int  # which object (in left-to-right order) changed

    @property
    def mask(self) -> np.ndarray:
        """(SIZE, SIZE) bool: where source and target may differ (the old and the new object's pixels)."""
        return object_mask(self.source.objects[self.index]) | object_mask(self.target.objects[self.index])


def edit_object(scene: Scene, index: int, **changes: str) -> Scene:
    """The scene with object `index` changed (colour= and / or shape=); position, size and background kept."""
    objects = list(scene.objects)
    objects[index] = dataclasses.replace(objects[index], **changes)
    return dataclasses.replace(scene, objects=tuple(objects))


def heldout_edit_pairs(count: int = 32, max_objects: int = 3) -> list[EditPair]:
    """A fixed list of edits on scenes no training stream produces: colour changes and shape changes, alternating.

    `max_objects=1` gives single-object scenes ("a red circle" -> "a blue circle").
    """
    pairs = []
    for i in range(count):
        rng = np.random.default_rng([_HELDOUT, max_objects, i])
        source = random_scene(rng, max_objects)
        index = int(rng.integers(len(source.objects)))
        obj = source.objects[index]
        if i % 2 == 0:
            kind, change = "colour", {"colour": str(rng.choice([c for c in COLOURS if c != obj.colour]))}
        else:
            kind, change = "shape", {"shape": str(rng.choice([s for s in SHAPES if s != obj.shape]))}
        pairs.append(EditPair(kind, source, edit_object(source, index, **change), index))
    return pairs
