"""Images and masks in and out: PIL / numpy / tensors <-> (B, C, H, W) float tensors in [0, 1].

Conventions (DESIGN.md): images are (B, 3, H, W) float in [0, 1] with H and W multiples of the VAE's
downsampling factor (8 for Stable Diffusion; other sizes are resized, with a warning); masks are
(B, 1, h, w) float in {0, 1}, given at any resolution and resized to the latent size with nearest
neighbours. Figures (mask overlays, side-by-side strips) are plain PIL, no plotting library.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor

ImageInput = Union[Image.Image, np.ndarray, Tensor, Sequence[Image.Image], Sequence[np.ndarray]]
MaskInput = Union[Image.Image, np.ndarray, Tensor, Sequence[Image.Image], Sequence[np.ndarray]]


def to_tensor(images: ImageInput, multiple: int = 8) -> Tensor:
    """PIL image(s), numpy array(s) or a tensor -> (B, 3, H, W) float32 tensor in [0, 1].

    PIL images of any mode are converted to RGB. Arrays are (H, W), (H, W, C) or (B, H, W, C) with
    C in {1, 3, 4} (alpha dropped), uint8 in [0, 255] or float in [0, 1]. Tensors are (3, H, W) or
    (B, 3, H, W) float in [0, 1]. A size that is not a multiple of `multiple` is resized down to one,
    with a warning.
    """
    if isinstance(images, Tensor):
        batch = _tensor_images(images)
    elif isinstance(images, (Image.Image, np.ndarray)):
        batch = _array_images(images)
    elif isinstance(images, Sequence) and not isinstance(images, str) and len(images) > 0:
        parts = [_array_images(im) if isinstance(im, (Image.Image, np.ndarray)) else None for im in images]
        if any(p is None for p in parts):
            kinds = sorted({type(im).__name__ for im in images})
            raise TypeError(f"a list of images must hold PIL images or numpy arrays, got {kinds}")
        sizes = {tuple(p.shape[-2:]) for p in parts}  # type: ignore[union-attr]
        if len(sizes) > 1:
            raise ValueError(f"all images of a batch must have the same size, got (H, W) sizes {sorted(sizes)}")
        batch = torch.cat(parts)  # type: ignore[arg-type]
    else:
        raise TypeError("images must be a PIL image, a numpy array, a tensor or a non-empty list of them, "
                        f"got {type(images).__name__}")
    return _round_size(batch, multiple)


def _tensor_images(images: Tensor) -> Tensor:
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"image tensors must be (3, H, W) or (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"image tensors must be floating point in [0, 1], got {images.dtype}")
    if images.numel() == 0 or not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1:
        raise ValueError("image tensors must hold finite values in [0, 1]")
    return images.float()


def _array_images(image: Image.Image | np.ndarray) -> Tensor:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image arrays must be (H, W), (H, W, C) or (B, H, W, C) with C in 1, 3, 4; got {array.shape}")
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif np.issubdtype(array.dtype, np.floating):
        if array.size == 0 or not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError("float image arrays must hold finite values in [0, 1]")
        array = array.astype(np.float32)
    else:
        raise TypeError(f"image arrays must be uint8 or float in [0, 1], got {array.dtype}")
    array = array[..., :3] if array.shape[-1] != 1 else np.repeat(array, 3, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)


def _round_size(images: Tensor, multiple: int) -> Tensor:
    h, w = images.shape[-2:]
    new_h, new_w = max(multiple, h - h % multiple), max(multiple, w - w % multiple)
    if (new_h, new_w) == (h, w):
        return images
    warnings.warn(f"image size {w} x {h} (width x height) is not a multiple of {multiple}: resized to "
                  f"{new_w} x {new_h}", stacklevel=3)
    return F.interpolate(images, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def to_pil(images: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) or (B, 1, H, W) tensor in [0, 1] -> list of RGB / L PIL images."""
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in to_uint8(images)]


def to_numpy(images: Tensor) -> np.ndarray:
    """(B, C, H, W) tensor -> (B, H, W, C) float32 numpy array (diffusers' "np" output layout)."""
    return images.detach().float().cpu().permute(0, 2, 3, 1).numpy()


def to_uint8(images: Tensor) -> np.ndarray:
    return (to_numpy(images).clip(0, 1) * 255).round().astype(np.uint8)


def to_mask(mask: MaskInput, size: tuple[int, int]) -> Tensor:
    """A user's mask(s) at any resolution -> (B, 1, h, w) float32 in {0, 1} at `size` = (h, w) (nearest).

    Accepts PIL images (mode L or any other mode, converted to L, 255 = edit), numpy arrays and tensors of
    shape (h, w), (B, h, w) or (B, 1, h, w). Values must already be binary: 0 / 1 (or 0 / 255 for uint8
    data and PIL images); anything else is an error rather than a silent threshold.
    """
    if isinstance(mask, Image.Image):
        mask = [mask]
    if isinstance(mask, Sequence) and not isinstance(mask, str):
        if len(mask) == 0 or not all(isinstance(m, (Image.Image, np.ndarray)) for m in mask):
            raise TypeError("a list of masks must be a non-empty list of PIL images or numpy arrays")
        arrays = [np.asarray(m.convert("L")) if isinstance(m, Image.Image) else np.asarray(m) for m in mask]
        if len({a.shape for a in arrays}) > 1:
            raise ValueError(f"all masks of a batch must have the same size, got {sorted({a.shape for a in arrays})}")
        mask = np.stack(arrays)
    if isinstance(mask, Tensor) and mask.dtype == torch.uint8:
        mask = mask.cpu().numpy()  # one rule for uint8 masks, whichever container they come in
    if isinstance(mask, np.ndarray):
        if mask.dtype == np.uint8:
            if not np.isin(mask, (0, 255)).all() and not np.isin(mask, (0, 1)).all():
                raise ValueError("uint8 masks must hold only 0 and 255 (or only 0 and 1)")
            mask = (mask > 0).astype(np.float32)
        mask = torch.from_numpy(np.ascontiguousarray(mask))
    if not isinstance(mask, Tensor):
        raise TypeError(f"a mask must be a PIL image, a numpy array or a tensor, got {type(mask).__name__}")
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim == 3:
        mask = mask[:, None]
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"a mask must be (h, w), (B, h, w) or (B, 1, h, w), got {tuple(mask.shape)}")
    mask = mask.float()
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask values must be 0 or 1 (binarise the mask first)")
    if tuple(mask.shape[-2:]) != tuple(size):
        mask = F.interpolate(mask, size=size, mode="nearest")
    return mask


def mask_to_pil(mask: Tensor, size: tuple[int, int] | None = None) -> list[Image.Image]:
    """(B, 1, h, w) mask in {0, 1} -> list of L images (255 = edit), upsampled to `size` = (H, W) (nearest)."""
    if size is not None and tuple(mask.shape[-2:]) != tuple(size):
        mask = F.interpolate(mask.float(), size=size, mode="nearest")
    return to_pil(mask.float())


def overlay(
    image: Image.Image, mask: Image.Image, color: tuple[int, int, int] = (255, 0, 0), alpha: float = 0.5
) -> Image.Image:
    """The image with the mask's region tinted by `color` (mask resized to the image, nearest)."""
    image = image.convert("RGB")
    mask = mask.convert("L").resize(image.size, Image.NEAREST)
    tint = Image.new("RGB", image.size, color)
    blended = Image.blend(image, tint, alpha)
    return Image.composite(blended, image, mask)


def side_by_side(
    images: Sequence[Image.Image], gap: int = 4, background: tuple[int, int, int] = (255, 255, 255)
) -> Image.Image:
    """Images in one row (each resized to the first one's height), separated by `gap` pixels."""
    if len(images) == 0:
        raise ValueError("side_by_side needs at least one image")
    height = images[0].height
    row = [im.convert("RGB").resize((max(1, round(im.width * height / im.height)), height)) for im in images]
    width = sum(im.width for im in row) + gap * (len(row) - 1)
    figure = Image.new("RGB", (width, height), background)
    x = 0
    for im in row:
        figure.paste(im, (x, 0))
        x += im.width + gap
    return figure


# ---- reading a picture the user names -------------------------------------------------------------------------
# 4096 x 4096 = 16.8 Mpx: SD's VAE decoder then needs about 64 GiB in fp32 (the rule of `size_warning`), the most one
# 80 GB accelerator holds. Larger files are scans, panoramas or decompression bombs: refused before any pixel is
# decoded, with the flag to lift the limit named. (PIL's own guard warns at 89 Mpx and fails at 179 Mpx: too late.)
DEFAULT_MAX_PIXELS = 4096 * 4096


@contextmanager
def _pil_pixel_limit(limit: int | None) -> Iterator[None]:
    """PIL's decompression-bomb limit (a module global) set for the duration of the block, then restored."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def read_image(path: str | os.PathLike[str], *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An RGB picture from a file, or one line saying why not: missing, a folder, unreadable, or more than
    `max_pixels` pixels (None: no limit). The size is read from the header, so a huge file is refused before it
    is decoded. EXIF orientation is applied (the picture as viewers show it, as diffusers' load_image does), and
    16-bit grey levels are scaled to 8 bits (PIL's convert would clip them to white)."""
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1):
        raise ValueError(f"max_pixels must be a positive integer or None, got {max_pixels!r}")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"image {path} is a folder, not a file")
    if not path.exists():
        raise FileNotFoundError(f"image {path} does not exist")
    if not path.is_file():
        raise ValueError(f"image {path} is not a regular file")  # a FIFO or a device: opening it could block
    # Our limit replaces PIL's for this call: PIL's would fire first (or not at all) and name no flag.
    with _pil_pixel_limit(None):
        try:
            im = Image.open(path)  # lazy: reads the header only
        except MemoryError:
            raise
        except Exception as e:  # PIL reports broken files with many exception types; each is "unreadable" here
            raise ValueError(f"image {path} is not a readable picture: {_reason(e)}") from None
        with im:
            width, height = im.size
            if max_pixels is not None and width * height > max_pixels:
                raise ValueError(f"image {path} has {width} x {height} = {width * height} pixels, above the limit "
                                 f"of {max_pixels} (--max-pixels)")
            try:
                im.load()  # decodes: a truncated or corrupt file fails here
                upright = ImageOps.exif_transpose(im)
                if upright.mode.startswith("I;16"):
                    upright = upright.convert("I").point(lambda v: v / 256)  # 0..65535 -> 0..255
                return upright.convert("RGB")
            except MemoryError:
                raise
            except Exception as e:
                raise ValueError(f"image {path} is not a readable picture: {_reason(e)}") from None


def _reason(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__  # one line


# The SD VAE decoder's peak, measured on a CPU in fp32: 302 MiB at 256 x 256, 618 MiB at 384 x 384, i.e. 4045 bytes a
# pixel (the encoder: 3085). It is the finest level: the 256-channel upsampled map, its conv, the 128-channel res
# blocks and the kernels' buffers, together ~8 maps of the first level's width (128) at full resolution.
VAE_PEAK_MAPS = 8


def size_warning(
    width: int, height: int, native_size: int, *, vae_channels: int = 128, bytes_per_value: int = 4
) -> str | None:
    """A warning above the model's native size (width x height > native_size^2), with the VAE decoder's expected
    peak memory: VAE_PEAK_MAPS (8) maps of `vae_channels` (the first VAE level's width: 128 for SD) x H x W values
    of `bytes_per_value` bytes (4: fp32, 2: fp16 / bf16). For SD in fp32: 4 KiB a pixel, 1 GiB at 512 x 512,
    4 GiB at 1024 x 1024, 64 GiB at 4096 x 4096."""
    if width * height <= native_size * native_size:
        return None
    mib = width * height * VAE_PEAK_MAPS * vae_channels * bytes_per_value / 2**20
    memory = f"{mib / 1024:.1f} GiB" if mib >= 1024 else f"{mib:.0f} MiB"
    return (f"the image is {width} x {height}, above the model's native {native_size} x {native_size}: expect "
            f"slower steps and about {memory} for the VAE decoder alone")
