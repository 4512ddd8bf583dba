"""Our AutoencoderKL against diffusers' on identical random weights (square and non-square sizes that are not
multiples of the UNet's downsampling), the posterior's sampling bits, the progress bar on large inputs, the
diffusers name mapping (current and deprecated attention names, Linear and 1x1-conv shapes), input validation.

Tolerance: max |ours - diffusers| / max |diffusers| <= 1e-5 (fp32, CPU).
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Iterator

import pytest
import torch
from torch import Tensor
from tqdm import tqdm

from tests._reference import diffusers_vae_kwargs, layout, require_layouts
from tests._reference import our_vae_from, reference_vae, relative_error
import diffedit.vae
from diffedit.configs import SD15, SD21, TINY, ModelConfig, VAEConfig
from diffedit.vae import AutoencoderKL, DiagonalGaussian
from weights_convert.diffusers import VAE_LEGACY_ATTENTION_NAMES, vae_from_diffusers, vae_to_diffusers

TOL = 1e-5
CFG = TINY.vae
# The shipped toy model's autoencoder: three levels (factor 4), so internal sizes halve twice.
TOY = ModelConfig.from_dict(json.loads((Path(__file__).parents[1] / "diffedit/toy/weights/model.json").read_text())
                            ["config"]).vae


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, AutoencoderKL]:
    reference = reference_vae(CFG, seed=0)
    return reference, our_vae_from(reference, CFG)


def _images(batch: int, size: int | tuple[int, int], seed: int = 0) -> Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _check_parity(reference: torch.nn.Module, ours: AutoencoderKL, size: int | tuple[int, int]) -> None:
    images = _images(2, size)
    expected = reference.encode(images).latent_dist
    posterior = ours.encode(images)
    assert relative_error(posterior.mean, expected.mean) <= TOL
    assert relative_error(posterior.logvar, expected.logvar) <= TOL
    assert expected.mean.std() > 0.1 and expected.logvar.std() > 0.1  # random weights: non-trivial moments

    z = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(1))
    decoded = reference.decode(z).sample
    assert decoded.shape == images.shape
    assert relative_error(ours.decode(z), decoded) <= TOL


@torch.no_grad()
def test_tiny_matches_diffusers(tiny: tuple[torch.nn.Module, AutoencoderKL]) -> None:
    _check_parity(*tiny, size=32)


@pytest.mark.parametrize("config, size", [(CFG, (18, 22)), (TOY, (72, 88)), (TOY, (36, 20))],
                         ids=["tiny-18x22", "toy-72x88", "toy-36x20"])
@torch.no_grad()
def test_sizes_not_multiples_of_the_unet_downsampling_match_diffusers(config: VAEConfig,
                                                                      size: tuple[int, int]) -> None:
    """Multiples of the VAE factor only: 72 x 88 pixels -> 18 x 22 toy latents (9 x 11 for SD), non-square."""
    reference = reference_vae(config, seed=2)
    _check_parity(reference, our_vae_from(reference, config), size)


@pytest.fixture(scope="module")
def full_size() -> Iterator[tuple[torch.nn.Module, AutoencoderKL]]:
    reference = reference_vae(SD15.vae, seed=1)  # SD 1.5 and 2.x share the autoencoder architecture
    ours = our_vae_from(reference, SD15.vae, share=True)
    yield reference, ours
    del reference, ours
    gc.collect()


@pytest.mark.slow
@torch.no_grad()
def test_full_size_matches_diffusers(full_size: tuple[torch.nn.Module, AutoencoderKL]) -> None:
    _check_parity(*full_size, size=64)
    _check_parity(*full_size, size=(72, 88))  # 9 x 11 latents: not a multiple of the SD UNet's 8


@torch.no_grad()
def test_sample_draws_the_same_bits_as_diffusers(tiny: tuple[torch.nn.Module, AutoencoderKL]) -> None:
    reference, ours = tiny
    images = _images(2, 32)
    expected = reference.encode(images).latent_dist
    # On the very same moments the sample must be bit-identical, and leave the generator in the same state.
    posterior = DiagonalGaussian.from_moments(expected.parameters)
    g_ours, g_ref = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(posterior.sample(g_ours), expected.sample(g_ref))
    assert torch.equal(torch.randn(3, generator=g_ours), torch.randn(3, generator=g_ref))
    # Through our own encoder: equal within tolerance.
    sample = ours.encode(images).sample(torch.Generator().manual_seed(7))
    assert relative_error(sample, expected.sample(torch.Generator().manual_seed(7))) <= TOL
    assert torch.equal(posterior.mode(), expected.mode())
    torch.testing.assert_close(posterior.std, expected.std, rtol=0, atol=0)


@torch.no_grad()
def test_progress_bar_on_large_inputs_only_and_bit_identical(tiny: tuple[torch.nn.Module, AutoencoderKL],
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    _, ours = tiny
    bars: list[tuple[str, int, int]] = []  # (desc, ticks, total) of every bar shown, when it closes

    class Recording(tqdm):
        def close(self) -> None:
            if not self.disable:
                bars.append((self.desc, self.n, self.total))
            super().close()

    monkeypatch.setattr(diffedit.vae, "tqdm", Recording)
    images = _images(1, (16, 24))
    z = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(1))
    quiet_mean, quiet_image = ours.encode(images).mean, ours.decode(z)  # 384 pixels: no bar by default
    assert bars == [] and capsys.readouterr().err == ""
    # Forced on: the same modules in the same order, so the same bits.
    assert torch.equal(ours.encode(images, progress=True).mean, quiet_mean)
    assert torch.equal(ours.decode(z, progress=True), quiet_image)
    # TINY: encoder 2 levels x 1 res block + 1 downsample + mid 3 = 6 ticks; decoder 2 x 2 + 1 upsample + 3 = 8.
    assert bars == [("VAE encode", 6, 6), ("VAE decode", 8, 8)]
    assert "VAE encode" in capsys.readouterr().err
    # Automatic above PROGRESS_PIXELS image pixels (the decoder counts the pixels it will produce).
    monkeypatch.setattr(diffedit.vae, "PROGRESS_PIXELS", 383)
    assert torch.equal(ours.encode(images).mean, quiet_mean) and torch.equal(ours.decode(z), quiet_image)
    assert len(bars) == 4
    ours.encode(images, progress=False), ours.decode(z, progress=False)
    assert len(bars) == 4 and capsys.readouterr().err.count("VAE") == 2


def test_latent_scaling_round_trip(tiny: tuple[torch.nn.Module, AutoencoderKL]) -> None:
    _, ours = tiny
    z = torch.randn(1, 4, 2, 2)
    torch.testing.assert_close(ours.to_latent(z), z * 0.18215, rtol=0, atol=0)
    torch.testing.assert_close(ours.from_latent(ours.to_latent(z)), z)


# --- weight-name mapping -------------------------------------------------------------------------------------

def _legacy(state: dict[str, Tensor], conv_shaped: bool) -> dict[str, Tensor]:
    """The same weights under the deprecated attention names, optionally with ldm's 1x1-conv shapes."""
    current_to_old = {new: old for old, new in VAE_LEGACY_ATTENTION_NAMES.items()}
    out = {}
    for name, tensor in state.items():
        prefix, sep, rest = name.partition("mid_block.attentions.0.")
        leaf, param = rest.rsplit(".", 1) if sep else ("", "")
        if leaf in current_to_old:
            name = f"{prefix}{sep}{current_to_old[leaf]}.{param}"
            if conv_shaped and param == "weight":
                tensor = tensor[:, :, None, None]
        out[name] = tensor
    return out


def test_tiny_mapping_round_trip(tiny: tuple[torch.nn.Module, AutoencoderKL]) -> None:
    reference, ours = tiny
    original = reference.state_dict()
    mapped = vae_from_diffusers(original)
    assert mapped.keys() == ours.state_dict().keys()
    back = vae_to_diffusers(mapped)
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)

    # Deprecated names, with Linear or 1x1-conv weights, give exactly the same tensors.
    for conv_shaped in (False, True):
        legacy = _legacy(original, conv_shaped)
        assert legacy.keys() != original.keys()
        from_legacy = vae_from_diffusers(legacy)
        assert from_legacy.keys() == mapped.keys()
        assert all(torch.equal(from_legacy[k], mapped[k]) for k in mapped)


@pytest.mark.parametrize("name, config", [("sd15", SD15.vae), ("sd21", SD21.vae)])
def test_real_layout_maps_and_loads(name: str, config: VAEConfig) -> None:
    require_layouts()
    spec = layout(f"{name}_diffusers_vae")
    shapes, aliases = spec["tensors"], spec["aliases"]
    assert set(aliases) <= set(shapes)  # the file uses the deprecated attention names
    torch.manual_seed(0)
    state = {k: torch.randn(shape) for k, shape in shapes.items()}  # ~84M floats: real values, bit checks

    mapped = vae_from_diffusers(state)
    with torch.device("meta"):
        ours = AutoencoderKL(config)
        from diffusers import AutoencoderKL as DiffusersAutoencoderKL

        reference = DiffusersAutoencoderKL(**diffusers_vae_kwargs(config))
    current = {aliases.get(k, k): v for k, v in state.items()}
    shapes_of = lambda sd: {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes_of(reference.state_dict()) == shapes_of(current)
    assert shapes_of(mapped) == shapes_of(ours.state_dict())
    ours.load_state_dict(mapped, strict=True, assign=True)

    back = vae_to_diffusers(mapped)  # current names come back
    assert back.keys() == current.keys()
    assert all(torch.equal(back[k], current[k]) for k in current)
    del state, mapped, back, current
    gc.collect()


def test_bad_names_are_rejected_loudly(tiny: tuple[torch.nn.Module, AutoencoderKL]) -> None:
    reference, _ = tiny
    state = dict(reference.state_dict())
    with pytest.raises(ValueError, match=r"1 tensor name\(s\) match no mapping rule: encoder.mid_block.oops.bias"):
        vae_from_diffusers({**state, "encoder.mid_block.oops.bias": torch.zeros(1)})
    # The same weight under its old and its new name is ambiguous: refuse.
    with pytest.raises(ValueError, match="both its old and its new names"):
        vae_from_diffusers({**state, **_legacy(state, conv_shaped=False)})
    bad = {k: (v[:, :, None, None].expand(-1, -1, 3, 3) if k.endswith("attentions.0.to_q.weight") else v)
           for k, v in state.items()}
    with pytest.raises(ValueError, match="expected a Linear or 1x1 conv weight"):
        vae_from_diffusers(bad)


# --- bad input -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, message", [
    ((2, 4, 32, 32), r"images must be \(batch, 3, height, width\)"),
    ((3, 32, 32), r"images must be"),
    ((2, 3, 31, 32), r"multiples of 2"),
])
def test_encode_rejects_bad_input(tiny: tuple[torch.nn.Module, AutoencoderKL], shape: tuple[int, ...],
                                  message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny[1].encode(torch.zeros(shape))


@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (4, 4, 4)])
def test_decode_rejects_bad_input(tiny: tuple[torch.nn.Module, AutoencoderKL], shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"latents must be \(batch, 4, h, w\)"):
        tiny[1].decode(torch.zeros(shape))
