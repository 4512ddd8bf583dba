"""The `diffedit` command: `edit`, `mask`, `invert` and `demo`.

    diffedit edit --model models/sd15 --image in.png --source "a bowl of fruits" --target "a bowl of pears" \\
        --out out.png --mask-out mask.png --figure figure.png
    diffedit mask --model DIR --image in.png --source ... --target ... --out mask.png
    diffedit invert --model DIR --image in.png --out in.inversion.safetensors   # then: edit --inversion FILE
    diffedit demo --out DIR        # a colour edit by the shipped toy model, offline (input, mask, edit, figure)
    diffedit eval --out results.json   # the toy benchmark: DiffEdit, diffusers' pipeline and baselines, measured

User errors (missing files, bad values, an output that exists without --force) print one line on stderr
and exit with status 2. Outputs are checked before any work starts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors import SafetensorError

from .edit import Inversion, MaskResult, edit, generate_mask, invert
from .image import overlay, side_by_side, to_pil, to_tensor
from .model import StableDiffusion, load
from .toy import evaluate as toy_evaluate

MASK_TINT = (255, 0, 255)  # magenta: visible on every colour of the shapes world, red included
DEMO_WORDS = ["a", "photo", "of", "red", "blue", "green", "circle", "square", "on", "background"]


class UserError(Exception):
    """A mistake in the command line or its files: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffedit", description="DiffEdit (Couairon et al. 2022) on Stable Diffusion.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(p: argparse.ArgumentParser, out_help: str) -> None:
        p.add_argument("--out", required=True, type=Path, help=out_help)
        p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
        p.add_argument("--steps", type=int, default=None, help="DDIM steps of the full schedule (default 50)")
        p.add_argument("--compat", action="store_true", help="reproduce diffusers' pipeline, defects included")
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
        p.add_argument("--force", action="store_true", help="overwrite existing outputs")
        p.add_argument("--quiet", action="store_true", help="no progress bars, no messages")

    def inputs(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, type=Path, help="a model folder (python -m weights_convert)")
        p.add_argument("--image", required=True, type=Path, help="the input image")

    def mask_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--source", required=True, help="prompt R describing the input image")
        p.add_argument("--target", required=True, help="prompt Q describing the wanted edit")
        p.add_argument("--mask-strength", type=float, default=0.5, help="noise level of the mask maps (0.5)")
        p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance of mask and edit (7.5)")
        p.add_argument("--threshold", type=float, default=3.0, help="mask threshold ratio rho (3.0)")
        p.add_argument("--num-maps", type=int, default=10, help="noise samples averaged into the mask (10)")

    p = commands.add_parser("edit", help="mask, invert and edit an image")
    inputs(p)
    mask_options(p)
    common(p, "the edited image")
    p.add_argument("--strength", type=float, default=None, help="encoding ratio r of the inversion (0.8)")
    p.add_argument("--invert-guidance", type=float, default=1.0, help="guidance of the inversion (1: unconditional)")
    p.add_argument("--negative", default=None, help="negative prompt of the edit (default: the source prompt)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta of the edit (0: deterministic)")
    p.add_argument("--paste-background", action="store_true",
                   help="outside the mask, the input's own pixels instead of the decoder's (not in the paper)")
    p.add_argument("--inversion", type=Path, default=None, help="an inversion file written by `diffedit invert`")
    p.add_argument("--mask-out", type=Path, default=None, help="also write the mask (image resolution)")
    p.add_argument("--figure", type=Path, default=None, help="also write input | mask overlay | edit")

    p = commands.add_parser("mask", help="write the DiffEdit mask of an image")
    inputs(p)
    mask_options(p)
    common(p, "the mask image (white = edit)")
    p.add_argument("--figure", type=Path, default=None, help="also write input | mask overlay")

    p = commands.add_parser("invert", help="DDIM-encode an image to a file that `edit --inversion` reads")
    inputs(p)
    common(p, "the inversion file (.safetensors)")
    p.add_argument("--prompt", default="", help="prompt of the inversion (default: unconditional)")
    p.add_argument("--strength", type=float, default=None, help="encoding ratio r (0.8)")
    p.add_argument("--guidance", type=float, default=1.0, help="guidance of the inversion (1: none)")

    p = commands.add_parser("demo", help="edit a shapes-world picture with the shipped toy model (offline, ~10 s)")
    p.add_argument("--out", type=Path, default=Path("diffedit-demo"), help="output folder (diffedit-demo)")
    p.add_argument("--model", type=Path, default=None, help="a toy model folder (default: the shipped weights)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--quiet", action="store_true", help="no progress bars, no messages")

    p = commands.add_parser("eval", help="the toy benchmark: DiffEdit and baselines on held-out shapes-world edits")
    toy_evaluate.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    except UserError as e:
        return _fail(e)
    say = (lambda *a: None) if args.quiet else print
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *rest, **kw: print(f"diffedit: warning: {message}", file=sys.stderr)
        try:
            run = {"edit": _edit, "mask": _mask, "invert": _invert, "demo": _demo, "eval": _eval}[args.command]
            for line in run(args):
                say(line)
        except (UserError, ValueError, TypeError, OSError, SafetensorError) as e:
            return _fail(e)
        except KeyboardInterrupt:
            print("diffedit: interrupted", file=sys.stderr)
            return 130
    return 0


def _fail(error: BaseException) -> int:
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"diffedit: error: {message}", file=sys.stderr)
    return 2


# ---- commands (generators of the lines to print) ------------------------------------------------------------
def _edit(args: argparse.Namespace):
    _check_outputs(args, images=[args.out, args.mask_out, args.figure])
    image, model, gen = _load_inputs(args)
    progress, compat = not args.quiet, args.compat
    inversion = None
    if args.inversion is not None:
        inversion = Inversion.load(args.inversion)
        for name, given, saved in (("--steps", args.steps, inversion.steps),
                                   ("--strength", args.strength, inversion.strength)):
            if given is not None and given != saved:
                raise UserError(f"{name} {given} disagrees with the inversion file ({saved}); leave it out")
        latent_size = tuple(s // model.config.vae.downsample_factor for s in image.shape[-2:])
        if tuple(inversion.z0.shape[-2:]) != latent_size or len(inversion.z0) != 1:
            raise UserError(f"{args.inversion} was made from another image size than {args.image}'s")
        z0 = inversion.z0
    elif not compat:
        z0 = model.encode_image(image)  # §3.1: encoded once (posterior mean), shared by mask and inversion
    else:
        z0 = None  # diffusers encodes the image anew in each stage, with a posterior sample
    given = dict(image=image) if z0 is None else dict(latents=z0)
    steps = inversion.steps if inversion is not None else args.steps or 50
    mask = generate_mask(model, source_prompt=args.source, target_prompt=args.target, num_maps=args.num_maps,
                         encode_strength=args.mask_strength, threshold_ratio=args.threshold, steps=steps,
                         guidance=args.guidance, generator=gen(), diffusers_compat=compat, progress=progress, **given)
    if inversion is None:
        # compat: the image's posterior from the mask stage, sampled anew as diffusers does (no second encoding)
        start = dict(posterior=mask.posterior) if mask.posterior is not None else given
        inversion = invert(model, strength=0.8 if args.strength is None else args.strength, steps=steps,
                           guidance=args.invert_guidance, generator=gen(), diffusers_compat=compat, progress=progress,
                           **start)
    negative = args.source if args.negative is None else args.negative
    result = edit(model, inversion, mask, args.target, negative_prompt=negative, guidance=args.guidance, eta=args.eta,
                  generator=gen(), background_image=image if args.paste_background else None,
                  diffusers_compat=compat, progress=progress)
    edited = result.images[0]
    yield from _save({args.out: edited, args.mask_out: mask.image_mask[0],
                      args.figure: lambda: _figure(image, mask, edited)})


def _mask(args: argparse.Namespace):
    _check_outputs(args, images=[args.out, args.figure])
    image, model, gen = _load_inputs(args)
    mask = generate_mask(model, image, args.source, args.target, num_maps=args.num_maps,
                         encode_strength=args.mask_strength, threshold_ratio=args.threshold, steps=args.steps or 50,
                         guidance=args.guidance, generator=gen(), diffusers_compat=args.compat, progress=not args.quiet)
    covered = mask.latent_mask.mean().item()
    yield from _save({args.out: mask.image_mask[0], args.figure: lambda: _figure(image, mask)})
    yield f"the mask covers {covered:.0%} of the image"


def _invert(args: argparse.Namespace):
    _check_outputs(args, files=[args.out])
    image, model, gen = _load_inputs(args)
    inversion = invert(model, image, args.prompt, strength=0.8 if args.strength is None else args.strength,
                       steps=args.steps or 50, guidance=args.guidance, generator=gen(), diffusers_compat=args.compat,
                       progress=not args.quiet)
    yield from _save({args.out: inversion})


def _demo(args: argparse.Namespace):
    """A colour edit of a rendered shapes-world scene by the toy model; without its weights, the smoke run."""
    from .toy import WEIGHTS, load_toy_model
    from .toy.world import Background, Obj, Scene, edit_object, render

    files = {name: args.out / f"{name}.png" for name in ("input", "mask", "edit", "figure")}
    _check_outputs(args, images=list(files.values()))
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
    image, progress = to_tensor(picture), not args.quiet  # as `diffedit edit` reads input.png: same bits
    # exactly what `diffedit edit` does with its defaults: z0 encoded once, a fresh seeded generator per stage
    gen = lambda: torch.Generator().manual_seed(args.seed)  # noqa: E731
    z0 = model.encode_image(image)
    mask = generate_mask(model, source_prompt=source_prompt, target_prompt=target_prompt, latents=z0, generator=gen(),
                         progress=progress)
    inversion = invert(model, latents=z0, generator=gen(), progress=progress)
    result = edit(model, inversion, mask, target_prompt, negative_prompt=source_prompt, generator=gen(),
                  progress=progress)
    edited = result.images[0]
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
    _check_outputs(args, images=[toy_evaluate.sheet_path(args)], files=[args.out])
    for line in toy_evaluate.run(args):
        print(line)
    return []


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
    image, progress = to_tensor(picture), not args.quiet
    z0 = model.encode_image(image)
    mask = generate_mask(model, source_prompt="a red circle", target_prompt="a green square", latents=z0, num_maps=4,
                         steps=10, generator=torch.Generator().manual_seed(0), progress=progress)
    inversion = invert(model, latents=z0, steps=10, progress=progress)
    result = edit(model, inversion, mask, "a green square", negative_prompt="a red circle",
                  generator=torch.Generator().manual_seed(0), progress=progress)
    edited = result.images[0]
    yield from _save({files["input"]: to_pil(image)[0], files["mask"]: mask.image_mask[0],
                      files["edit"]: edited, files["figure"]: lambda: _figure(image, mask, edited)})
    yield banner


# ---- helpers ------------------------------------------------------------------------------------------------
def _check_outputs(args: argparse.Namespace, images: list[Path | None] = (), files: list[Path | None] = ()) -> None:
    """Fail before any work if an output exists (without --force), repeats, or is an image of unknown type."""
    images, files = [p for p in images if p is not None], [p for p in files if p is not None]
    given = images + files
    if len({p.resolve() for p in given}) != len(given):
        raise UserError("two outputs have the same path")
    for path in given:
        if path.is_dir():
            raise UserError(f"{path} is a folder, not a file")
        if path.exists() and not args.force:
            raise UserError(f"{path} exists; pass --force to overwrite it")
    for path in images:
        if Image.registered_extensions().get(path.suffix.lower()) not in Image.SAVE:
            raise UserError(f"cannot tell the image format of {path} from its extension (use .png, .jpg, ...)")


def _load_inputs(args: argparse.Namespace):
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if not args.image.is_file():
        raise UserError(f"image {args.image} does not exist")
    with Image.open(args.image) as im:
        picture = im.convert("RGB")
    model = load(args.model, device=device)
    image = to_tensor(picture, model.config.vae.downsample_factor)
    # one fresh generator per stage: each stage's draws depend on the seed only (CPU: same bits anywhere)
    return image, model, lambda: torch.Generator().manual_seed(args.seed)


def _figure(image: torch.Tensor, mask: MaskResult, edited: Image.Image | None = None) -> Image.Image:
    picture = to_pil(image)[0]
    panels = [picture, overlay(picture, mask.image_mask[0])] + ([edited] if edited is not None else [])
    return side_by_side(panels)


def _save(things: dict[Path | None, Any]):
    """Write each image / inversion (a callable is called first: figures are made only when asked for)."""
    for path, thing in things.items():
        if path is None:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        (thing() if callable(thing) else thing).save(path)
        yield f"wrote {path}"


if __name__ == "__main__":
    sys.exit(main())
