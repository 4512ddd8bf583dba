"""The `diffedit` command: `edit`, `mask`, `invert`, `demo`, `eval` and `run`.

    diffedit edit --model models/sd15 --image in.png --source "a bowl of fruits" --target "a bowl of pears" \\
        --out out.png --mask-out mask.png --figure figure.png
    diffedit mask --model DIR --image in.png --source ... --target ... --out mask.png
    diffedit invert --model DIR --image in.png --out in.inversion.safetensors   # then: edit --inversion FILE
    diffedit demo --out DIR        # a colour edit by the shipped toy model, offline (input, mask, edit, figure)
    diffedit eval --out results.json   # the toy benchmark: DiffEdit, diffusers' pipeline and baselines, measured
    diffedit run --model DIR --out RUN manifest.jsonl   # a dataset (or --pie-bench DIR); under torchrun: sharded

User errors (missing files, bad values, an output that exists without --force) print one line on stderr
and exit with status 2. Outputs are checked before any work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import signal
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors import SafetensorError

from . import vae as vae_module
from ._args import integer, nonempty_path, number
from .chain import edit_image
from .edit import Inversion, MaskResult, generate_mask, invert
from .files import Interrupts, atomic_write, load_inversion, save_inversion
from .image import DEFAULT_MAX_PIXELS, overlay, read_image, side_by_side, size_warning, to_pil, to_tensor
from .model import StableDiffusion, load
from .run import EditSettings, RunOptions, run_dataset
from .toy import evaluate as toy_evaluate

MASK_TINT = (255, 0, 255)  # magenta: visible on every colour of the shapes world, red included
DEMO_WORDS = ["a", "photo", "of", "red", "blue", "green", "circle", "square", "on", "background"]


class UserError(Exception):
    """A mistake in the command line or its files: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message} (see --help)")


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffedit", description="DiffEdit (Couairon et al. 2022) on Stable Diffusion.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(p: argparse.ArgumentParser, out_help: str) -> None:
        p.add_argument("--out", required=True, type=nonempty_path, help=out_help)
        p.add_argument("--seed", type=integer(0, 2**63 - 1), default=0, help="seed of every random draw (default 0)")
        p.add_argument("--steps", type=integer(1), default=None, help="DDIM steps of the full schedule (default 50)")
        p.add_argument("--compat", action="store_true", help="reproduce diffusers' pipeline, defects included")
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
        p.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                       help="weights and activations (default fp32; fp16 / bf16 where the device runs them)")
        p.add_argument("--force", action="store_true", help="overwrite existing outputs")
        p.add_argument("--quiet", action="store_true", help="no progress bars, no messages")
        p.add_argument("--compile", action="store_true",
                       help="torch.compile the UNet (CUDA graphs on CUDA); the first call of each shape pays a warm-up")

    def inputs(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, type=nonempty_path, help="a model folder (python -m weights_convert)")
        p.add_argument("--image", required=True, type=nonempty_path, help="the input image")
        p.add_argument("--max-pixels", type=integer(0), default=DEFAULT_MAX_PIXELS,
                       help=f"refuse larger inputs (default {DEFAULT_MAX_PIXELS}; 0: no limit)")

    def mask_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--source", required=True, help="prompt R describing the input image")
        p.add_argument("--target", required=True, help="prompt Q describing the wanted edit")
        p.add_argument("--mask-strength", type=number(0, 1), default=0.5, help="noise level of the mask maps (0.5)")
        p.add_argument("--guidance", type=number(1), default=7.5,
                       help="classifier-free guidance of mask and edit (7.5)")
        p.add_argument("--threshold", type=number(0, open_low=True), default=3.0,
                       help="mask threshold ratio rho (3.0)")
        p.add_argument("--num-maps", type=integer(1), default=10, help="noise samples averaged into the mask (10)")

    p = commands.add_parser("edit", help="mask, invert and edit an image")
    inputs(p)
    mask_options(p)
    common(p, "the edited image")
    p.add_argument("--strength", type=number(0, 1), default=None, help="encoding ratio r of the inversion (0.8)")
    p.add_argument("--invert-guidance", type=number(1), default=1.0,
                   help="guidance of the inversion (1: unconditional)")
    p.add_argument("--negative", default=None, help="negative prompt of the edit (default: the source prompt)")
    p.add_argument("--eta", type=number(0, 1), default=0.0, help="DDIM eta of the edit (0: deterministic)")
    p.add_argument("--paste-background", action="store_true",
                   help="outside the mask, the input's own pixels instead of the decoder's (not in the paper)")
    p.add_argument("--inversion", type=nonempty_path, default=None,
                   help="an inversion file written by `diffedit invert`")
    p.add_argument("--ignore-inversion-source", action="store_true",
                   help="use --inversion even if it was made from another image, model or mode")
    p.add_argument("--mask-out", type=nonempty_path, default=None, help="also write the mask (image resolution)")
    p.add_argument("--figure", type=nonempty_path, default=None, help="also write input | mask overlay | edit")

    p = commands.add_parser("mask", help="write the DiffEdit mask of an image")
    inputs(p)
    mask_options(p)
    common(p, "the mask image (white = edit)")
    p.add_argument("--figure", type=nonempty_path, default=None, help="also write input | mask overlay")

    p = commands.add_parser("invert", help="DDIM-encode an image to a file that `edit --inversion` reads")
    inputs(p)
    common(p, "the inversion file (.safetensors)")
    p.add_argument("--prompt", default="", help="prompt of the inversion (default: unconditional)")
    p.add_argument("--strength", type=number(0, 1), default=None, help="encoding ratio r (0.8)")
    p.add_argument("--guidance", type=number(1), default=1.0, help="guidance of the inversion (1: none)")

    p = commands.add_parser("demo", help="edit a shapes-world picture with the shipped toy model (offline, ~5 s)")
    p.add_argument("--out", type=nonempty_path, default=Path("diffedit-demo"), help="output folder (diffedit-demo)")
    p.add_argument("--model", type=nonempty_path, default=None,
                   help="a toy model folder (default: the shipped weights)")
    p.add_argument("--seed", type=integer(0, 2**63 - 1), default=0, help="seed of every random draw (default 0)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--quiet", action="store_true", help="no progress bars, no messages")

    p = commands.add_parser("eval", help="the toy benchmark: DiffEdit and baselines on held-out shapes-world edits")
    toy_evaluate.add_arguments(p)

    p = commands.add_parser("run", help="DiffEdit over a dataset (JSONL manifest or PIE-Bench), torchrun-sharded")
    p.add_argument("manifest", nargs="?", type=nonempty_path, default=None,
                   help="a JSONL manifest: one edit a line, {id, image, source, target[, mask, gt_mask, seed, ...]}")
    p.add_argument("--pie-bench", type=nonempty_path, default=None, help="a PIE-Bench folder (mapping_file.json + "
                   "annotation_images/) instead of a manifest")
    p.add_argument("--model", required=True, type=nonempty_path, help="a model folder (python -m weights_convert)")
    p.add_argument("--max-pixels", type=integer(0), default=DEFAULT_MAX_PIXELS,
                   help=f"refuse larger inputs (default {DEFAULT_MAX_PIXELS}; 0: no limit)")
    p.add_argument("--mask-strength", type=number(0, 1), default=0.5, help="noise level of the mask maps (0.5)")
    p.add_argument("--guidance", type=number(1), default=7.5, help="classifier-free guidance of mask and edit (7.5)")
    p.add_argument("--threshold", type=number(0, open_low=True), default=3.0, help="mask threshold ratio rho (3.0)")
    p.add_argument("--num-maps", type=integer(1), default=10, help="noise samples averaged into the mask (10)")
    common(p, "the run folder: items/<id>.{edit.png,mask.png,json}, run.json, summary.{json,md}, contact_sheet.png")
    p.add_argument("--strength", type=number(0, 1), default=0.8, help="encoding ratio r of the inversion (0.8)")
    p.add_argument("--invert-guidance", type=number(1), default=1.0, help="guidance of the inversion (1)")
    p.add_argument("--negative", default=None, help="negative prompt of the edit (default: the source prompt)")
    p.add_argument("--eta", type=number(0, 1), default=0.0, help="DDIM eta of the edit (0: deterministic)")
    p.add_argument("--paste-background", action="store_true", help="outside the mask, the input's own pixels")
    p.add_argument("--batch-size", type=integer(1), default=1,
                   help="items edited in one call per rank (default 1: the bits of `diffedit edit`; more may change "
                        "the last bits)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out with its recorded settings")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    except UserError as e:
        return _fail(e)
    say = (lambda *a: None) if args.quiet else print
    with warnings.catch_warnings(), Interrupts() as interrupts, _QuietVAE(args.quiet):
        warnings.showwarning = lambda message, *rest, **kw: print(f"diffedit: warning: {message}", file=sys.stderr)
        try:
            run = {"edit": _edit, "mask": _mask, "invert": _invert, "demo": _demo, "eval": _eval,
                   "run": _run}[args.command]
            for line in run(args):
                say(line)
        except KeyboardInterrupt:
            return _interrupted(interrupts.received)
        except Exception as e:
            if interrupts.received is not None:  # the interruption, reworded by a library: say what happened
                return _interrupted(interrupts.received)
            if isinstance(e, (UserError, ValueError, TypeError, OSError, SafetensorError)):
                return _fail(e)
            if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
                return _fail(UserError(f"out of memory ({type(e).__name__}): try a smaller image (--max-pixels), "
                                       "--dtype bf16 or another --device"))
            raise  # a bug: keep the traceback
    return 0


def _interrupted(signum: int | None) -> int:
    print(f"diffedit: interrupted{' (SIGTERM)' if signum == signal.SIGTERM else ''}", file=sys.stderr)
    return 130


class _QuietVAE:
    """--quiet: the VAE's own bar on large pictures (vae.PROGRESS_PIXELS) stays off too, for the command's length."""

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.saved = quiet, vae_module.PROGRESS_PIXELS

    def __enter__(self) -> None:
        if self.quiet:
            vae_module.PROGRESS_PIXELS = float("inf")

    def __exit__(self, *exc: object) -> None:
        vae_module.PROGRESS_PIXELS = self.saved


def _fail(error: BaseException) -> int:
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"diffedit: error: {message}", file=sys.stderr)
    return 2


# ---- commands (generators of the lines to print) ------------------------------------------------------------
def _edit(args: argparse.Namespace):
    _check_outputs(args, images=[(args.out, "RGB"), (args.mask_out, "L"), (args.figure, "RGB")],
                   inputs=[args.image, args.inversion])
    inversion, made_from = (None, {}) if args.inversion is None else load_inversion(args.inversion)
    if inversion is not None:
        for name, given, saved in (("--steps", args.steps, inversion.steps),
                                   ("--strength", args.strength, inversion.strength)):
            if given is not None and given != saved:
                raise UserError(f"{name} {given} disagrees with the inversion file ({saved}); leave it out")
    steps = inversion.steps if inversion is not None else args.steps or 50
    strength = 0.8 if args.strength is None else args.strength
    _check_levels(steps, **{"--mask-strength": args.mask_strength, "--strength": strength})
    image, model = _load_inputs(args)
    if inversion is not None:
        _check_inversion_source(args, inversion, made_from, image, model)
    result = edit_image(model, image, args.source, args.target, seed=args.seed, steps=steps, num_maps=args.num_maps,
                        mask_strength=args.mask_strength, threshold_ratio=args.threshold, guidance=args.guidance,
                        strength=strength, invert_guidance=args.invert_guidance, negative_prompt=args.negative,
                        eta=args.eta, inversion=inversion, paste_background=args.paste_background,
                        diffusers_compat=args.compat, progress=not args.quiet)
    edited, mask = result.edit.images[0], result.mask
    _warn_if_empty(mask, "the output is the input's reconstruction, not an edit")
    yield from _save({args.out: edited, args.mask_out: mask.image_mask[0],
                      args.figure: lambda: _figure(image, mask, edited)})


def _mask(args: argparse.Namespace):
    _check_outputs(args, images=[(args.out, "L"), (args.figure, "RGB")], inputs=[args.image])
    steps = args.steps or 50
    _check_levels(steps, **{"--mask-strength": args.mask_strength})
    image, model = _load_inputs(args)
    mask = generate_mask(model, image, args.source, args.target, num_maps=args.num_maps,
                         encode_strength=args.mask_strength, threshold_ratio=args.threshold, steps=steps,
                         guidance=args.guidance, generator=_generator(args.seed), diffusers_compat=args.compat,
                         progress=not args.quiet)
    covered = mask.latent_mask.mean().item()
    _warn_if_empty(mask, "an edit with it would be the input's reconstruction")
    yield from _save({args.out: mask.image_mask[0], args.figure: lambda: _figure(image, mask)})
    yield f"the mask covers {covered:.0%} of the image"


def _invert(args: argparse.Namespace):
    if args.out.suffix != ".safetensors":
        raise UserError(f"--out {args.out}: an inversion file is written as .safetensors")
    _check_outputs(args, files=[args.out], inputs=[args.image])
    steps, strength = args.steps or 50, 0.8 if args.strength is None else args.strength
    _check_levels(steps, **{"--strength": strength})
    image, model = _load_inputs(args)
    inversion = invert(model, image, args.prompt, strength=strength, steps=steps, guidance=args.guidance,
                       generator=_generator(args.seed), diffusers_compat=args.compat, progress=not args.quiet)
    save_inversion(inversion, args.out, **_fingerprints(image, model))
    yield f"wrote {args.out}"


def _demo(args: argparse.Namespace):
    """A colour edit of a rendered shapes-world scene by the toy model; without its weights, the smoke run."""
    from .toy import WEIGHTS, load_toy_model
    from .toy.world import Background, Obj, Scene, edit_object, render

    files = {name: args.out / f"{name}.png" for name in ("input", "mask", "edit", "figure")}
    _check_outputs(args, images=[(path, "RGB") for path in files.values()])
    try:
        model = load(args.model) if args.model is not None else load_toy_model()
    except FileNotFoundError:
        if args.model is not None:
            raise
        yield from _smoke_demo(args, files)
        return
    # Two objects, so that the mask has something to leave alone; placed by hand, not drawn from a training stream.
    scene = Scene(Background("beige", "flat", angle=0.0, strength=10.0, period=12.0),
                  (Obj("triangle", "yellow", x=18.0, y=20.0, radius=12.0),
                   Obj("square", "blue", x=46.0, y=44.0, radius=10.0)))
    target = edit_object(scene, 1, colour="red")
    source_prompt, target_prompt = scene.caption, target.caption
    picture, truth = render(scene)
    # exactly what `diffedit edit` does with its defaults (the same call), on the picture as it reads input.png
    result = edit_image(model, to_tensor(picture), source_prompt, target_prompt, seed=args.seed,
                        progress=not args.quiet)
    edited, mask = result.edit.images[0], result.mask
    m, folder = toy_evaluate, args.model or WEIGHTS  # m: the benchmark's metric functions
    predicted, pixels = np.asarray(mask.image_mask[0]) > 0, np.asarray(edited)
    colour = m.nearest_colour(m.mean_colour(pixels, truth[1]))
    outside = m.psnr(pixels, picture, ~truth[1])
    big = lambda im: im.resize((4 * im.width, 4 * im.height), Image.NEAREST)  # noqa: E731  (64 px is tiny on screen)
    input_image = Image.fromarray(picture)
    tinted = overlay(input_image, mask.image_mask[0], MASK_TINT)
    figure = lambda: side_by_side([big(input_image), big(tinted), big(edited)])  # noqa: E731
    yield f"toy model {folder}: {source_prompt!r} -> {target_prompt!r} (seed {args.seed})"
    yield from _save({files["input"]: input_image, files["mask"]: mask.image_mask[0], files["edit"]: edited,
                      files["figure"]: figure})
    yield (f"mask: {predicted.mean():.0%} of the picture, IoU {m.mask_iou(predicted, truth[1]):.2f} with the square, "
           f"{(predicted & truth[0]).sum() / truth[0].sum():.0%} of the triangle")
    yield f"the square is now {colour} (mean colour); outside it the edit keeps the input at {outside:.1f} dB PSNR"
    yield "figure: input | mask (magenta) | edit, 4x enlarged; input, mask and edit are at the model's 64x64"
    yield (f"the same edit, bit for bit: diffedit edit --model {folder} "
           f"--image {files['input']} --source {source_prompt!r} --target {target_prompt!r} --seed {args.seed} "
           "--out edit.png")


def _eval(args: argparse.Namespace) -> list[str]:
    """The toy benchmark (diffedit/toy/evaluate.py); its table is the result, printed even with --quiet."""
    _check_outputs(args, images=[(toy_evaluate.check_sheet(args), "RGB")], files=[args.out])
    for line in toy_evaluate.run(args):
        print(line)
    return []


def _run(args: argparse.Namespace):
    """A dataset run (diffedit/run.py): one process, or one rank of torchrun's group."""
    if (args.manifest is None) == (args.pie_bench is None):
        raise UserError("give a manifest (MANIFEST.jsonl) or --pie-bench DIR, one of them")
    if args.resume and args.force:
        raise UserError("--resume continues a run and --force starts it over: give one of them")
    device = _device(args.device)
    settings = EditSettings(steps=args.steps or 50, num_maps=args.num_maps, mask_strength=args.mask_strength,
                            threshold=args.threshold, guidance=args.guidance, strength=args.strength,
                            invert_guidance=args.invert_guidance, negative=args.negative, eta=args.eta,
                            paste_background=args.paste_background)
    options = RunOptions(model=args.model, out=args.out, manifest=args.manifest, pie_bench=args.pie_bench,
                         settings=settings, seed=args.seed, compat=args.compat, device=device,
                         dtype=_dtype(args.dtype, device), batch_size=args.batch_size,
                         max_pixels=args.max_pixels or None, resume=args.resume, force=args.force, quiet=args.quiet,
                         compile=args.compile)
    yield from run_dataset(options)


def _smoke_demo(args: argparse.Namespace, files: dict[str, Path]):
    """Build a TINY random model, save it, load it back, and run the three stages on a drawn picture."""
    from .configs import TINY
    from .text import load_tokenizer, write_tokenizer

    banner = ("SMOKE RUN on a tiny model with RANDOM weights (the toy model's weights are not in "
              "diffedit/toy/weights): it exercises mask -> inversion -> masked denoising end to end, but the edit "
              "is meaningless.")
    print(banner)
    with tempfile.TemporaryDirectory(prefix="diffedit-demo-") as tmp:
        write_tokenizer(Path(tmp) / "tokenizer", DEMO_WORDS)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = StableDiffusion(TINY, load_tokenizer(Path(tmp) / "tokenizer", TINY.text))
        model.save(Path(tmp) / "model")
        model = load(Path(tmp) / "model")
    s = TINY.image_size
    picture = Image.new("RGB", (s, s), (40, 60, 200))  # a red disc on blue
    ImageDraw.Draw(picture).ellipse((s // 4, s // 4, 3 * s // 4, 3 * s // 4), fill=(220, 30, 30))
    image = to_tensor(picture)
    result = edit_image(model, image, "a red circle", "a green square", num_maps=4, steps=10, progress=not args.quiet)
    mask = result.mask
    edited = result.edit.images[0]
    yield from _save({files["input"]: to_pil(image)[0], files["mask"]: mask.image_mask[0],
                      files["edit"]: edited, files["figure"]: lambda: _figure(image, mask, edited)})
    yield banner


# ---- helpers ------------------------------------------------------------------------------------------------
def _check_outputs(args: argparse.Namespace, images: list[tuple[Path | None, str]] = (),
                   files: list[Path | None] = (), inputs: list[Path | None] = ()) -> None:
    """Fail before any work if an output exists (without --force), repeats, is an input, cannot be created, or is
    an image whose format (from its extension) cannot hold the picture (`images`: (path, mode) pairs)."""
    images = [(p, mode) for p, mode in images if p is not None]  # pairs, not a dict: a repeated path stays visible
    given = [p for p, _ in images] + [p for p in files if p is not None]
    if len({p.resolve() for p in given}) != len(given):
        repeated = next(p for i, p in enumerate(given) if p.resolve() in {q.resolve() for q in given[:i]})
        raise UserError(f"two outputs have the same path ({repeated}): one would overwrite the other")
    model = getattr(args, "model", None)
    protected = {p.resolve() for p in inputs if p is not None}
    for path in given:
        if path.resolve() in protected:
            raise UserError(f"{path} is an input of this command: write the output elsewhere")
        if model is not None and Path(model).resolve() in path.resolve().parents:
            raise UserError(f"{path} is inside the model folder {model}: write the output elsewhere")
        if path.is_dir():
            raise UserError(f"{path} is a folder, not a file")
        if (path.exists() or path.is_symlink()) and not args.force:
            raise UserError(f"{path} exists; pass --force to overwrite it")
        parent = next(p for p in path.absolute().parents if p.exists())
        if not parent.is_dir():
            raise UserError(f"cannot write {path}: {parent} is a file, not a folder")
        if not os.access(parent, os.W_OK):
            raise UserError(f"cannot write {path}: {parent} is not writable")
        try:  # a real file: /proc, /sys or read-only mounts pass os.access (as root, always) but refuse one
            tempfile.TemporaryFile(dir=parent).close()
        except OSError as e:
            raise UserError(f"cannot write {path}: {parent} does not take new files ({e.strerror or e})") from None
    for path, mode in images:
        _check_image_format(path, mode)


def _check_image_format(path: Path, mode: str) -> None:
    """The extension names a format that PIL can write a `mode` picture in (tried on a 8x8 picture)."""
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt not in Image.SAVE:
        raise UserError(f"cannot tell the image format of {path} from its extension (use .png, .jpg, ...)")
    try:
        Image.new(mode, (8, 8)).save(io.BytesIO(), format=fmt)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: the {fmt} format cannot hold this picture ({e}); use .png") from None


def _check_levels(steps: int, **strengths: float) -> None:
    for flag, value in strengths.items():
        if int(steps * value) < 1:
            raise UserError(f"{flag} {value} of {steps} steps leaves no step: int(steps * strength) must be >= 1")


def _device(name: str) -> torch.device:
    """--device as a torch device this torch can run, or one clear line."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: diffedit runs on cpu or cuda, not {device.type}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: this torch has no CUDA device (CPU-only build or no GPU)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    return device


def _dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype, after trying a convolution in it on the device: refused in one line where it cannot run."""
    dtype = DTYPES[name]
    try:
        x = torch.zeros(1, 1, 4, 4, dtype=dtype, device=device)
        torch.nn.functional.conv2d(x, torch.zeros(1, 1, 3, 3, dtype=dtype, device=device))
    except (RuntimeError, TypeError) as e:
        raise UserError(f"--dtype {name} does not run on {device}: {' '.join(str(e).split())[:120]}") from None
    return dtype


def _load_inputs(args: argparse.Namespace) -> tuple[torch.Tensor, StableDiffusion]:
    device = _device(args.device)
    dtype = _dtype(args.dtype, device)
    picture = read_image(args.image, max_pixels=args.max_pixels or None)
    model = load(args.model, device=device, dtype=dtype, compile=args.compile)
    warning = size_warning(picture.width, picture.height, model.config.image_size,
                           vae_channels=model.config.vae.channels[0], bytes_per_value=model.dtype.itemsize)
    if warning is not None:
        warnings.warn(warning, stacklevel=2)
    return to_tensor(picture, model.config.vae.downsample_factor), model


def _generator(seed: int) -> torch.Generator:
    # one fresh generator per stage (edit_image does the same): each stage's draws depend on the seed only
    return torch.Generator().manual_seed(seed)


def _fingerprints(image: torch.Tensor, model: StableDiffusion) -> dict[str, str]:
    """What an inversion file records of its making, for `edit --inversion` to check: the picture as the model
    sees it (after any resizing) and the model (its config and provenance, as in model.json)."""
    record = json.dumps({"config": dataclasses.asdict(model.config), "provenance": model.provenance},
                        sort_keys=True, default=str)
    return {"image_sha256": hashlib.sha256(image.cpu().numpy().tobytes()).hexdigest(),
            "model_sha256": hashlib.sha256(record.encode()).hexdigest()}


def _check_inversion_source(args: argparse.Namespace, inversion: Inversion, made_from: dict[str, str],
                            image: torch.Tensor, model: StableDiffusion) -> None:
    latent_size = tuple(s // model.config.vae.downsample_factor for s in image.shape[-2:])
    if tuple(inversion.z0.shape[-2:]) != latent_size or len(inversion.z0) != 1:
        raise UserError(f"{args.inversion} was made from another image size than {args.image}'s")
    if args.ignore_inversion_source:
        return
    now = {**_fingerprints(image, model), "compat": str(args.compat)}
    was = {**made_from, "compat": str(inversion.diffusers_compat)}
    what = {"image_sha256": f"another image than {args.image}", "model_sha256": f"another model than {args.model}",
            "compat": "--compat" if inversion.diffusers_compat else "the default mode (no --compat)"}
    for key, description in what.items():
        if key not in was:
            raise UserError(f"{args.inversion} does not record its {key.split('_')[0]}; pass "
                            "--ignore-inversion-source to use it anyway")
        if was[key] != now[key]:
            raise UserError(f"{args.inversion} was made from {description}; pass --ignore-inversion-source to use "
                            "it anyway")


def _warn_if_empty(mask: MaskResult, consequence: str) -> None:
    if not mask.latent_mask.any():
        warnings.warn(f"the mask is empty (the prompts' noise estimates nowhere differ beyond --threshold): "
                      f"{consequence}")


def _figure(image: torch.Tensor, mask: MaskResult, edited: Image.Image | None = None) -> Image.Image:
    picture = to_pil(image)[0]
    panels = [picture, overlay(picture, mask.image_mask[0])] + ([edited] if edited is not None else [])
    return side_by_side(panels)


def _save(things: dict[Path | None, Any]):
    """Write each image atomically (a callable is called first: figures are made only when asked for)."""
    for path, thing in things.items():
        if path is None:
            continue
        picture = thing() if callable(thing) else thing
        atomic_write(path, lambda tmp: picture.save(tmp, format=Image.registered_extensions()[path.suffix.lower()]))
        yield f"wrote {path}"


if __name__ == "__main__":
    sys.exit(main())
