"""Full DiffEdit (mask + inversion + edit): our code against diffusers' StableDiffusionDiffEditPipeline.

    python -m bench.run --out bench/results.json                     # tiny, SD 1.5 architecture, toy
    python -m bench.run --models tiny --reps 3 --steps 6 --num-maps 2 # a quick look

Per model, in one process: (1) a fidelity check, ours with diffusers_compat=True against diffusers on the same
weights, inputs and seeds (a benchmark of different work would be worthless); the same run counts the FLOPs of
every stage (torch.utils.flop_counter) and serves as warm-up; (2) `--reps` timed repetitions, the sides
alternating (order rotated each repetition), per-stage wall time and per-component time (UNet, VAE encoder,
VAE decoder, text encoder: forward hooks; "other" is the rest: glue, schedulers, Python) — medians reported;
(3) UNet forward throughput at the edit's batch (CFG: 2) against the machine's matmul throughput in the same dtype;
(4) peak memory of one full run per side, each in a fresh subprocess (Linux: VmHWM reset through
/proc/self/clear_refs; CUDA: max_memory_allocated).

"ours-paper" (informational, --no-paper to skip) is our default, paper-faithful mode: it does less work (one
VAE encode shared by mask and inversion, the posterior mean) but different numbers, so it is not the
comparison the targets are about.

Every result is a frozen dataclass below (`Results` at the top); the JSON file is `dataclasses.asdict` of it, and
the table is printed from that JSON (so `--show` reads a file exactly as a fresh run does).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from diffedit import edit, generate_mask, invert
from diffedit.edit import Inversion

from .models import MODELS, Subject, build, diffusers_pipeline, shares_weights

STAGES = ("mask", "invert", "edit")
COMPONENTS = ("unet", "vae_encoder", "vae_decoder", "text_encoder")
# Targets of the issue: full DiffEdit ours / diffusers (compat, same settings) on CPU.
TIME_TARGETS = {"tiny": 0.6, "sd15": 0.8}
UNET_PEAK_TARGET = 0.85  # UNet forward throughput / measured fp32 matmul throughput (SD 1.5 architecture)
# Fidelity: the binary masks must be identical; max |ours - diffusers| / max |diffusers| below these.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2}


@dataclass(frozen=True)
class Settings:
    steps: int = 10
    num_maps: int = 2
    mask_strength: float = 0.5  # -> one UNet call (batch 4 x num_maps with CFG) at t = 501 for 10 steps
    strength: float = 0.8  # -> int(steps * strength) inversion steps (batch 1) and edit steps (batch 2)
    guidance: float = 7.5  # mask and edit
    inversion_guidance: float = 1.0  # the paper's unconditional DDIM encoding (diffusers' default would be 7.5)


# ---- the records: one per measured thing; field names are the JSON keys ------------------------------------------
# A repetition's times, one flat mapping per side: "mask", "invert", "edit", "total" and "<stage>.<component>"
# (components: COMPONENTS and "other"), in seconds. Kept flat: the committed JSON files use these keys.
Timing = dict[str, float]


@dataclass(frozen=True)
class Env:
    device: str
    torch: str
    diffusers: str
    threads: int
    python: str
    date_utc: str


@dataclass(frozen=True)
class Matmul:
    """An n x n x n torch.matmul (2 n^3 FLOPs) in `dtype`: the machine's practical peak for the UNets' work."""

    n: int
    dtype: str
    best_gflops: float
    median_gflops: float


@dataclass(frozen=True)
class Check:
    """Ours (compat) against diffusers: masks identical, the rest relative (max |ours - diff| / max |diff|)."""

    tolerance: float
    mask_pixels_differing: int
    mask_fraction_on: float
    inversion_rel_err: float
    edit_rel_err_same_inputs: float  # diffusers' edit run on *our* mask and inversion
    chain_rel_err: float  # informational: each side's own chain
    passed: bool


@dataclass(frozen=True)
class KernelKind:
    """The profiler's time in one kind of matmul-like kernel, and the FLOPs FlopCounterMode counts for it."""

    s: float
    gflop: float
    gflops: float | None  # None where no time was spent in it


@dataclass(frozen=True)
class TopOp:
    op: str
    self_s: float
    calls: int


@dataclass(frozen=True)
class UnetProfile:
    total_s: float
    gemm_share: float  # conv / linear / attention kernels' share of the self time
    kinds: dict[str, KernelKind]
    top: list[TopOp]


@dataclass(frozen=True)
class UnetRun:
    """One UNet forward at the edit's CFG batch, each side: FLOPs counted once, median time."""

    batch: int
    latent: list[int]
    ours_gflop: float
    diffusers_gflop: float
    rel_err: float
    ours_profile: UnetProfile
    ours_s: float
    ours_gflops: float
    diffusers_s: float
    diffusers_gflops: float
    ours_fraction_of_matmul_peak: float
    diffusers_fraction_of_matmul_peak: float


@dataclass(frozen=True)
class MemoryPeak:
    """Peak memory of one full run of one side in a fresh process (MiB); working = peak - base."""

    side: str
    method: str
    base_mib: float
    peak_mib: float
    working_mib: float


@dataclass(frozen=True)
class ProbeFailure:
    error: str  # the end of the subprocess's output


@dataclass(frozen=True)
class Target:
    target: str
    value: float | list[float] | None  # None: a pass / fail target (fidelity)
    met: bool


@dataclass(frozen=True)
class ModelResult:
    """Everything measured on one model."""

    note: str
    image: list[int]
    latent: list[int]
    unet_params_m: float
    shared_weights: bool
    build_s: float
    load_before: tuple[float, float, float]
    date_utc: str
    settings: Settings
    reps: int
    check: dict[str, Check]  # per compat side
    gflop: dict[str, float]  # "side/stage"
    median_s: dict[str, Timing]  # per side
    samples_s: dict[str, list[Timing]]  # per side, every repetition
    ratio: dict[str, float]  # ours / diffusers per stage and total
    ratio_vs_diffusers: dict[str, dict[str, float]]  # per side other than diffusers
    matmul: Matmul  # measured right before the UNet timing
    unet: UnetRun
    memory: dict[str, MemoryPeak | ProbeFailure] | None  # None with --no-memory
    load_after: tuple[float, float, float]
    targets: dict[str, Target]


@dataclass(frozen=True)
class Skipped:
    error: str  # e.g. the toy model before `make toy-model`


@dataclass(frozen=True)
class Results:
    env: Env
    models: dict[str, ModelResult | Skipped | dict[str, Any]]  # dict: a model kept from an earlier file (--merge)
    matmul: Matmul
    matmul_after: Matmul | None  # None in the file written between models


@dataclass(frozen=True)
class RunOutput:
    """What one side's full DiffEdit returned (not serialised)."""

    mask: np.ndarray  # (B, h, w) binary latent mask
    latents: Tensor  # the inverted latents (float, CPU)
    images: np.ndarray
    inversion: Inversion | None  # ours only: the latents the edit starts from


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)  # CPU generators on every device: same bits everywhere


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- timing: stages by context manager, components by forward hooks -------------------------------------------
class Recorder:
    """Wall time per (side, stage) and per (side, stage, component); optional FLOP count per stage."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.side, self.stage_name = "", ""
        self.stage_s: dict[tuple[str, str], float] = {}
        self.comp_s: dict[tuple[str, str, str], float] = defaultdict(float)
        self.flops: dict[tuple[str, str], int] = {}
        self._hooked: set[int] = set()
        self._start: dict[int, float] = {}

    def watch(self, modules: dict[str, torch.nn.Module]) -> None:
        for comp, module in modules.items():
            if id(module) in self._hooked:  # the text encoder is one object shared by both sides
                continue
            self._hooked.add(id(module))
            module.register_forward_pre_hook(self._pre(module))
            module.register_forward_hook(self._post(module, comp))

    def _pre(self, module: torch.nn.Module) -> Callable:
        def hook(*_: Any) -> None:
            _sync(self.device)
            self._start[id(module)] = time.perf_counter()
        return hook

    def _post(self, module: torch.nn.Module, comp: str) -> Callable:
        def hook(*_: Any) -> None:
            _sync(self.device)
            if self.stage_name:
                elapsed = time.perf_counter() - self._start.pop(id(module))
                self.comp_s[(self.side, self.stage_name, comp)] += elapsed
        return hook

    @contextlib.contextmanager
    def stage(self, name: str, count_flops: bool = False) -> Iterator[None]:
        self.stage_name = name
        for comp in COMPONENTS:
            self.comp_s.pop((self.side, name, comp), None)
        counter = FlopCounterMode(display=False) if count_flops else contextlib.nullcontext()
        _sync(self.device)
        start = time.perf_counter()
        with counter:
            yield
        _sync(self.device)
        self.stage_s[(self.side, name)] = time.perf_counter() - start
        if count_flops:
            self.flops[(self.side, name)] = counter.get_total_flops()  # type: ignore[union-attr]
        self.stage_name = ""

    def timing(self, side: str) -> Timing:
        """The last run of `side`: each stage, the total, and each stage's components ("other": the rest)."""
        sample = {st: self.stage_s[(side, st)] for st in STAGES}
        sample["total"] = sum(sample[st] for st in STAGES)
        for st in STAGES:
            comps = {c: self.comp_s.get((side, st, c), 0.0) for c in COMPONENTS}
            for c, v in comps.items():
                sample[f"{st}.{c}"] = v
            sample[f"{st}.other"] = sample[st] - sum(comps.values())
        return sample


# ---- the two implementations, same settings -------------------------------------------------------------------
def run_ours(sub: Subject, s: Settings, rec: Recorder, compat: bool = True, count_flops: bool = False) -> RunOutput:
    m = sub.model
    common: dict[str, Any] = dict(steps=s.steps, diffusers_compat=compat, progress=False)
    with rec.stage("mask", count_flops):
        mask = generate_mask(m, sub.image, sub.source, sub.target, num_maps=s.num_maps,
                             encode_strength=s.mask_strength, guidance=s.guidance, generator=_gen(2), **common)
    with rec.stage("invert", count_flops):
        # The mask's work is handed on, as a user chaining the stages would: its posterior (compat: diffusers
        # encodes the image again for its own posterior sample) and its prompt embeddings (no text encoder here).
        if compat:
            inv = invert(m, prompt=mask.source_embeddings, posterior=mask.posterior, strength=s.strength,
                         guidance=s.inversion_guidance, generator=_gen(3), **common)
        else:  # the paper's recipe: unconditional encoding of the z0 the mask already computed
            inv = invert(m, latents=mask.latents, prompt="", strength=s.strength, guidance=s.inversion_guidance,
                         generator=_gen(3), **common)
    with rec.stage("edit", count_flops):
        out = edit(m, inv, mask, mask.target_embeddings, negative_prompt=mask.source_embeddings,
                   guidance=s.guidance, generator=_gen(4), output_type="np", diffusers_compat=compat,
                   progress=False)
    return RunOutput(mask=mask.latent_mask[:, 0].cpu().numpy(), latents=inv.latents.float().cpu(),
                     images=out.images, inversion=inv)


def run_diffusers(sub: Subject, pipe: Any, s: Settings, rec: Recorder, count_flops: bool = False) -> RunOutput:
    with rec.stage("mask", count_flops):
        mask = pipe.generate_mask(image=sub.image, source_prompt=sub.source, target_prompt=sub.target,
                                  num_maps_per_mask=s.num_maps, mask_encode_strength=s.mask_strength,
                                  num_inference_steps=s.steps, guidance_scale=s.guidance, generator=_gen(2),
                                  output_type="np")
    with rec.stage("invert", count_flops):
        latents = pipe.invert(prompt=sub.source, image=sub.image, num_inference_steps=s.steps,
                              inpaint_strength=s.strength, guidance_scale=s.inversion_guidance,
                              generator=_gen(3)).latents
    with rec.stage("edit", count_flops):
        images = diffusers_edit(sub, pipe, s, mask, latents)
    return RunOutput(mask=mask, latents=latents.float().cpu(), images=images, inversion=None)


def diffusers_edit(sub: Subject, pipe: Any, s: Settings, mask: np.ndarray, latents: Tensor) -> np.ndarray:
    mask_image = torch.from_numpy(np.asarray(mask)).float()[:, None]
    return pipe(prompt=sub.target, mask_image=mask_image, image_latents=latents, inpaint_strength=s.strength,
                num_inference_steps=s.steps, guidance_scale=s.guidance, negative_prompt=sub.source,
                generator=_gen(4), output_type="np").images


def relative_error(ours: Any, theirs: Any) -> float:
    a = torch.as_tensor(np.asarray(ours), dtype=torch.float64)
    b = torch.as_tensor(np.asarray(theirs), dtype=torch.float64)
    return ((a - b).abs().max() / b.abs().max()).item()


def compare(ours: RunOutput, theirs: RunOutput, sub: Subject, pipe: Any, s: Settings, tol: float) -> Check:
    """Masks identical; inversion latents and the edit (diffusers run on *our* mask and inversion: the edit alone,
    not the chain's amplified rounding) within `tol` relative (max |ours - diffusers| / max |diffusers|)."""
    assert ours.inversion is not None, "compare() takes our side first"
    same_inputs = diffusers_edit(sub, pipe, s, ours.mask, ours.inversion.latents)
    differing = int((ours.mask != np.asarray(theirs.mask)).sum())
    inversion_err = relative_error(ours.latents, theirs.latents)
    edit_err = relative_error(ours.images, same_inputs)
    return Check(tolerance=tol, mask_pixels_differing=differing, mask_fraction_on=float(np.asarray(theirs.mask).mean()),
                 inversion_rel_err=inversion_err, edit_rel_err_same_inputs=edit_err,
                 chain_rel_err=relative_error(ours.images, theirs.images),
                 passed=differing == 0 and inversion_err < tol and edit_err < tol)


def check_and_count(sub: Subject, pipe: Any, s: Settings, rec: Recorder, tol: float,
                    sides: list[str]) -> dict[str, Check]:
    """Every compat side must do diffusers' numbers. The runs also count each stage's FLOPs and warm up."""
    outputs = {}
    for side in sides:
        rec.side = side
        outputs[side] = RUNNERS[side](sub, pipe, s, rec, True)
    checks = {side: compare(outputs[side], outputs["diffusers"], sub, pipe, s, tol)
              for side in sides if side == "ours"}
    bad = {side: c for side, c in checks.items() if not c.passed}
    if bad:
        raise AssertionError(f"{sub.name}: not diffusers' numbers: {bad}")
    return checks


RUNNERS: dict[str, Callable[..., RunOutput]] = {
    "ours": lambda sub, pipe, s, rec, flops=False: run_ours(sub, s, rec, compat=True, count_flops=flops),
    "diffusers": lambda sub, pipe, s, rec, flops=False: run_diffusers(sub, pipe, s, rec, count_flops=flops),
    "ours-paper": lambda sub, pipe, s, rec, flops=False: run_ours(sub, s, rec, compat=False, count_flops=flops),
}


# ---- throughput --------------------------------------------------------------------------------------------
def matmul_throughput(device: torch.device, n: int, reps: int, dtype: torch.dtype = torch.float32) -> Matmul:
    """GFLOP/s of an n x n x n torch.matmul (2 n^3 FLOPs) in the UNets' dtype (fp32 on CPU, fp16 on CUDA):
    the machine's practical peak for the work the UNets do."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    torch.matmul(a, b, out=c)
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        torch.matmul(a, b, out=c)
        _sync(device)
        times.append(time.perf_counter() - t0)
    flops = 2 * n**3
    return Matmul(n=n, dtype=str(dtype).removeprefix("torch."), best_gflops=flops / min(times) / 1e9,
                  median_gflops=flops / statistics.median(times) / 1e9)


def unet_throughput(sub: Subject, pipe: Any, batch: int, reps: int, tol: float, peak_gflops: float) -> UnetRun:
    """One UNet forward at the edit's CFG batch: FLOPs counted once, time = median of alternating repetitions;
    each side's GFLOP/s also as a fraction of `peak_gflops` (the matmul measured just before)."""
    m, dev = sub.model, sub.model.device
    h, w = (s // m.config.vae.downsample_factor for s in sub.image.shape[-2:])
    g = _gen(7)
    x = torch.randn(batch, m.config.unet.in_channels, h, w, generator=g).to(dev, m.dtype)
    ctx = torch.randn(batch, m.config.text.max_length, m.config.unet.cross_attention_dim, generator=g).to(dev, m.dtype)
    t = torch.full((batch,), 501, device=dev)
    # (module) -> output; counted through .forward, the eager code even under --compile: a compiled module first
    # called under FlopCounterMode would run eagerly ever after (see compile_both)
    calls = {
        "ours": lambda unet: unet(x, t, ctx),
        "diffusers": lambda unet: unet(x, t, encoder_hidden_states=ctx, return_dict=False)[0],
    }
    modules = {"ours": m.unet, "diffusers": pipe.unet}
    gflop: dict[str, float] = {}
    with torch.no_grad():
        outputs = {}
        for side, call in calls.items():
            counter = FlopCounterMode(display=False)
            with counter:
                outputs[side] = call(modules[side].forward)
            gflop[side] = counter.get_total_flops() / 1e9
            if side == "ours":
                by_op = {str(k): v for k, v in counter.get_flop_counts().get("Global", {}).items()}
            call(modules[side])  # the warm-up (compiled: this input signature's graph)
        rel_err = relative_error(outputs["ours"].float().cpu(), outputs["diffusers"].float().cpu())
        assert rel_err < tol, f"UNet outputs differ: {rel_err:.2e}"
        times: dict[str, list[float]] = {side: [] for side in calls}
        for r in range(reps):
            for side in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
                _sync(dev)
                t0 = time.perf_counter()
                calls[side](modules[side])
                _sync(dev)
                times[side].append(time.perf_counter() - t0)
    profile = profile_unet(lambda: calls["ours"](m.unet), by_op)
    sec = {side: statistics.median(times[side]) for side in calls}
    rate = {side: gflop[side] / sec[side] for side in calls}
    return UnetRun(batch=batch, latent=[h, w], ours_gflop=gflop["ours"], diffusers_gflop=gflop["diffusers"],
                   rel_err=rel_err, ours_profile=profile, ours_s=sec["ours"], ours_gflops=rate["ours"],
                   diffusers_s=sec["diffusers"], diffusers_gflops=rate["diffusers"],
                   ours_fraction_of_matmul_peak=rate["ours"] / peak_gflops,
                   diffusers_fraction_of_matmul_peak=rate["diffusers"] / peak_gflops)


CATEGORIES = {  # profiler kernels -> the FlopCounterMode op that counts their FLOPs
    "conv": (("aten::mkldnn_convolution", "aten::_slow_conv2d_forward", "aten::cudnn_convolution",
              "aten::convolution_overrideable"), ("aten.convolution",)),
    "linear": (("aten::addmm", "aten::mm", "aten::bmm"), ("aten.addmm", "aten.mm", "aten.bmm")),
    "attention": (("aten::_scaled_dot_product_flash_attention_for_cpu",
                   "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_flash_attention"),
                  ("aten._scaled_dot_product_flash_attention_for_cpu", "aten._scaled_dot_product_efficient_attention",
                   "aten._scaled_dot_product_flash_attention")),
}
GEMM_OPS = tuple(kernel for kernels, _ in CATEGORIES.values() for kernel in kernels)


@torch.no_grad()
def profile_unet(call: Callable[[], Tensor], flops_by_op: dict[str, int]) -> UnetProfile:
    """Where one UNet forward spends its time: top ops by self time, the share of matmul-like kernels
    (convolutions, linear layers, attention) against everything else (norms, activations, copies, adds), and
    the GFLOP/s each kind of matmul-like kernel reaches (CPU times; on CUDA they are launch times)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        call()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
    kinds = {}
    for kind, (kernels, ops) in CATEGORIES.items():
        seconds = sum(e.self_cpu_time_total for e in events if e.key in kernels) / 1e6
        gflop = sum(flops_by_op.get(op, 0) for op in ops) / 1e9
        kinds[kind] = KernelKind(s=seconds, gflop=gflop, gflops=gflop / seconds if seconds else None)
    return UnetProfile(total_s=total / 1e6, gemm_share=gemm / total, kinds=kinds,
                       top=[TopOp(op=e.key, self_s=e.self_cpu_time_total / 1e6, calls=e.count) for e in top])


# ---- peak memory, each side in a fresh process -----------------------------------------------------------------
def _status_mib(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) / 1024  # type: ignore[union-attr]


def _max_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def probe(args: argparse.Namespace) -> None:
    """(Subprocess) build the model, run one full DiffEdit on one side, print its memory high-water mark."""
    device, dtype = _device_dtype(args.device)
    s = _settings(args, args.models)
    sub = build(args.models, device, dtype, size=args.size)
    side = args.probe
    # Every side builds the pipeline (diffusers imported, its modules holding our tensors: no extra weights), so
    # the baselines match and the peaks differ by the runs alone.
    pipe = diffusers_pipeline(sub.model)
    rec = Recorder(torch.device(device))
    gc.collect()
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        method, base = "torch.cuda.max_memory_allocated", torch.cuda.memory_allocated() / 2**20
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
            method, base = "VmHWM after clear_refs", _status_mib("VmRSS")
        except OSError:
            method, base = "ru_maxrss (includes the build: no clear_refs)", _max_rss_mib()
    with torch.no_grad():
        RUNNERS[side](sub, pipe, s, rec)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _status_mib("VmHWM") if "clear_refs" in method else _max_rss_mib()
    result = MemoryPeak(side=side, method=method, base_mib=base, peak_mib=peak, working_mib=peak - base)
    print("BENCH_PROBE " + json.dumps(asdict(result)), flush=True)


def measure_memory(args: argparse.Namespace, name: str, sides: list[str]) -> dict[str, MemoryPeak | ProbeFailure]:
    out: dict[str, MemoryPeak | ProbeFailure] = {}
    for side in sides:
        cmd = [sys.executable, "-m", "bench.run", "--probe", side, "--models", name, "--steps", str(args.steps),
               "--strength", str(_settings(args, name).strength),
               "--num-maps", str(args.num_maps), "--device", args.device, "--threads", str(torch.get_num_threads())]
        if args.size:
            cmd += ["--size", str(args.size)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_PROBE ")]
        if proc.returncode or not lines:
            out[side] = ProbeFailure(error=(proc.stderr or proc.stdout)[-2000:])
        else:
            out[side] = MemoryPeak(**json.loads(lines[-1][len("BENCH_PROBE "):]))
    return out


# ---- one model -----------------------------------------------------------------------------------------------
def timed_reps(sub: Subject, pipe: Any, s: Settings, rec: Recorder, sides: list[str], reps: int,
               name: str) -> dict[str, list[Timing]]:
    """`reps` full runs per side, the order rotated each repetition (no side always runs first)."""
    samples: dict[str, list[Timing]] = {side: [] for side in sides}
    for r in range(reps):
        order = sides[r % len(sides):] + sides[: r % len(sides)]
        for side in order:
            rec.side = side
            RUNNERS[side](sub, pipe, s, rec)
            samples[side].append(rec.timing(side))
        _log(f"[{name}] rep {r + 1}/{reps}: " + ", ".join(f"{sd} {samples[sd][-1]['total']:.2f} s" for sd in sides))
    return samples


def compile_both(sub: Subject, pipe: Any, s: Settings, rec: Recorder, sides: list[str], name: str) -> None:
    """Compile both UNets (the bulk of the work), then one untimed run per side: every batch shape's warm-up.

    After the fidelity check, not before: a compiled UNet first called under FlopCounterMode (the check counts
    FLOPs) is marked skipped by Dynamo and runs eagerly ever after (torch 2.13); ours avoids that itself
    (StableDiffusion._unet runs such a call through forward()), diffusers' does not. The compiled graphs are
    therefore not checked for fidelity here: tests/test_compile.py holds them to eager's numbers."""
    sub.model.compile_unet()
    pipe.unet.compile()
    for side in sides:
        t0 = time.perf_counter()
        rec.side = side
        RUNNERS[side](sub, pipe, s, rec)
        _log(f"[{name}] {side}: compiled and warmed up in {time.perf_counter() - t0:.1f} s")


def bench_model(name: str, args: argparse.Namespace) -> ModelResult:
    device, dtype = _device_dtype(args.device)
    s = _settings(args, name)
    reps = _reps(args, name)
    load_before = os.getloadavg()
    t_build = time.perf_counter()
    sub = build(name, device, dtype, size=args.size)
    pipe = diffusers_pipeline(sub.model)
    build_s = time.perf_counter() - t_build
    built = dict(note=sub.note, image=list(sub.image.shape[-2:]),
                 latent=[x // sub.model.config.vae.downsample_factor for x in sub.image.shape[-2:]],
                 unet_params_m=sum(p.numel() for p in sub.model.unet.parameters()) / 1e6,
                 shared_weights=shares_weights(sub.model, pipe), build_s=build_s, load_before=load_before,
                 date_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), settings=s, reps=reps)
    _log(f"[{name}] built in {build_s:.1f} s ({built['unet_params_m']:.1f}M UNet params, "
         f"shared weights: {built['shared_weights']})")
    rec = Recorder(torch.device(device))
    if not args.compile:
        for m in (sub.model, pipe):
            rec.watch(dict(unet=m.unet, vae_encoder=m.vae.encoder, vae_decoder=m.vae.decoder,
                           text_encoder=m.text_encoder))
    tol = TOLERANCE[dtype]

    sides = ["ours", "diffusers"] + ([] if args.no_paper else ["ours-paper"])
    with torch.no_grad():
        t0 = time.perf_counter()
        check = check_and_count(sub, pipe, s, rec, tol, sides)
        gflop = {f"{side}/{stage}": f / 1e9 for (side, stage), f in rec.flops.items()}
        _log(f"[{name}] fidelity check passed in {time.perf_counter() - t0:.1f} s: {check}")
        if args.compile:
            compile_both(sub, pipe, s, rec, sides, name)
        samples = timed_reps(sub, pipe, s, rec, sides, reps, name)
        median = {side: {k: statistics.median(x[k] for x in samples[side]) for k in samples[side][0]}
                  for side in sides}
        ratio_vs = {sd: {k: median[sd][k] / median["diffusers"][k] for k in (*STAGES, "total")}
                    for sd in sides if sd != "diffusers"}
        # The matmul reference right before the UNet timing, under the same load as it.
        mm = matmul_throughput(torch.device(device), args.matmul_size, 5, dtype)
        unet = unet_throughput(sub, pipe, batch=2 if s.guidance > 1 else 1, reps=args.unet_reps, tol=tol,
                               peak_gflops=mm.best_gflops)
        _log(f"[{name}] UNet: ours {unet.ours_gflops:.1f} GFLOP/s, diffusers {unet.diffusers_gflops:.1f} GFLOP/s")
    del sub, pipe, rec
    gc.collect()
    memory = None
    if not args.no_memory:
        memory = measure_memory(args, name, sides)
        _log(f"[{name}] memory: {json.dumps({sd: asdict(m) for sd, m in memory.items()})}")
    res = ModelResult(**built, check=check, gflop=gflop, median_s=median, samples_s=samples,
                      ratio=ratio_vs["ours"], ratio_vs_diffusers=ratio_vs, matmul=mm, unet=unet, memory=memory,
                      load_after=os.getloadavg(), targets={})
    return replace(res, targets=targets(name, res))


def targets(name: str, res: ModelResult) -> dict[str, Target]:
    out: dict[str, Target] = {}
    if name in TIME_TARGETS:
        total = res.ratio["total"]
        out["total_ratio"] = Target(target=f"<= {TIME_TARGETS[name]}", value=total, met=total <= TIME_TARGETS[name])
    if name == "sd15":
        frac = res.unet.ours_fraction_of_matmul_peak
        out["unet_fraction_of_matmul_peak"] = Target(target=f">= {UNET_PEAK_TARGET}", value=frac,
                                                     met=frac >= UNET_PEAK_TARGET)
    mem = res.memory or {}
    ours, theirs = mem.get("ours"), mem.get("diffusers")
    if isinstance(ours, MemoryPeak) and isinstance(theirs, MemoryPeak):
        out["peak_memory"] = Target(target="ours <= diffusers", value=[ours.peak_mib, theirs.peak_mib],
                                    met=ours.peak_mib <= theirs.peak_mib)
    for side, c in res.check.items():
        out[f"fidelity_{side}"] = Target(target=f"masks identical, rel err < {c.tolerance:.0e}", value=None,
                                         met=c.passed)
    return out


# ---- report: from the JSON (a fresh run's or an earlier file's) ------------------------------------------------
def table(results: dict[str, Any]) -> str:
    env, mm = results["env"], results["matmul"]
    lines = [f"{env['device']} | torch {env['torch']} | diffusers {env['diffusers']} | {env['threads']} threads | "
             f"{mm.get('dtype', 'float32')} matmul {mm['best_gflops']:.1f} GFLOP/s "
             f"(best; median {mm['median_gflops']:.1f}, n={mm['n']})"]
    for name, r in results["models"].items():
        if "error" in r:
            lines.append(f"\n== {name}: skipped: {r['error']}")
        else:
            lines += _model_table(name, r)
    return "\n".join(lines)


def _model_table(name: str, r: dict[str, Any]) -> list[str]:
    sides = list(r["median_s"])
    med = r["median_s"]
    lines = [f"\n== {name} ({r['note']}): image {r['image'][0]}x{r['image'][1]}, "
             f"latent {r['latent'][0]}x{r['latent'][1]}, "
             f"load avg {r['load_before'][0]:.2f} -> {r['load_after'][0]:.2f}"]
    s = r["settings"]
    lines.append(f"settings: steps {s['steps']}, mask strength {s['mask_strength']} x {s['num_maps']} maps, inversion "
                 f"strength {s['strength']} (guidance {s['inversion_guidance']}), edit guidance {s['guidance']}; "
                 f"median of {r['reps']} alternating reps")
    others = list(r["ratio_vs_diffusers"])
    lines.append(f"{'stage':<8}" + "".join(f"{sd + ' s':>14}" for sd in sides)
                 + "".join(f"{sd.replace('ours-', '') + '/diff':>12}" for sd in others)
                 + "".join(f"{'GFLOP ' + sd:>18}" for sd in sides))

    def flop(sd: str, st: str) -> float:
        return sum(r["gflop"][f"{sd}/{x}"] for x in STAGES) if st == "total" else r["gflop"][f"{sd}/{st}"]

    for st in (*STAGES, "total"):
        lines.append(f"{st:<8}" + "".join(f"{med[sd][st]:>14.3f}" for sd in sides)
                     + "".join(f"{r['ratio_vs_diffusers'][sd][st]:>12.3f}" for sd in others)
                     + "".join(f"{flop(sd, st):>18.1f}" for sd in sides))
    lines.append(f"{'total, best rep':<16}"
                 + "".join(f"{sd} {min(x['total'] for x in r['samples_s'][sd]):.3f} s  " for sd in sides)
                 + "(less sensitive to other load than the median)")

    def components(sd: str, st: str) -> str:
        shown = [f"{c.replace('vae_', '').replace('_encoder', '')} {med[sd][f'{st}.{c}']:.3f}"
                 for c in (*COMPONENTS, "other") if med[sd][f"{st}.{c}"] > 0.0005]
        return f"{st}[" + ", ".join(shown) + "]"

    lines.append("time by component (median s): "
                 + "; ".join(f"{sd} " + " ".join(components(sd, st) for st in STAGES) for sd in sides))
    u, rmm = r["unet"], r["matmul"]
    lines.append(f"UNet forward, batch {u['batch']} at {u['latent'][0]}x{u['latent'][1]}: {u['ours_gflop']:.1f} GFLOP; "
                 f"ours {u['ours_s'] * 1e3:.1f} ms = {u['ours_gflops']:.1f} GFLOP/s "
                 f"({100 * u['ours_fraction_of_matmul_peak']:.0f}% of {rmm.get('dtype', 'float32')} matmul "
                 f"{rmm['best_gflops']:.1f} GFLOP/s measured just before); "
                 f"diffusers {u['diffusers_s'] * 1e3:.1f} ms = {u['diffusers_gflops']:.1f} GFLOP/s "
                 f"({100 * u['diffusers_fraction_of_matmul_peak']:.0f}%)")
    pr = u.get("ours_profile")
    if pr:
        kinds = ", ".join(f"{k} {v['s']:.2f} s = {v['gflops']:.0f} GFLOP/s" for k, v in pr["kinds"].items()
                          if v["gflops"])
        top = ", ".join(f"{e['op'].replace('aten::', '')} {e['self_s']:.2f}" for e in pr["top"][:10])
        lines.append(f"ours UNet profile (one forward, {pr['total_s']:.2f} s): {100 * pr['gemm_share']:.0f}% in "
                     f"conv/linear/attention kernels ({kinds}); top ops (self s): {top}")
    if r.get("memory"):
        lines.append("peak memory (fresh process, one run): " + "; ".join(
            f"{sd} {m['peak_mib']:.0f} MiB (working {m['working_mib']:.0f} MiB over {m['base_mib']:.0f})"
            if "peak_mib" in m else f"{sd} failed" for sd, m in r["memory"].items()))
    for sd, c in r["check"].items():
        lines.append(f"fidelity {sd} vs diffusers: mask pixels differing {c['mask_pixels_differing']} "
                     f"(mask {100 * c['mask_fraction_on']:.0f}% on), inversion {c['inversion_rel_err']:.1e}, "
                     f"edit on same inputs {c['edit_rel_err_same_inputs']:.1e} (tolerance {c['tolerance']:.0e}); "
                     f"own chains {c['chain_rel_err']:.1e}")
    lines.append("targets: " + "; ".join(
        f"{k} {v['target']}: {'MET' if v['met'] else 'MISSED'}"
        + (f" ({_fmt(v['value'])})" if v.get("value") is not None else "") for k, v in r["targets"].items()))
    return lines


def _fmt(v: Any) -> str:
    return ", ".join(f"{x:.3g}" for x in v) if isinstance(v, list) else f"{v:.3g}"


# ---- plumbing --------------------------------------------------------------------------------------------------
def _device_dtype(device: str) -> tuple[str, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device, torch.float16 if device.startswith("cuda") else torch.float32


# Per-model defaults: the SD 1.5 architecture keeps a few UNet calls per stage (10 steps, 0.3 -> 3 inversion and 3
# edit steps) so that one full run stays around a minute or two per side on a 2-core CPU.
DEFAULTS = {"tiny": dict(reps=5, strength=0.8), "toy": dict(reps=5, strength=0.8), "sd15": dict(reps=3, strength=0.3)}


def _settings(args: argparse.Namespace, name: str = "tiny") -> Settings:
    strength = args.strength or DEFAULTS.get(name, DEFAULTS["tiny"])["strength"]
    return Settings(steps=args.steps, num_maps=args.num_maps, strength=strength)


def _reps(args: argparse.Namespace, name: str) -> int:
    return args.reps or DEFAULTS.get(name, DEFAULTS["tiny"])["reps"]


def _log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def _env(device: str) -> Env:
    import diffusers

    cpu = platform.processor()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU: {cpu} ({os.cpu_count()} cores)"
    return Env(device=name, torch=torch.__version__, diffusers=diffusers.__version__, threads=torch.get_num_threads(),
               python=platform.python_version(), date_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,sd15,toy",
                   help=f"comma-separated, from {MODELS} (toy: skipped if its weights are missing)")
    p.add_argument("--reps", type=int, default=0,
                   help="timed repetitions per side, median reported (default: 5; sd15 3)")
    p.add_argument("--strength", type=float, default=0.0, help="inversion / edit strength (default: 0.8; sd15 0.3)")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps (mask at strength 0.5, the rest at --strength)")
    p.add_argument("--num-maps", type=int, default=2, help="noise maps for the mask")
    p.add_argument("--size", type=int, default=0, help="image side (default: tiny/toy 64, sd15 256)")
    p.add_argument("--unet-reps", type=int, default=5, help="timed UNet forwards per side")
    p.add_argument("--matmul-size", type=int, default=4096)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (cuda: fp16, channels_last)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile both UNets after the fidelity check, warm up, then time (no component timing)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--no-paper", action="store_true", help="skip our default (paper) mode, informational")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--out", default="bench/results.json")
    p.add_argument("--merge", action="store_true", help="add to / replace models in an existing --out file")
    p.add_argument("--show", action="store_true", help="print the table of an existing --out file and exit")
    p.add_argument("--probe", choices=tuple(RUNNERS), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _write(out: Path, results: Results) -> dict[str, Any]:
    """The JSON file is asdict(results); returns what was written, as read back."""
    text = json.dumps(asdict(results), indent=1, default=str)
    out.write_text(text)
    return json.loads(text)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.probe:
        return probe(args)
    if args.show:
        return print(table(json.loads(Path(args.out).read_text())))
    device, dtype = _device_dtype(args.device)
    args.device = device
    matmul = matmul_throughput(torch.device(device), args.matmul_size, 5, dtype)
    results = Results(env=_env(device), models={}, matmul=matmul, matmul_after=None)
    _log(f"matmul: {matmul}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge and out.is_file():  # keep the other models' results of an earlier run
        results.models.update(json.loads(out.read_text()).get("models", {}))
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        try:
            results.models[name] = bench_model(name, args)
        except FileNotFoundError as e:  # the toy model before `make toy-model`
            results.models[name] = Skipped(error=str(e))
            _log(f"[{name}] skipped: {e}")
        _write(out, results)
    after = matmul_throughput(torch.device(device), args.matmul_size, 5, dtype)
    written = _write(out, replace(results, matmul_after=after))
    print(table(written))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
