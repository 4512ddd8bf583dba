"""The on-disk model layout (DESIGN.md): reading, strict checking and atomic writing.

A model folder holds
    unet.safetensors  vae.safetensors  text_encoder.safetensors   tensors under our own names
    tokenizer/                                                    CLIPTokenizer files
    text_encoder_2.safetensors  tokenizer_2/                      SDXL's second text encoder and its tokenizer
    model.json        {"format": ..., "config": ModelConfig as a dict, "provenance": {...}}
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .configs import ModelConfig

FORMAT = "diffedit-v1"
COMPONENTS = ("unet", "vae", "text_encoder")
TOKENIZER_DIR = "tokenizer"
TOKENIZER_2_DIR = "tokenizer_2"


def components(config: ModelConfig) -> tuple[str, ...]:
    """The tensor files of a model folder: SDXL's adds text_encoder_2."""
    return COMPONENTS + (("text_encoder_2",) if config.text_2 is not None else ())
CONFIG_FILE = "model.json"


def check_state_dict(given: dict[str, Tensor], expected: dict[str, torch.Size], what: str) -> None:
    """One clear error naming every missing, unexpected and mis-shaped tensor (nothing is loaded leniently)."""
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    shapes = sorted(
        f"{k}: {tuple(given[k].shape)} != {tuple(expected[k])}"
        for k in set(given) & set(expected)
        if tuple(given[k].shape) != tuple(expected[k])
    )
    if missing or extra or shapes:
        parts = [f"{what} weights do not match the model:"]
        for label, items in (("missing", missing), ("unexpected", extra), ("wrong shape", shapes)):
            if items:
                more = f" ... and {len(items) - 20} more" if len(items) > 20 else ""
                parts.append(f"  {len(items)} {label}: {', '.join(items[:20])}{more}")
        # one line in the CLI (whitespace folded): ';' between the lists
        raise ValueError(parts[0] + "\n" + ";\n".join(parts[1:]))


def read_json_object(path: Path, error: type[ValueError] = ValueError) -> dict[str, Any]:
    """A JSON file that must hold an object, or `error` naming the file (bad JSON, too deep, another type)."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise error(f"{path} is not valid JSON: nested too deeply") from None
    if not isinstance(content, dict):
        got = "null" if content is None else f"a {type(content).__name__}"
        raise error(f"{path} must hold a JSON object, got {got}")
    return content


def read_config(folder: str | os.PathLike[str]) -> tuple[ModelConfig, dict[str, Any]]:
    """(config, provenance) from a model folder's model.json."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a diffedit model folder: {CONFIG_FILE} is missing")
    meta = read_json_object(path)
    if meta.get("format") != FORMAT:  # a missing key is reported as the wrong format, on purpose
        raise ValueError(f"{path}: unsupported format {meta.get('format')!r}, expected {FORMAT!r}")
    for key in ("config", "provenance"):
        if key not in meta:
            raise ValueError(f"{path}: {key} must be a JSON object, got None (the key is missing)")
        if not isinstance(meta[key], dict):
            raise ValueError(f"{path}: {key} must be a JSON object, got {meta[key]!r}")
    try:
        return ModelConfig.from_dict(meta["config"]), meta["provenance"]
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def read_component(folder: str | os.PathLike[str], name: str) -> dict[str, Tensor]:
    path = Path(folder) / f"{name}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"model folder {folder} lacks {path.name}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:  # truncated, garbage, unreadable: name the file
        raise ValueError(f"{path} is not a readable safetensors file: {' '.join(str(e).split())}") from None


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_folder(out: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """A temporary sibling of `out` to write into, renamed to `out` when the block succeeds and removed when it
    fails, so an error or an interruption never leaves a half-written `out`. An existing `out` (a folder, a file
    or a link) is replaced only with `force`: moved aside, the new one renamed in, the old one removed, so the swap
    is as short as possible and a failure in it puts the old one back.

    Every temporary is named `.OUT.*.tmp`, the one moved aside too: whatever a killed (SIGKILL) run leaves is
    found, removed and named on stderr by the next run writing the same `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # .OUT.<mkdtemp's random letters, no dot>[.old].tmp: not the temporaries of a sibling such as OUT.v2
    ours = re.compile(rf"\.{re.escape(out.name)}\.[^.]+(\.old)?\.tmp")
    for stale in sorted(p for p in out.parent.iterdir() if ours.fullmatch(p.name)):
        print(f"removing {stale}, left behind by an interrupted write of {out}", file=sys.stderr)
        _remove(stale)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old: Path | None = None
    try:
        yield tmp
        _usual_permissions(tmp)
        if out.exists() or out.is_symlink():
            if not force:
                raise FileExistsError(f"{out} exists; pass force=True (--force) to replace it")
            old = tmp.with_name(tmp.name.removesuffix(".tmp") + ".old.tmp")  # unique: tmp's name is
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        if old is not None and (old.exists() or old.is_symlink()) and not (out.exists() or out.is_symlink()):
            old.rename(out)  # interrupted between the two renames: the old one is put back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        _remove(old)


def _remove(path: Path) -> None:
    """Remove a file, a link or a folder, if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _usual_permissions(folder: Path) -> None:
    # mkdtemp makes a private (0700) folder and safetensors writes 0600 files: give the result the
    # permissions a plain mkdir / open would have had under the user's umask.
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def write_model_folder(
    out: str | os.PathLike[str],
    config: ModelConfig,
    tensors: dict[str, dict[str, Tensor]],
    tokenizer_dir: str | os.PathLike[str],
    provenance: dict[str, Any],
    *,
    dtype: torch.dtype | None = None,
    force: bool = False,
    tokenizer_2_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Write a model folder atomically: everything goes to a temporary sibling that is renamed into place
    at the end, so a failure or interruption never leaves a half-written `out`.

    `tensors` maps each of `components(config)` to its state dict (our names); SDXL's second tokenizer comes from
    `tokenizer_2_dir`. An existing `out` is replaced only with `force=True`.
    """
    out = Path(out)
    if sorted(tensors) != sorted(components(config)):
        raise ValueError(f"expected tensors for {components(config)}, got {sorted(tensors)}")
    if (tokenizer_2_dir is None) != (config.text_2 is None):
        raise ValueError("a second tokenizer goes with a second text encoder (SDXL), and only with one")
    if (out.exists() or out.is_symlink()) and not force:  # checked before any work, and again at the swap
        raise FileExistsError(f"{out} exists; pass force=True (--force) to replace it")
    with atomic_folder(out, force) as tmp:
        for name, state in tensors.items():
            state = {
                k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
                for k, v in state.items()
            }
            save_file(state, str(tmp / f"{name}.safetensors"))
        shutil.copytree(tokenizer_dir, tmp / TOKENIZER_DIR)
        if tokenizer_2_dir is not None:
            shutil.copytree(tokenizer_2_dir, tmp / TOKENIZER_2_DIR)
        meta = {"format": FORMAT, "config": config.to_dict(), "provenance": provenance}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out
