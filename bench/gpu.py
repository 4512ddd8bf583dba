"""The GPU bench of issue 15: SD 1.5 architecture (random weights) at 512 x 512, ours against diffusers' pipeline.

    python -m bench.gpu --device cuda --dtype bf16 --compile --sdxl --out bench/results-gpu.json   # the GPU command
    python -m bench.gpu --device cpu --model tiny --size 64 --steps 4 --batch 2 --reps 2 \
        --compile --compile-backend aot_eager --out /tmp/gpu-cpu.json                         # a CPU check

In one process, on one set of random weights (diffusers' UNet and VAE adopt our tensors: bench/models.py):
1. Fidelity first: our compat chain (diffusers_compat=True) on the very model diffusers' pipeline holds (its dtype,
   fp16 on CUDA; its tensors) against the pipeline: binary masks identical, inverted latents and the edit (diffusers
   run on our mask and inversion) within TOLERANCE relative (max |ours - diffusers| / max |diffusers|). A failure
   makes the exit status 1, but the timings still run (a lent GPU's minutes are not spent twice). With --dtype bf16
   the compat chain in bf16 is compared with the same diffusers run too, against the bf16 tolerances (5e-2, at most
   1% of the mask's pixels flipped), and reported: how far bf16 moves the numbers, not a check of the code.
2. Side by side, alternating (the order rotated every repetition), medians: `ours` = edit_image (the paper's chain
   and defaults: 10 maps, 50 steps, strength 0.8) at batch 1 and at --batch images in one call; `ours-compat` =
   the compat chain at diffusers' settings; `diffusers` = StableDiffusionDiffEditPipeline with its documented
   defaults (num_maps_per_mask 10, mask_encode_strength 0.5, 50 steps, inpaint_strength 0.8, guidance 7.5, invert's
   guidance 7.5 too; the edit's negative prompt is the source prompt, as its documentation's example), SDPA
   (AttnProcessor2_0), channels_last, at batch 1 and --batch. Per stage (mask, invert, edit: each
   with its text, VAE and UNet work), end to end per edit, edits per second; peak memory of each side's run
   (CUDA: max_memory_allocated; CPU: VmHWM) and above what was allocated before it ("working").
   --compile: our UNet compiled (StableDiffusion.compile_unet, CUDA graphs on CUDA); its warm-up is timed apart
   and the compiled chain is timed against diffusers (eager, as its defaults) once more.
3. UNet throughput, ours and diffusers' (each in its dtype): FLOPs of one forward counted once
   (torch.utils.flop_counter), the median forward timed, at the edit's CFG batch (2 rows) and at --batch's
   (2 x batch); TFLOP/s and the fraction of the device's dense bf16 / fp16 peak (PEAK_TFLOPS by device name;
   otherwise the measured matmul rate, 8192^3 on CUDA, in --dtype).
   Where ours is channels_last (load()'s layout on CUDA in half precision), also in NCHW, eager: what it buys.
4. --sdxl: bench/sdxl.py's measurements (one SDXL UNet forward at batch 2 and 1 and a VAE decode at 1024 x 1024),
   then our whole default chain (edit_image, eager) on a random SDXL base at --sdxl-size, batch 1, per stage.
A phase that raises (--sdxl, --compile) is recorded under `errors` with its message, and the others still run.

Everything is a frozen dataclass below; the JSON file is dataclasses.asdict(Results).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

import diffedit.chain
from diffedit import edit_image
from diffedit.configs import SDXL
from diffedit.model import StableDiffusion, use_fast_layout
from diffedit.text import PromptEmbeddings

from .models import Subject, _image, build, diffusers_pipeline, random_model_on, shares_weights
from .run import Env, RunOutput, Settings, _env, diffusers_edit, matmul_throughput, relative_error, run_diffusers
from .run import run_ours
from .sdxl import DTYPES, Measurement

STAGES = ("mask", "invert", "edit")
# Relative tolerance of the fidelity check by (ours, diffusers) dtype; the binary masks must be identical, except
# that bf16 against fp16 (different roundings of every op) may flip MASK_TOLERANCE of the pixels near the threshold.
TOLERANCE = {("fp32", "fp32"): 1e-4, ("fp16", "fp16"): 1e-2, ("bf16", "fp16"): 5e-2, ("bf16", "bf16"): 1e-2,
             ("bf16", "fp32"): 5e-2}
MASK_TOLERANCE = {("bf16", "fp16"): 0.01, ("bf16", "fp32"): 0.01}
# Dense (no sparsity) bf16 / fp16 tensor-core peaks, TFLOP/s, from the vendors' data sheets; first match wins.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
               ("A100", 312.0), ("L40S", 362.0))
TARGETS = dict(seconds_per_edit=0.5, speedup_vs_diffusers=5.0, unet_fraction_of_peak=0.5)  # issue 15, GPU


@dataclass(frozen=True)
class GpuSettings:
    model: str
    device: str
    dtype: str  # ours
    diffusers_dtype: str  # diffusers' pipeline (fp16 on CUDA, its documented half precision)
    size: int
    steps: int
    num_maps: int
    batch: int
    reps: int
    compile: bool
    compile_mode: str | None
    compile_backend: str
    chain: Settings  # the compat chain's and diffusers' settings (diffusers' defaults)
    cudnn_benchmark: bool = False  # torch.backends.cudnn.benchmark for the whole run (both sides)


@dataclass(frozen=True)
class Fidelity:
    tolerance: float
    mask_tolerance: float  # fraction of mask pixels allowed to differ
    mask_pixels_differing: int
    mask_fraction_on: float
    inversion_rel_err: float
    edit_rel_err_same_inputs: float  # diffusers' edit on our mask and inversion
    passed: bool


@dataclass(frozen=True)
class SideTiming:
    side: str  # "ours", "ours-compat", "diffusers", "ours-compiled", ...
    batch: int
    median_s: dict[str, float]  # per stage and "total"
    samples_total_s: tuple[float, ...]
    seconds_per_edit: float
    edits_per_s: float
    peak_memory_bytes: int
    working_memory_bytes: int  # peak minus what was allocated (CPU: resident) before the run


@dataclass(frozen=True)
class Peak:
    tflops: float
    source: str  # "data sheet: <name>" or "measured matmul"
    matmul_tflops: float  # measured n^3 matmul in --dtype, best of 5
    matmul_n: int


@dataclass(frozen=True)
class UnetRate:
    side: str  # "ours" (StableDiffusion.unet_output) or "diffusers" (pipe.unet)
    rows: int
    compiled: bool
    channels_last: bool  # the UNet's weights in NHWC (load()'s layout on CUDA in half precision)
    gflop: float  # one forward, counted by FlopCounterMode
    median_s: float
    tflops: float
    fraction_of_peak: float


@dataclass(frozen=True)
class Target:
    name: str
    goal: float
    value: float | None
    met: bool | None


@dataclass(frozen=True)
class Results:
    env: Env
    settings: GpuSettings
    shared_weights: bool  # diffusers holds our very tensors (same dtype on both sides)
    fidelity: Fidelity  # ours (compat) in diffusers' dtype on diffusers' tensors: gates the run (exit status 1)
    fidelity_dtype: Fidelity | None  # ours (compat) in --dtype against diffusers, when the dtypes differ: reported
    compile_warmup_s: dict[str, float]  # "batch 1" / "batch 8": the first compiled chain of that batch, seconds
    timings: tuple[SideTiming, ...]
    peak: Peak
    unet: tuple[UnetRate, ...]
    sdxl: tuple[Measurement, ...] | None
    sdxl_chain: tuple[SideTiming, ...]  # our default chain on a random SDXL base, eager, batch 1
    targets: tuple[Target, ...]
    errors: dict[str, str]  # phase -> what it raised (the other phases ran)
    load_after: tuple[float, float, float]  # os.getloadavg(): CPU figures under load are not worth much


# ---- timing helpers ---------------------------------------------------------------------------------------------
def _log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Stages:
    """Wall time per stage: a device synchronisation at each stage's boundaries only (never inside a loop)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, {}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def stage(self, name: str, count_flops: bool = False) -> Iterator[None]:  # bench.run.Recorder's interface
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        self.seconds[name] = time.perf_counter() - start


@contextlib.contextmanager
def staged_chain(stages: Stages) -> Iterator[None]:
    """edit_image's three stages timed where it calls them (diffedit.chain's names wrapped for the duration)."""
    originals = {name: getattr(diffedit.chain, name) for name in ("generate_mask", "invert", "edit")}
    labels = dict(generate_mask="mask", invert="invert", edit="edit")

    def timed(name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            with stages.stage(labels[name]):
                return originals[name](*args, **kwargs)
        return call

    for name in originals:
        setattr(diffedit.chain, name, timed(name))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(diffedit.chain, name, fn)


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def peak_memory(device: torch.device, into: dict[str, int]) -> Iterator[None]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)
        before = _rss("VmRSS")
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = _rss("VmHWM")
    into.update(peak=peak, working=peak - before)


# ---- the sides ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Side:
    name: str
    batch: int
    run: Callable[[Stages], Any]  # fills Stages.seconds with mask / invert / edit


def batched(sub: Subject, batch: int) -> tuple[Tensor, list[str], list[str]]:
    # distinct images (the same picture shifted), so that no side can share work across rows
    images = torch.cat([torch.roll(sub.image, shifts=7 * i, dims=-1) for i in range(batch)])
    return images, [sub.source] * batch, [sub.target] * batch


def ours_side(sub: Subject, s: GpuSettings, batch: int, name: str = "ours") -> Side:
    images, source, target = batched(sub, batch)

    def run(stages: Stages) -> Any:
        with staged_chain(stages):
            return edit_image(sub.model, images, source, target, seed=0, steps=s.steps, num_maps=s.num_maps,
                              output_type="np", progress=False)
    return Side(name, batch, run)


def compat_side(sub: Subject, s: GpuSettings) -> Side:
    return Side("ours-compat", 1, lambda stages: run_ours(sub, s.chain, stages, compat=True))  # type: ignore[arg-type]


def diffusers_side(ref: Subject, pipe: Any, s: GpuSettings, batch: int) -> Side:
    images, source, target = batched(ref, batch)
    sub = Subject(ref.name, ref.model, images, source, target)  # type: ignore[arg-type]
    return Side("diffusers", batch, lambda stages: run_diffusers(sub, pipe, s.chain, stages))  # type: ignore[arg-type]


def time_sides(sides: list[Side], reps: int, device: torch.device) -> list[SideTiming]:
    """Each side once untimed (warm-up), then `reps` rounds, the order rotated each round; medians."""
    stages = Stages(device)
    for side in sides:
        side.run(stages)
    samples: dict[str, list[dict[str, float]]] = {side.name: [] for side in sides}
    memory: dict[str, dict[str, int]] = {side.name: {} for side in sides}
    for r in range(reps):
        for side in sides[r % len(sides):] + sides[: r % len(sides)]:
            stages.seconds = {}
            mem: dict[str, int] = {}
            with peak_memory(device, mem):
                side.run(stages)
            sample = {st: stages.seconds[st] for st in STAGES}
            sample["total"] = sum(sample.values())
            samples[side.name].append(sample)
            memory[side.name] = {k: max(v, memory[side.name].get(k, 0)) for k, v in mem.items()}
    out = []
    for side in sides:
        median = {k: statistics.median(x[k] for x in samples[side.name]) for k in (*STAGES, "total")}
        out.append(SideTiming(side.name, side.batch, median, tuple(x["total"] for x in samples[side.name]),
                              median["total"] / side.batch, side.batch / median["total"],
                              memory[side.name]["peak"], memory[side.name]["working"]))
        _log(f"  {side.name} batch {side.batch}: {median['total']:.3f} s "
             f"({', '.join(f'{st} {median[st]:.3f}' for st in STAGES)}), "
             f"peak {memory[side.name]['peak'] / 2**30:.2f} GiB")
    return out


# ---- fidelity ---------------------------------------------------------------------------------------------------
def fidelity(sub: Subject, ref: Subject, pipe: Any, s: GpuSettings) -> tuple[Fidelity, Fidelity | None]:
    """(1) our compat chain on the very model diffusers holds (its dtype, its tensors) against diffusers: the
    implementation check, which gates the run; (2) when --dtype differs, our compat chain in --dtype against the same
    diffusers run: how far the other precision moves the numbers, against the stated bf16 tolerances."""
    stages = Stages(sub.model.device)
    theirs: RunOutput = run_diffusers(ref, pipe, s.chain, stages)  # type: ignore[arg-type]

    def check(model: Subject, key: tuple[str, str]) -> Fidelity:
        tol, mask_tol = TOLERANCE.get(key, 5e-2), MASK_TOLERANCE.get(key, 0.0)
        ours: RunOutput = run_ours(model, s.chain, stages, compat=True)  # type: ignore[arg-type]
        assert ours.inversion is not None
        latents = ours.inversion.latents.to(pipe.unet.dtype)  # diffusers' edit on our mask and inversion
        same_inputs = diffusers_edit(ref, pipe, s.chain, ours.mask, latents)
        differing = int((ours.mask != np.asarray(theirs.mask)).sum())
        inversion_err = relative_error(ours.latents, theirs.latents)
        edit_err = relative_error(ours.images, same_inputs)
        passed = differing <= mask_tol * ours.mask.size and inversion_err < tol and edit_err < tol
        return Fidelity(tol, mask_tol, differing, float(np.asarray(theirs.mask).mean()), inversion_err, edit_err,
                        passed)

    same = check(ref, (s.diffusers_dtype, s.diffusers_dtype))
    return same, None if sub is ref else check(sub, (s.dtype, s.diffusers_dtype))


# ---- throughput -------------------------------------------------------------------------------------------------
def device_peak(device: torch.device, dtype: torch.dtype) -> Peak:
    n = 8192 if device.type == "cuda" else 1024
    mm = matmul_throughput(device, n, 5, dtype)
    measured = mm.best_gflops / 1e3
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_TFLOPS:
            if key in name:
                return Peak(tflops, f"data sheet: {key} dense bf16/fp16 ({name})", measured, n)
    return Peak(measured, "measured matmul", measured, n)


def unet_rate(model: StableDiffusion, latent: int, rows: int, reps: int, peak: Peak, compiled: bool,
              gflop: float | None = None, pipe: Any = None) -> UnetRate:
    """One UNet forward of `rows` rows: ours through StableDiffusion.unet_output (the path the loops take, compiled
    or not), or with `pipe` diffusers' UNet as its pipeline calls it. FLOPs counted once when not given, then the
    median of `reps` timed forwards."""
    dev, cfg = model.device, model.config
    dtype = model.dtype if pipe is None else pipe.unet.dtype
    g = _gen(7)  # the model's own input sizes, random values (the UNet's work does not depend on them)
    x = torch.randn(rows, cfg.unet.in_channels, latent, latent, generator=g).to(dev, dtype)
    tokens = torch.randn(rows, cfg.text.max_length, cfg.unet.cross_attention_dim, generator=g).to(dev, dtype)
    cond = PromptEmbeddings(tokens)  # SD 1.x / 2.x conditioning: the tokens alone
    t = torch.full((rows,), 501, device=dev)
    if pipe is None:
        call = lambda: model.unet_output(x, 501, cond)  # noqa: E731
    else:
        call = lambda: pipe.unet(x, t, encoder_hidden_states=tokens, return_dict=False)[0]  # noqa: E731
    kernel = next(p for p in (model.unet if pipe is None else pipe.unet).parameters() if p.ndim == 4)
    channels_last = kernel.is_contiguous(memory_format=torch.channels_last)
    stages = Stages(dev)
    with torch.no_grad():
        if gflop is None:
            counter = FlopCounterMode(display=False)
            with counter:
                call()
            gflop = counter.get_total_flops() / 1e9
        for _ in range(2):  # warm-up (compiled: the graph of this shape)
            call()
        times = []
        for _ in range(reps):
            stages.sync()
            t0 = time.perf_counter()
            call()
            stages.sync()
            times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    tflops = gflop / sec / 1e3
    return UnetRate("ours" if pipe is None else "diffusers", rows, compiled, channels_last, gflop, sec, tflops,
                    tflops / peak.tflops)


def contiguous_unet_rates(model: StableDiffusion, latent: int, rows: tuple[int, ...], reps: int, peak: Peak,
                          counted: list[UnetRate]) -> list[UnetRate]:
    """Our eager UNet in the contiguous (NCHW) layout at `rows`, then back in load()'s layout: what channels_last
    buys."""
    model.unet.to(memory_format=torch.contiguous_format)
    try:
        return [unet_rate(model, latent, n, reps, peak, False,
                          next(u.gflop for u in counted if u.rows == n and u.side == "ours")) for n in rows]
    finally:
        use_fast_layout(model)


# ---- the run ----------------------------------------------------------------------------------------------------
def subjects(args: argparse.Namespace) -> tuple[Subject, Subject, Any]:
    """Ours in --dtype and diffusers' pipeline in its dtype on the same random weights: one model (shared tensors)
    when the dtypes agree, else a copy of the same weights cast for diffusers."""
    device = torch.device(args.device)
    base = build(args.model, "cpu", torch.float32, size=args.size)  # seeded random weights, built once

    def place(model: StableDiffusion, dtype: torch.dtype) -> StableDiffusion:
        return use_fast_layout(model.to(device=device, dtype=dtype).eval())  # load()'s: NHWC on CUDA in half

    ours_dtype, ref_dtype = DTYPES[args.dtype], DTYPES[diffusers_dtype(args)]
    ref_model = copy.deepcopy(base.model) if ours_dtype != ref_dtype else base.model
    ours = Subject(base.name, place(base.model, ours_dtype), base.image, base.source, base.target, base.note)
    ref = ours if ref_model is base.model else Subject(base.name, place(ref_model, ref_dtype), base.image,
                                                       base.source, base.target, base.note)
    return ours, ref, diffusers_pipeline(ref.model, sample_size=args.size // 8)


def diffusers_dtype(args: argparse.Namespace) -> str:
    return "fp16" if args.device.startswith("cuda") else "fp32"  # CPU: half-precision convolutions are not fast


def sdxl_measurements(args: argparse.Namespace) -> tuple[Measurement, ...]:
    from . import sdxl

    out = Path("/tmp") / f"bench-gpu-sdxl-{time.time_ns()}.json"
    sdxl.main(["--device", args.device, "--dtype", args.dtype, "--size", str(args.sdxl_size), "--reps",
               str(max(args.reps // 2, 1)), "--out", str(out)])
    data = json.loads(out.read_text())
    out.unlink()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()  # the SDXL networks are gone: give their blocks back before the compiled runs
    return tuple(Measurement(**{**m, "seconds_all": tuple(m["seconds_all"])}) for m in data["measurements"])


def sdxl_chain(args: argparse.Namespace, s: GpuSettings) -> list[SideTiming]:
    """Our default chain (edit_image, the paper's defaults, eager) on a random SDXL base at --sdxl-size, batch 1:
    the UNet in --dtype, the VAE fp32 (force_upcast), both text encoders; per stage, as the SD sides."""
    device = torch.device(args.device)
    model = random_model_on(SDXL, args.device, DTYPES[args.dtype], seed=0)
    sub = Subject("sdxl", model, _image("sdxl", args.sdxl_size, 0), "a bowl of fruits", "a bowl of pears")
    try:
        return time_sides([ours_side(sub, s, 1, "ours-sdxl")], max(args.reps - 1, 1), device)
    finally:
        del model, sub
        if device.type == "cuda":
            torch.cuda.empty_cache()


@contextlib.contextmanager
def phase(name: str, errors: dict[str, str]) -> Iterator[None]:
    """A phase whose failure is recorded and logged, not fatal: a lent GPU's minutes are not spent twice."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - recorded, shown, and the exit status says so
        import traceback

        traceback.print_exc()
        errors[name] = f"{type(exc).__name__}: {exc}"[:2000]
        _log(f"{name} failed: {errors[name]}")


def targets(timings: list[SideTiming], unet: list[UnetRate], device: torch.device) -> tuple[Target, ...]:
    """Issue 15's GPU targets; on a CPU (a check that the script runs) `met` stays None."""
    if device.type != "cuda":
        return tuple(Target(name, goal, None, None) for name, goal in TARGETS.items())
    by = {(t.side, t.batch): t for t in timings}
    best1 = min((t.seconds_per_edit for t in timings if t.side.startswith("ours") and t.side != "ours-compat"
                 and t.batch == 1), default=None)
    diff1 = by.get(("diffusers", 1))
    speedup = None if best1 is None or diff1 is None else diff1.seconds_per_edit / best1
    big = [u.fraction_of_peak for u in unet if u.rows > 2 and u.side == "ours"]
    frac = max(big) if big else None
    ours = [t for t in timings if t.side.startswith("ours") and t.side != "ours-compat"]
    mem = [(t, by.get(("diffusers", t.batch))) for t in ours]
    mem_ok = all(d is None or t.peak_memory_bytes <= d.peak_memory_bytes for t, d in mem)

    def target(name: str, goal: float, value: float | None, met: Callable[[float], bool]) -> Target:
        return Target(name, goal, value, None if value is None else met(value))

    return (target("seconds_per_edit_batch1", TARGETS["seconds_per_edit"], best1, lambda v: v <= 0.5),
            target("speedup_vs_diffusers_batch1", TARGETS["speedup_vs_diffusers"], speedup, lambda v: v >= 5.0),
            target("unet_fraction_of_peak_big_batch", TARGETS["unet_fraction_of_peak"], frac, lambda v: v >= 0.5),
            Target("peak_memory_at_most_diffusers", 1.0, None, mem_ok))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="ours (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--model", choices=("sd15", "tiny"), default="sd15")
    p.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of every side (default 50: both defaults)")
    p.add_argument("--num-maps", type=int, default=10, help="the mask's noise maps (default 10: both defaults)")
    p.add_argument("--batch", type=int, default=8, help="images per call for edits per second (default 8)")
    p.add_argument("--reps", type=int, default=3, help="timed rounds per side (default 3), medians reported")
    p.add_argument("--unet-reps", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="also time our chain with the UNet compiled")
    p.add_argument("--compile-mode", default=None, help="StableDiffusion.compile_unet's mode (default: its own)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (default inductor; aot_eager: a quick CPU check of the compiled path)")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark on for the whole run, both sides (a process-wide switch)")
    p.add_argument("--sdxl", action="store_true", help="also bench/sdxl.py's SDXL UNet and VAE at --sdxl-size")
    p.add_argument("--sdxl-size", type=int, default=1024)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--show", type=Path, default=None, metavar="JSON",
                   help="print the table of a results file and run nothing")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.show is not None:
        print(summary(json.loads(args.show.read_text(encoding="utf-8"))))
        return 0
    device = torch.device(args.device)
    # diffusers' documented defaults (its signatures): the paper's, except the inversion's guidance (7.5, with "": 80
    # UNet rows where the paper's unconditional encoding has 40); the compat chain does the same work
    chain = Settings(steps=args.steps, num_maps=args.num_maps, mask_strength=0.5, strength=0.8, guidance=7.5,
                     inversion_guidance=7.5)
    t0 = time.perf_counter()
    ours, ref, pipe = subjects(args)
    s = GpuSettings(args.model, str(device), args.dtype, diffusers_dtype(args), args.size, args.steps, args.num_maps,
                    args.batch, args.reps, args.compile, args.compile_mode, args.compile_backend, chain,
                    args.cudnn_benchmark)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark  # this bench process's switch, never the library's
    _log(f"built in {time.perf_counter() - t0:.1f} s: {s}")
    latent = args.size // ours.model.config.vae.downsample_factor
    with torch.no_grad():
        check, drift = fidelity(ours, ref, pipe, s)
        _log(f"fidelity: {check}; in {s.dtype}: {drift}")
        peak = device_peak(device, DTYPES[args.dtype])
        _log(f"peak: {peak}")
        unet = [unet_rate(side.model, latent, rows, args.unet_reps, peak, False, pipe=p)
                for rows in (2, 2 * args.batch) for side, p in ((ours, None), (ref, pipe))]
        if any(u.channels_last for u in unet if u.side == "ours"):  # load()'s layout on CUDA in half precision
            unet += contiguous_unet_rates(ours.model, latent, (2, 2 * args.batch), args.unet_reps, peak, unet)
        rates = [(u.side, u.rows, u.channels_last, round(u.tflops, 3), round(u.fraction_of_peak, 3)) for u in unet]
        _log(f"UNet (side, rows, channels_last, TFLOP/s, fraction of peak): {rates}")
        timings: list[SideTiming] = []
        shared = shares_weights(ours.model, pipe)
        warmup: dict[str, float] = {}
        sdxl: tuple[Measurement, ...] | None = None
        sdxl_timings: list[SideTiming] = []
        errors: dict[str, str] = {}

        def snapshot() -> Results:
            """The results so far, written at once: should a lent machine's time run out (compilation is the long
            part), what was measured is kept."""
            results = Results(_env(args.device), s, shared, check, drift, dict(warmup), tuple(timings), peak,
                              tuple(unet), sdxl, tuple(sdxl_timings), targets(timings, unet, device), dict(errors),
                              os.getloadavg())
            write(args.out, results)
            return results

        snapshot()
        timings += time_sides([ours_side(ours, s, 1), compat_side(ours, s), diffusers_side(ref, pipe, s, 1)],
                              args.reps, device)
        snapshot()
        timings += time_sides([ours_side(ours, s, args.batch), diffusers_side(ref, pipe, s, args.batch)],
                              max(args.reps - 1, 1), device)
        snapshot()
        if args.compile:
            with phase("compile", errors):
                ours.model.compile_unet(args.compile_mode, backend=args.compile_backend)

        def compiled(batch: int) -> None:
            """The compiled chain at `batch`: its warm-up (each batch shape compiled once: batch 1 has 3, the mask's
            2n rows, the inversion's 1, the edit's 2; --batch 2 more), its UNet rate, then timed against diffusers."""
            if not args.compile or "compile" in errors:
                return
            with phase(f"compiled batch {batch}", errors):
                t1 = time.perf_counter()
                ours_side(ours, s, batch).run(Stages(device))
                warmup[f"batch {batch}"] = time.perf_counter() - t1
                _log(f"compiled ({ours.model.compile_mode}) and warmed up at batch {batch} in "
                     f"{warmup[f'batch {batch}']:.1f} s")
                rows = 2 * batch
                unet.append(unet_rate(ours.model, latent, rows, args.unet_reps, peak, True,
                                      next(u.gflop for u in unet if u.rows == rows and u.side == "ours")))
                sides = [ours_side(ours, s, batch, "ours-compiled")]
                sides += [diffusers_side(ref, pipe, s, 1)] if batch == 1 else []
                timings.extend(time_sides(sides, args.reps if batch == 1 else max(args.reps - 1, 1), device))
            snapshot()

        # Most telling first, should the machine's time run out: the compiled chain at batch 1 (issue 15's seconds
        # per edit), then SDXL (eager, about a minute), then the compiled chain at --batch.
        compiled(1)
        if args.sdxl:
            with phase("sdxl", errors):
                sdxl = sdxl_measurements(args)
            snapshot()
            with phase("sdxl chain", errors):
                sdxl_timings += sdxl_chain(args, s)
            snapshot()
        compiled(args.batch)
    results = snapshot()
    print(summary(asdict(results)))
    return 0 if check.passed and not results.errors else 1


def write(out: Path | None, results: Results) -> None:
    if out is not None:
        out.write_text(json.dumps(asdict(results), indent=2) + "\n", encoding="utf-8")
        _log(f"wrote {out}")


def summary(r: dict[str, Any]) -> str:
    """The table, from the JSON form of Results (so `--show FILE` prints a committed file as a fresh run would)."""
    st, fid, drift = r["settings"], r["fidelity"], r["fidelity_dtype"]
    lines = [f"{r['env']['device']}, torch {r['env']['torch']}, ours {st['dtype']}, diffusers {st['diffusers_dtype']}, "
             f"{st['model']} at {st['size']} x {st['size']}, {st['steps']} steps, {st['num_maps']} maps"
             f"{', cudnn.benchmark' if st.get('cudnn_benchmark') else ''}; fidelity "
             f"{'passed' if fid['passed'] else 'FAILED'} (inversion {fid['inversion_rel_err']:.2e}, edit "
             f"{fid['edit_rel_err_same_inputs']:.2e}, mask pixels differing {fid['mask_pixels_differing']})"
             + ("" if drift is None else f"; in {st['dtype']}: inversion {drift['inversion_rel_err']:.2e}, edit "
                f"{drift['edit_rel_err_same_inputs']:.2e}, mask pixels differing {drift['mask_pixels_differing']} "
                f"({'within' if drift['passed'] else 'OUTSIDE'} the stated tolerance)"),
             "| side | batch | mask s | invert s | edit s | s / edit | edits / s | peak GiB |", "|" + " --- |" * 8]
    for t in [*r["timings"], *r.get("sdxl_chain", ())]:
        lines.append(f"| {t['side']} | {t['batch']} | " + " | ".join(f"{t['median_s'][x]:.3f}" for x in STAGES)
                     + f" | {t['seconds_per_edit']:.3f} | {t['edits_per_s']:.2f} | "
                     f"{t['peak_memory_bytes'] / 2**30:.2f} |")
    for k, v in r["compile_warmup_s"].items():
        lines.append(f"compile warm-up, {k}: {v:.1f} s")
    peak = r["peak"]
    lines.append(f"matmul {peak['matmul_n']}^3 in {st['dtype']}: {peak['matmul_tflops']:.3g} TFLOP/s")
    for u in r["unet"]:
        lines.append(f"UNet {u['side']} {u['rows']} rows{' compiled' if u['compiled'] else ''}"
                     f"{'' if u.get('channels_last', True) else ' NCHW'}: {u['tflops']:.3g} TFLOP/s = "
                     f"{100 * u['fraction_of_peak']:.1f}% of {peak['tflops']:.3g} ({peak['source']})")
    for m in r["sdxl"] or ():
        lines.append(f"SDXL {m['what']}: {m['seconds_median']:.3f} s, peak {m['peak_bytes'] / 2**30:.2f} GiB")
    lines += [f"target {t['name']}: goal {t['goal']}, value {t['value']}, met {t['met']}" for t in r["targets"]]
    lines += [f"ERROR in {k}: {v}" for k, v in r.get("errors", {}).items()]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
