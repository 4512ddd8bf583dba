"""A Stable Diffusion checkpoint -> a diffedit model folder. The orchestration behind `python -m weights_convert`.

Three kinds of source, told apart by what SRC is:
    a diffusers-format folder   unet/ vae/ text_encoder/ tokenizer/ scheduler/ (+ model_index.json); the
                                ModelConfig is read from their config files
    an original single file     .safetensors / .ckpt (CompVis / Stability layout); the ModelConfig is detected
                                from the tensors (detect.py) and the tokenizer comes from --tokenizer
    a hub repo id               "org/name": a diffusers-format repo, fetched with only the files needed

Every path ends in the same steps:
    state dicts in diffusers names + ModelConfig
    -> every tensor checked against the model the config describes (one error naming all problems)
    -> renamed to ours (the tables in diffusers.py)
    -> write_model_folder, which writes atomically (nothing half-written survives a failure)
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from diffedit.configs import ModelConfig, TextConfig
from diffedit.text import build_text_model, load_tokenizer, text_state_dict
from diffedit.unet import UNet
from diffedit.vae import AutoencoderKL
from diffedit.weights import CONFIG_FILE, COMPONENTS, check_state_dict, sha256_file, write_model_folder

from . import __version__
from .detect import detect_single_file
from .diffusers_config import CONFIG_FILES, ConversionError, config_from_diffusers
from .diffusers import unet_from_diffusers, unet_to_diffusers, vae_current_names, vae_from_diffusers, vae_to_diffusers
from .ldm import read_checkpoint, split_ldm

CONVERTER = f"weights_convert {__version__}"
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

# Weight files of a diffusers-format folder, most preferred first (the fp16 variants first when fp16 is asked for).
WEIGHT_FILES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
}
TOKENIZER_FILES = (
    "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json",
)  # fmt: skip

# Where a single file's tokenizer comes from when --tokenizer is not given (the repos diffusers uses too).
DEFAULT_TOKENIZER = {"<|endoftext|>": "openai/clip-vit-large-patch14", "!": "stabilityai/stable-diffusion-2-1"}


@dataclass
class Source:
    """What a reader hands to the common steps: diffusers-named tensors, their config, where they came from."""

    config: ModelConfig
    tensors: dict[str, dict[str, Tensor]]  # unet / vae / text_encoder, diffusers names
    tokenizer_dir: Path | None  # a folder holding the tokenizer files, or None: take it from --tokenizer
    inputs: dict[str, Path]  # every file read, by its name relative to the source (hashed into the provenance)
    provenance: dict[str, Any] = field(default_factory=dict)


# ---- the whole conversion ---------------------------------------------------------------------------------------


def convert(
    src: str,
    out: str | Path,
    *,
    dtype: str | None = None,
    force: bool = False,
    tokenizer: str | None = None,
    prediction_type: str | None = None,
    image_size: int | None = None,
    quiet: bool = False,
) -> Path:
    """Convert SRC (diffusers folder, single file or hub repo id) into the diffedit model folder OUT."""
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    cast = DTYPES[dtype] if dtype else None  # None: keep the source's dtypes
    out = Path(out)
    check_out(src, out, force)  # early, so a long conversion is not wasted (the swap checks again)
    overrides = {"prediction_type": prediction_type, "image_size": image_size}
    kind, path = locate(src)
    if kind == "diffedit":
        raise ConversionError(f"{src} is already a diffedit model folder (use --to diffusers to export it)")
    if kind == "single-file":
        source = read_single_file(path, quiet=quiet, **overrides)
    else:
        if kind == "hub":
            path = fetch_diffusers_repo(src, prefer_fp16=dtype == "fp16", quiet=quiet)
        name = Path(src).name  # the folder's or the repo's name, for a model that is none of our presets
        source = read_diffusers_folder(path, prefer_fp16=dtype == "fp16", quiet=quiet, name=name, **overrides)
        source.provenance["source"] = src
        if kind == "hub":
            source.provenance["revision"] = path.name  # snapshots/<commit>
    if tokenizer is not None or source.tokenizer_dir is None:
        source.tokenizer_dir, source.provenance["tokenizer"] = find_tokenizer(tokenizer, source.config, quiet)

    ours = to_ours(source.tensors, source.config)
    with tempfile.TemporaryDirectory(prefix="diffedit-tokenizer-") as staged:
        stage_tokenizer(source.tokenizer_dir, Path(staged), source.config.text)
        source.provenance |= {
            "files": _hashes(source.inputs, quiet),  # last: the slow step comes after every check has passed
            "converter": CONVERTER,
            "dtype": _dtype_name(ours, cast),
        }
        _say(quiet, f"writing {out}")
        written = write_model_folder(
            out, source.config, ours, staged, source.provenance, dtype=cast, force=force
        )
    c, kind = source.config, source.provenance["dtype"]
    _say(quiet, f"wrote {written}: {c.name}, {c.schedule.prediction_type}, {c.image_size} px, {kind}")
    return written


def check_out(src: str | Path, out: Path, force: bool) -> None:
    """Refuse an OUT whose writing would destroy SRC (OUT is SRC, inside it, or holds it: --force would remove
    the source, and without it the source would gain a folder), then an existing OUT without force."""
    source, target = Path(src), Path(out)
    if source.exists():  # not a hub id
        source, target = source.resolve(), target.resolve()
        clash = (
            "OUT is SRC" if source == target
            else "OUT is inside SRC" if source in target.parents
            else "SRC is inside OUT" if target in source.parents
            else None
        )  # fmt: skip
        if clash is not None:
            raise ConversionError(f"{clash} ({src} -> {out}): writing OUT would destroy the source")
    if (out.exists() or out.is_symlink()) and not force:  # a dangling link counts: the swap would refuse it
        raise ConversionError(f"{out} exists; pass --force to replace it")


def locate(src: str) -> tuple[str, Path]:
    """("diffedit" | "diffusers" | "single-file" | "hub", path) for SRC."""
    path = Path(src)
    if path.is_dir():
        if (path / CONFIG_FILE).is_file():
            return "diffedit", path
        if (path / "model_index.json").is_file() or (path / "unet").is_dir():
            return "diffusers", path
        raise ConversionError(f"{src}: a folder, but neither a diffusers-format model (no model_index.json, no unet/)")
    if path.is_file():
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            expected = ", ".join(SINGLE_FILE_SUFFIXES)
            raise ConversionError(f"{src}: unknown checkpoint type {path.suffix!r} (expected {expected})")
        return "single-file", path
    if REPO_ID.fullmatch(src) and not src.endswith(SINGLE_FILE_SUFFIXES) and not src.startswith("."):
        return "hub", path
    raise ConversionError(f"{src}: no such file or folder, and not a hub repo id (org/name)")


# ---- reading sources ----------------------------------------------------------------------------------------------


def read_tensors(path: Path, quiet: bool = False, label: str | None = None) -> dict[str, Tensor]:
    """A weight file's tensors: safetensors (with a progress bar), or a pickle read weights-only."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys = list(f.keys())
                bar = tqdm(keys, desc=f"reading {label or path.name}", unit="tensor", disable=quiet)
                return {k: f.get_tensor(k) for k in bar}
        _say(quiet, f"reading {path.name} (weights-only unpickler)")
        return read_checkpoint(path)
    except ValueError as e:
        lines = str(e).splitlines()
        if "refused" not in lines[0]:
            raise
        # A code-carrying pickle: our two lines and torch's reason, without torch's advice to unpickle it anyway.
        reason = [line for line in lines if "Unsupported global" in line or "Unsupported operand" in line]
        raise ConversionError("\n".join(lines[:2] + reason[:1])) from e
    except Exception as e:  # a truncated or corrupt file: safetensors / torch raise their own types
        raise ConversionError(f"{path}: cannot read it: {type(e).__name__}: {e}") from e


def read_single_file(
    path: Path, *, prediction_type: str | None = None, image_size: int | None = None, quiet: bool = False
) -> Source:
    state_dict = read_tensors(path, quiet)
    config = detect_single_file(state_dict, prediction_type=prediction_type, image_size=image_size)
    tensors = split_ldm(state_dict, config)
    guessed = prediction_type is None and config.text.activation == "gelu" and image_size is None
    how = " (guessed: SD 2.x files carry no flag)" if guessed else ""
    how = " (from --prediction-type)" if prediction_type else how
    provenance = {
        "source": str(path),
        "format": f"single-file {path.suffix}",
        "prediction_type": config.schedule.prediction_type + how,
    }
    return Source(config, tensors, None, {path.name: path}, provenance)


def read_diffusers_folder(
    folder: Path,
    *,
    prefer_fp16: bool = False,
    prediction_type: str | None = None,
    image_size: int | None = None,
    quiet: bool = False,
    name: str | None = None,
) -> Source:
    configs = {}
    for part, rel in CONFIG_FILES.items():
        if not (folder / rel).is_file():
            raise ConversionError(f"{folder} lacks {rel}: not a complete diffusers-format Stable Diffusion folder")
        try:
            configs[part] = json.loads((folder / rel).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConversionError(f"{folder / rel} is not valid JSON: {e}") from None
        except RecursionError:
            raise ConversionError(f"{folder / rel} is not valid JSON: nested too deeply") from None
        if not isinstance(configs[part], dict):
            got = "null" if configs[part] is None else f"a {type(configs[part]).__name__}"
            raise ConversionError(f"{folder / rel} must hold a JSON object, got {got}")
    config = config_from_diffusers(configs, prediction_type, image_size, name=name or folder.name)
    weights = {c: weight_file(folder, c, prefer_fp16) for c in COMPONENTS}
    inputs = [folder / rel for rel in CONFIG_FILES.values()] + list(weights.values())
    inputs += [p for p in [folder / "model_index.json"] if p.is_file()]
    tokenizer_dir = folder / "tokenizer"
    inputs += [tokenizer_dir / f for f in TOKENIZER_FILES if (tokenizer_dir / f).is_file()]
    tensors = {c: read_tensors(p, quiet, label=p.relative_to(folder).as_posix()) for c, p in weights.items()}
    provenance = {
        "source": str(folder),
        "format": "diffusers",
        "prediction_type": config.schedule.prediction_type
        + (" (from --prediction-type)" if prediction_type else " (scheduler_config.json)"),
    }
    named_inputs = {p.relative_to(folder).as_posix(): p for p in inputs}
    return Source(config, tensors, tokenizer_dir if tokenizer_dir.is_dir() else None, named_inputs, provenance)


def weight_candidates(component: str, prefer_fp16: bool) -> list[str]:
    plain = list(WEIGHT_FILES[component])
    fp16 = [n.replace(".", ".fp16.", 1) for n in plain]  # diffusion_pytorch_model.fp16.safetensors
    return [f"{component}/{n}" for n in (fp16 + plain if prefer_fp16 else [plain[0], fp16[0], plain[1], fp16[1]])]


def weight_file(folder: Path, component: str, prefer_fp16: bool) -> Path:
    candidates = weight_candidates(component, prefer_fp16)
    found = [folder / c for c in candidates if (folder / c).is_file()]
    if not found:
        sharded = sorted(p.name for p in (folder / component).glob("*.index.json"))
        hint = f" (sharded weights {sharded} are not supported)" if sharded else ""
        raise ConversionError(f"{folder / component} holds none of {[Path(c).name for c in candidates]}{hint}")
    return found[0]


def fetch_diffusers_repo(repo_id: str, *, prefer_fp16: bool, quiet: bool) -> Path:
    """Download (or find in the cache) a diffusers-format repo: configs, tokenizer and one weight file per network.

    The weight files are asked for in order of preference, so a repo holding fp32 and fp16 copies is fetched once.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars

    if quiet:
        disable_progress_bars()
    wanted = ["model_index.json", *CONFIG_FILES.values(), "tokenizer/*"]
    folder: Path | None = None
    for choice in range(4):
        missing = [c for c in COMPONENTS if folder is None or not _any_file(folder, weight_candidates(c, prefer_fp16))]
        if not missing:
            break
        patterns = wanted + [weight_candidates(c, prefer_fp16)[choice] for c in missing]
        try:
            folder = Path(snapshot_download(repo_id, allow_patterns=patterns))
        except Exception as e:  # offline, unknown repo, gated, incomplete cache: all end here, as one message
            raise ConversionError(f"{repo_id}: no such local file or folder, so it was tried as a hub repo id: cannot "
                                  f"fetch {repo_id} from the hub: {type(e).__name__}: {_first_line(e)}") from e
    assert folder is not None
    return folder


# ---- checking and renaming ----------------------------------------------------------------------------------------


def our_shapes(config: ModelConfig) -> dict[str, dict[str, torch.Size]]:
    """Every tensor our model of `config` holds, by component, in our on-disk names (built on meta: no memory)."""
    with torch.device("meta"):
        unet, vae, text = UNet(config.unet), AutoencoderKL(config.vae), build_text_model(config.text)
    states = {"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": text_state_dict(text)}
    return {c: {k: v.shape for k, v in s.items()} for c, s in states.items()}


def to_ours(tensors: dict[str, dict[str, Tensor]], config: ModelConfig) -> dict[str, dict[str, Tensor]]:
    """diffusers-named state dicts -> ours, after checking every name and shape against the model of `config`:
    one error lists every missing, unknown and mis-shaped tensor of all three networks."""
    given = {
        "unet": tensors["unet"],
        "vae": vae_current_names(tensors["vae"]),
        "text_encoder": text_file_names(tensors["text_encoder"]),
    }
    ours = our_shapes(config)
    expected = {
        "unet": _shapes(unet_to_diffusers(ours["unet"])),
        "vae": _shapes(vae_to_diffusers(ours["vae"])),
        "text_encoder": ours["text_encoder"],
    }
    problems = []
    for component in COMPONENTS:
        state = given[component]
        if component == "vae":  # old VAE files keep the mid-block attention as 1x1 convs: (C, C, 1, 1) for (C, C)
            state = {k: x.flatten(1) if _is_1x1_for(x, expected["vae"].get(k)) else x for k, x in state.items()}
        try:
            check_state_dict(state, expected[component], component)
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise ConversionError(f"the weights do not match config {config.name!r}:\n" + "\n".join(problems))
    return {
        "unet": unet_from_diffusers(given["unet"]),
        "vae": vae_from_diffusers(given["vae"]),
        "text_encoder": given["text_encoder"],
    }


def text_file_names(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Text encoder tensors under the names of the real files ("text_model.*"), without the position_ids buffer.

    Files written by transformers >= 5 drop the "text_model." level; older ones (all the hub's SD repos) keep it
    and may hold position_ids, a constant buffer.
    """
    prefix = "" if any(k.startswith("text_model.") for k in state_dict) else "text_model."
    return {prefix + k: v for k, v in state_dict.items() if not k.endswith("embeddings.position_ids")}


def _is_1x1_for(x: Tensor, linear: torch.Size | None) -> bool:
    return linear is not None and len(linear) == 2 and tuple(x.shape) == (*linear, 1, 1)


def _shapes(state: dict[str, Any]) -> dict[str, torch.Size]:
    return {k: (v if isinstance(v, torch.Size) else v.shape) for k, v in state.items()}


# ---- tokenizer ----------------------------------------------------------------------------------------------------


def find_tokenizer(spec: str | None, config: ModelConfig, quiet: bool) -> tuple[Path, dict[str, Any]]:
    """The folder holding the tokenizer named by --tokenizer (a folder, a diffusers folder, a hub repo id), or the
    family's default repo when none is given. Returns (folder, provenance)."""
    if spec is None:
        default = DEFAULT_TOKENIZER.get(config.text.pad_token)
        hint = (
            "pass --tokenizer DIR|REPO_ID (a folder with vocab.json + merges.txt or tokenizer.json, "
            "a diffusers folder, or a hub repo id)"
        )
        if default is None:
            raise ConversionError(f"this checkpoint carries no tokenizer: {hint}")
        try:
            folder = _fetch_tokenizer(default, quiet)
        except ConversionError as e:
            raise ConversionError(f"this checkpoint carries no tokenizer and the default, {e}; {hint}") from e
        spec = default
    elif Path(spec).is_dir():
        folder = Path(spec)
    elif REPO_ID.fullmatch(spec):
        folder = _fetch_tokenizer(spec, quiet)
    else:
        raise ConversionError(f"--tokenizer {spec}: no such folder, and not a hub repo id (org/name)")
    if _any_file(folder / "tokenizer", TOKENIZER_FILES):  # a diffusers folder
        folder = folder / "tokenizer"
    has_bpe_pair = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if not has_bpe_pair and not (folder / "tokenizer.json").is_file():
        raise ConversionError(f"--tokenizer {spec}: no vocab.json + merges.txt or tokenizer.json in {folder}")
    files = {f: sha256_file(folder / f) for f in TOKENIZER_FILES if (folder / f).is_file()}
    return folder, {"source": spec, "files": files}


def _fetch_tokenizer(repo_id: str, quiet: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars

    if quiet:
        disable_progress_bars()
    patterns = [*TOKENIZER_FILES, *(f"tokenizer/{f}" for f in TOKENIZER_FILES)]  # a tokenizer repo or a diffusers one
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated, incomplete cache
        reason = f"{type(e).__name__}: {_first_line(e)}"
        raise ConversionError(f"{repo_id} could not be fetched from the hub ({reason})") from e


def stage_tokenizer(folder: Path, staged: Path, text: TextConfig) -> None:
    """Copy the tokenizer files (only those: a hub folder may hold much more) and check they suit the model."""
    for f in TOKENIZER_FILES:
        if (folder / f).is_file():
            shutil.copyfile(folder / f, staged / f)  # follows the hub cache's symlinks
    try:
        load_tokenizer(staged, text)
    except (ValueError, OSError) as e:
        raise ConversionError(f"tokenizer {folder}: {e}") from e


# ---- small helpers ------------------------------------------------------------------------------------------------


def _hashes(files: dict[str, Path], quiet: bool, chunk: int = 1 << 24) -> dict[str, str]:
    """sha256 of every input file (as diffedit.weights.sha256_file), with one progress bar over all their bytes."""
    total = sum(p.stat().st_size for p in files.values())
    hashes = {}
    with tqdm(total=total, desc="sha256", unit="B", unit_scale=True, disable=quiet) as bar:
        for name, path in files.items():
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(chunk):
                    h.update(block)
                    bar.update(len(block))
            hashes[name] = h.hexdigest()
    return hashes


def _dtype_name(ours: dict[str, dict[str, Tensor]], dtype: torch.dtype | None) -> str:
    if dtype is not None:
        return str(dtype).removeprefix("torch.")
    found = {str(t.dtype).removeprefix("torch.") for s in ours.values() for t in s.values() if t.is_floating_point()}
    return "+".join(sorted(found))


def _any_file(folder: Path, names: Any) -> bool:
    return any((folder / n).is_file() for n in names)


def _first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, file=sys.stderr)
