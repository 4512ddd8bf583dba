"""diffedit.conv: the CPU convolution taken as a matmul of unfolded patches on small maps, against F.conv2d; an
upsampler's conv at the input's resolution, against F.interpolate then F.conv2d.

Tolerance: max |ours - reference| / max |reference| <= 1e-5 in fp32 (the same products summed in another order);
1e-12 in float64, where the sub-pixel identity is checked for itself.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import diffedit.conv as conv
from diffedit.conv import LARGE_WEIGHT_BYTES, SMALL_MAP_POSITIONS, UPSAMPLE_MIN_POSITIONS, Conv2d, conv2d_as_matmul
from diffedit.conv import upsample_conv, upsample_conv_pays
from diffedit.unet import Upsample
from tests._reference import relative_error

TOL = 1e-5


# (kernel, stride, padding) x input size: the UNet's 3x3 convs, its stride-2 downsampling (padded both sides, and the
# VAE's right-and-bottom padding done before the conv), 1x1 shortcuts; odd sizes and a 1x1 map (SD's 4x4 level at
# a 32 px image) where the padding is all a 3x3 kernel sees.
CASES = [(geometry, size) for geometry in [(3, 1, 1), (3, 2, 1), (3, 2, 0), (1, 1, 0), (3, 1, 0)]
         for size in [(4, 4), (7, 5), (1, 1)] if size[0] + 2 * geometry[2] >= geometry[0]]


@pytest.mark.parametrize("geometry,size", CASES, ids=[f"k{k}s{s}p{p}-{h}x{w}" for (k, s, p), (h, w) in CASES])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_matmul_conv_matches_f_conv2d(geometry: tuple[int, int, int], size: tuple[int, int], bias: bool) -> None:
    kernel, stride, padding = geometry
    torch.manual_seed(0)
    x = torch.randn(3, 24, *size)
    weight, b = torch.randn(16, 24, kernel, kernel), torch.randn(16) if bias else None
    expected = F.conv2d(x, weight, b, stride=stride, padding=padding)
    got = conv2d_as_matmul(x, weight, b, stride, padding)
    assert got.shape == expected.shape
    assert relative_error(got, expected) <= TOL
    assert got.is_contiguous()


class _Spy:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        self.calls += 1
        return conv2d_as_matmul(*args, **kwargs)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> _Spy:
    spy = _Spy()
    monkeypatch.setattr(conv, "conv2d_as_matmul", spy)
    return spy


@pytest.mark.parametrize("channels,matmul", [(1280, True), (640, False)], ids=["56MiB", "14MiB"])
def test_only_weights_past_the_mmap_threshold_take_the_matmul(spy: _Spy, channels: int, matmul: bool) -> None:
    """SD's coarsest levels (1280 channels, 3x3: 56 MiB) on 2 rows of 4x4 take it; 640 channels (14 MiB) do not."""
    torch.manual_seed(0)
    layer = Conv2d(channels, channels, 3, padding=1)
    assert (layer.weight.numel() * 4 > LARGE_WEIGHT_BYTES) == matmul
    x = torch.randn(2, channels, 4, 4)
    with torch.no_grad():
        got, expected = layer(x), F.conv2d(x, layer.weight, layer.bias, padding=1)
    assert spy.calls == int(matmul)
    assert relative_error(got, expected) <= TOL
    assert matmul or torch.equal(got, expected)


@pytest.fixture
def small_is_large(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any weight counts as large: the other conditions tested on small layers."""
    monkeypatch.setattr(conv, "LARGE_WEIGHT_BYTES", 0)


SIDE = int(SMALL_MAP_POSITIONS**0.5)  # 16: one row of SIDE x SIDE is exactly the limit
# case -> (Conv2d keyword arguments, input shape, whether the matmul runs). Positions are counted at the output,
# over all rows of the batch.
DISPATCH: dict[str, tuple[dict[str, Any], tuple[int, ...], bool]] = {
    "at-the-limit": ({"padding": 1}, (2, 8, SIDE, SIDE // 2), True),
    "stride-2, the limit at the output": ({"padding": 1, "stride": 2}, (1, 8, 2 * SIDE, 2 * SIDE), True),
    "one row within, two rows over": ({"padding": 1}, (2, 8, SIDE, SIDE), False),
    "over the limit": ({"padding": 1}, (1, 8, SIDE + 1, SIDE + 1), False),
    "bf16": ({"padding": 1}, (1, 8, 4, 4), False),
    "groups": ({"padding": 1, "groups": 2}, (1, 8, 4, 4), False),
    "dilation": ({"padding": 1, "dilation": 2}, (1, 8, 4, 4), False),
    "non-square kernel": ({"kernel_size": (3, 1), "padding": (1, 0)}, (1, 8, 4, 4), False),
    "reflect padding": ({"padding": 1, "padding_mode": "reflect"}, (1, 8, 4, 4), False),
    "string padding": ({"padding": "same"}, (1, 8, 4, 4), False),
    "unbatched input": ({"padding": 1}, (8, 4, 4), False),
}


@pytest.mark.usefixtures("small_is_large")
@pytest.mark.parametrize("case", list(DISPATCH))
def test_which_convolutions_take_the_matmul(spy: _Spy, case: str) -> None:
    """The matmul where `_matmul_pays` says (within TOL of F.conv2d); anywhere else F.conv2d itself, bit for bit."""
    kwargs, shape, matmul = DISPATCH[case]
    torch.manual_seed(0)
    layer = Conv2d(8, 8, **{"kernel_size": 3, **kwargs})
    x = torch.randn(*shape)
    if case == "bf16":
        layer, x = layer.to(torch.bfloat16), x.to(torch.bfloat16)
    with torch.no_grad():
        got = layer(x)
        expected = nn.Conv2d.forward(layer, x)
    assert spy.calls == int(matmul)
    assert relative_error(got, expected) <= TOL if matmul else torch.equal(got, expected)


def test_state_dict_and_repr_are_nn_conv2d_s() -> None:
    ours, theirs = Conv2d(4, 6, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight", "bias"]
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert isinstance(ours, nn.Conv2d) and repr(ours) == repr(theirs)


# ---- an upsampler's conv at the input's resolution ---------------------------------------------------------------
def upsample_then_conv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)


@pytest.mark.parametrize("shape", [(2, 5, 7, 4), (1, 3, 1, 1), (1, 6, 2, 9)], ids=["7x4", "1x1", "2x9"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_upsample_conv_is_upsampling_then_convolving(shape: tuple[int, ...], bias: bool) -> None:
    """In float64 the identity itself (every parity, the borders where the padding is read, a 1x1 map)."""
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64)
    weight = torch.randn(4, shape[1], 3, 3, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64) if bias else None
    expected = upsample_then_conv(x, weight, b)
    got = upsample_conv(x, weight, b)
    assert got.shape == expected.shape and got.is_contiguous()
    assert relative_error(got, expected) <= 1e-12


@pytest.mark.parametrize("channels,side", [(512, 32), (256, 64)], ids=["512ch-32x32", "256ch-64x64"])
def test_sd_s_upsamplers_take_it_within_float_rounding(monkeypatch: pytest.MonkeyPatch, channels: int,
                                                       side: int) -> None:
    """The SD VAE decoder's upsamplers at a 256 px image take `upsample_conv`, within TOL of the plain path."""
    torch.manual_seed(0)
    layer = Upsample(channels)
    x = torch.randn(1, channels, side, side)
    calls: list[int] = []
    monkeypatch.setattr("diffedit.unet.upsample_conv", lambda *a: calls.append(1) or upsample_conv(*a))
    with torch.no_grad():
        got, expected = layer(x), upsample_then_conv(x, layer.conv.weight, layer.conv.bias)
    assert calls == [1]
    assert relative_error(got, expected) <= TOL


SIDE_UP = int(UPSAMPLE_MIN_POSITIONS**0.5)  # 32: one row of SIDE_UP x SIDE_UP is exactly the floor
# case -> (Conv2d keyword arguments, channels, input shape, whether upsample_conv runs). Positions are counted at the
# input, over all rows of the batch. 192 channels have 1.27 MiB of weights, 160 channels 0.88 MiB; the conditions
# that would shrink the weights (bf16, groups) are tested at 256 channels (2.25 MiB; 1.125 in bf16 or 2 groups), so
# that the floor cannot be what refuses them.
UPSAMPLE_DISPATCH: dict[str, tuple[dict[str, Any], int, tuple[int, ...], bool]] = {
    "at the floor": ({}, 192, (1, SIDE_UP, SIDE_UP), True),
    "two rows reach it": ({}, 192, (2, SIDE_UP, SIDE_UP // 2), True),
    "below the floor": ({}, 192, (1, SIDE_UP - 1, SIDE_UP), False),
    "weights under 1 MiB": ({}, 160, (1, SIDE_UP, SIDE_UP), False),
    "bf16": ({}, 256, (1, SIDE_UP, SIDE_UP), False),
    "bf16 weights, fp32 input": ({}, 256, (1, SIDE_UP, SIDE_UP), False),
    "groups": ({"groups": 2}, 256, (1, SIDE_UP, SIDE_UP), False),
    "stride 2": ({"stride": 2}, 192, (1, SIDE_UP, SIDE_UP), False),
    "no padding": ({"padding": 0}, 192, (1, SIDE_UP, SIDE_UP), False),
    "dilation": ({"dilation": 2}, 192, (1, SIDE_UP, SIDE_UP), False),
    "5x5 kernel": ({"kernel_size": 5}, 192, (1, SIDE_UP, SIDE_UP), False),
    "reflect padding": ({"padding_mode": "reflect"}, 192, (1, SIDE_UP, SIDE_UP), False),
}


@pytest.mark.parametrize("case", list(UPSAMPLE_DISPATCH))
def test_which_upsamplers_take_it(case: str) -> None:
    kwargs, channels, (rows, h, w), expected = UPSAMPLE_DISPATCH[case]
    layer = nn.Conv2d(channels, channels, **{"kernel_size": 3, "padding": 1, **kwargs})
    x = torch.zeros(rows, channels, h, w)
    if case.startswith("bf16"):
        layer = layer.to(torch.bfloat16)
        x = x.to(torch.bfloat16) if case == "bf16" else x
    if expected or case.startswith("bf16") or case == "groups":  # the same layer in fp32 / one group would take it
        assert 2**20 <= channels * channels * 9 * 4 <= LARGE_WEIGHT_BYTES
    assert upsample_conv_pays(x, layer) == expected
    assert not upsample_conv_pays(x.to("meta"), layer)  # the CPU only


def test_upsampler_to_twice_the_size_takes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The UNet passes its skip's size: exactly twice x's is the plain x2 upsampling, and takes the fast path."""
    torch.manual_seed(0)
    layer, x = Upsample(256), torch.randn(1, 256, 32, 32)
    calls: list[int] = []
    monkeypatch.setattr("diffedit.unet.upsample_conv", lambda *a: calls.append(1) or upsample_conv(*a))
    with torch.no_grad():
        got = layer(x, size=(64, 64))
    assert calls == [1]
    assert relative_error(got, upsample_then_conv(x, layer.conv.weight, layer.conv.bias)) <= TOL


def test_upsampler_to_a_given_size_and_tiny_layers_stay_plain(monkeypatch: pytest.MonkeyPatch) -> None:
    """An odd skip size (interpolation to `size`, not x2) and a small layer (the tiny configs') are bit for bit."""
    monkeypatch.setattr("diffedit.unet.upsample_conv", lambda *a: pytest.fail("upsample_conv was taken"))
    torch.manual_seed(0)
    big, small = Upsample(256), Upsample(64)
    with torch.no_grad():
        x = torch.randn(1, 256, 32, 32)
        got = big(x, size=(63, 64))
        expected = big.conv(F.interpolate(x, size=(63, 64), mode="nearest"))
        assert torch.equal(got, expected)
        x = torch.randn(1, 64, 64, 64)
        assert torch.equal(small(x), small.conv(F.interpolate(x, scale_factor=2.0, mode="nearest")))
