"""One SDXL UNet forward at 1024 x 1024 (128 x 128 latents) and one VAE decode of that size: time and peak memory.

A benchmark, not a test (figures depend on the machine and its load). The SDXL base architecture is built on the meta
device and filled with seeded noise in place (no real weights are needed for time and memory); the UNet runs at
batch 2, the classifier-free-guidance batch of every guided step, and batch 1, the unguided inversion's.

    python -m bench.sdxl --batches 1 --reps 1 --warmup 0 --out bench/results-sdxl-cpu.json   # CPU, fp32
    python -m bench.sdxl --device cuda --dtype fp16 --out bench/results-sdxl-cuda.json

CPU memory: the process's peak RSS (VmHWM) reset before each measurement through /proc/self/clear_refs, minus the
RSS before it ("working"); CUDA: torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from diffedit.configs import SDXL
from diffedit.unet import UNet
from diffedit.vae import AutoencoderKL

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Measurement:
    what: str  # "unet batch 2", "vae decode"
    seconds_median: float
    seconds_all: tuple[float, ...]
    peak_bytes: int  # CPU: peak RSS during the call; CUDA: max allocated
    working_bytes: int  # peak minus what was resident before the call (weights, inputs)


@dataclass(frozen=True)
class Results:
    device: str
    dtype: str
    threads: int
    image_size: int
    unet_parameters: int
    vae_dtype: str
    measurements: tuple[Measurement, ...]


def fill_on(module: torch.nn.Module, device: str, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """A module built on the meta device, allocated on `device` in `dtype` and filled there with seeded noise:
    N(0, 1/fan_in) weights, norm scales one, small biases (activations of order one, no default initialisation)."""
    module = module.to_empty(device=device).to(dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, p[0].numel() ** -0.5 if p.ndim > 1 else 0.02, generator=g)
    return module.eval()


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure(what: str, call, device: str, reps: int, warmup: int) -> Measurement:
    for _ in range(warmup):  # allocator, kernels (on CPU a minutes-long 1024 forward needs none)
        call()
    times, peak, before = [], 0, 0
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            before = _rss("VmRSS")
        start = time.perf_counter()
        call()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        peak = max(peak, torch.cuda.max_memory_allocated() if device == "cuda" else _rss("VmHWM"))
    return Measurement(what, statistics.median(times), tuple(times), peak, peak - before)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (default 1024, SDXL's native)")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batches", default="2,1", help="UNet batch sizes, comma-separated (default 2,1)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    dtype, h = DTYPES[args.dtype], args.size // 8
    with torch.device("meta"):
        unet, vae = UNet(SDXL.unet), AutoencoderKL(SDXL.vae)
    unet = fill_on(unet, args.device, dtype, seed=0)
    vae_dtype = torch.float32 if SDXL.vae.force_upcast else dtype  # SDXL's VAE runs in fp32 (it overflows in fp16)
    vae = fill_on(vae, args.device, vae_dtype, seed=1)
    g = torch.Generator(device=args.device).manual_seed(2)
    rand = lambda *shape, dt=dtype: torch.randn(*shape, generator=g, device=args.device).to(dt)  # noqa: E731
    measurements = []
    with torch.no_grad():
        for batch in (int(b) for b in args.batches.split(",")):
            x, context = rand(batch, 4, h, h), rand(batch, 77, 2048)
            pooled = rand(batch, 1280)
            sizes = torch.tensor([[args.size, args.size, 0, 0, args.size, args.size]] * batch, device=args.device)
            call = lambda: unet(x, 500, context, pooled=pooled, sizes=sizes.float())  # noqa: E731
            measurements.append(_measure(f"unet batch {batch}", call, args.device, args.reps, args.warmup))
            print(measurements[-1])
        z = rand(1, 4, h, h, dt=vae_dtype)
        decode = lambda: vae.decode(z, progress=False)  # noqa: E731
        measurements.append(_measure("vae decode", decode, args.device, args.reps, args.warmup))
        print(measurements[-1])
    results = Results(args.device, args.dtype, torch.get_num_threads(), args.size,
                      sum(p.numel() for p in unet.parameters()), str(vae_dtype).removeprefix("torch."),
                      tuple(measurements))
    if args.out is not None:
        args.out.write_text(json.dumps(asdict(results), indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
