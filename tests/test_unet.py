"""Our UNet against diffusers' UNet2DConditionModel on identical random weights, the attention hook, the
diffusers name mapping against real checkpoint layouts, and input validation.

Tolerance: max |ours - diffusers| / max |diffusers| <= 1e-5 (fp32, CPU). On the tiny configs the outputs are
bit-identical: both sides run the same kernels in the same order. At full size the coarsest levels' convolutions
(1280 channels and more) run as matmuls on the CPU (diffedit/conv.py): ~1e-6 apart.
"""

from __future__ import annotations

import gc
import json
import re
from pathlib import Path
from typing import Iterator

import pytest
import torch
from torch import Tensor

from tests._reference import diffusers_unet_kwargs, layout, require_layouts
from tests._reference import our_unet_from, reference_unet, relative_error
from diffedit.configs import SD15, SD21, TINY, ModelConfig, UNetConfig
from diffedit.unet import Attention, UNet
from weights_convert.diffusers import unet_from_diffusers, unet_to_diffusers

TOL = 1e-5
CFG = TINY.unet
# The shipped toy model's UNet: three levels (two downsamplings, factor 4), attention on the two coarser ones.
TOY = ModelConfig.from_dict(json.loads((Path(__file__).parents[1] / "diffedit/toy/weights/model.json").read_text())
                            ["config"]).unet


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, UNet]:
    reference = reference_unet(CFG, seed=0)
    return reference, our_unet_from(reference, CFG)


def _inputs(cfg: UNetConfig, batch: int, size: int = 8, seed: int = 0) -> tuple[Tensor, Tensor]:
    torch.manual_seed(seed)
    return torch.randn(batch, cfg.in_channels, size, size), torch.randn(batch, 77, cfg.cross_attention_dim)


# --- parity with diffusers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0, 999, torch.tensor(500), torch.tensor([10, 981]), torch.tensor([261.0])],
                         ids=["int0", "int999", "0d", "per-element", "float-1"])
@torch.no_grad()
def test_tiny_matches_diffusers(tiny: tuple[torch.nn.Module, UNet], t: int | Tensor) -> None:
    reference, ours = tiny
    x, context = _inputs(CFG, batch=2)
    expected = reference(x, t, context).sample
    assert relative_error(ours(x, t, context), expected) <= TOL
    assert expected.std() > 0.1  # random norms and biases: a non-trivial output


@pytest.mark.parametrize("size", [(9, 11), (5, 8), (12, 6)], ids=["9x11", "5x8", "12x6"])
@torch.no_grad()
def test_any_latent_size_matches_diffusers(tiny: tuple[torch.nn.Module, UNet], size: tuple[int, int]) -> None:
    """Latents that are not multiples of the UNet's total downsampling (72 x 88 pixels -> 9 x 11 latents):
    diffusers upsamples each level to its skip connection's size, and so do we."""
    reference, ours = tiny
    torch.manual_seed(3)
    x, context = torch.randn(2, CFG.in_channels, *size), torch.randn(2, 77, CFG.cross_attention_dim)
    expected = reference(x, 500, context).sample
    assert expected.shape == x.shape and relative_error(ours(x, 500, context), expected) <= TOL


@pytest.mark.parametrize("size", [(18, 22), (9, 11), (7, 16)], ids=["18x22", "9x11", "7x16"])
@torch.no_grad()
def test_any_latent_size_matches_diffusers_two_downsamplings(size: tuple[int, int]) -> None:
    """The toy UNet halves twice: 72 x 88 toy pixels -> 18 x 22 latents -> 9 x 11 -> 5 x 6, and back up to 9 x 11
    (not 10 x 12) and 18 x 22; 9 x 11 and 7 x 16 are odd at the first level already."""
    reference = reference_unet(TOY, seed=2)
    ours = our_unet_from(reference, TOY)
    torch.manual_seed(4)
    x, context = torch.randn(2, TOY.in_channels, *size), torch.randn(2, 77, TOY.cross_attention_dim)
    expected = reference(x, 500, context).sample
    assert expected.shape == x.shape and relative_error(ours(x, 500, context), expected) <= TOL
    assert expected.std() > 0.1


@pytest.fixture(scope="module", params=["sd15", "sd21"])
def full_size(request: pytest.FixtureRequest) -> Iterator[tuple[UNetConfig, torch.nn.Module, UNet]]:
    # SD 2.1 (v-prediction) and 2.1-base share this network; sd21 also covers upcast_attention (a no-op in fp32).
    cfg = {"sd15": SD15, "sd21": SD21}[request.param].unet
    reference = reference_unet(cfg, seed=1)
    # Ours adopts the reference's tensors (assign=True): one copy of ~860M parameters in memory, not two.
    ours = our_unet_from(reference, cfg, share=True)
    yield cfg, reference, ours
    del reference, ours
    gc.collect()


@pytest.mark.slow
@torch.no_grad()
def test_full_size_matches_diffusers(full_size: tuple[UNetConfig, torch.nn.Module, UNet]) -> None:
    cfg, reference, ours = full_size
    x, context = _inputs(cfg, batch=1, seed=1)
    expected = reference(x, 500, context).sample
    assert relative_error(ours(x, 500, context), expected) <= TOL
    assert expected.std() > 0.1
    # 72 x 88 pixels: 9 x 11 latents, not a multiple of SD's total downsampling (8): 9x11 -> 5x6 -> 3x3 -> 2x2.
    x = torch.randn(1, cfg.in_channels, 9, 11, generator=torch.Generator().manual_seed(2))
    expected = reference(x, 500, context).sample
    assert expected.shape == x.shape and relative_error(ours(x, 500, context), expected) <= TOL


# --- attention hook ------------------------------------------------------------------------------------------

PLACE = re.compile(r"(down\.\d+\.attn\.\d+|mid\.attn|up\.\d+\.attn\.\d+)\.blocks\.\d+\.(self|cross)_attn")


@torch.no_grad()
def test_hook_returning_none_changes_nothing(tiny: tuple[torch.nn.Module, UNet]) -> None:
    _, ours = tiny
    x, context = _inputs(CFG, batch=2)
    plain = ours(x, 300, context)  # SDPA path
    explicit = ours(x, 300, context, attention_hook=lambda probs, is_cross, place: None)  # explicit softmax path
    assert relative_error(explicit, plain) <= TOL


@torch.no_grad()
def test_hook_records_attention_maps(tiny: tuple[torch.nn.Module, UNet]) -> None:
    _, ours = tiny
    x, context = _inputs(CFG, batch=2)
    records: list[tuple[str, bool, Tensor]] = []
    ours(x, 300, context, attention_hook=lambda probs, is_cross, place: records.append((place, is_cross, probs)))

    places = [place for place, _, _ in records]
    transformers = 1 + 1 + 2  # TINY: down.1 (1 res block), mid, up.0 (the mirrored level: 2 res blocks)
    assert CFG.transformer_depth == (1, 1)  # one block per transformer
    assert len(places) == len(set(places)) == 2 * transformers
    for place, is_cross, probs in records:
        assert PLACE.fullmatch(place), place
        assert place.endswith("cross_attn") == is_cross
        assert isinstance(ours.get_submodule(place), Attention)  # the place is the module's path
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-5, rtol=0)
        # Attention levels sit at 4x4 (one downsample of 8x8); heads of the attention level (and mid).
        tokens = 77 if is_cross else 16
        assert probs.shape == (2, CFG.heads[1], 16, tokens)


@torch.no_grad()
def test_hook_editing_probs(tiny: tuple[torch.nn.Module, UNet]) -> None:
    """Uniform cross-attention must equal attending to a context whose tokens all equal the mean token.

    (v has no bias, so the mean of the values is the value of the mean token; identical keys give exactly
    uniform softmax probabilities.) The right side runs the plain SDPA path: an independent computation.
    """
    _, ours = tiny
    x, context = _inputs(CFG, batch=2)

    def uniform_cross(probs: Tensor, is_cross: bool, place: str) -> Tensor | None:
        return torch.full_like(probs, 1.0 / probs.shape[-1]) if is_cross else None

    edited = ours(x, 300, context, attention_hook=uniform_cross)
    mean_context = context.mean(dim=1, keepdim=True).expand_as(context)
    assert relative_error(edited, ours(x, 300, mean_context)) <= TOL
    assert relative_error(edited, ours(x, 300, context)) > 1e-3  # the edit did change the output


def test_hook_with_wrong_shape_is_rejected(tiny: tuple[torch.nn.Module, UNet]) -> None:
    _, ours = tiny
    x, context = _inputs(CFG, batch=2)
    with pytest.raises(ValueError, match="attention hook at .* returned shape"):
        ours(x, 300, context, attention_hook=lambda probs, is_cross, place: probs[..., :1])


def test_upcast_attention_computes_in_fp32() -> None:
    attn = Attention(16, heads=2, upcast=True).to(torch.bfloat16)
    seen: list[torch.dtype] = []
    out = attn(torch.randn(1, 5, 16, dtype=torch.bfloat16), hook=lambda p, c, s: seen.append(p.dtype))
    assert seen == [torch.float32] and out.dtype == torch.bfloat16


# --- weight-name mapping -------------------------------------------------------------------------------------

def test_tiny_mapping_round_trip(tiny: tuple[torch.nn.Module, UNet]) -> None:
    reference, ours = tiny
    original = reference.state_dict()
    mapped = unet_from_diffusers(original)
    assert mapped.keys() == ours.state_dict().keys()
    back = unet_to_diffusers(mapped)
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)


@pytest.mark.parametrize("name, config", [("sd15", SD15.unet), ("sd21", SD21.unet)])
def test_real_layout_maps_and_loads(name: str, config: UNetConfig) -> None:
    require_layouts()
    shapes = layout(f"{name}_diffusers_unet")["tensors"]
    # Meta tensors: the real names and shapes, no memory.
    state = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}

    mapped = unet_from_diffusers(state)
    with torch.device("meta"):
        ours = UNet(config)
        from diffusers import UNet2DConditionModel

        reference = UNet2DConditionModel(**diffusers_unet_kwargs(config))
    # Our reference builder reproduces the real architecture, name for name and shape for shape.
    assert {k: list(v.shape) for k, v in reference.state_dict().items()} == shapes
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in ours.state_dict().items()}
    ours.load_state_dict(mapped, strict=True, assign=True)

    back = unet_to_diffusers(mapped)
    assert back.keys() == state.keys()
    assert all(back[k] is state[k] for k in state)  # pure renames: the very same tensors come back


def test_unknown_names_are_rejected_loudly(tiny: tuple[torch.nn.Module, UNet]) -> None:
    reference, ours = tiny
    state = dict(reference.state_dict())
    state["down_blocks.0.resnets.0.extra.weight"] = torch.zeros(1)
    state["text_model.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"2 tensor name\(s\) match no mapping rule: down_blocks.0.resnets.0.extra"
                                         r".weight, text_model.weight"):
        unet_from_diffusers(state)
    ours_state = dict(ours.state_dict(), **{"down.0.res.0.typo.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="down.0.res.0.typo.weight"):
        unet_to_diffusers(ours_state)


# --- bad input -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("x_shape, context_shape, t, message", [
    ((2, 3, 8, 8), (2, 77, 32), 1, r"x must be \(batch, 4, height, width\)"),
    ((2, 4, 8), (2, 77, 32), 1, r"x must be"),
    ((2, 4, 8, 8), (2, 77, 16), 1, r"context must be \(2, tokens, 32\)"),
    ((2, 4, 8, 8), (1, 77, 32), 1, r"context must be"),
    ((2, 4, 8, 8), (2, 77, 32), torch.tensor([1, 2, 3]), r"t must be a number or a \(2,\) tensor"),
])
def test_bad_input_is_rejected(tiny: tuple[torch.nn.Module, UNet], x_shape: tuple[int, ...],
                               context_shape: tuple[int, ...], t: int | Tensor, message: str) -> None:
    _, ours = tiny
    with pytest.raises(ValueError, match=message):
        ours(torch.zeros(x_shape), t, torch.zeros(context_shape))
