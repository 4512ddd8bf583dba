"""Writing outputs so that nothing is lost or half-written: one temp-file + rename helper for every file.

A failed write (disk full, an unwritable format, an interruption) leaves the old file, if any, as it was and no
temporary file behind; a successful one replaces the destination in one `os.replace` (atomic on POSIX).
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

FILE_MODE = 0o644  # images, masks, inversions and JSON alike: readable by others, as an ordinary `open` makes them


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None], *, mode: int = FILE_MODE) -> Path:
    """Call `write(tmp)` on a temporary sibling of `path`, then rename it onto `path`.

    The temporary file keeps `path`'s suffix, so writers that pick a format from the name (PIL, safetensors)
    see the real one. The parent folder is created if missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """`atomic_write` for a UTF-8 text file (JSON records, summaries)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# ---- inversion files ------------------------------------------------------------------------------------------
INVERSION_FORMAT = "diffedit-inversion-v1"
_SETTINGS = {"steps": int, "strength": float, "guidance": float, "prediction_type": str, "diffusers_compat": bool}


def save_inversion(inversion: Any, path: str | os.PathLike[str], **made_from: str) -> Path:
    """An Inversion as .safetensors (no pickle): z0, latents, timesteps; the settings and `made_from` (what it was
    made from: image and model fingerprints, so that `edit --inversion` can refuse a mismatch) as JSON metadata."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"an inversion file is written as .safetensors, not {path.name}")
    settings = {"format": INVERSION_FORMAT, **{k: getattr(inversion, k) for k in _SETTINGS}}
    tensors = dict(z0=inversion.z0, latents=inversion.latents, timesteps=torch.tensor(inversion.timesteps))
    tensors = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
               for k, v in tensors.items()}
    metadata = {"diffedit": json.dumps(settings), "made_from": json.dumps(made_from)}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_inversion(path: str | os.PathLike[str]) -> tuple[Any, dict[str, str]]:
    """(Inversion, made_from) from a file of `save_inversion`; one clear error for anything else."""
    from .edit import Inversion

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"inversion {path} is a folder, not an inversion file")
    if not path.is_file():
        raise FileNotFoundError(f"inversion file {path} does not exist")
    not_ours = f"{path} is not a diffedit inversion file ({INVERSION_FORMAT})"
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            settings, made_from = json.loads(meta.get("diffedit", "{}")), json.loads(meta.get("made_from", "{}"))
        tensors = load_file(str(path))
    except (SafetensorError, json.JSONDecodeError, OSError) as e:
        raise ValueError(f"{not_ours}: {' '.join(str(e).split())}") from None
    if not isinstance(settings, dict) or settings.pop("format", None) != INVERSION_FORMAT:
        raise ValueError(not_ours)
    if sorted(settings) != sorted(_SETTINGS) or sorted(tensors) != ["latents", "timesteps", "z0"]:
        raise ValueError(f"{not_ours}: its fields are {sorted(settings)} and tensors {sorted(tensors)}")
    for key, kind in _SETTINGS.items():
        value = settings[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = settings[key] = float(value)
        if type(value) is not kind:
            raise ValueError(f"{not_ours}: {key} is {value!r}, not a {kind.__name__}")
    if not isinstance(made_from, dict) or not all(isinstance(v, str) for v in made_from.values()):
        raise ValueError(f"{not_ours}: its made_from record is not a mapping of strings")
    for key in ("z0", "latents"):
        if tensors[key].dtype != torch.float32:
            raise ValueError(f"{path}: {key} is {tensors[key].dtype}, an inversion file holds float32 latents")
        if not torch.isfinite(tensors[key]).all():
            raise ValueError(f"{path}: {key} holds NaN or Inf values")
    if tensors["timesteps"].dtype != torch.int64 or tensors["timesteps"].ndim != 1:
        raise ValueError(f"{not_ours}: timesteps must be a 1-d int64 tensor")
    inversion = Inversion(tensors["z0"], tensors["latents"], tuple(tensors["timesteps"].tolist()), **settings)
    return inversion, made_from


class Interrupts:
    """SIGINT / SIGTERM raise KeyboardInterrupt inside the block (so temporaries are removed as on Ctrl-C) and are
    remembered: an interruption that a library turns into an error of its own (safetensors does: "could not
    determine the shape of object type 'torch.storage.UntypedStorage'") is still reported as one. Used by both
    commands (`diffedit`, `python -m weights_convert`). The previous handlers are put back on the way out; off the
    main thread (an embedding application) nothing is installed and its own handlers stay."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signum
        raise KeyboardInterrupt

    def __enter__(self) -> "Interrupts":
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread
                break
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            if handler is not None:  # None: a handler installed outside Python, which cannot be put back
                signal.signal(signum, handler)
