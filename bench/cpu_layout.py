"""CPU probe: does channels_last (NHWC) pay for the SD 1.5 UNet and VAE in fp32, and what do page faults cost?

    python -m bench.cpu_layout --part unet --reps 6       # UNet at 2 rows of 32x32: NCHW against NHWC, alternating
    python -m bench.cpu_layout --part decode --reps 6     # VAE decoder at a 256 x 256 image
    python -m bench.cpu_layout --part encode --reps 6     # VAE encoder
    python -m bench.cpu_layout --part decode --layouts nchw --reps 5                       # the allocator A/B: run
    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 \\
        python -m bench.cpu_layout --part decode --layouts nchw --reps 5                   # once without, once with

Random SD 1.5-architecture weights. In one process the layouts alternate (the weights re-laid out between calls,
outside the timed region): medians, each call timed alone, with the outputs' difference ||a - b|| / ||a|| against
the first layout's (float rounding: oneDNN sums in another order in NHWC). glibc reads its MALLOC_ variables at
start-up, so the allocator A/B is two processes. The library does neither (bench/README.md, "2026-12-05: what else
was tried for the CPU targets"); this only measures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from diffedit.configs import SD15

from .models import random_model_on

FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def calls(part: str, seed: int = 7) -> tuple[torch.nn.Module, Callable[[torch.memory_format], Tensor]]:
    """The network to re-lay out and one call of it, its input in the given layout."""
    model = random_model_on(SD15, "cpu", torch.float32)
    g = torch.Generator().manual_seed(seed)
    if part == "unet":
        x, ctx = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 77, 768, generator=g)
        t = torch.full((2,), 501)
        return model.unet, lambda fmt: model.unet(x.contiguous(memory_format=fmt), t, ctx)
    if part == "decode":
        z = torch.randn(1, 4, 32, 32, generator=g)
        return model.vae, lambda fmt: model.vae.decode(z.contiguous(memory_format=fmt), progress=False)
    image = torch.rand(1, 3, 256, 256, generator=g) * 2 - 1
    return model.vae, lambda fmt: model.vae.encode(image.contiguous(memory_format=fmt), progress=False).mean


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_layout", description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("unet", "decode", "encode"), default="unet")
    p.add_argument("--layouts", default="nchw,nhwc", help="comma-separated: nchw, nhwc")
    p.add_argument("--reps", type=int, default=6)
    args = p.parse_args(argv)
    layouts = args.layouts.split(",")
    if any(name not in FORMATS for name in layouts):  # '' (an empty --layouts) included
        p.error(f"--layouts takes nchw and / or nhwc, not {args.layouts!r}")
    network, call = calls(args.part)
    outputs, seconds = {}, {name: [] for name in layouts}
    for name in layouts:  # warm-up, and the outputs to compare
        network.to(memory_format=FORMATS[name])
        outputs[name] = call(FORMATS[name])
    for r in range(args.reps):
        for name in layouts if r % 2 == 0 else layouts[::-1]:
            network.to(memory_format=FORMATS[name])
            start = time.perf_counter()
            call(FORMATS[name])
            seconds[name].append(time.perf_counter() - start)
    first = outputs[layouts[0]]
    result = dict(part=args.part, threads=torch.get_num_threads(),
                  median_s={name: round(statistics.median(s), 4) for name, s in seconds.items()},
                  samples_s={name: [round(v, 4) for v in s] for name, s in seconds.items()},
                  rel_diff={name: float((o - first).norm() / first.norm()) for name, o in outputs.items()})
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
