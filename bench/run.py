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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from diffedit import edit, generate_mask, invert

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
                self.comp_s[(self.side, self.stage_name, comp)] += time.perf_counter() - self._start.pop(id(module))
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


# ---- the two implementations, same settings -------------------------------------------------------------------
def run_ours(sub: Subject, s: Settings, rec: Recorder, compat: bool = True, count_flops: bool = False) -> dict[str, Any]:
    m = sub.model
    common = dict(steps=s.steps, diffusers_compat=compat, progress=False)
    with rec.stage("mask", count_flops):
        mask = generate_mask(m, sub.image, sub.source, sub.target, num_maps=s.num_maps, encode_strength=s.mask_strength,
                             guidance=s.guidance, generator=_gen(2), **common)
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
        out = edit(m, inv, mask, mask.target_embeddings, negative_prompt=mask.source_embeddings, guidance=s.guidance,
                   generator=_gen(4), output_type="np", diffusers_compat=compat, progress=False)
    return dict(mask=mask.latent_mask[:, 0].cpu().numpy(), latents=inv.latents.float().cpu(), images=out.images,
                inversion=inv, mask_result=mask)


def run_diffusers(sub: Subject, pipe: Any, s: Settings, rec: Recorder, count_flops: bool = False) -> dict[str, Any]:
    with rec.stage("mask", count_flops):
        mask = pipe.generate_mask(image=sub.image, source_prompt=sub.source, target_prompt=sub.target,
                                  num_maps_per_mask=s.num_maps, mask_encode_strength=s.mask_strength,
                                  num_inference_steps=s.steps, guidance_scale=s.guidance, generator=_gen(2),
                                  output_type="np")
    with rec.stage("invert", count_flops):
        latents = pipe.invert(prompt=sub.source, image=sub.image, num_inference_steps=s.steps,
                              inpaint_strength=s.strength, guidance_scale=s.inversion_guidance, generator=_gen(3)).latents
    with rec.stage("edit", count_flops):
        images = diffusers_edit(sub, pipe, s, mask, latents)
    return dict(mask=mask, latents=latents.float().cpu(), images=images)


def diffusers_edit(sub: Subject, pipe: Any, s: Settings, mask: np.ndarray, latents: Tensor) -> np.ndarray:
    return pipe(prompt=sub.target, mask_image=torch.from_numpy(np.asarray(mask)).float()[:, None], image_latents=latents,
                inpaint_strength=s.strength, num_inference_steps=s.steps, guidance_scale=s.guidance,
                negative_prompt=sub.source, generator=_gen(4), output_type="np").images


def relative_error(ours: Any, theirs: Any) -> float:
    a, b = torch.as_tensor(np.asarray(ours), dtype=torch.float64), torch.as_tensor(np.asarray(theirs), dtype=torch.float64)
    return ((a - b).abs().max() / b.abs().max()).item()


def compare(ours: dict[str, Any], theirs: dict[str, Any], sub: Subject, pipe: Any, s: Settings, tol: float) -> dict[str, Any]:
    """Masks identical; inversion latents and the edit (diffusers run on *our* mask and inversion: the edit alone,
    not the chain's amplified rounding) within `tol` relative (max |ours - diffusers| / max |diffusers|)."""
    same_inputs = diffusers_edit(sub, pipe, s, ours["mask"], ours["inversion"].latents)
    result = dict(
        tolerance=tol,
        mask_pixels_differing=int((ours["mask"] != np.asarray(theirs["mask"])).sum()),
        mask_fraction_on=float(np.asarray(theirs["mask"]).mean()),
        inversion_rel_err=relative_error(ours["latents"], theirs["latents"]),
        edit_rel_err_same_inputs=relative_error(ours["images"], same_inputs),
        chain_rel_err=relative_error(ours["images"], theirs["images"]),  # informational: each side's own chain
    )
    result["passed"] = (result["mask_pixels_differing"] == 0 and result["inversion_rel_err"] < tol
                        and result["edit_rel_err_same_inputs"] < tol)
    return result


def check_and_count(sub: Subject, pipe: Any, s: Settings, rec: Recorder, tol: float, sides: list[str]) -> dict[str, Any]:
    """Every compat side must do diffusers' numbers. The runs also count each stage's FLOPs and warm up."""
    outputs = {}
    for side in sides:
        rec.side = side
        outputs[side] = RUNNERS[side](sub, pipe, s, rec, True)
    checks = {side: compare(outputs[side], outputs["diffusers"], sub, pipe, s, tol)
              for side in sides if side == "ours"}
    bad = {side: c for side, c in checks.items() if not c["passed"]}
    if bad:
        raise AssertionError(f"{sub.name}: not diffusers' numbers: {bad}")
    return checks


RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    "ours": lambda sub, pipe, s, rec, flops=False: run_ours(sub, s, rec, compat=True, count_flops=flops),
    "diffusers": lambda sub, pipe, s, rec, flops=False: run_diffusers(sub, pipe, s, rec, count_flops=flops),
    "ours-paper": lambda sub, pipe, s, rec, flops=False: run_ours(sub, s, rec, compat=False, count_flops=flops),
}


# ---- throughput --------------------------------------------------------------------------------------------
def matmul_throughput(device: torch.device, n: int, reps: int, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
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
    return dict(n=n, dtype=str(dtype).removeprefix("torch."), best_gflops=flops / min(times) / 1e9,
                median_gflops=flops / statistics.median(times) / 1e9)


def unet_throughput(sub: Subject, pipe: Any, batch: int, reps: int, tol: float) -> dict[str, Any]:
    """One UNet forward at the edit's CFG batch: FLOPs counted once, time = median of alternating repetitions."""
    m, dev = sub.model, sub.model.device
    h, w = (s // m.config.vae.downsample_factor for s in sub.image.shape[-2:])
    g = _gen(7)
    x = torch.randn(batch, m.config.unet.in_channels, h, w, generator=g).to(dev, m.dtype)
    ctx = torch.randn(batch, m.config.text.max_length, m.config.unet.cross_attention_dim, generator=g).to(dev, m.dtype)
    t = torch.full((batch,), 501, device=dev)
    calls = {
        "ours": lambda: m.unet(x, t, ctx),
        "diffusers": lambda: pipe.unet(x, t, encoder_hidden_states=ctx, return_dict=False)[0],
    }
    out: dict[str, Any] = dict(batch=batch, latent=[h, w])
    with torch.no_grad():
        outputs = {}
        for side, call in calls.items():
            counter = FlopCounterMode(display=False)
            with counter:
                outputs[side] = call()  # also the warm-up
            out[f"{side}_gflop"] = counter.get_total_flops() / 1e9
            if side == "ours":
                by_op = {str(k): v for k, v in counter.get_flop_counts().get("Global", {}).items()}
        out["rel_err"] = relative_error(outputs["ours"].float().cpu(), outputs["diffusers"].float().cpu())
        assert out["rel_err"] < tol, f"UNet outputs differ: {out['rel_err']:.2e}"
        times: dict[str, list[float]] = {side: [] for side in calls}
        for r in range(reps):
            for side in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
                _sync(dev)
                t0 = time.perf_counter()
                calls[side]()
                _sync(dev)
                times[side].append(time.perf_counter() - t0)
    out["ours_profile"] = profile_unet(calls["ours"], by_op)
    for side in calls:
        out[f"{side}_s"] = statistics.median(times[side])
        out[f"{side}_gflops"] = out[f"{side}_gflop"] / out[f"{side}_s"]
    return out


GEMM_OPS = ("aten::mkldnn_convolution", "aten::_slow_conv2d_forward", "aten::addmm", "aten::mm", "aten::bmm",
            "aten::convolution_overrideable", "aten::cudnn_convolution", "aten::_scaled_dot_product_flash_attention_for_cpu",
            "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_flash_attention")


CATEGORIES = {  # profiler kernels -> the FlopCounterMode op that counts their FLOPs
    "conv": (("aten::mkldnn_convolution", "aten::_slow_conv2d_forward", "aten::cudnn_convolution",
              "aten::convolution_overrideable"), ("aten.convolution",)),
    "linear": (("aten::addmm", "aten::mm", "aten::bmm"), ("aten.addmm", "aten.mm", "aten.bmm")),
    "attention": (("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_efficient_attention",
                   "aten::_scaled_dot_product_flash_attention"),
                  ("aten._scaled_dot_product_flash_attention_for_cpu", "aten._scaled_dot_product_efficient_attention",
                   "aten._scaled_dot_product_flash_attention")),
}


@torch.no_grad()
def profile_unet(call: Callable[[], Tensor], flops_by_op: dict[str, int]) -> dict[str, Any]:
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
        kinds[kind] = dict(s=seconds, gflop=gflop, gflops=gflop / seconds if seconds else None)
    return dict(total_s=total / 1e6, gemm_share=gemm / total, kinds=kinds,
                top=[dict(op=e.key, self_s=e.self_cpu_time_total / 1e6, calls=e.count) for e in top])


# ---- peak memory, each side in a fresh process -----------------------------------------------------------------
def _status_mib(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) / 1024  # type: ignore[union-attr]


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
    result: dict[str, Any] = dict(side=side)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
            result["method"] = "VmHWM after clear_refs"
        except OSError:
            result["method"] = "ru_maxrss (includes the build: no clear_refs)"
        base = _status_mib("VmRSS")
        if "ru_maxrss" in result["method"]:
            import resource

            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with torch.no_grad():
        RUNNERS[side](sub, pipe, s, rec)
    if torch.device(device).type == "cuda":
        result.update(method="torch.cuda.max_memory_allocated", base_mib=base / 2**20,
                      peak_mib=torch.cuda.max_memory_allocated() / 2**20)
    else:
        import resource

        peak = _status_mib("VmHWM") if "clear_refs" in result["method"] else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result.update(base_mib=base, peak_mib=peak)
    result["working_mib"] = result["peak_mib"] - result["base_mib"]
    print("BENCH_PROBE " + json.dumps(result), flush=True)


def measure_memory(args: argparse.Namespace, name: str, sides: list[str]) -> dict[str, Any]:
    out = {}
    for side in sides:
        cmd = [sys.executable, "-m", "bench.run", "--probe", side, "--models", name, "--steps", str(args.steps),
               "--strength", str(_settings(args, name).strength),
               "--num-maps", str(args.num_maps), "--device", args.device, "--threads", str(torch.get_num_threads())]
        if args.size:
            cmd += ["--size", str(args.size)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_PROBE ")]
        if proc.returncode or not lines:
            out[side] = dict(error=(proc.stderr or proc.stdout)[-2000:])
        else:
            out[side] = json.loads(lines[-1][len("BENCH_PROBE "):])
    return out


# ---- one model -----------------------------------------------------------------------------------------------
def bench_model(name: str, args: argparse.Namespace, matmul: dict[str, float]) -> dict[str, Any]:
    device, dtype = _device_dtype(args.device)
    s = _settings(args, name)
    load_before = os.getloadavg()
    t_build = time.perf_counter()
    sub = build(name, device, dtype, size=args.size)
    pipe = diffusers_pipeline(sub.model)
    if args.compile:  # GPU path: compile the UNets (the bulk of the work); hooks would break the graphs
        sub.model.unet = torch.compile(sub.model.unet)
        pipe.unet = torch.compile(pipe.unet)
    build_s = time.perf_counter() - t_build
    res: dict[str, Any] = dict(
        note=sub.note, image=list(sub.image.shape[-2:]), latent=[x // sub.model.config.vae.downsample_factor for x in sub.image.shape[-2:]],
        unet_params_m=sum(p.numel() for p in sub.model.unet.parameters()) / 1e6, shared_weights=shares_weights(sub.model, pipe),
        build_s=build_s, load_before=load_before, date_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), settings=asdict(s), reps=_reps(args, name),
    )
    _log(f"[{name}] built in {build_s:.1f} s ({res['unet_params_m']:.1f}M UNet params, shared weights: {res['shared_weights']})")
    rec = Recorder(torch.device(device))
    if not args.compile:
        m = sub.model
        rec.watch(dict(unet=m.unet, vae_encoder=m.vae.encoder, vae_decoder=m.vae.decoder, text_encoder=m.text_encoder))
        rec.watch(dict(unet=pipe.unet, vae_encoder=pipe.vae.encoder, vae_decoder=pipe.vae.decoder, text_encoder=pipe.text_encoder))
    tol = TOLERANCE[dtype]

    sides = ["ours", "diffusers"] + ([] if args.no_paper else ["ours-paper"])
    with torch.no_grad():
        t0 = time.perf_counter()
        res["check"] = check_and_count(sub, pipe, s, rec, tol, sides)
        res["gflop"] = {f"{side}/{stage}": f / 1e9 for (side, stage), f in rec.flops.items()}
        _log(f"[{name}] fidelity check passed in {time.perf_counter() - t0:.1f} s: {res['check']}")
        samples: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
        for r in range(_reps(args, name)):
            order = sides[r % len(sides):] + sides[: r % len(sides)]  # rotate: no side always runs first
            for side in order:
                rec.side = side
                RUNNERS[side](sub, pipe, s, rec)
                sample = {st: rec.stage_s[(side, st)] for st in STAGES}
                sample["total"] = sum(sample[st] for st in STAGES)
                for st in STAGES:
                    comps = {c: rec.comp_s.get((side, st, c), 0.0) for c in COMPONENTS}
                    for c, v in comps.items():
                        sample[f"{st}.{c}"] = v
                    sample[f"{st}.other"] = sample[st] - sum(comps.values())
                samples[side].append(sample)
            _log(f"[{name}] rep {r + 1}/{_reps(args, name)}: " + ", ".join(f"{sd} {samples[sd][-1]['total']:.2f} s" for sd in sides))
        res["median_s"] = {side: {k: statistics.median(x[k] for x in samples[side]) for k in samples[side][0]} for side in sides}
        res["samples_s"] = samples
        res["ratio"] = {k: res["median_s"]["ours"][k] / res["median_s"]["diffusers"][k] for k in (*STAGES, "total")}
        res["ratio_vs_diffusers"] = {sd: {k: res["median_s"][sd][k] / res["median_s"]["diffusers"][k] for k in (*STAGES, "total")}
                                     for sd in sides if sd != "diffusers"}
        # The matmul reference right before the UNet timing, under the same load as it.
        res["matmul"] = mm = matmul_throughput(torch.device(device), args.matmul_size, 5, dtype)
        res["unet"] = unet_throughput(sub, pipe, batch=2 if s.guidance > 1 else 1, reps=args.unet_reps, tol=tol)
        for side in ("ours", "diffusers"):
            res["unet"][f"{side}_fraction_of_matmul_peak"] = res["unet"][f"{side}_gflops"] / mm["best_gflops"]
        _log(f"[{name}] UNet: " + ", ".join(f"{sd} {res['unet'][sd + '_gflops']:.1f} GFLOP/s" for sd in ("ours", "diffusers")))
    del sub, pipe, rec
    gc.collect()
    if not args.no_memory:
        res["memory"] = measure_memory(args, name, sides)
        _log(f"[{name}] memory: {json.dumps(res['memory'])}")
    res["load_after"] = os.getloadavg()
    res["targets"] = targets(name, res)
    return res


def targets(name: str, res: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if name in TIME_TARGETS:
        out["total_ratio"] = dict(target=f"<= {TIME_TARGETS[name]}", value=res["ratio"]["total"],
                                  met=res["ratio"]["total"] <= TIME_TARGETS[name])
    if name == "sd15":
        frac = res["unet"]["ours_fraction_of_matmul_peak"]
        out["unet_fraction_of_matmul_peak"] = dict(target=f">= {UNET_PEAK_TARGET}", value=frac, met=frac >= UNET_PEAK_TARGET)
    mem = res.get("memory", {})
    if "peak_mib" in mem.get("ours", {}) and "peak_mib" in mem.get("diffusers", {}):
        out["peak_memory"] = dict(target="ours <= diffusers", value=[mem["ours"]["peak_mib"], mem["diffusers"]["peak_mib"]],
                                  met=mem["ours"]["peak_mib"] <= mem["diffusers"]["peak_mib"])
    for side, c in res["check"].items():
        out[f"fidelity_{side}"] = dict(target=f"masks identical, rel err < {c['tolerance']:.0e}", met=c["passed"])
    return out


# ---- report ----------------------------------------------------------------------------------------------------
def table(results: dict[str, Any]) -> str:
    lines = []
    env, mm = results["env"], results["matmul"]
    lines.append(f"{env['device']} | torch {env['torch']} | diffusers {env['diffusers']} | {env['threads']} threads | "
                 f"{mm.get('dtype', 'float32')} matmul {mm['best_gflops']:.1f} GFLOP/s (best; median {mm['median_gflops']:.1f}, n={mm['n']})")
    for name, r in results["models"].items():
        if "error" in r:
            lines.append(f"\n== {name}: skipped: {r['error']}")
            continue
        sides = list(r["median_s"])
        lines.append(f"\n== {name} ({r['note']}): image {r['image'][0]}x{r['image'][1]}, latent {r['latent'][0]}x{r['latent'][1]}, "
                     f"load avg {r['load_before'][0]:.2f} -> {r['load_after'][0]:.2f}")
        s = r["settings"]
        lines.append(f"settings: steps {s['steps']}, mask strength {s['mask_strength']} x {s['num_maps']} maps, inversion "
                     f"strength {s['strength']} (guidance {s['inversion_guidance']}), edit guidance {s['guidance']}; "
                     f"median of {r['reps']} alternating reps")
        others = list(r["ratio_vs_diffusers"])
        head = f"{'stage':<8}" + "".join(f"{sd + ' s':>14}" for sd in sides) + "".join(
            f"{sd.replace('ours-', '') + '/diff':>12}" for sd in others) + "".join(
            f"{'GFLOP ' + sd:>18}" for sd in sides)
        lines.append(head)
        for st in (*STAGES, "total"):
            row = f"{st:<8}" + "".join(f"{r['median_s'][sd][st]:>14.3f}" for sd in sides) + "".join(
                f"{r['ratio_vs_diffusers'][sd][st]:>12.3f}" for sd in others)
            flop = lambda sd: sum(r["gflop"][f"{sd}/{x}"] for x in STAGES) if st == "total" else r["gflop"][f"{sd}/{st}"]  # noqa: E731
            row += "".join(f"{flop(sd):>18.1f}" for sd in sides)
            lines.append(row)
        lines.append(f"{'total, best rep':<16}" + "".join(f"{sd} {min(x['total'] for x in r['samples_s'][sd]):.3f} s  " for sd in sides)
                     + "(less sensitive to other load than the median)")
        lines.append("time by component (median s): " + "; ".join(
            f"{sd} " + " ".join(f"{st}[" + ", ".join(f"{c.replace('vae_', '').replace('_encoder', '')} {r['median_s'][sd][f'{st}.{c}']:.3f}"
                                                     for c in (*COMPONENTS, "other") if r['median_s'][sd][f'{st}.{c}'] > 0.0005) + "]"
                                for st in STAGES) for sd in sides))
        u = r["unet"]
        lines.append(f"UNet forward, batch {u['batch']} at {u['latent'][0]}x{u['latent'][1]}: {u['ours_gflop']:.1f} GFLOP; ours "
                     f"{u['ours_s'] * 1e3:.1f} ms = {u['ours_gflops']:.1f} GFLOP/s ({100 * u['ours_fraction_of_matmul_peak']:.0f}% of "
                     f"{r['matmul'].get('dtype', 'float32')} matmul {r['matmul']['best_gflops']:.1f} GFLOP/s measured just before); diffusers {u['diffusers_s'] * 1e3:.1f} ms = {u['diffusers_gflops']:.1f} GFLOP/s "
                     f"({100 * u['diffusers_fraction_of_matmul_peak']:.0f}%)")
        pr = u.get("ours_profile")
        if pr:
            lines.append(f"ours UNet profile (one forward, {pr['total_s']:.2f} s): {100 * pr['gemm_share']:.0f}% in conv/linear/attention "
                         "kernels (" + ", ".join(f"{k} {v['s']:.2f} s = {v['gflops']:.0f} GFLOP/s" for k, v in pr["kinds"].items() if v["gflops"])
                         + "); top ops (self s): " + ", ".join(f"{e['op'].replace('aten::', '')} {e['self_s']:.2f}" for e in pr["top"][:10]))
        if "memory" in r:
            lines.append("peak memory (fresh process, one run): " + "; ".join(
                f"{sd} {m['peak_mib']:.0f} MiB (working {m['working_mib']:.0f} MiB over {m['base_mib']:.0f})" if "peak_mib" in m
                else f"{sd} failed" for sd, m in r["memory"].items()))
        for sd, c in r["check"].items():
            lines.append(f"fidelity {sd} vs diffusers: mask pixels differing {c['mask_pixels_differing']} (mask {100 * c['mask_fraction_on']:.0f}% on), "
                         f"inversion {c['inversion_rel_err']:.1e}, edit on same inputs {c['edit_rel_err_same_inputs']:.1e} "
                         f"(tolerance {c['tolerance']:.0e}); own chains {c['chain_rel_err']:.1e}")
        lines.append("targets: " + "; ".join(f"{k} {v['target']}: {'MET' if v['met'] else 'MISSED'}"
                                             + (f" ({_fmt(v['value'])})" if "value" in v else "") for k, v in r["targets"].items()))
    return "\n".join(lines)


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


def _env(device: str) -> dict[str, Any]:
    import diffusers

    cpu = platform.processor()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU: {cpu} ({os.cpu_count()} cores)"
    return dict(device=name, torch=torch.__version__, diffusers=diffusers.__version__, threads=torch.get_num_threads(),
                python=platform.python_version(), date_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,sd15,toy", help=f"comma-separated, from {MODELS} (toy: skipped if not built)")
    p.add_argument("--reps", type=int, default=0, help="timed repetitions per side, median reported (default: 5; sd15 3)")
    p.add_argument("--strength", type=float, default=0.0, help="inversion / edit strength (default: 0.8; sd15 0.3)")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps (mask at strength 0.5, inversion / edit at 0.8)")
    p.add_argument("--num-maps", type=int, default=2, help="noise maps for the mask")
    p.add_argument("--size", type=int, default=0, help="image side (default: tiny/toy 64, sd15 256)")
    p.add_argument("--unet-reps", type=int, default=5, help="timed UNet forwards per side")
    p.add_argument("--matmul-size", type=int, default=4096)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (cuda: fp16, channels_last)")
    p.add_argument("--compile", action="store_true", help="torch.compile both UNets (GPU path; no component timing)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--no-paper", action="store_true", help="skip our default (paper) mode, informational")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--out", default="bench/results.json")
    p.add_argument("--merge", action="store_true", help="add to / replace models in an existing --out file")
    p.add_argument("--show", action="store_true", help="print the table of an existing --out file and exit")
    p.add_argument("--probe", choices=tuple(RUNNERS), help=argparse.SUPPRESS)
    return p.parse_args(argv)


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
    results: dict[str, Any] = dict(env=_env(device), models={})
    results["matmul"] = matmul_throughput(torch.device(device), args.matmul_size, 5, dtype)
    _log(f"matmul: {results['matmul']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge and out.is_file():  # keep the other models' results of an earlier run
        results["models"] = json.loads(out.read_text()).get("models", {})
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        try:
            results["models"][name] = bench_model(name, args, results["matmul"])
        except FileNotFoundError as e:  # the toy model before `make toy-model`
            results["models"][name] = dict(error=str(e))
            _log(f"[{name}] skipped: {e}")
        out.write_text(json.dumps(results, indent=1, default=str))
    after = matmul_throughput(torch.device(device), args.matmul_size, 5, dtype)
    results["matmul_after"] = after
    out.write_text(json.dumps(results, indent=1, default=str))
    print(table(results))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
