"""read_image: one-line messages for missing, folder, unreadable and too-large files; our pixel limit replaces
PIL's decompression-bomb guard for the call only; orientation and bit depth. size_warning: when and how much."""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffedit.image import DEFAULT_MAX_PIXELS, read_image, size_warning


def _picture(tmp_path: Path, width: int = 100, height: int = 50, mode: str = "RGB", name: str = "p.png") -> Path:
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    path = tmp_path / name
    Image.fromarray(array).convert(mode).save(path)
    return path


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height (8-bit grey) and that holds no pixel data: a bomb's first bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def _one_line(error: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_reads_rgb(tmp_path: Path) -> None:
    for mode in ("RGB", "RGBA", "L", "P"):
        path = _picture(tmp_path, mode=mode, name=f"{mode}.png")
        image = read_image(path)
        assert image.mode == "RGB" and image.size == (100, 50)
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(path).convert("RGB")))


def test_missing_and_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as e:
        read_image(tmp_path / "missing.png")
    assert _one_line(e) == f"image {tmp_path / 'missing.png'} does not exist"
    with pytest.raises(ValueError) as e:
        read_image(tmp_path)
    assert _one_line(e) == f"image {tmp_path} is a folder, not a file"


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_unreadable_files(tmp_path: Path, damage: str) -> None:
    path = _picture(tmp_path)
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a picture " * 100, "empty": b""}[damage])
    with pytest.raises(ValueError) as e:
        read_image(path)
    assert re.fullmatch(rf"image {re.escape(str(path))} is not a readable picture: \S.*", _one_line(e))


def test_pixel_limit_is_ours_with_its_flag(tmp_path: Path) -> None:
    path = _picture(tmp_path)  # 100 x 50 = 5000 pixels
    with pytest.raises(ValueError) as e:
        read_image(path, max_pixels=4999)
    assert _one_line(e) == f"image {path} has 100 x 50 = 5000 pixels, above the limit of 4999 (--max-pixels)"
    assert read_image(path, max_pixels=5000).size == (100, 50)


def test_a_bomb_is_refused_by_our_limit_before_decoding(tmp_path: Path) -> None:
    """20000 x 20000 = 400 Mpx: PIL's own guard (DecompressionBombError above 2 x 89.5 Mpx) would fire first."""
    path = _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)  # what PIL alone says
    with pytest.raises(ValueError) as e:
        read_image(path)
    assert _one_line(e) == (f"image {path} has 20000 x 20000 = 400000000 pixels, above the limit of "
                            f"{DEFAULT_MAX_PIXELS} (--max-pixels)")


def test_pil_limit_does_not_fire_and_is_restored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL would refuse our 5000-pixel picture (> 2 x 1000)
    path = _picture(tmp_path)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    assert read_image(path, max_pixels=None).size == (100, 50)  # None: no limit at all
    assert read_image(path).size == (100, 50)
    with pytest.raises(ValueError, match="above the limit of 4999"):
        read_image(path, max_pixels=4999)
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable picture"):
        read_image(path)
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored after successes and errors alike


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "100"])
def test_bad_max_pixels(tmp_path: Path, bad: object) -> None:
    with pytest.raises(ValueError) as e:
        read_image(_picture(tmp_path), max_pixels=bad)  # type: ignore[arg-type]
    assert _one_line(e) == f"max_pixels must be a positive integer or None, got {bad!r}"


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    stored = rng.integers(0, 256, (2, 4, 3), dtype=np.uint8)  # 4 wide, 2 high as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the viewer rotates 90 degrees clockwise
    path = tmp_path / "rotated.png"
    Image.fromarray(stored).save(path, exif=exif)
    image = read_image(path)
    assert image.size == (2, 4)
    assert np.array_equal(np.asarray(image), np.rot90(stored, k=-1))


def test_16_bit_grey_is_scaled_not_clipped(tmp_path: Path) -> None:
    levels = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    path = tmp_path / "deep.png"
    Image.fromarray(levels).save(path)
    assert Image.open(path).mode.startswith("I;16")
    image = np.asarray(read_image(path)).astype(int)
    assert np.abs(image - (levels[..., None] // 256)).max() <= 1 and image.max() == 255 and image.min() == 0
    assert len(np.unique(image)) > 32  # PIL's plain convert("RGB") would give 0 and 255 only


def test_size_warning() -> None:
    assert size_warning(512, 512, 512) is None and size_warning(400, 600, 512) is None  # 240000 <= 262144
    assert size_warning(1024, 1024, 512) == ("the image is 1024 x 1024, above the model's native 512 x 512: expect "
                                             "slower steps and about 4.0 GiB for the VAE decoder alone")
    # 4 KiB a pixel in fp32 with SD's 128 channels; half in fp16; the toy VAE (16 channels) an eighth of that
    assert size_warning(4096, 4096, 512).endswith("about 64.0 GiB for the VAE decoder alone")
    assert size_warning(520, 520, 512, bytes_per_value=2).endswith("about 528 MiB for the VAE decoder alone")
    assert size_warning(72, 88, 64, vae_channels=16).endswith("about 3 MiB for the VAE decoder alone")
