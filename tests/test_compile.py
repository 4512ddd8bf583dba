"""Opt-in torch.compile of the UNet (StableDiffusion.compile_unet / load(compile=True)) and the loops' freedom from
host-device synchronisation, on the tiny model (CPU).

Tolerances: a compiled UNet output within 1e-5 relative (max |compiled - eager| / max |eager|) of eager; the latents
of a short compiled chain (mask, inversion, edit) within 1e-5 relative with "aot_eager", 1e-4 with Inductor (its
reordered reductions, amplified by the edit's guidance), the binary mask identical. The default set
compiles with the "aot_eager" backend (Dynamo's capture and AOTAutograd's graph, no code generation: seconds); the
Inductor tests (generated C++ kernels, as load(compile=True) gives) are marked slow: on a loaded 2-core machine the
first compilation of the tiny UNet takes ~90 s per batch shape (~10 s when Inductor's on-disk cache holds it).
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from diffedit import edit, generate_mask, invert
from diffedit.model import StableDiffusion, load
from tests.conftest import make_tiny_model, seeded

TOLERANCE = 1e-5
# Inductor's kernels fuse and reorder the reductions (GroupNorm, softmax): ~1e-6 relative per UNet call, which the
# guided edit multiplies by its guidance (7.5) at every step. Measured on the tiny model: 6e-6 inversion, 3e-5 edit.
INDUCTOR_CHAIN_TOLERANCE = 1e-4
STEPS, MAPS = 4, 2  # mask at 0.5 of 4 steps; inversion and edit: int(4 * 0.8) = 3 steps


def rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def dynamo_missing() -> str | None:
    """Why torch.compile cannot capture here, or None."""
    try:
        import torch._dynamo
    except Exception as error:  # a build without Dynamo
        return f"torch._dynamo does not import: {error}"
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile (Dynamo) is not supported on this Python / platform"
    return None


def inductor_missing() -> str | None:
    """Why Inductor cannot generate CPU kernels here (it compiles C++), or None."""
    reason = dynamo_missing()
    if reason is not None:
        return reason
    try:
        import torch._inductor  # noqa: F401
    except Exception as error:
        return f"torch._inductor does not import: {error}"
    if not any(shutil.which(cc) for cc in ("cc", "gcc", "g++", "clang++", "c++")):
        return "Inductor's CPU backend needs a C++ compiler (cc / g++ / clang++), none on PATH"
    return None


def compiled_or_skip(call: Callable[[], Any]) -> Any:
    """Run the first compiled call; a backend that cannot build here (compiler errors) skips with its reason."""
    try:
        return call()
    except Exception as error:  # torch._dynamo.exc.BackendCompilerFailed, a C++ build error, ...
        if "BackendCompilerFailed" in type(error).__name__ or "CppCompileError" in repr(error):
            pytest.skip(f"torch.compile cannot build here: {str(error).splitlines()[0][:200]}")
        raise


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    reason = dynamo_missing()
    if reason is not None:
        pytest.skip(reason)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def chain(model: StableDiffusion, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A short default chain: the mask (2 maps in one call: 4 UNet rows), the inversion (1), the guided edit (2)."""
    mask = generate_mask(model, images, "a bowl of fruits", "a bowl of pears", num_maps=MAPS, steps=STEPS,
                         generator=seeded(1), progress=False)
    inversion = invert(model, latents=mask.latents, steps=STEPS, progress=False)
    result = edit(model, inversion, mask, "a bowl of pears", negative_prompt="a bowl of fruits",
                  output_type="latent", progress=False)
    return mask.latent_mask, inversion.latents, result.latents


@pytest.fixture(scope="module")
def images() -> Tensor:
    return torch.rand(1, 3, 16, 16, generator=seeded(5))


def test_aot_eager_chain_equals_eager_one_graph_per_shape(tokenizer_dir: Path, images: Tensor) -> None:
    eager = chain(make_tiny_model(tokenizer_dir), images)
    model = make_tiny_model(tokenizer_dir).compile_unet(backend="aot_eager")
    compiled = compiled_or_skip(lambda: chain(model, images))
    assert torch.equal(compiled[0], eager[0]), "the binary masks differ"
    for name, a, b in (("inversion", compiled[1], eager[1]), ("edit", compiled[2], eager[2])):
        assert rel(a, b) < TOLERANCE, f"{name} latents: {rel(a, b):.2e}"
    # the timestep is a tensor input, not a constant: one graph per batch shape (4, 1 and 2 rows), not per step
    assert graphs() == 3, torch._dynamo.utils.counters["stats"]
    chain(model, images)
    assert graphs() == 3, "a second edit of the same shapes recompiled"


def test_save_and_load_after_compile(tokenizer_dir: Path, tmp_path: Path) -> None:
    model = make_tiny_model(tokenizer_dir).compile_unet(backend="aot_eager")
    x, cond = torch.randn(1, 4, 8, 8, generator=seeded(2)), model.encode_prompt("a photo of apples")
    out = compiled_or_skip(lambda: model.unet_output(x, 481, cond))
    folder = model.save(tmp_path / "m")
    loaded = load(folder)
    assert loaded.unet.state_dict().keys() == make_tiny_model(tokenizer_dir).unet.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(loaded.unet.state_dict().values(), model.unet.state_dict().values()))
    assert torch.equal(loaded.unet_output(x, 481, cond), out) or rel(loaded.unet_output(x, 481, cond), out) < TOLERANCE
    again = load(folder, compile=True)  # compiled lazily: nothing is built until its first call
    assert again.compile_mode == "default" and again.unet.state_dict().keys() == loaded.unet.state_dict().keys()


def test_compile_modes_checked(tokenizer_dir: Path) -> None:
    model = make_tiny_model(tokenizer_dir)
    with pytest.raises(ValueError, match="CUDA graphs"):
        model.compile_unet("reduce-overhead")  # a CPU model
    with pytest.raises(ValueError, match="mode must be one of"):
        model.compile_unet("fastest")
    with pytest.raises(ValueError, match="takes neither"):
        model.compile_unet("default", backend="aot_eager")
    with pytest.raises(ValueError, match="takes neither"):
        model.compile_unet(backend="aot_eager", options={"conv_1x1_as_mm": True})
    with pytest.raises(ValueError, match="CUDA graphs follow the compile mode"):
        model.compile_unet(options={"triton.cudagraphs": True})
    assert model.compile_mode is None


def test_compile_options_join_the_modes_own(tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile refuses a mode and options together: the mode's settings (Inductor's own table) and the
    caller's reach it as one options dict, the caller's last; nothing is compiled here (the call is recorded)."""
    model = make_tiny_model(tokenizer_dir)
    calls: list[dict[str, object]] = []
    monkeypatch.setattr(model.unet, "compile", lambda **kwargs: calls.append(kwargs))
    model.compile_unet(options={"conv_1x1_as_mm": True})
    model.compile_unet("max-autotune-no-cudagraphs", options={"coordinate_descent_tuning": False})
    assert calls == [
        dict(options={"conv_1x1_as_mm": True}, dynamic=False),
        dict(options={"max_autotune": True, "coordinate_descent_tuning": False}, dynamic=False),
    ]
    assert model.compile_mode == "max-autotune-no-cudagraphs"


def test_attention_hook_runs_eagerly_on_a_compiled_unet(tokenizer_dir: Path) -> None:
    model = make_tiny_model(tokenizer_dir).compile_unet(backend="aot_eager")
    x, cond = torch.randn(1, 4, 8, 8, generator=seeded(3)), model.encode_prompt("a photo")
    plain = compiled_or_skip(lambda: model.unet_output(x, 301, cond))
    seen: list[str] = []
    hooked = model.unet_output(x, 301, cond, attention_hook=lambda probs, is_cross, place: seen.append(place))
    assert seen and graphs() == 1, "the hook was traced instead of run"
    assert rel(hooked, plain) < TOLERANCE


def test_a_first_call_under_a_dispatch_mode_leaves_the_unet_compilable(tokenizer_dir: Path) -> None:
    """FLOP counting before timing (what bench/ does): left to Dynamo, a compiled UNet first called under
    FlopCounterMode would be marked skipped and run eagerly ever after, with no error (torch 2.13)."""
    model = make_tiny_model(tokenizer_dir).compile_unet(backend="aot_eager")
    x, cond = torch.randn(1, 4, 8, 8, generator=seeded(4)), model.encode_prompt("a photo")
    with FlopCounterMode(display=False) as counter:
        counted = model.unet_output(x, 301, cond)
    assert counter.get_total_flops() > 0 and graphs() == 0, "the counted call was not the eager forward"
    compiled = compiled_or_skip(lambda: model.unet_output(x, 301, cond))
    assert graphs() == 1, "the UNet no longer compiles after a call under a dispatch mode"
    assert rel(compiled, counted) < TOLERANCE


@pytest.mark.slow
def test_inductor_unet_and_chain_equal_eager(tokenizer_dir: Path, images: Tensor) -> None:
    reason = inductor_missing()
    if reason is not None:
        pytest.skip(reason)
    eager_model = make_tiny_model(tokenizer_dir)
    model = make_tiny_model(tokenizer_dir).compile_unet()  # load(compile=True)'s default: Inductor, "default" on CPU
    x, cond = torch.randn(2, 4, 8, 8, generator=seeded(4)), eager_model.encode_prompt(["a photo", "a bowl"])
    out = compiled_or_skip(lambda: model.unet_output(x, 481, cond))
    assert rel(out, eager_model.unet_output(x, 481, cond)) < TOLERANCE
    eager, compiled = chain(eager_model, images), chain(model, images)
    assert torch.equal(compiled[0], eager[0])
    assert rel(compiled[1], eager[1]) < INDUCTOR_CHAIN_TOLERANCE, f"inversion: {rel(compiled[1], eager[1]):.2e}"
    assert rel(compiled[2], eager[2]) < INDUCTOR_CHAIN_TOLERANCE, f"edit: {rel(compiled[2], eager[2]):.2e}"


# ---- host-device synchronisation inside the loops --------------------------------------------------------------
SYNCING = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "equal")  # each waits for the device


class HostTensors(TorchFunctionMode):
    """Counts tensors made from Python data (torch.tensor / as_tensor of numbers: on a GPU, a host-to-device copy
    that waits for the device) and tensors moved to a device (`.to(device)` / `.cuda()`)."""

    def __init__(self, counts: Counter, active: Callable[[], bool]) -> None:
        super().__init__()
        self.counts, self.active = counts, active

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self.active():
            name = getattr(func, "__name__", str(func))
            if name in ("tensor", "as_tensor") and args and not isinstance(args[0], Tensor):
                self.counts[f"torch.{name}(python data)"] += 1
            elif name == "to" and ("device" in kwargs or any(isinstance(a, (str, torch.device)) for a in args[1:])):
                self.counts["Tensor.to(device)"] += 1
            elif name in ("cuda", "cpu", "equal", "is_nonzero"):
                self.counts[f"Tensor.{name}()"] += 1
        return func(*args, **kwargs)


def test_no_host_device_sync_inside_the_inversion_and_edit_loops(tokenizer_dir: Path, monkeypatch: Any) -> None:
    """Between a loop's first UNet call and its last step's callback nothing reads a tensor's value on the host
    (.item(), bool(), float(), torch.equal, ...) and no tensor is made from Python numbers or moved between
    devices: on a GPU each would stall the queue of kernels at every step."""
    model = make_tiny_model(tokenizer_dir)
    counts: Counter = Counter()
    state = {"inside": False, "last": -1}
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def counting(self: Tensor, *args: Any, _name: str = name, _original: Any = original) -> Any:
            if state["inside"]:
                counts[f"Tensor.{_name}"] += 1
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counting)
    real_unet_output = model.unet_output

    def unet_output(*args: Any, **kwargs: Any) -> Tensor:
        state["inside"] = True  # the loop has begun
        return real_unet_output(*args, **kwargs)

    def callback(step: dict[str, Any]) -> None:
        if step["i"] == state["last"]:
            state["inside"] = False  # its last step is done

    monkeypatch.setattr(model, "unet_output", unet_output)
    z0 = torch.randn(1, 4, 8, 8, generator=seeded(6))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1
    with HostTensors(counts, lambda: state["inside"]):
        state["last"] = 2  # 3 steps
        inversion = invert(model, latents=z0, steps=STEPS, callback=callback, progress=False)
        assert not state["inside"] and counts == Counter(), f"inversion loop: {dict(counts)}"
        edit(model, inversion, mask, "a bowl of pears", negative_prompt="a bowl of fruits", callback=callback,
             output_type="latent", progress=False)
        assert not state["inside"] and counts == Counter(), f"edit loop: {dict(counts)}"
