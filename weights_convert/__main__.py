"""`python -m weights_convert SRC OUT`: convert a Stable Diffusion checkpoint to a diffedit model folder, or back.

User errors (a bad file, an unsupported model, an existing OUT, ...) are one line on stderr and exit code 2;
nothing is written then. Ctrl-C or SIGTERM: "interrupted: nothing was written", exit code 130, no temporary
folder left behind. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import signal
import sys

from diffedit.files import Interrupts

from .convert import ConversionError, convert
from .export import export_diffusers

EXAMPLES = """\
examples:
  python -m weights_convert stable-diffusion-v1-5/stable-diffusion-v1-5 models/sd15
  python -m weights_convert v2-1_768-ema-pruned.safetensors models/sd21 --tokenizer stabilityai/stable-diffusion-2-1
  python -m weights_convert ./my-diffusers-folder models/mine --dtype fp16
  python -m weights_convert models/sd15 exported/sd15 --to diffusers
  python -m weights_convert stabilityai/stable-diffusion-xl-base-1.0 models/sdxl --dtype fp16
  python -m weights_convert sd_xl_base_1.0.safetensors models/sdxl --tokenizer stabilityai/stable-diffusion-xl-base-1.0
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive_multiple_of_8(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value <= 0 or value % 8:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 8 (pixels), got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m weights_convert",
        description="Convert a Stable Diffusion 1.x / 2.x / XL base checkpoint into a diffedit model folder (format "
        "auto-detected), or export a diffedit model folder to diffusers format.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", metavar="SRC", help="a diffusers-format folder, an original .safetensors / .ckpt file, "
                   "a hub repo id (org/name); with --to diffusers: a diffedit model folder")  # fmt: skip
    p.add_argument("out", metavar="OUT", help="the folder to write (must not exist, unless --force)")
    p.add_argument("--dtype", choices=["fp16", "fp32"], help="cast floating-point weights (default: keep the source's)")
    p.add_argument("--force", action="store_true",
                   help="replace OUT if it exists (a folder or a file; never SRC, nor a folder inside or around it)")
    p.add_argument("--tokenizer", metavar="DIR|REPO_ID",
                   help="tokenizer for single files (which carry none): a folder with vocab.json + merges.txt or "
                   "tokenizer.json, a diffusers folder, or a hub repo id (default: the model family's hub "
                   "repo); SDXL: its tokenizer_2/ if it has one, else derived with \"!\" padding")  # fmt: skip
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"],
                   help="override what the model predicts (single files carry no flag: SD 2.x defaults to v at "
                   "768 px)")  # fmt: skip
    p.add_argument("--image-size", type=_positive_multiple_of_8, metavar="N",
                   help="override the training resolution (pixels, a positive multiple of 8)")
    p.add_argument("--to", choices=["diffedit", "diffusers"], default="diffedit",
                   help="diffusers: export the diffedit model folder SRC to diffusers format")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    return p


def one_line(error: BaseException) -> str:
    """A (possibly multi-line) message as one line: the listing after a heading ends in ':' joins with '; '."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    head, rest = lines[0], lines[1:]
    if not rest:
        return head
    return f"{head} {'; '.join(rest)}" if head.endswith(":") else "; ".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    with Interrupts() as interrupts:
        try:
            if args.to == "diffusers":
                for flag in ("tokenizer", "prediction_type", "image_size"):
                    if getattr(args, flag) is not None:
                        raise ConversionError(f"--{flag.replace('_', '-')} does not apply to --to diffusers")
                export_diffusers(args.src, args.out, dtype=args.dtype, force=args.force, quiet=args.quiet)
            else:
                convert(
                    args.src, args.out, dtype=args.dtype, force=args.force, tokenizer=args.tokenizer,
                    prediction_type=args.prediction_type, image_size=args.image_size, quiet=args.quiet,
                )  # fmt: skip
        except KeyboardInterrupt:
            return _interrupted(interrupts.received)
        except Exception as e:
            if interrupts.received is not None:  # the interruption, reworded by a library: say what happened
                return _interrupted(interrupts.received)
            if not isinstance(e, (ValueError, OSError)):  # ConversionError is a ValueError; OSError: files
                raise  # a bug: keep the traceback
            print(f"error: {one_line(e)}", file=sys.stderr)
            return 2
    return 0


def _interrupted(signum: int | None) -> int:
    how = " (SIGTERM)" if signum == signal.SIGTERM else ""
    print(f"interrupted{how}: nothing was written", file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())
