"""The toy benchmark: DiffEdit and its baselines over the held-out edits of the shapes world, measured on pixels.

    diffedit eval --out results.json                      # or: python -m diffedit.toy.evaluate --out ...
    diffedit eval --model /path/to/toy/folder --count 8 --methods diffedit sdedit

Every edit of `world.heldout_edit_pairs` (colour changes and shape changes, alternating) is run by each method
with the source caption as R and the target caption as Q, the DiffEdit defaults (mask n = 10 at strength 0.5,
rho = 3, guidance 7.5; inversion r = 0.8, unconditional; edit negative prompt = the source caption, DESIGN.md's
recipe; `--negative empty` and `--guidance` change the edit, `--threshold` the mask; in the default mode the
mask does not depend on the guidance, as both noise estimates share the unconditional one) and compared with
the ground truth that the world renders:

    diffedit          ours, the default (paper-faithful) mode
    diffedit_compat   ours with diffusers_compat=True (diffusers' numbers, its defects included)
    sdedit            SDEdit (Meng et al. 2022): z0 noised to r with one random draw, decoded with Q, no mask
    encode_decode     the paper's "encode-decode without mask" (Fig. 6): the DDIM encoding to r, decoded with Q, no mask
    reconstruction    the null edit: the VAE reconstruction of the input (the ceiling of background PSNR)
    diffusers         diffusers' StableDiffusionDiffEditPipeline on the exported weights, same settings

Metrics (plain functions below, usable from notebooks): the IoU of the method's mask (image resolution) with
the ground-truth edit region `EditPair.mask`; the PSNR outside that region against the input and against the
VAE reconstruction (what a perfect latent-space edit can reach); edit success from the pixels (`edit_success`);
seconds per edit (mask + inversion + edit + VAE, one image at a time, on this machine).
The "diffusers" row should equal "diffedit_compat" up to float rounding: a check of the compat mode at scale.
Below the table, the default mode against each other method, edit by edit (`compare`: the paired mean difference
of background PSNR and its standard error; the spread between edits is far larger than the gaps between methods).
The JSON has every edit's numbers; a contact sheet (`--sheet`, default beside the JSON as .png) shows the first
`--sheet-count` edits as pictures: input | ground-truth target | each method's mask and edit.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from diffedit._args import integer, nonempty_path, number
from diffedit.chain import edit_image
from diffedit.edit import Inversion, edit, invert, noise_inversion
from diffedit.files import atomic_write, atomic_write_text
from diffedit.image import overlay, to_uint8
from diffedit.model import StableDiffusion
# the metrics (diffedit/toy/metrics.py), re-exported: `evaluate.psnr`, ...
from diffedit.toy.metrics import classify_shape, colour_pixels, edit_success, mask_iou, mean_colour  # noqa: F401
from diffedit.toy.metrics import nearest_colour, psnr  # noqa: F401
from diffedit.toy.world import EditPair, heldout_edit_pairs, render, to_tensor

METHODS = ("diffedit", "diffedit_compat", "sdedit", "encode_decode", "reconstruction", "diffusers")


# ---- the methods: (model, pair's input, R, Q) -> edited uint8 image and mask (image resolution) or None ----------
@dataclasses.dataclass(frozen=True)
class Settings:
    """One benchmark run's settings; the defaults are DiffEdit's (DESIGN.md) and the same for every method."""

    steps: int = 50
    num_maps: int = 10
    mask_strength: float = 0.5
    threshold: float = 3.0
    guidance: float = 7.5
    strength: float = 0.8
    negative: str = "source"  # the edit's negative prompt: "source" (R, DESIGN.md's recipe) or "empty" ("")
    paste_background: bool = False  # our DiffEdit rows paste the input's pixels outside the mask (edit's option)
    seed: int = 0

    def negative_prompt(self, source: str) -> str:
        if self.negative not in ("source", "empty"):
            raise ValueError(f"negative must be 'source' or 'empty', got {self.negative!r}")
        return source if self.negative == "source" else ""


Output = tuple[np.ndarray, np.ndarray | None]  # the edited uint8 (H, W, 3) image, the mask (H, W) bool or None
Method = Callable[[StableDiffusion, torch.Tensor, str, str, Settings, int], Output]


def run_diffedit(model, image, source, target, s: Settings, seed: int, compat: bool = False):
    """DiffEdit as the CLI runs it (edit_image: z0 encoded once, compat: diffusers' posterior samples)."""
    result = edit_image(model, image, source, target, seed=seed, steps=s.steps, num_maps=s.num_maps,
                        mask_strength=s.mask_strength, threshold_ratio=s.threshold, guidance=s.guidance,
                        strength=s.strength, negative_prompt=s.negative_prompt(source),
                        paste_background=s.paste_background, output_type="pt", diffusers_compat=compat, progress=False)
    return to_uint8(result.edit.images)[0], np.asarray(result.mask.image_mask[0]) > 0


def run_sdedit(model, image, source, target, s: Settings, seed: int):
    """SDEdit: z0 noised to r with one random draw (`noise_inversion`), decoded with Q, no mask (all ones)."""
    z0 = model.encode_image(image)
    generator = torch.Generator().manual_seed(seed)
    noised = noise_inversion(model, z0, strength=s.strength, steps=s.steps, generator=generator)
    return _unmasked_edit(model, noised, source, target, s, seed), None


def run_encode_decode(model, image, source, target, s: Settings, seed: int):
    """Encode-decode without mask (paper Fig. 6): the DDIM encoding to r as DiffEdit's, decoded with Q, no mask."""
    inversion = invert(model, latents=model.encode_image(image), strength=s.strength, steps=s.steps, progress=False)
    return _unmasked_edit(model, inversion, source, target, s, seed), None


def _unmasked_edit(model: StableDiffusion, inversion: Inversion, source: str, target: str, s: Settings,
                   seed: int) -> np.ndarray:
    ones = torch.ones(1, 1, *inversion.z0.shape[-2:])  # the blend keeps nothing of the input's levels
    result = edit(model, inversion, ones, target, negative_prompt=s.negative_prompt(source), guidance=s.guidance,
                  generator=torch.Generator().manual_seed(seed), output_type="pt", progress=False)
    return to_uint8(result.images)[0]


def run_reconstruction(model, image, source, target, s: Settings, seed: int):
    """The null edit: the VAE reconstruction of the input (no diffusion at all)."""
    return _reconstruction(model, image), None


def _reconstruction(model: StableDiffusion, image: torch.Tensor) -> np.ndarray:
    return to_uint8(model.decode_latents(model.encode_image(image)))[0]


@contextlib.contextmanager
def _libraries_quiet() -> Iterator[None]:
    """transformers' and diffusers' loggers at errors only and their progress bars off; restored on exit."""
    from transformers.utils import logging as transformers_logging

    loggers = [transformers_logging]
    try:
        from diffusers.utils import logging as diffusers_logging

        loggers.append(diffusers_logging)
    except ImportError:
        pass
    saved = [(log, log.get_verbosity(), log.is_progress_bar_enabled()) for log in loggers]
    for log in loggers:
        log.set_verbosity_error()
        log.disable_progress_bar()
    try:
        yield
    finally:
        for log, verbosity, bars in saved:
            log.set_verbosity(verbosity)
            if bars:
                log.enable_progress_bar()


class DiffusersRunner:
    """diffusers' StableDiffusionDiffEditPipeline on our weights, exported with `python -m weights_convert
    FOLDER OUT --to diffusers` and loaded with `from_pretrained`. diffusers is imported here only."""

    def __init__(self, model_dir: Path, workdir: Path) -> None:
        out = workdir / "diffusers"
        # no loading bars, no deprecation notice (the pipeline is frozen since 0.33), no transformers notes about
        # image processors the pipeline never uses: the table is what this command prints
        with _libraries_quiet():
            # first: without diffusers (ImportError: the row is skipped), nothing is exported
            from diffusers import DDIMInverseScheduler, StableDiffusionDiffEditPipeline

            subprocess.run([sys.executable, "-m", "weights_convert", str(model_dir), str(out), "--to", "diffusers",
                            "--dtype", "fp32", "--quiet"], check=True)
            self.pipe = StableDiffusionDiffEditPipeline.from_pretrained(
                out, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                inverse_scheduler=DDIMInverseScheduler.from_pretrained(out, subfolder="scheduler"),
            )
        self.pipe.set_progress_bar_config(disable=True)

    def __call__(self, model, image, source, target, s: Settings, seed: int):
        pipe, gen = self.pipe, lambda: torch.Generator().manual_seed(seed)  # noqa: E731
        picture = Image.fromarray(to_uint8(image)[0])
        mask = pipe.generate_mask(image=picture, source_prompt=source, target_prompt=target,
                                  num_maps_per_mask=s.num_maps, mask_encode_strength=s.mask_strength,
                                  mask_thresholding_ratio=s.threshold, num_inference_steps=s.steps,
                                  guidance_scale=s.guidance, generator=gen(), output_type="np")
        # the same inversion as ours: unconditional (prompt "", guidance 1), not diffusers' default of 7.5
        latents = pipe.invert(prompt="", image=picture, num_inference_steps=s.steps, inpaint_strength=s.strength,
                              guidance_scale=1.0, generator=gen()).latents
        out = pipe(prompt=target, mask_image=torch.from_numpy(mask).float()[:, None], image_latents=latents,
                   inpaint_strength=s.strength, num_inference_steps=s.steps, guidance_scale=s.guidance,
                   negative_prompt=s.negative_prompt(source), generator=gen(), output_type="np").images
        edited = (np.clip(out[0], 0, 1) * 255).round().astype(np.uint8)
        factor = image.shape[-1] // mask.shape[-1]
        return edited, np.kron(mask[0] > 0.5, np.ones((factor, factor), bool))


# ---- the benchmark ------------------------------------------------------------------------------------------
def evaluate(
    model: StableDiffusion, pairs: Sequence[EditPair], methods: Sequence[str] = METHODS,
    settings: Settings = Settings(), model_dir: str | Path | None = None, progress: bool = True,
    say: Callable[[str], None] = print, on_edit: Callable[[int, EditPair, dict[str, Output]], None] | None = None,
) -> dict[str, Any]:
    """Run `methods` on every pair; per-edit records, per-method summaries and the paired comparisons of the
    default mode with the other methods (`compare`) as a JSON-ready dict.

    Edit i uses the seed `settings.seed + i` for every stage. "diffusers" needs the model's folder (`model_dir`)
    and diffusers installed; without them it is skipped with a note. `on_edit(i, pair, outputs)` sees each
    edit's pictures as they are made: {method: (edited uint8 image, mask at image resolution or None)}.
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    runners: dict[str, Method] = {
        "diffedit": run_diffedit,
        "diffedit_compat": lambda *a: run_diffedit(*a, compat=True),
        "sdedit": run_sdedit,
        "encode_decode": run_encode_decode,
        "reconstruction": run_reconstruction,
    }
    notes: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="diffedit-eval-") as tmp:
        if "diffusers" in methods:
            try:
                if model_dir is None:
                    raise RuntimeError("needs the model's folder (--model, or the shipped toy weights)")
                runners["diffusers"] = DiffusersRunner(Path(model_dir), Path(tmp))
            except ImportError:
                notes["diffusers"] = "skipped: diffusers is not installed"
            except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
                notes["diffusers"] = f"skipped: {' '.join(str(e).split())}"
        for name, note in notes.items():  # on stderr, even with --quiet: a method the user asked for is missing
            print(f"{name}: {note}", file=sys.stderr)
        records: dict[str, list[dict[str, Any]]] = {m: [] for m in methods if m in runners}
        for i, pair in enumerate(pairs):
            source_image, _ = render(pair.source)
            image = to_tensor(source_image)[None].to(model.device, model.dtype)
            recon = _reconstruction(model, image)
            background = ~pair.mask
            outputs: dict[str, Output] = {}
            for name in records:
                start = time.perf_counter()
                edited, mask = runners[name](model, image, pair.source.caption, pair.target.caption, settings,
                                             settings.seed + i)
                seconds = time.perf_counter() - start
                outputs[name] = (edited, mask)
                records[name].append(dict(
                    index=i, kind=pair.kind, source=pair.source.caption, target=pair.target.caption,
                    mask_iou=None if mask is None else mask_iou(mask, pair.mask),
                    mask_coverage=None if mask is None else float(mask.mean()),
                    psnr_background_input=psnr(edited, source_image, background),
                    psnr_background_reconstruction=psnr(edited, recon, background),
                    success=edit_success(pair, edited), seconds=seconds,
                ))
            if on_edit is not None:
                on_edit(i, pair, outputs)
            if progress:
                say(f"[{i + 1}/{len(pairs)}] {pair.kind}: {pair.source.caption!r} -> {pair.target.caption!r}  "
                    + "  ".join(f"{m} {'ok' if r[-1]['success'] else 'no'}" for m, r in records.items()))
    summary = {name: summarise(rows) for name, rows in records.items()}
    comparisons = {f"diffedit - {name}": compare(records["diffedit"], rows)
                   for name, rows in records.items() if name != "diffedit" and "diffedit" in records}
    return dict(
        settings=dataclasses.asdict(settings), count=len(pairs), model=str(model_dir) if model_dir else None,
        provenance=model.provenance, device=str(model.device), torch_threads=torch.get_num_threads(),
        machine=platform.processor() or platform.machine(), notes=notes, summary=summary, comparisons=comparisons,
        edits=records,
    )


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means over the edits of one method (mask IoU None for methods without a mask); success overall and by kind."""
    def mean(key: str, subset: Sequence[dict[str, Any]] = rows) -> float | None:
        values = [r[key] for r in subset if r[key] is not None]
        return float(np.mean(values)) if values else None

    out = {k: mean(k) for k in ("mask_iou", "mask_coverage", "psnr_background_input",
                                "psnr_background_reconstruction", "success", "seconds")}
    for kind in ("colour", "shape"):
        subset = [r for r in rows if r["kind"] == kind]
        out[f"success_{kind}"] = mean("success", subset) if subset else None
    return out


def compare(rows: Sequence[dict[str, Any]], others: Sequence[dict[str, Any]],
            key: str = "psnr_background_input") -> dict[str, Any]:
    """The paired difference rows - others of `key` over the same edits: its mean, the standard error of that
    mean (sample std / sqrt(n); ~2 of them either side is a 95% interval), in how many edits `rows` is higher,
    and n. Two methods of nearly equal means can only be told apart this way: the spread between edits
    (several dB of PSNR) is much larger than the difference. Edits where either value is infinite are left out."""
    pairs = [(a[key], b[key]) for a, b in zip(rows, others, strict=True)
             if a[key] is not None and b[key] is not None and math.isfinite(a[key]) and math.isfinite(b[key])]
    d = np.array([a - b for a, b in pairs], np.float64)
    return dict(key=key, count=len(d), mean=float(d.mean()) if len(d) else None,
                standard_error=float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else None,
                higher=int((d > 0).sum()))


def format_comparisons(results: dict[str, Any]) -> str:
    """One line per comparison of `evaluate`'s results."""
    lines = []
    for name, c in results.get("comparisons", {}).items():
        if c["mean"] is None:
            continue
        se = "" if c["standard_error"] is None else f" +- {c['standard_error']:.2f}"
        lines.append(f"{name}, {c['key']}: {c['mean']:+.2f}{se} dB (paired mean +- standard error; "
                     f"{name.split(' - ')[0]} higher in {c['higher']} of {c['count']} edits)")
    return "\n".join(lines)


def contact_sheet(rows: Sequence[tuple[EditPair, dict[str, Output]]], scale: int = 2) -> Image.Image:
    """The edits as pictures, one row per edit: input | ground-truth target | for each method its mask over the
    input (methods with a mask) and its edit; a header names the columns. Images enlarged `scale` x (nearest)."""
    if not rows:
        raise ValueError("contact_sheet needs at least one edit")
    methods = list(rows[0][1])
    titles = ["input", "target"] + [t for m in methods for t in ((f"{m} mask", m) if rows[0][1][m][1] is not None
                                                                  else (m,))]
    size, gap, head = rows[0][1][methods[0]][0].shape[0] * scale, 4, 14
    sheet = Image.new("RGB", (len(titles) * (size + gap) - gap, head + len(rows) * (size + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for j, title in enumerate(titles):
        draw.text((j * (size + gap) + 2, 1), title[: size // 6], fill=(0, 0, 0))  # the default font: ~6 px a letter
    for i, (pair, outputs) in enumerate(rows):
        source = Image.fromarray(render(pair.source)[0])
        panels = [source, Image.fromarray(render(pair.target)[0])]
        for m in methods:
            edited, mask = outputs[m]
            if mask is not None:
                panels.append(overlay(source, Image.fromarray(mask.astype(np.uint8) * 255), (255, 0, 255)))
            panels.append(Image.fromarray(edited))
        for j, panel in enumerate(panels):
            sheet.paste(panel.resize((size, size), Image.NEAREST), (j * (size + gap), head + i * (size + gap)))
    return sheet


def format_table(results: dict[str, Any]) -> str:
    """The summary as a plain-text table (n/a where a method has no mask)."""
    head = ["method", "mask IoU", "bg PSNR vs input", "bg PSNR vs VAE", "success", "colour", "shape", "s/edit"]
    rows = [head]
    for name, s in results["summary"].items():
        def f(key: str, fmt: str) -> str:
            v = s[key]
            return "n/a" if v is None else ("inf" if v == math.inf else format(v, fmt))
        rows.append([name, f("mask_iou", ".3f"), f("psnr_background_input", ".2f"),
                     f("psnr_background_reconstruction", ".2f"), f("success", ".0%"), f("success_colour", ".0%"),
                     f("success_shape", ".0%"), f("seconds", ".2f")])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


# ---- command line (also `diffedit eval`) --------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=nonempty_path, default=Path("results.json"), help="the JSON results (results.json)")
    p.add_argument("--model", type=nonempty_path, default=None,
                   help="a toy model folder (default: the shipped weights)")
    p.add_argument("--count", type=integer(1), default=32, help="held-out edits, colour and shape alternating (32)")
    p.add_argument("--max-objects", type=integer(1), default=3, help="objects per scene, at most (3)")
    p.add_argument("--steps", type=integer(1), default=50, help="DDIM steps (50)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD",
                   help=f"any of {', '.join(METHODS)} (all)")
    p.add_argument("--num-maps", type=integer(1), default=10, help="noise samples of the mask (10)")
    p.add_argument("--guidance", type=number(1), default=7.5, help="guidance of mask and edit (7.5)")
    p.add_argument("--threshold", type=number(0, open_low=True), default=3.0, help="mask threshold ratio rho (3.0)")
    p.add_argument("--negative", choices=("source", "empty"), default="source",
                   help="negative prompt of the edit: the source caption (DESIGN.md's recipe) or empty (source)")
    p.add_argument("--paste-background", action="store_true",
                   help="the diffedit and diffedit_compat rows (no other) paste the input outside the mask")
    p.add_argument("--seed", type=integer(0, 2**63 - 2**20), default=0,
                   help="edit i uses seed + i (0; room left for 2**20 edits under torch's int64 seeds)")
    p.add_argument("--sheet", type=nonempty_path, default=None,
                   help="the edits as pictures (input | target | each method's mask and edit); default: --out "
                        "with .png")
    p.add_argument("--sheet-count", type=integer(0), default=16,
                   help="edits on the sheet, the first ones (16; 0: none)")
    p.add_argument("--force", action="store_true", help="overwrite --out and --sheet")
    p.add_argument("--quiet", action="store_true", help="print the table only")


def sheet_path(args: argparse.Namespace) -> Path | None:
    """Where the contact sheet goes: --sheet, else --out with .png; None with --sheet-count 0."""
    if args.sheet_count == 0:
        return None
    return args.sheet if args.sheet is not None else args.out.with_suffix(".png")


def check_sheet(args: argparse.Namespace) -> Path | None:
    """`sheet_path`, refused where it is --out itself (e.g. --out r.png with the default sheet)."""
    sheet = sheet_path(args)
    if sheet is not None and sheet.resolve() == args.out.resolve():
        why = "--sheet" if args.sheet is not None else "the contact sheet (by default --out with .png)"
        raise ValueError(f"--out {args.out} is also {why}: give --out a .json name or --sheet another path")
    return sheet


def _finite(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (JSON has no Infinity or NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def run(args: argparse.Namespace):
    """`diffedit eval`: yields the lines to print (the table last) and writes the JSON."""
    from diffedit.model import load
    from diffedit.toy import WEIGHTS, load_toy_model

    sheet = check_sheet(args)
    for path in [args.out] + ([sheet] if sheet is not None else []):
        if path.exists() and not args.force:
            raise ValueError(f"{path} exists; pass --force to overwrite it")
    model = load(args.model) if args.model is not None else load_toy_model()
    folder = args.model if args.model is not None else WEIGHTS
    settings = Settings(steps=args.steps, num_maps=args.num_maps, threshold=args.threshold, guidance=args.guidance,
                        negative=args.negative, paste_background=args.paste_background, seed=args.seed)
    pairs = heldout_edit_pairs(args.count, args.max_objects)
    shown: list[tuple[EditPair, dict[str, Output]]] = []
    keep = lambda i, pair, outputs: shown.append((pair, outputs)) if i < args.sheet_count else None  # noqa: E731
    results = evaluate(model, pairs, args.methods, settings, folder, progress=not args.quiet,
                       say=print if not args.quiet else (lambda line: None), on_edit=keep)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # strict JSON: a +inf PSNR (identical pixels) or an undefined mean is written as null, not Infinity / NaN
    atomic_write_text(args.out, json.dumps(_finite(results), indent=1, allow_nan=False) + "\n")
    yield f"{args.count} held-out edits (max {args.max_objects} objects), {args.steps} steps, model {folder}"
    yield format_table(results)
    if results["comparisons"]:
        yield format_comparisons(results)
    yield f"wrote {args.out}"
    if sheet is not None and shown:
        sheet.parent.mkdir(parents=True, exist_ok=True)
        picture = contact_sheet(shown)
        atomic_write(sheet, lambda tmp: picture.save(tmp, format=Image.registered_extensions()[sheet.suffix.lower()]))
        yield f"wrote {sheet} (the first {len(shown)} edits)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffedit.toy.evaluate", description=__doc__.split("\n")[0])
    add_arguments(parser)
    try:
        for line in run(parser.parse_args(argv)):
            print(line)
    except (ValueError, OSError) as e:  # bad input: one line, as `diffedit eval` says it
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
