"""A model loaded in float16 or bfloat16 (`load(folder, dtype=...)`) agrees with the same model in float32.

Each network is run on the same fp32 inputs cast to the dtype, so each error is that network's own; measured
against float32 as max |low - fp32| / max |fp32| (tests._reference.relative_error), in units of the dtype's
machine epsilon (fp16: 2^-10 ~ 9.8e-4, bf16: 2^-7 ~ 7.8e-3). Measured with torch 2.13 on CPU:

    model          dtype   text   UNet (worst of 3 t)   VAE encode   VAE decode    (x eps)
    toy (trained)  fp16    1.1    0.7                   0.6          2.0
    toy (trained)  bf16    1.3    0.6                   0.7          2.9
    tiny (random)  fp16    1.2    3.5                   2.4          1.9
    tiny (random)  bf16    1.4    5.1                   2.7          2.7

The bound is TOL_EPS = 10 eps for every network (fp16 9.8e-3, bf16 7.8e-2): 2x the worst measured value.
Besides, a network left in fp32 fails the dtype check and an fp16 overflow (inf) the finiteness check.
On CPU every op runs in both dtypes (torch 2.13), but fp16 is slow there: a toy UNet call takes 87 ms
in fp16, 21 ms in bf16, 23 ms in fp32 (1 thread); use bf16 on CPUs. Where a torch build lacks a half-precision CPU
kernel (older releases had no fp16 conv), that dtype is skipped, saying so.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from tests._reference import relative_error
from tests.conftest import make_tiny_model
from diffedit.model import StableDiffusion, load

TOY = Path(__file__).parents[1] / "diffedit" / "toy" / "weights"
TOL_EPS = 10
PROMPTS = ["a red circle", "a photo of pears"]  # words of both tokenizers (the tests' and the toy's)


@pytest.fixture(scope="module", params=["toy", "tiny"])
def folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    if request.param == "toy":
        return TOY  # trained weights: realistic activations
    folder = tmp_path_factory.mktemp("models") / "tiny"
    make_tiny_model(tokenizer_dir, seed=5).save(folder)  # random weights, norms and biases included: harsher
    return folder


@pytest.fixture(scope="module")
def fp32(folder: Path) -> StableDiffusion:
    return load(folder)


def _low(folder: Path, dtype: torch.dtype) -> StableDiffusion:
    model = load(folder, dtype=dtype)
    assert model.dtype == dtype and {p.dtype for p in model.parameters()} == {dtype}
    return model


def _check(low: Tensor, reference: Tensor, dtype: torch.dtype, what: str) -> float:
    assert low.dtype == dtype, what
    assert torch.isfinite(low).all(), what
    error = relative_error(low.float(), reference)
    assert error <= TOL_EPS * torch.finfo(dtype).eps, f"{what}: {error:.2e} = {error / torch.finfo(dtype).eps:.1f} eps"
    return error


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@torch.no_grad()
def test_low_precision_agrees_with_fp32(folder: Path, fp32: StableDiffusion, dtype: torch.dtype) -> None:
    low = _low(folder, dtype)
    factor = fp32.config.vae.downsample_factor
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 9, 11, generator=g)  # odd, non-square latents: the size-matching upsamples too
    images = torch.rand(2, 3, 9 * factor, 11 * factor, generator=g)
    z = torch.randn(2, 4, 9, 11, generator=g)
    tokens = fp32.encode_prompt(PROMPTS).tokens
    try:
        _check(low.encode_prompt(PROMPTS).tokens, tokens, dtype, "text encoder")
        for t in (21, 500, 981):  # sinusoidal features in fp32 at any dtype: high t keeps its frequencies
            _check(low.unet(x.to(dtype), t, tokens.to(dtype)), fp32.unet(x, t, tokens), dtype, f"UNet at t={t}")
        _check(low.vae.encode(images.to(dtype) * 2 - 1).mean, fp32.vae.encode(images * 2 - 1).mean, dtype,
               "VAE encode")
        _check(low.vae.decode(z.to(dtype)), fp32.vae.decode(z), dtype, "VAE decode")
        # The model's own entry point: fp32 latents are cast, the images come out in the model's dtype.
        _check(low.decode_latents(z), fp32.decode_latents(z), dtype, "decode_latents")
    except (RuntimeError, NotImplementedError) as e:  # a torch build without this dtype's CPU kernel for some op
        if "not implemented for" not in str(e):
            raise
        pytest.skip(f"{dtype} unsupported on CPU by this torch build: {' '.join(str(e).split())[:120]}")


def _conv_layouts(model: StableDiffusion) -> set[str]:
    kernels = [p for p in [*model.unet.parameters(), *model.vae.parameters()] if p.ndim == 4 and p.shape[-1] > 1]
    return {"channels_last" if k.is_contiguous(memory_format=torch.channels_last) and not k.is_contiguous()
            else "contiguous" if k.is_contiguous() else "other" for k in kernels}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpu_models_keep_the_contiguous_layout(folder: Path, dtype: torch.dtype) -> None:
    """channels_last is for CUDA in half precision only (use_fast_layout): on CPU the weights stay NCHW, the layout
    every CPU number of the test suite was measured in."""
    assert _conv_layouts(load(folder, dtype=dtype)) == {"contiguous"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="channels_last is applied on CUDA only; no CUDA device here")
@torch.no_grad()
def test_cuda_half_models_are_channels_last_and_agree(folder: Path) -> None:
    """On CUDA, bf16: UNet and VAE kernels in NHWC, and the UNet agrees with the same weights in NCHW (the layout
    changes which cuDNN kernel runs, hence the rounding, not the function): within 10 bf16 eps; fp32 stays NCHW."""
    model = load(folder, device="cuda", dtype=torch.bfloat16)
    assert _conv_layouts(model) == {"channels_last"}
    assert _conv_layouts(load(folder, device="cuda")) == {"contiguous"}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g).to("cuda", torch.bfloat16)
    tokens = model.encode_prompt(PROMPTS).tokens
    nhwc = model.unet(x, 500, tokens).float()
    nchw = model.unet.to(memory_format=torch.contiguous_format)(x, 500, tokens).float()
    assert relative_error(nhwc, nchw) <= TOL_EPS * torch.finfo(torch.bfloat16).eps
