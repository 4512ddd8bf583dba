"""Our UNet's rate alone (no diffusers, no chain): eager, eager with cudnn.benchmark, then compiled.

    python -m bench.unet_rate --out "$OUT/unet-rate.json"     # a GPU: SD 1.5, 512 x 512, bf16
    python -m bench.unet_rate --device cpu --model tiny --size 64 --dtype fp32 --compile-backend aot_eager \
        --rows 1,2                                              # a CPU check

    python -m bench.unet_rate --compile-mode max-autotune --out "$OUT/unet-rate-autotune.json"  # Inductor's search

A minute-sized probe for what bench/gpu.py leaves open (a compiled UNet at a large batch, whether cuDNN's own
algorithm search pays, whether Inductor's autotuning does): random SD 1.5-architecture weights filled on the
device, channels_last on CUDA; the rates of bench.gpu.unet_rate (FLOPs counted once per batch, median forward).
The JSON is rewritten after every rate.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from diffedit.configs import SD15, TINY

from .gpu import UnetRate, _log, device_peak, unet_rate
from .models import random_model_on
from .run import _env
from .sdxl import DTYPES


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.unet_rate", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--model", choices=("sd15", "tiny"), default="sd15")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--rows", default="2,16", help="UNet batch sizes, comma-separated; compiled in this order")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--compile-mode", default=None, help="StableDiffusion.compile_unet's mode, e.g. max-autotune")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    device, rows = torch.device(args.device), [int(r) for r in args.rows.split(",")]
    model = random_model_on(SD15 if args.model == "sd15" else TINY, args.device, DTYPES[args.dtype])
    latent = args.size // model.config.vae.downsample_factor
    peak = device_peak(device, DTYPES[args.dtype])
    rates: list[dict[str, object]] = []
    env = asdict(_env(args.device))

    def record(rate: UnetRate, cudnn_benchmark: bool) -> UnetRate:
        rates.append(dict(asdict(rate), cudnn_benchmark=cudnn_benchmark))
        _log(f"{rate.rows} rows, compiled {rate.compiled}, cudnn.benchmark {cudnn_benchmark}: {rate.tflops:.1f} "
             f"TFLOP/s, {rate.median_s * 1e3:.2f} ms, {100 * rate.fraction_of_peak:.1f}% of {peak.tflops:.0f}")
        if args.out is not None:
            out = dict(env=env, peak=asdict(peak), model=args.model, size=args.size, dtype=args.dtype,
                       compile_mode=args.compile_mode, rates=rates)
            args.out.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
        return rate

    gflop: dict[int, float] = {}
    # Off, on, off again: the first pass also warms the process up (its figures ran cold on the H200), so the
    # A/B reads the last two.
    for benchmark in (False, True, False):
        torch.backends.cudnn.benchmark = benchmark  # a process-wide switch: this probe's, never the library's
        for n in rows:
            gflop[n] = record(unet_rate(model, latent, n, args.reps, peak, False, gflop.get(n)), benchmark).gflop
    torch.backends.cudnn.benchmark = True
    model.compile_unet(args.compile_mode, backend=args.compile_backend)
    for n in rows:  # cudnn.benchmark on: each shape's algorithms searched before its graph is captured
        t0 = time.perf_counter()
        record(unet_rate(model, latent, n, args.reps, peak, True, gflop[n]), True)
        _log(f"  (compiled and timed in {time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
