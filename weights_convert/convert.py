"""A Stable Diffusion checkpoint -> a diffedit model folder. The orchestration behind `python -m weights_convert`.

Three kinds of source, told apart by what SRC is:
    a diffusers-format folder   unet/ vae/ text_encoder/ tokenizer/ scheduler/ (+ model_index.json; SDXL:
                                text_encoder_2/ tokenizer_2/); the ModelConfig is read from their config files
    an original single file     .safetensors / .ckpt (CompVis / Stability layout); the ModelConfig is detected
                                from the tensors (detect.py) and the tokenizer comes from --tokenizer
    a hub repo id               "org/name": a diffusers-format repo, fetched with only the files needed
The SDXL refiner, SD3 and FLUX are named and refused, in every kind of source.

Every path ends in the same steps:
    state dicts in diffusers names + ModelConfig
    -> every tensor checked against the model the config describes (one error naming all problems)
    -> renamed to ours (the tables in diffusers.py)
    -> write_model_folder, which writes atomically (nothing half-written survives a failure)
"""

from __future__ import annotations

import hashlib
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
from diffedit.text import PROJECTION, build_text_model, load_tokenizer, text_state_dict
from diffedit.unet import UNet
from diffedit.vae import AutoencoderKL
from diffedit.weights import CONFIG_FILE, check_state_dict, components, read_json_object, sha256_file
from diffedit.weights import write_model_folder

from . import __version__
from .detect import detect_single_file
from .diffusers_config import CONFIG_FILES, SDXL_CONFIG_FILES, SUPPORTED, ConversionError, config_from_diffusers
from .diffusers_config import other_pipeline
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
    "text_encoder_2": ("model.safetensors", "pytorch_model.bin"),  # SDXL
}
ALL_COMPONENTS = tuple(WEIGHT_FILES)
TOKENIZER_FILES = (
    "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json",
)  # fmt: skip

# Where a single file's tokenizer comes from when --tokenizer is not given (the repos diffusers uses too).
DEFAULT_TOKENIZER = {"<|endoftext|>": "openai/clip-vit-large-patch14", "!": "stabilityai/stable-diffusion-2-1"}
# SDXL's two (tokenizer/ and tokenizer_2/: CLIP's BPE, padding with the end token and with "!").
DEFAULT_TOKENIZER_XL = "stabilityai/stable-diffusion-xl-base-1.0"
TOKENIZER_2_PAD = "!"  # what a tokenizer_2 derived from tokenizer/ pads with (OpenCLIP's vocabulary is CLIP's)


@dataclass
class Source:
    """What a reader hands to the common steps: diffusers-named tensors, their config, where they came from."""

    config: ModelConfig
    tensors: dict[str, dict[str, Tensor]]  # unet / vae / text_encoder (/ text_encoder_2), diffusers names
    tokenizer_dir: Path | None  # a folder holding the tokenizer files, or None: take it from --tokenizer
    inputs: dict[str, Path]  # every file read, by its name relative to the source (hashed into the provenance)
    provenance: dict[str, Any] = field(default_factory=dict)
    tokenizer_2_dir: Path | None = None  # SDXL's second tokenizer, or None: from --tokenizer (or derived)


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
    sdxl = source.config.text_2 is not None
    if tokenizer is not None or source.tokenizer_dir is None:
        (source.tokenizer_dir, source.provenance["tokenizer"]), second = find_tokenizers(tokenizer, source.config,
                                                                                         quiet)
        if sdxl:
            source.tokenizer_2_dir, source.provenance["tokenizer_2"] = second
    elif sdxl and source.tokenizer_2_dir is None:  # an SDXL folder without tokenizer_2/: derived from its tokenizer/
        source.provenance["tokenizer_2"] = {"derived_from": "tokenizer", "pad_token": TOKENIZER_2_PAD}

    ours = to_ours(source.tensors, source.config)
    with tempfile.TemporaryDirectory(prefix="diffedit-tokenizer-") as staged:
        first, second_dir = Path(staged) / "1", (Path(staged) / "2" if sdxl else None)
        stage_tokenizer(source.tokenizer_dir, first, source.config.text)
        if second_dir is not None:
            assert source.config.text_2 is not None
            stage_tokenizer(source.tokenizer_2_dir, second_dir, source.config.text_2, derive_from=first)
        source.provenance |= {
            "files": _hashes(source.inputs, quiet),  # last: the slow step comes after every check has passed
            "converter": CONVERTER,
            "dtype": _dtype_name(ours, cast),
        }
        _say(quiet, f"writing {out}")
        written = write_model_folder(
            out, source.config, ours, first, source.provenance, dtype=cast, force=force, tokenizer_2_dir=second_dir
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
        raise ConversionError(f"{src}: a folder, but neither a diffedit model (no {CONFIG_FILE}) nor a "
                              "diffusers-format one (no model_index.json, no unet/)")
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
        reason = [line for line in lines if "Unsupported global" in line]
        raise ConversionError("\n".join(lines[:2] + reason[:1])) from e
    except OSError as e:  # permissions, a folder named .ckpt, ...: the system's own words
        raise ConversionError(f"{path}: cannot read it: {type(e).__name__}: {e}") from e
    except Exception as e:  # a truncated or corrupt file: safetensors / torch raise their own types
        if path.suffix != ".safetensors":  # the unpickler's own errors (KeyError: 174812789) say nothing to a user
            raise ConversionError(f"{path}: cannot read it as a PyTorch checkpoint (corrupt, truncated or not one: "
                                  f"{type(e).__name__}: {e})") from e
        raise ConversionError(f"{path}: cannot read it: {type(e).__name__}: {e}") from e


def read_single_file(
    path: Path, *, prediction_type: str | None = None, image_size: int | None = None, quiet: bool = False
) -> Source:
    state_dict = read_tensors(path, quiet)
    config = detect_single_file(state_dict, prediction_type=prediction_type, image_size=image_size)
    tensors = split_ldm(state_dict, config)
    family = "SDXL" if config.text_2 is not None else "SD 2.x" if config.text.activation == "gelu" else None
    guessed = prediction_type is None and image_size is None and family is not None
    how = f" (guessed: {family} files carry no flag)" if guessed else ""
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
    refuse_other_models(folder)
    configs = {}
    optional = {k: rel for k, rel in SDXL_CONFIG_FILES.items() if (folder / rel).is_file()}
    for part, rel in (CONFIG_FILES | optional).items():
        if not (folder / rel).is_file():
            raise ConversionError(f"{folder} lacks {rel}: not a complete diffusers-format Stable Diffusion folder")
        configs[part] = _read_json(folder / rel)
    if (folder / "model_index.json").is_file():
        configs["model_index"] = _read_json(folder / "model_index.json")
    config = config_from_diffusers(configs, prediction_type, image_size, name=name or folder.name)
    weights = {c: weight_file(folder, c, prefer_fp16) for c in components(config)}
    inputs = [folder / rel for rel in (CONFIG_FILES | optional).values()] + list(weights.values())
    inputs += [p for p in [folder / "model_index.json"] if p.is_file()]
    tokenizer_dir, tokenizer_2_dir = folder / "tokenizer", folder / "tokenizer_2"
    for d in (tokenizer_dir, tokenizer_2_dir) if config.text_2 is not None else (tokenizer_dir,):
        inputs += [d / f for f in TOKENIZER_FILES if (d / f).is_file()]
    tensors = {c: read_tensors(p, quiet, label=p.relative_to(folder).as_posix()) for c, p in weights.items()}
    provenance = {
        "source": str(folder),
        "format": "diffusers",
        "prediction_type": config.schedule.prediction_type
        + (" (from --prediction-type)" if prediction_type else " (scheduler_config.json)"),
    }
    named_inputs = {p.relative_to(folder).as_posix(): p for p in inputs}
    second = tokenizer_2_dir if config.text_2 is not None and tokenizer_2_dir.is_dir() else None
    return Source(config, tensors, tokenizer_dir if tokenizer_dir.is_dir() else None, named_inputs, provenance,
                  tokenizer_2_dir=second)


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, ConversionError)


def refuse_other_models(folder: Path) -> None:
    """A diffusers folder of a model we know and do not support (the SDXL refiner, SD3, FLUX, ...), named before
    any "lacks unet/config.json" could hide what it is."""
    index = _read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    unet = _read_json(folder / CONFIG_FILES["unet"]) if (folder / CONFIG_FILES["unet"]).is_file() else None
    other = other_pipeline(index, unet)
    if other is None and (folder / "transformer").is_dir() and not (folder / "unet").is_dir():
        other = "a transformer-based model (SD3, FLUX, ...: no unet/)"
    if other is not None:
        raise ConversionError(f"{folder} is {other}: {SUPPORTED}")


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
    """Download (or find in the cache) a diffusers-format repo: configs, tokenizers and one weight file per network
    (SDXL: text_encoder_2/ and tokenizer_2/ too; never the repo's single files or other pipelines' weights).

    The configs come first, so an unsupported model (the SDXL refiner, SD3, FLUX) is refused before any weights are
    downloaded. The weight files are then asked for in order of preference, so a repo holding fp32 and fp16 copies
    is fetched once.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars

    if quiet:
        disable_progress_bars()
    wanted = ["model_index.json", *CONFIG_FILES.values(), *SDXL_CONFIG_FILES.values(), "tokenizer/*", "tokenizer_2/*"]

    def fetch(patterns: list[str]) -> Path:
        try:
            return Path(snapshot_download(repo_id, allow_patterns=patterns))
        except Exception as e:  # offline, unknown repo, gated, incomplete cache: all end here, as one message
            raise ConversionError(f"{repo_id}: no such local file or folder, so it was tried as a hub repo id: cannot "
                                  f"fetch {repo_id} from the hub: {type(e).__name__}: {_first_line(e)}") from e

    folder = fetch(wanted)
    refuse_other_models(folder)
    needed = [c for c in ALL_COMPONENTS if c != "text_encoder_2" or (folder / SDXL_CONFIG_FILES[c]).is_file()]
    for choice in range(4):
        missing = [c for c in needed if not _any_file(folder, weight_candidates(c, prefer_fp16))]
        if not missing:
            break
        folder = fetch(wanted + [weight_candidates(c, prefer_fp16)[choice] for c in missing])
    return folder


# ---- checking and renaming ----------------------------------------------------------------------------------------


def our_shapes(config: ModelConfig) -> dict[str, dict[str, torch.Size]]:
    """Every tensor our model of `config` holds, by component, in our on-disk names (built on meta: no memory)."""
    with torch.device("meta"):
        unet, vae, text = UNet(config.unet), AutoencoderKL(config.vae), build_text_model(config.text)
        states = {"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": text_state_dict(text)}
        if config.text_2 is not None:
            states["text_encoder_2"] = text_state_dict(build_text_model(config.text_2))
    return {c: {k: v.shape for k, v in s.items()} for c, s in states.items()}


def to_ours(tensors: dict[str, dict[str, Tensor]], config: ModelConfig) -> dict[str, dict[str, Tensor]]:
    """diffusers-named state dicts -> ours, after checking every name and shape against the model of `config`:
    one error lists every missing, unknown and mis-shaped tensor of all the networks."""
    texts = [c for c in components(config) if c.startswith("text_encoder")]
    if sorted(tensors) != sorted(components(config)):
        raise ConversionError(f"expected the networks {list(components(config))}, got {sorted(tensors)}")
    given = {
        "unet": tensors["unet"],
        "vae": vae_current_names(tensors["vae"]),
        **{c: text_file_names(tensors[c]) for c in texts},
    }
    ours = our_shapes(config)
    expected = {
        "unet": _shapes(unet_to_diffusers(ours["unet"])),
        "vae": _shapes(vae_to_diffusers(ours["vae"])),
        **{c: ours[c] for c in texts},
    }
    problems = []
    for component in components(config):
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
        **{c: given[c] for c in texts},  # already under the real files' names, which are ours
    }


def text_file_names(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Text encoder tensors under the names of the real files ("text_model.*"), without the position_ids buffer.

    Files written by transformers >= 5 drop the "text_model." level; older ones (all the hub's SD repos) keep it
    and may hold position_ids, a constant buffer. SDXL's CLIPTextModelWithProjection keeps its projection
    ("text_projection.weight") beside text_model.* in both.
    """
    prefix = "" if any(k.startswith("text_model.") for k in state_dict) else "text_model."
    return {(k if k == PROJECTION else prefix + k): v for k, v in state_dict.items()
            if not k.endswith("embeddings.position_ids")}


def _is_1x1_for(x: Tensor, linear: torch.Size | None) -> bool:
    return linear is not None and len(linear) == 2 and tuple(x.shape) == (*linear, 1, 1)


def _shapes(state: dict[str, Any]) -> dict[str, torch.Size]:
    return {k: (v if isinstance(v, torch.Size) else v.shape) for k, v in state.items()}


# ---- tokenizer ----------------------------------------------------------------------------------------------------


Tokenizer = tuple[Path, dict[str, Any]]  # (folder, provenance)
Tokenizer2 = tuple[Path | None, dict[str, Any]]  # folder None: derived from the first one


def find_tokenizer(spec: str | None, config: ModelConfig, quiet: bool) -> Tokenizer:
    """The folder holding the tokenizer named by --tokenizer (a folder, a diffusers folder, a hub repo id), or the
    family's default repo when none is given. Returns (folder, provenance)."""
    return find_tokenizers(spec, config, quiet)[0]


def find_tokenizers(spec: str | None, config: ModelConfig, quiet: bool) -> tuple[Tokenizer, Tokenizer2]:
    """The model's tokenizer and, for SDXL, its second one: (folder, provenance) each.

    SDXL's second tokenizer is the tokenizer_2/ beside the first in a diffusers folder or repo; a plain tokenizer
    folder has none, and then it is derived from the first (folder None): OpenCLIP bigG's vocabulary and merges are
    CLIP's, only the pad token differs ("!"), which stage_tokenizer sets.
    """
    hint = (
        "pass --tokenizer DIR|REPO_ID (a folder with vocab.json + merges.txt or tokenizer.json, "
        "a diffusers folder, or a hub repo id)"
    )
    if spec is None:
        default = DEFAULT_TOKENIZER_XL if config.text_2 is not None else DEFAULT_TOKENIZER.get(config.text.pad_token)
        if default is None:
            raise ConversionError(f"this checkpoint carries no tokenizer: {hint}")
        try:
            root = _fetch_tokenizer(default, quiet)
        except ConversionError as e:
            raise ConversionError(f"this checkpoint carries no tokenizer and the default, {e}; {hint}") from e
        spec = default
    elif Path(spec).is_dir():
        root = Path(spec)
    elif REPO_ID.fullmatch(spec):
        root = _fetch_tokenizer(spec, quiet)
    else:
        raise ConversionError(f"--tokenizer {spec}: no such folder, and not a hub repo id (org/name)")
    first = _tokenizer_in(root / "tokenizer" if _any_file(root / "tokenizer", TOKENIZER_FILES) else root, spec)
    if config.text_2 is None or not _any_file(root / "tokenizer_2", TOKENIZER_FILES):
        return first, (None, {"derived_from": "tokenizer", "pad_token": TOKENIZER_2_PAD})
    return first, _tokenizer_in(root / "tokenizer_2", f"{spec} (tokenizer_2)")


def _tokenizer_in(folder: Path, spec: str) -> Tokenizer:
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
    # a tokenizer repo, or a diffusers one (SDXL's with tokenizer_2/)
    patterns = [*TOKENIZER_FILES, *(f"{d}/{f}" for d in ("tokenizer", "tokenizer_2") for f in TOKENIZER_FILES)]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated, incomplete cache
        reason = f"{type(e).__name__}: {_first_line(e)}"
        raise ConversionError(f"{repo_id} could not be fetched from the hub ({reason})") from e


def stage_tokenizer(folder: Path | None, staged: Path, text: TextConfig, derive_from: Path | None = None) -> None:
    """Copy the tokenizer files (only those: a hub folder may hold much more) and check they suit the model.

    folder None: the tokenizer of `derive_from` (an already staged one) with the model's pad token instead of its
    own (SDXL's tokenizer_2 from its tokenizer: same BPE, "!" padding)."""
    staged.mkdir(parents=True, exist_ok=True)
    if folder is None:
        if derive_from is None:
            raise ValueError("stage_tokenizer needs a folder or a tokenizer to derive from")
        from transformers import CLIPTokenizer

        CLIPTokenizer.from_pretrained(str(derive_from), pad_token=text.pad_token).save_pretrained(str(staged))
        folder = staged
    else:
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
