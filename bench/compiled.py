"""Our compiled chain alone, with Inductor options: issue 15's seconds per edit, and where its GPU time goes.

    python -m bench.compiled --option conv_1x1_as_mm=1 --option epilogue_fusion=0 \
        --option coordinate_descent_tuning=1 --cudnn-benchmark --profile --out "$OUT/compiled.json"   # a GPU
    python -m bench.compiled --device cpu --dtype fp32 --model tiny --size 64 --steps 4 --num-maps 2 \
        --backend aot_eager --rows 4 --profile --out /tmp/compiled.json                              # a CPU check

bench/gpu.py times every side and phase; this probe spends a lent GPU's minutes on the compiled side only, in the
order that matters should the time run out: random SD 1.5-architecture weights on the device (channels_last in half
precision), `StableDiffusion.compile_unet(mode, options=...)`, then
1. one UNet call at the edit's 2 rows and the inversion's 1 (each shape's compile timed, then its median call),
2. the default chain (edit_image, the paper's defaults) at batch 1: its warm-up (the mask's 2n-row shape is the one
   left to compile), then --reps timed runs, per stage, medians;
3. --profile: one chain run under torch.profiler: the GPU's busy time against the wall, and the kernels by kind
   (convolution, matmul, attention, Inductor's Triton, other), with their count per UNet call;
4. --rows: the UNet's rate at more rows (a new shape each), against the device's dense peak;
5. --diffusers: diffusers' pipeline (fp16, its defaults) at batch 1, alternating with ours, for the speed-up.
Each phase's results are written at once, and a phase that the slowest compile so far says would overrun --deadline
(seconds from the start) is skipped and said so: a call stopped at its limit keeps what was measured.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

import diffedit.unet
from diffedit import edit_image
from diffedit.configs import SD15, TINY

from .gpu import Side, Stages, _log, device_peak, diffusers_side, staged_chain, time_sides, unet_rate
from .models import Subject, _image, diffusers_pipeline, random_model_on
from .run import Settings, _env
from .sdxl import DTYPES

# Kernel kinds by name, first match wins. Inductor's kernels come first: it names them after the operators they
# fuse (triton_poi_fused_add_convolution_silu_0 is no convolution); its matmul / conv templates apart. Then cuDNN's
# convolutions, which also say "gemm" (implicit GEMM), before the matmuls.
KINDS = (("inductor template", r"^triton_tem_"), ("inductor triton", r"^triton_"),
         ("convolution", r"conv|fprop|dgrad|wgrad|implicit"), ("attention", r"flash|fmha|attention|sdpa"),
         ("matmul", r"gemm|nvjet|cutlass|cublas|matmul|splitk"))


def option(text: str) -> tuple[str, Any]:
    """KEY=VALUE of an Inductor setting: true / false / 1 / 0 as booleans (write 1.0 for a float), other numbers as
    such, anything else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"an Inductor option is KEY=VALUE, got {text!r}")
    lowered = value.lower()
    if lowered in ("true", "false"):
        return key, lowered == "true"
    for kind in (int, float):
        try:
            parsed = kind(value)
        except ValueError:
            continue
        return key, bool(parsed) if parsed in (0, 1) and kind is int else parsed
    return key, value


def kernel_kind(name: str) -> str:
    return next((kind for kind, pattern in KINDS if re.search(pattern, name, re.IGNORECASE)), "other")


def profile_chain(run: Any, device: torch.device, unet_calls: int) -> dict[str, Any]:
    """One run under torch.profiler: device time by kernel kind against the wall, and the 30 longest kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    stages = Stages(device)
    stages.sync()
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        run(stages)
        stages.sync()
    wall = time.perf_counter() - t0
    by_kind: dict[str, dict[str, float]] = defaultdict(lambda: dict(ms=0.0, count=0))
    kernels = []
    for e in prof.key_averages():
        if e.device_type != DeviceType.CUDA or e.count == 0:
            continue  # the kernels themselves: an operator's device time repeats its kernels'
        ms = e.self_device_time_total / 1e3
        kind = "copy / fill" if e.key.startswith(("Memcpy", "Memset")) else kernel_kind(e.key)
        by_kind[kind]["ms"] += ms
        by_kind[kind]["count"] += e.count
        kernels.append(dict(name=e.key[:120], kind=kind, count=e.count, ms=round(ms, 3)))
    busy = sum(k["ms"] for k in by_kind.values())
    kinds = {k: dict(ms=round(v["ms"], 2), share=round(v["ms"] / busy, 4) if busy else 0.0, count=int(v["count"]),
                     per_unet_call=round(v["count"] / unet_calls, 1)) for k, v in sorted(by_kind.items())}
    return dict(wall_ms=round(wall * 1e3, 2), kernel_ms=round(busy, 2), busy_fraction=round(busy / 1e3 / wall, 4),
                stages_s=dict(stages.seconds), unet_calls=unet_calls, kinds=kinds,
                top=sorted(kernels, key=lambda k: -k["ms"])[:30])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.compiled", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--model", choices=("sd15", "tiny"), default="sd15")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--num-maps", type=int, default=10)
    p.add_argument("--mode", default=None, help="StableDiffusion.compile_unet's mode (default: its own)")
    p.add_argument("--backend", default="inductor")
    p.add_argument("--option", type=option, action="append", default=[], metavar="KEY=VALUE",
                   help="an Inductor setting for this model's graphs (repeatable), e.g. conv_1x1_as_mm=1")
    p.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark for the run")
    p.add_argument("--upsample-conv", action="store_true",
                   help="every upsampler through diffedit.conv.upsample_conv (its gate is CPU-only): an A/B on a GPU")
    p.add_argument("--reps", type=int, default=5, help="timed chains (default 5), medians")
    p.add_argument("--unet-reps", type=int, default=20)
    p.add_argument("--rows", default="16", help="UNet rates at these rows after the chain, comma-separated ('' none)")
    p.add_argument("--profile", action="store_true", help="one chain run under torch.profiler")
    p.add_argument("--diffusers", action="store_true", help="diffusers' pipeline at batch 1, alternating with ours")
    p.add_argument("--deadline", type=float, default=540.0, help="seconds from the start: later phases skipped")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.backends.cudnn.benchmark = args.cudnn_benchmark  # this probe's process-wide switch, never the library's
    if args.upsample_conv:  # this probe's too: 4 multiply-adds instead of 9 for 8% of a 512 px UNet's work
        diffedit.unet.upsample_conv_pays = lambda x, conv: True  # type: ignore[assignment]
    model = random_model_on(SD15 if args.model == "sd15" else TINY, args.device, dtype)
    sub = Subject(args.model, model, _image(args.model, args.size, 0), "a bowl of fruits", "a bowl of pears")
    latent = args.size // model.config.vae.downsample_factor
    options = dict(args.option)
    out: dict[str, Any] = dict(env=asdict(_env(args.device)), settings=dict(
        model=args.model, size=args.size, dtype=args.dtype, steps=args.steps, num_maps=args.num_maps, mode=args.mode,
        backend=args.backend, options=options, cudnn_benchmark=args.cudnn_benchmark, upsample_conv=args.upsample_conv),
        skipped=[])

    def save(phase: str) -> None:
        out["elapsed_s"] = round(time.perf_counter() - start, 1)
        if args.out is not None:  # whole or not at all, should the call be stopped while writing
            partial = args.out.with_name(args.out.name + ".partial")
            partial.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
            os.replace(partial, args.out)
        _log(f"{phase} done at {out['elapsed_s']:.0f} s")

    with torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:  # eager, one row: the UNet's work is linear in its rows
            model.unet_output(torch.randn(1, 4, latent, latent, device=device, dtype=dtype), 501,
                              model.encode_prompt(""))
        gflop_row = counter.get_total_flops() / 1e9
        peak = device_peak(device, dtype)
        out.update(peak=asdict(peak), gflop_per_row=gflop_row, built_s=round(time.perf_counter() - start, 1))
        save(f"built ({gflop_row:.0f} GFLOP a row, peak {peak.tflops:.0f} TFLOP/s)")
        model.compile_unet(args.mode, backend=args.backend, options=options or None)
        compile_s: dict[str, float] = {}
        out.update(compile_s=compile_s, unet=[])

        def rate(rows: int) -> None:
            t0 = time.perf_counter()
            r = unet_rate(model, latent, rows, args.unet_reps, peak, True, gflop_row * rows)
            compile_s[f"{rows} rows"] = round(time.perf_counter() - t0 - r.median_s * (args.unet_reps + 2), 1)
            out["unet"].append(asdict(r))
            save(f"{rows} rows: compiled in {compile_s[f'{rows} rows']:.0f} s, {r.median_s * 1e3:.2f} ms a call, "
                 f"{r.tflops:.0f} TFLOP/s = {100 * r.fraction_of_peak:.1f}% of {peak.tflops:.0f}")

        def in_time(phase: str, shapes: int = 1) -> bool:
            """Room for `shapes` more compiles, judged by the slowest so far, and 30 s."""
            need = shapes * max(compile_s.values(), default=0.0) + 30
            if time.perf_counter() - start + need <= args.deadline:
                return True
            out["skipped"].append(f"{phase}: {need:.0f} s needed at {time.perf_counter() - start:.0f} s")
            save(f"{phase} skipped")
            return False

        rate(2)
        rate(1)
        images, source, target = sub.image, [sub.source], [sub.target]

        def chain(stages: Stages) -> Any:
            with staged_chain(stages):
                return edit_image(model, images, source, target, seed=0, steps=args.steps, num_maps=args.num_maps,
                                  output_type="np", progress=False)

        ours = Side("ours-compiled", 1, chain)
        # The chain's warm-up is the mask's shape and more: on the H200 it outlasted 90 s where a shape took 44 s
        # (cuDNN's searches for the VAE's shapes under --cudnn-benchmark, the first run's allocations).
        if in_time("chain", shapes=2):
            t0 = time.perf_counter()
            chain(Stages(device))
            compile_s["chain warm-up"] = round(time.perf_counter() - t0, 1)
            save(f"chain warm-up ({compile_s['chain warm-up']:.0f} s)")
            out["chain"] = asdict(time_sides([ours], args.reps, device)[0])
            save(f"chain: {out['chain']['seconds_per_edit']:.3f} s an edit")
            if args.profile:
                # the defaults' UNet calls: the mask's one (all maps in one call), the inversion's and the edit's steps
                calls = 1 + 2 * int(args.steps * 0.8)
                try:  # the one CUDA-only path here (CUPTI under CUDA graphs): a failure costs this phase alone
                    out["profile"] = profile_chain(chain, device, calls)
                    save(f"profile: GPU busy {100 * out['profile']['busy_fraction']:.0f}% of the wall")
                except Exception as exc:  # noqa: BLE001 - recorded in the JSON, the later phases still run
                    out["profile_error"] = f"{type(exc).__name__}: {exc}"[:2000]
                    save(f"profile failed: {out['profile_error']}")
        for rows in [int(r) for r in args.rows.split(",") if r]:
            if in_time(f"{rows} rows"):
                rate(rows)
        if args.diffusers and in_time("diffusers"):
            # diffusers' half precision (fp16) on CUDA: random weights of the same architecture (the work, not the
            # values, is timed; bench/gpu.py checks fidelity on shared tensors)
            ref_model = random_model_on(model.config, args.device, torch.float16 if device.type == "cuda" else dtype)
            ref = Subject(args.model, ref_model, sub.image, sub.source, sub.target)
            pipe = diffusers_pipeline(ref_model, sample_size=latent)
            settings = Settings(steps=args.steps, num_maps=args.num_maps, mask_strength=0.5, strength=0.8,
                                guidance=7.5, inversion_guidance=7.5)
            theirs = diffusers_side(ref, pipe, SimpleNamespace(chain=settings), 1)  # type: ignore[arg-type]
            timings = time_sides([ours, theirs], 3, device)
            out["alternating"] = [asdict(t) for t in timings]
            speedup = timings[1].seconds_per_edit / timings[0].seconds_per_edit
            out["speedup_vs_diffusers"] = speedup
            save(f"diffusers alternating: {speedup:.2f}x")
    out["median_call_ms"] = {r["rows"]: round(r["median_s"] * 1e3, 3) for r in out["unet"]}
    save("all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
