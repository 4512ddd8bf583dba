"""Metrics of the toy benchmark: plain functions on numpy arrays, usable from notebooks and tests.

Mask IoU against the ground-truth edit region, PSNR (optionally over a region), colour and shape read back from the
pixels of a shapes-world picture, and edit success (did the edited object become the target's colour / shape?).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from diffedit.toy.world import COLOURS, SHAPES, EditPair, Scene, object_mask, render_background

def mask_iou(mask: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two boolean masks of the same shape (1.0 when both are empty)."""
    mask, truth = _bool(mask), _bool(truth)
    if mask.shape != truth.shape:
        raise ValueError(f"mask {mask.shape} and truth {truth.shape} differ in shape")
    union = (mask | truth).sum()
    return 1.0 if union == 0 else float((mask & truth).sum() / union)


def psnr(image: np.ndarray, reference: np.ndarray, region: np.ndarray | None = None, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB, 10 log10(peak^2 / MSE), over the pixels where `region` is True.

    Images are (H, W, C) or (H, W) arrays on the same scale (uint8 0..255 with the default peak); the MSE
    averages every channel of the selected pixels. Identical pixels give +inf.
    """
    a, b = np.asarray(image, np.float64), np.asarray(reference, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"image {a.shape} and reference {b.shape} differ in shape")
    if region is not None:
        region = _bool(region)
        if region.shape != a.shape[:2]:
            raise ValueError(f"region {region.shape} does not match the image {a.shape}")
        if not region.any():
            raise ValueError("psnr over an empty region")
        a, b = a[region], b[region]
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def nearest_colour(rgb: Sequence[float], palette: dict[str, tuple[int, int, int]] = COLOURS) -> str:
    """The name of the palette colour nearest (Euclidean, RGB 0..255) to `rgb`."""
    rgb = np.asarray(rgb, np.float64)
    return min(palette, key=lambda name: float(np.sum((rgb - np.asarray(palette[name])) ** 2)))


def mean_colour(image: np.ndarray, region: np.ndarray) -> np.ndarray:
    """The mean RGB (0..255) of `image` (H, W, 3) over the pixels of `region` (H, W)."""
    region = _bool(region)
    if not region.any():
        raise ValueError("mean colour of an empty region")
    return np.asarray(image, np.float64)[region].mean(0)


def colour_pixels(image: np.ndarray, colour: str, background: np.ndarray) -> np.ndarray:
    """(H, W) bool: the pixels whose nearest colour, among the world's object colours and the scene's own
    background at that pixel (`background`, (H, W, 3)), is `colour`."""
    image = np.asarray(image, np.float64)
    candidates = [np.broadcast_to(np.asarray(COLOURS[c], np.float64), image.shape) for c in COLOURS]
    candidates.append(np.asarray(background, np.float64))
    distances = np.stack([np.sum((image - c) ** 2, -1) for c in candidates])
    return distances.argmin(0) == list(COLOURS).index(colour)


def classify_shape(image: np.ndarray, scene: Scene, index: int) -> str | None:
    """Which shape does object `index` of `scene` have in `image`? A pixel-level classifier (None: no pixels).

    The object's pixels are those of its colour (`colour_pixels`) inside its bounding box grown by 2 px. Each
    shape is rendered with the same area and centroid as those pixels (so that a generated shape a little smaller,
    larger or off-centre is judged by its form, not by its placement); the answer is the shape with the highest
    IoU. On clean renders it is always right (IoU ~1 against at most ~0.85 for another shape).
    """
    obj = scene.objects[index]
    size = image.shape[0]
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    box = (np.abs(xx - obj.x) <= obj.radius + 2) & (np.abs(yy - obj.y) <= obj.radius + 2)
    pixels = colour_pixels(image, obj.colour, render_background(scene.background, size)) & box
    if pixels.sum() < 4:
        return None
    area, cx, cy = pixels.sum(), xx[pixels].mean(), yy[pixels].mean()
    ious = {}
    for shape in SHAPES:
        reference = object_mask(dataclasses.replace(obj, shape=shape), size)  # the shape at the object's place
        scale = math.sqrt(area / reference.sum())  # sizes scale with the radius, areas with its square
        # the centre that puts the scaled shape's centroid on the pixels' centroid
        x = cx - (xx[reference].mean() - obj.x) * scale
        y = cy - (yy[reference].mean() - obj.y) * scale
        candidate = dataclasses.replace(obj, shape=shape, x=float(x), y=float(y), radius=obj.radius * scale)
        ious[shape] = mask_iou(pixels, object_mask(candidate, size))
    return max(ious, key=ious.get)  # type: ignore[arg-type]


def edit_success(pair: EditPair, image: np.ndarray) -> bool:
    """Did `image` (uint8 (H, W, 3)) make the edit of `pair`, judged on pixels?

    colour edits: the mean colour inside the target object's ground-truth mask is nearest, among the world's
    COLOURS, to the target colour. shape edits: `classify_shape` finds the target shape.
    """
    obj = pair.target.objects[pair.index]
    if pair.kind == "colour":
        return nearest_colour(mean_colour(image, object_mask(obj, image.shape[0]))) == obj.colour
    if pair.kind == "shape":
        return classify_shape(image, pair.target, pair.index) == obj.shape
    raise ValueError(f"unknown edit kind {pair.kind!r}")


def _bool(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    return mask > 0 if mask.dtype != bool else mask
