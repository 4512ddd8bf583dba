"""`diffedit run`: DiffEdit over a dataset (a JSONL manifest or a PIE-Bench folder), on one process or under torchrun.

    diffedit run --model models/sd15 --out runs/pie manifest.jsonl
    torchrun --nproc-per-node 8 -m diffedit run --model models/sd15 --out runs/pie --pie-bench data/PIE-Bench

What it guarantees (DESIGN.md, "Runs at scale"):
- Deterministic: an item's seed is its manifest `seed`, or else `item_seed(run_seed, id)` = the first 8 bytes of
  sha256(f"{run_seed}:{id}") as a big-endian integer, masked to 63 bits. Its outputs are those of `diffedit edit`
  on its image with that seed and the same settings, bit for bit on CPU, whatever the world size, rank or order.
  `--batch-size B > 1` edits up to B compatible items in one call (masks still one by one): the last float bits of
  the inversion and edit may then change, and depend on which items share a batch.
- Sharded: the ids are sorted and rank r of W takes ids[r::W] (before any skipping), so a restarted rank redoes
  its own share; rank 0 shows one progress bar over all ranks (it counts the records in OUT/items) and writes the
  summary after a barrier.
- Resumable: OUT/items/<id>.edit.png, <id>.mask.png and then <id>.json (the record: settings, timings, metrics) are
  each written atomically; a record means "done", so a restart skips those items and loses at most the ones in
  flight. OUT/run.json records the run's settings; another run's folder is refused without --resume / --force.
- Checked first: the whole manifest is validated (one line naming the manifest line) before anything is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from . import pie_bench, run_metrics
from .chain import edit_image
from .edit import edit, generate_mask, invert
from .files import atomic_write, atomic_write_text
from .image import overlay, read_image, side_by_side, to_pil, to_tensor
from .model import StableDiffusion, load

T = TypeVar("T")
RUN_FORMAT = "diffedit-run-v1"
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # safe as a file name everywhere; never a dot file
ITEMS = "items"
SUMMARY_FILES = ("summary.json", "summary.md", "contact_sheet.png")
SHEET_ROWS, SHEET_SIZE = 16, 128  # the contact sheet: the first 16 items by id, panels at most 128 px high
GROUP_TIMEOUT = timedelta(hours=2)  # how long a rank waits at a barrier for the slowest one
MASK_TINT = (255, 0, 255)


class RunError(ValueError):
    """A bad manifest, folder or setting: one line, exit status 2, nothing written."""


@dataclass(frozen=True)
class EditSettings:
    """The settings of one edit, named as `diffedit edit`'s flags (--threshold is edit_image's threshold_ratio)."""

    steps: int = 50
    num_maps: int = 10
    mask_strength: float = 0.5
    threshold: float = 3.0
    guidance: float = 7.5
    strength: float = 0.8
    invert_guidance: float = 1.0
    negative: str | None = None
    eta: float = 0.0
    paste_background: bool = False


SETTING_NAMES = tuple(f.name for f in dataclasses.fields(EditSettings))
ITEM_FIELDS = ("id", "image", "source", "target", "mask", "gt_mask", "seed", "edit_type", *SETTING_NAMES)


@dataclass(frozen=True)
class Item:
    """One edit of the dataset, validated."""

    id: str
    where: str  # "manifest.jsonl line 3" or "mapping_file.json record '000000000000'", for messages
    image: Path
    source: str
    target: str
    seed: int  # given or derived (item_seed)
    settings: EditSettings
    edit_type: str = ""
    mask: Path | None = None  # a given edit mask: mask estimation is skipped
    gt_mask: Path | None = None  # a ground-truth mask file (manifest)
    gt_rle: tuple[int, ...] | None = None  # a ground-truth mask as PIE-Bench's run-length code


@dataclass(frozen=True)
class RunOptions:
    """What `diffedit run` was asked for (cli.py builds it from the flags)."""

    model: Path
    out: Path
    manifest: Path | None
    pie_bench: Path | None
    settings: EditSettings
    seed: int = 0
    compat: bool = False
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    batch_size: int = 1
    max_pixels: int | None = None
    resume: bool = False
    force: bool = False
    quiet: bool = False
    compile: bool = False  # torch.compile the UNet (StableDiffusion.compile_unet): speed only, not a setting


@dataclass(frozen=True)
class World:
    """This process's place in the torchrun group (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.size > 1


# ---- seeds and shards -------------------------------------------------------------------------------------------
def item_seed(run_seed: int, item_id: str) -> int:
    """The seed of an item without its own: sha256(f"{run_seed}:{id}")'s first 8 bytes, big-endian, & (2**63 - 1)."""
    digest = hashlib.sha256(f"{run_seed}:{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def shard(ids: Sequence[str], rank: int, world_size: int) -> list[str]:
    """Rank `rank`'s share of the ids: the sorted ids, round-robin (ids[rank::world_size])."""
    return sorted(ids)[rank::world_size]


# ---- reading and validating the dataset ----------------------------------------------------------------------
def _check_id(value: object, seen: dict[str, str], where: str) -> str:
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise RunError(f"{where}: id {value!r} is not safe as a file name (letters, digits, '.', '_', '-'; "
                       "not starting with '.' or '-'; at most 128)")
    if value.lower() in seen:
        raise RunError(f"{where}: duplicate id {value!r} (first at {seen[value.lower()]})")
    seen[value.lower()] = where
    return value


def _setting(name: str, value: object, where: str) -> Any:
    """One per-item setting, checked as `diffedit edit` checks its flag."""
    kind = type(getattr(EditSettings(), name))
    if name == "negative":
        if value is not None and not isinstance(value, str):
            raise RunError(f"{where}: negative must be a string or null")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise RunError(f"{where}: {name} must be true or false, got {value!r}")
        return value
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or (kind is int and not isinstance(value, int)) or not math.isfinite(value):
        raise RunError(f"{where}: {name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    low, high = {"steps": (1, None), "num_maps": (1, None), "mask_strength": (0, 1), "threshold": (0, None),
                 "guidance": (1, None), "strength": (0, 1), "invert_guidance": (1, None), "eta": (0, 1)}[name]
    if value < low or (high is not None and value > high) or (name == "threshold" and value == 0):
        bounds = f"in [{low}, {high}]" if high is not None else (f"> {low}" if name == "threshold" else f">= {low}")
        raise RunError(f"{where}: {name} {value} is out of range (it must be {bounds})")
    return kind(value)


def check_settings(settings: EditSettings, where: str) -> None:
    """Both noise levels leave at least one DDIM step (as the CLI's --steps / --strength check)."""
    for name in ("mask_strength", "strength"):
        if int(settings.steps * getattr(settings, name)) < 1:
            raise RunError(f"{where}: {name} {getattr(settings, name)} of {settings.steps} steps leaves no step")


def _picture_size(path: Path, where: str, max_pixels: int | None) -> tuple[int, int]:
    try:
        return read_image(path, max_pixels=max_pixels).size
    except (ValueError, OSError) as e:
        raise RunError(f"{where}: {' '.join(str(e).split())}") from None


def _check_mask(path: Path, size: tuple[int, int], what: str, where: str) -> None:
    if not path.is_file():
        raise RunError(f"{where}: {what} {path} does not exist")
    try:
        with Image.open(path) as im:
            picture = im.convert("L")
    except Exception as e:  # PIL's many exception types for a broken file
        raise RunError(f"{where}: {what} {path} is not a readable picture: {' '.join(str(e).split())}") from None
    if picture.size != size:
        raise RunError(f"{where}: {what} {path} is {picture.width} x {picture.height}, the image {size[0]} x {size[1]}")
    values = np.unique(np.asarray(picture))
    if what == "mask" and not (set(values.tolist()) <= {0, 255} or set(values.tolist()) <= {0, 1}):
        raise RunError(f"{where}: mask {path} must hold only 0 and 255 (white = edit)")


JSONL = "a manifest is JSON Lines: one object per line"


def parse_line(text: str, where: str, root: Path, options: RunOptions, seen: dict[str, str]) -> Item:
    """One manifest line -> Item, every file opened and checked; RunError naming the line otherwise."""
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as e:
        raise RunError(f"{where}: not valid JSON ({e.msg} at column {e.colno}; {JSONL})") from None
    if not isinstance(entry, dict):
        raise RunError(f"{where}: must be a JSON object, got {type(entry).__name__} ({JSONL})")
    unknown = sorted(set(entry) - set(ITEM_FIELDS))
    if unknown:
        raise RunError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(ITEM_FIELDS)})")
    item_id = _check_id(entry.get("id"), seen, where)
    for field in ("image", "source", "target"):
        if not isinstance(entry.get(field), str) or not entry[field].strip():
            what = "prompt" if field != "image" else "image path"
            if entry.get(field) is None:
                raise RunError(f"{where}: missing {what} {field!r} (a non-empty string)")
            raise RunError(f"{where}: {what} {field!r} must be a non-empty string, got {entry[field]!r}")
    seed = entry.get("seed", item_seed(options.seed, item_id))
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise RunError(f"{where}: seed must be an integer in [0, 2**63 - 1], got {seed!r}")
    settings = dataclasses.replace(options.settings, **{k: _setting(k, entry[k], where) for k in SETTING_NAMES
                                                        if k in entry})
    check_settings(settings, where)
    image = root / entry["image"]
    size = _picture_size(image, where, options.max_pixels)
    masks: dict[str, Path | None] = {}
    for field in ("mask", "gt_mask"):
        value = entry.get(field)
        if value is not None and (not isinstance(value, str) or not value):
            raise RunError(f"{where}: {field} must be a path (a string)")
        masks[field] = None if value is None else root / value
        if masks[field] is not None:
            _check_mask(masks[field], size, field, where)
    edit_type = entry.get("edit_type", "")
    if not isinstance(edit_type, str):
        raise RunError(f"{where}: edit_type must be a string")
    return Item(item_id, where, image, entry["source"], entry["target"], seed, settings, edit_type,
                masks["mask"], masks["gt_mask"])


def read_manifest(path: Path, options: RunOptions) -> list[Item]:
    """Every line of a JSONL manifest (blank lines skipped); image paths are relative to the manifest's folder."""
    if not path.is_file():
        raise RunError(f"manifest {path} does not exist" if not path.exists() else f"manifest {path} is not a file")
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) is dropped
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RunError(f"manifest {path}: not readable: {' '.join(str(e).split())}") from None
    seen: dict[str, str] = {}
    items = [parse_line(text, f"{path} line {n}", path.parent, options, seen)
             for n, text in enumerate(lines, 1) if text.strip()]
    if not items:
        raise RunError(f"manifest {path} holds no edit")
    return items


def read_pie_bench(folder: Path, options: RunOptions) -> list[Item]:
    """A PIE-Bench folder's edits (pie_bench.py), with the run's settings and derived seeds."""
    try:
        records = pie_bench.read_mapping(folder)
    except ValueError as e:
        raise RunError(str(e)) from None
    check_settings(options.settings, "the settings")
    seen: dict[str, str] = {}
    items = []
    for key, record in records:
        where = f"{folder / pie_bench.MAPPING_FILE} record {key!r}"
        _check_id(key, seen, where)
        try:
            pie = pie_bench.parse_record(folder, key, record)
        except ValueError as e:
            raise RunError(f"{where}: {e}") from None
        _picture_size(pie.image, where, options.max_pixels)
        items.append(Item(key, where, pie.image, pie.source, pie.target, item_seed(options.seed, key),
                          options.settings, pie.edit_type, gt_rle=pie.rle))
    if not items:
        raise RunError(f"{folder / pie_bench.MAPPING_FILE} holds no edit")
    return items


def data_fingerprint(options: RunOptions) -> dict[str, str]:
    """What the run reads its edits from: the kind and the sha256 of the manifest / mapping file."""
    path = options.manifest if options.manifest is not None else options.pie_bench / pie_bench.MAPPING_FILE
    kind = "manifest" if options.manifest is not None else "pie-bench"
    return {"kind": kind, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


# ---- the run folder -------------------------------------------------------------------------------------------
def run_record(options: RunOptions) -> dict[str, Any]:
    """OUT/run.json: what makes an item's bits (identity: model, data, device type; settings: the rest)."""
    model_json = options.model / "model.json"
    model_sha = hashlib.sha256(model_json.read_bytes()).hexdigest() if model_json.is_file() else ""
    identity = {"model_sha256": model_sha, "data": data_fingerprint(options), "device_type": options.device.type}
    settings = {"seed": options.seed, "compat": options.compat, "dtype": str(options.dtype).removeprefix("torch."),
                "batch_size": options.batch_size, **dataclasses.asdict(options.settings)}
    return {"format": RUN_FORMAT, "identity": identity, "settings": settings}


def check_folder(options: RunOptions, wanted: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Read-only: what to do with OUT ("new", "continue", "restart") and the settings to run with (--resume takes
    the recorded ones). A folder of another run, or not a run, is refused without --resume / --force."""
    out = options.out
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a folder")
    if options.model.resolve() in (out.resolve(), *out.resolve().parents):
        raise RunError(f"--out {out} is inside the model folder {options.model}: write the run elsewhere")
    if not out.exists() or all(_is_stale_temporary(p.name) for p in out.iterdir()):  # killed before run.json
        return "new", wanted
    if options.force:
        return "restart", wanted
    try:
        recorded = json.loads((out / "run.json").read_text(encoding="utf-8"))
        ok = (isinstance(recorded, dict) and recorded.get("format") == RUN_FORMAT
              and isinstance(recorded.get("identity"), dict) and isinstance(recorded.get("settings"), dict)
              and sorted(recorded["settings"]) == sorted(wanted["settings"]))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        ok = False
    if not ok:
        raise RunError(f"--out {out} holds files but no diffedit run (no readable run.json); pass --force to "
                       "write the run there anyway, or choose another folder")
    if recorded == wanted:
        return "continue", wanted
    names = {"model_sha256": "model (model.json)", "data": "manifest or mapping_file.json", "device_type": "device"}
    for key, name in names.items():
        if recorded["identity"].get(key) != wanted["identity"][key]:
            raise RunError(f"--out {out} holds a run of another {name}; pass --force to start it over")
    if not options.resume:
        diff = sorted(k for k in wanted["settings"] if recorded["settings"].get(k) != wanted["settings"][k])
        name = diff[0] if diff else "format"
        raise RunError(f"--out {out} holds a run with other settings ({name}: {recorded['settings'].get(name)!r}, "
                       f"now {wanted['settings'].get(name)!r}); pass --resume to continue it with its own settings "
                       "or --force to start over")
    return "continue", recorded


def options_from_record(options: RunOptions, record: dict[str, Any]) -> RunOptions:
    """The run's options with the recorded settings (--resume)."""
    s = record["settings"]
    dtype = getattr(torch, s["dtype"])
    return dataclasses.replace(options, seed=s["seed"], compat=s["compat"], dtype=dtype, batch_size=s["batch_size"],
                               settings=EditSettings(**{k: s[k] for k in SETTING_NAMES}))


def _is_stale_temporary(name: str) -> bool:
    """A temporary of files.atomic_write (".<name>.<random>.tmp<suffix>") left by a killed process."""
    return name.startswith(".") and ".tmp" in name


def prepare_folder(out: Path, how: str, record: dict[str, Any]) -> None:
    """Rank 0 only: start over if asked, write run.json, remove the temporaries of a killed run."""
    items = out / ITEMS
    if how == "restart":
        shutil.rmtree(items, ignore_errors=True)
        for name in ("run.json", *SUMMARY_FILES):
            (out / name).unlink(missing_ok=True)
    atomic_write_text(out / "run.json", json.dumps(record, indent=2, sort_keys=True) + "\n")  # first: "a run"
    items.mkdir(exist_ok=True)
    for folder in (out, items):
        for entry in os.scandir(folder):
            if entry.is_file(follow_symlinks=False) and _is_stale_temporary(entry.name):
                os.unlink(entry.path)


def record_path(out: Path, item_id: str) -> Path:
    return out / ITEMS / f"{item_id}.json"


def count_done(out: Path, ids: set[str]) -> int:
    """How many of `ids` have their record (one folder listing: cheap enough to poll)."""
    try:
        names = os.listdir(out / ITEMS)
    except FileNotFoundError:
        return 0
    return sum(1 for n in names if n.endswith(".json") and n[:-5] in ids)


# ---- torch.distributed --------------------------------------------------------------------------------------
def join_world(device: torch.device) -> World:
    """Under torchrun (WORLD_SIZE > 1): join the group (gloo on CPU, NCCL on CUDA; RANK, WORLD_SIZE, MASTER_ADDR
    from the environment) and take the device of LOCAL_RANK. Otherwise rank 0 of 1 on `device`."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return World(0, 1, device)
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local) if device.index is None else device
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=GROUP_TIMEOUT)
    return World(dist.get_rank(), dist.get_world_size(), device)


def first_failing_rank(world: World, failed: bool) -> int | None:
    """The lowest rank whose step failed (an all_reduce MIN), or None when none did; this rank's own answer alone."""
    if not world.distributed:
        return 0 if failed else None
    flag = torch.tensor([world.rank if failed else world.size], device=world.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return None if int(flag.item()) == world.size else int(flag.item())


def agreed(world: World, step: Callable[[], T]) -> T:
    """Run `step` on every rank; if any rank fails, all stop, and the lowest failing rank alone says why (the
    others exit with status 2 silently): one line for a bad input, not one per rank."""
    try:
        value, error = step(), None
    except Exception as e:  # noqa: BLE001  (re-raised below on the rank that reports it)
        value, error = None, e
    failing = first_failing_rank(world, error is not None)
    if failing is None:
        return value
    if failing == world.rank:
        raise error
    raise SystemExit(2)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


# ---- editing -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Edited:
    """One item's outputs."""

    item: Item
    picture: Image.Image  # the input as the model saw it
    edit: Image.Image
    mask: Image.Image  # mode L, image resolution, 255 = edit
    seconds: float
    batch: int


def load_picture(model: StableDiffusion, item: Item, max_pixels: int | None) -> torch.Tensor:
    """The item's input exactly as `diffedit edit` reads it (read_image, then to_tensor)."""
    return to_tensor(read_image(item.image, max_pixels=max_pixels), model.config.vae.downsample_factor)


def edit_one(model: StableDiffusion, item: Item, options: RunOptions) -> Edited:
    """One item: `edit_image` called as cli's `_edit` calls it; with a given mask, invert then edit with it."""
    start = time.perf_counter()
    s, pixels = item.settings, load_picture(model, item, options.max_pixels)
    if item.mask is None:
        result = edit_image(model, pixels, item.source, item.target, seed=item.seed, steps=s.steps,
                            num_maps=s.num_maps, mask_strength=s.mask_strength, threshold_ratio=s.threshold,
                            guidance=s.guidance, strength=s.strength, invert_guidance=s.invert_guidance,
                            negative_prompt=s.negative, eta=s.eta, paste_background=s.paste_background,
                            diffusers_compat=options.compat, progress=False)
        edited, mask = result.edit.images[0], result.mask.image_mask[0]
    else:
        generator = lambda: torch.Generator().manual_seed(item.seed)  # noqa: E731  (one per stage, as edit_image)
        mask = Image.open(item.mask).convert("L")
        inversion = invert(model, pixels, strength=s.strength, steps=s.steps, guidance=s.invert_guidance,
                           generator=generator(), diffusers_compat=options.compat, progress=False)
        edited = edit(model, inversion, mask, item.target, guidance=s.guidance, eta=s.eta, generator=generator(),
                      negative_prompt=item.source if s.negative is None else s.negative,
                      background_image=pixels if s.paste_background else None, diffusers_compat=options.compat,
                      progress=False).images[0]
        mask = mask.point(lambda v: 255 if v else 0)
    return Edited(item, to_pil(pixels)[0], edited, mask, time.perf_counter() - start, 1)


def edit_batch(model: StableDiffusion, items: Sequence[Item], options: RunOptions) -> list[Edited]:
    """Several compatible items (same settings and size, no given mask, eta 0, not --compat): each mask with its
    own seed, then one inversion and one edit for all. The last float bits may differ from edit_one's."""
    start, s = time.perf_counter(), items[0].settings
    pixels = [load_picture(model, item, options.max_pixels) for item in items]
    masks = [generate_mask(model, px, item.source, item.target, num_maps=s.num_maps, encode_strength=s.mask_strength,
                           threshold_ratio=s.threshold, steps=s.steps, guidance=s.guidance,
                           generator=torch.Generator().manual_seed(item.seed), progress=False)
             for px, item in zip(pixels, items)]
    inversion = invert(model, latents=torch.cat([m.latents for m in masks]), strength=s.strength, steps=s.steps,
                       guidance=s.invert_guidance, progress=False)
    negatives = [item.source if s.negative is None else s.negative for item in items]
    result = edit(model, inversion, torch.cat([m.latent_mask for m in masks]), [item.target for item in items],
                  negative_prompt=negatives, guidance=s.guidance, eta=0.0,
                  background_image=torch.cat(pixels) if s.paste_background else None, progress=False)
    seconds = (time.perf_counter() - start) / len(items)
    return [Edited(item, to_pil(px)[0], image, m.image_mask[0], seconds, len(items))
            for item, px, image, m in zip(items, pixels, result.images, masks)]


def batches(items: Sequence[Item], size: int, compat: bool) -> list[list[Item]]:
    """The rank's to-do items in chunks of at most `size` that one edit_batch call can take (others alone)."""
    if size == 1:
        return [[item] for item in items]
    groups: dict[tuple, list[Item]] = {}
    for item in items:
        alone = item.mask is not None or item.settings.eta != 0 or compat
        with Image.open(item.image) as picture:  # the header: its size
            key = ("alone", item.id) if alone else (item.settings, picture.size)
        groups.setdefault(key, []).append(item)
    return [group[i:i + size] for group in groups.values() for i in range(0, len(group), size)]


def ground_truth(item: Item, size: tuple[int, int]) -> np.ndarray | None:
    """The item's ground-truth mask (H, W) in {0, 1} at `size` = (W, H), or None: a file, or PIE-Bench's code."""
    if item.gt_rle is not None:
        return pie_bench.mask_decode(item.gt_rle, (size[1], size[0]))
    if item.gt_mask is None:
        return None
    picture = Image.open(item.gt_mask).convert("L").resize(size, Image.NEAREST)
    return (np.asarray(picture) >= 128).astype(np.float64)


def item_metrics(done: Edited, networks: run_metrics.ModelMetrics | None = None) -> dict[str, float | str]:
    """The metrics of one edit (run_metrics.py): the weight-free ones against the ground-truth mask (none without
    one), then PIE-Bench's model metrics whose networks are loaded (structure distance and CLIP of the whole edit
    need no mask)."""
    truth = ground_truth(done.item, done.picture.size)
    edited, original = np.asarray(done.edit.convert("RGB")), np.asarray(done.picture)
    metrics: dict[str, float | str] = {}
    if truth is not None:
        metrics.update(run_metrics.background_metrics(edited, original, truth))
        metrics["mask_iou"] = run_metrics.mask_iou(np.asarray(done.mask), truth)
    if networks is not None:
        metrics.update(networks.item(original, edited, done.item.target, truth))
    return metrics


def save(out: Path, done: Edited, world: World, networks: run_metrics.ModelMetrics | None = None) -> None:
    """The edit, the mask, then the record (its presence means done), each atomically."""
    item = done.item
    files = {"edit": f"{item.id}.edit.png", "mask": f"{item.id}.mask.png"}
    for key, picture in (("edit", done.edit), ("mask", done.mask)):
        atomic_write(out / ITEMS / files[key], lambda tmp, p=picture: p.save(tmp, format="PNG"))
    record = {"id": item.id, "image": str(item.image), "source": item.source, "target": item.target,
              "edit_type": item.edit_type, "seed": item.seed, "settings": dataclasses.asdict(item.settings),
              "mask_given": item.mask is not None, "outputs": files, "metrics": item_metrics(done, networks),
              "seconds": done.seconds, "batch": done.batch, "rank": world.rank, "world_size": world.size}
    atomic_write_text(record_path(out, item.id), json.dumps(record, indent=2, sort_keys=True) + "\n")


class Progress:
    """Rank 0's bar over every rank's items: counted directly alone, by polling the records under torchrun."""

    def __init__(self, out: Path, ids: set[str], world: World, enabled: bool) -> None:
        self.out, self.ids, self.world = out, ids, world
        self.bar = tqdm(total=len(ids), initial=count_done(out, ids), desc="diffedit run", unit="edit",
                        disable=not enabled or world.rank != 0)
        self.stop = threading.Event()
        self.thread = None
        if world.distributed and world.rank == 0 and enabled:
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()

    def _poll(self) -> None:
        while not self.stop.wait(1.0):
            self.refresh()

    def refresh(self) -> None:
        self.bar.n = count_done(self.out, self.ids)
        self.bar.refresh()

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        self.refresh()
        self.bar.close()


# ---- the summary -------------------------------------------------------------------------------------------------
METRIC_COLUMNS = (  # key, heading, scale (PIE-Bench's tables: structure and LPIPS x 10^3, MSE x 10^4, SSIM x 10^2)
    ("structure_distance", "structure x1e3", 1e3), ("psnr_unedit_part", "bg PSNR (dB)", 1.0),
    ("lpips_unedit_part", "bg LPIPS x1e3", 1e3), ("mse_unedit_part", "bg MSE x1e4", 1e4),
    ("ssim_unedit_part", "bg SSIM x1e2", 1e2), ("clip_similarity_target_image", "CLIP whole", 1.0),
    ("clip_similarity_target_image_edit_part", "CLIP edited", 1.0), ("mask_iou", "mask IoU", 1.0),
    ("seconds", "s / edit", 1.0),
)


def aggregate(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean of each metric over the records where it is a finite number, with that count."""
    row: dict[str, Any] = {"edits": len(records)}
    for key, _, _ in METRIC_COLUMNS:
        values = [r["seconds"] if key == "seconds" else r["metrics"].get(key) for r in records]
        finite = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
        row[key] = {"mean": sum(finite) / len(finite) if finite else None, "count": len(finite)}
    return row


def summarise(records: Sequence[dict[str, Any]], model_metrics: dict[str, str]) -> dict[str, Any]:
    """Overall and per edit type rows, and the model metrics' status (rank 0's ModelMetrics.status())."""
    types = sorted({r["edit_type"] for r in records if r["edit_type"]})
    per_type = {t: aggregate([r for r in records if r["edit_type"] == t]) for t in types}
    names = {t: pie_bench.EDIT_TYPES.get(t, t) for t in types}
    return {"overall": aggregate(records), "per_edit_type": per_type, "edit_type_names": names,
            "model_metrics": model_metrics}


def table(summary: dict[str, Any], pie: bool) -> str:
    """The summary as a Markdown table (one row overall, one per edit type) and the model metrics' status."""
    heads = ["", "edits", *(title for _, title, _ in METRIC_COLUMNS)]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    rows = [("overall", summary["overall"])]
    rows += [(f"{t} {summary['edit_type_names'][t]}" if pie else t, row) for t, row in summary["per_edit_type"].items()]
    for name, row in rows:
        cells = [name, str(row["edits"])]
        for key, _, scale in METRIC_COLUMNS:
            mean = row[key]["mean"]
            cells.append("n/a" if mean is None else f"{mean * scale:.4g}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- {name}: {status}" for name, status in summary["model_metrics"].items()]
    return "\n".join(lines) + "\n"


def contact_sheet(out: Path, records: Sequence[dict[str, Any]]) -> Image.Image:
    """Rows of input | mask (magenta) | edit for the first SHEET_ROWS items by id, panels at most SHEET_SIZE high."""
    rows = []
    for record in sorted(records, key=lambda r: r["id"])[:SHEET_ROWS]:
        picture = Image.open(record["image"]).convert("RGB")
        edited = Image.open(out / ITEMS / record["outputs"]["edit"]).convert("RGB")
        picture = picture.resize(edited.size) if picture.size != edited.size else picture
        mask = Image.open(out / ITEMS / record["outputs"]["mask"])
        row = side_by_side([picture, overlay(picture, mask, MASK_TINT), edited])
        scale = min(1.0, SHEET_SIZE / row.height)
        rows.append(row.resize((max(1, round(row.width * scale)), max(1, round(row.height * scale)))))
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height + 4 for r in rows) - 4), (255, 255, 255))
    y = 0
    for row in rows:
        sheet.paste(row, (0, y))
        y += row.height + 4
    return sheet


def write_summary(out: Path, items: Sequence[Item], pie: bool, model_metrics: dict[str, str]) -> dict[str, Any]:
    """Rank 0, after every rank is done: summary.json, summary.md, contact_sheet.png (each atomically)."""
    records = [json.loads(record_path(out, item.id).read_text(encoding="utf-8")) for item in items
               if record_path(out, item.id).is_file()]
    summary = {**summarise(records, model_metrics), "missing": len(items) - len(records)}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    atomic_write_text(out / "summary.md", table(summary, pie))
    if records:
        sheet = contact_sheet(out, records)
        atomic_write(out / "contact_sheet.png", lambda tmp: sheet.save(tmp, format="PNG"))
    return summary


# ---- the run -----------------------------------------------------------------------------------------------------
def read_items(options: RunOptions) -> list[Item]:
    if (options.manifest is None) == (options.pie_bench is None):
        raise RunError("give a manifest (MANIFEST.jsonl) or --pie-bench DIR, one of them")
    if options.manifest is not None:
        return read_manifest(options.manifest, options)
    return read_pie_bench(options.pie_bench, options)


def run_dataset(options: RunOptions) -> Iterator[str]:
    """The whole run on this rank; yields the lines rank 0 prints (nothing on other ranks)."""
    world = join_world(options.device)
    options = dataclasses.replace(options, device=world.device)
    try:
        yield from _run(options, world)
    finally:
        if world.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _plan(options: RunOptions) -> tuple[list[Item], str, RunOptions, dict[str, Any]]:
    """Validate everything (read-only): the items, the folder and the settings to run with."""
    items = read_items(options)
    how, record = check_folder(options, run_record(options))
    if record is not None and record["settings"] != run_record(options)["settings"]:
        options = options_from_record(options, record)
        items = read_items(options)  # the recorded seed and settings
    return items, how, options, record


def _run(options: RunOptions, world: World) -> Iterator[str]:
    items, how, options, record = agreed(world, lambda: _plan(options))
    model = agreed(world, lambda: load(options.model, device=world.device, dtype=options.dtype,
                                       compile=options.compile))
    if world.rank == 0:
        prepare_folder(options.out, how, record)
    barrier(world)
    networks = run_metrics.load_model_metrics(world.device)  # once per rank, from local caches only
    by_id = {item.id: item for item in items}
    todo = [by_id[i] for i in shard(list(by_id), world.rank, world.size)
            if not record_path(options.out, i).is_file()]
    if world.rank == 0:
        done = count_done(options.out, set(by_id))
        yield (f"{len(items)} edits, {done} already done; {world.size} rank(s) on {world.device.type}"
               + (f", batches of {options.batch_size}" if options.batch_size > 1 else ""))
    progress = Progress(options.out, set(by_id), world, not options.quiet)
    try:
        for chunk in batches(todo, options.batch_size, options.compat):
            results = [edit_one(model, chunk[0], options)] if len(chunk) == 1 else edit_batch(model, chunk, options)
            for result in results:
                save(options.out, result, world, networks)
            if not world.distributed:
                progress.refresh()
    finally:
        progress.close()
    barrier(world)
    if world.rank == 0:
        summary = write_summary(options.out, items, options.pie_bench is not None, networks.status())
        yield from table(summary, options.pie_bench is not None).splitlines()
        yield f"wrote {options.out / 'summary.md'}, summary.json, contact_sheet.png and {ITEMS}/"
