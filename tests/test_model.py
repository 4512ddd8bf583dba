"""StableDiffusion: the on-disk layout, strict loading, classifier-free guidance, and a DDIM round trip."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffedit.ddim import add_noise, ddim_inverse_step, ddim_step, step_size, timesteps
from diffedit.model import StableDiffusion, load

from .conftest import make_tiny_model


def assert_rel(ours: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> None:
    # Batched and separate UNet calls may reduce in a different order: compare relative to the scale.
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert err <= rtol, f"relative error {err:.2e} > {rtol:.0e}"


def test_import_never_imports_diffusers() -> None:
    code = (
        "import sys, pkgutil, importlib, diffedit, weights_convert\n"
        "for pkg in (diffedit, weights_convert):\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        if not m.name.endswith('__main__'):\n"
        "            importlib.import_module(m.name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'diffusers')\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> tuple[StableDiffusion, Path]:
    model = make_tiny_model(tokenizer_dir, "v_prediction", seed=3)
    model.provenance = {"source": "test"}
    folder = tmp_path_factory.mktemp("models") / "tiny"
    model.save(folder)
    return model, folder


def test_save_load_round_trip(saved: tuple[StableDiffusion, Path]) -> None:
    model, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == [
        "model.json", "text_encoder.safetensors", "tokenizer", "unet.safetensors", "vae.safetensors"
    ]
    loaded = load(folder)
    assert loaded.config == model.config and loaded.provenance == {"source": "test"}
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    x, cond = torch.randn(1, 4, 8, 8), loaded.encode_prompt("a red circle")
    assert torch.equal(loaded.unet_output(x, 11, cond), model.unet_output(x, 11, cond))


def test_no_overwrite_without_force(saved: tuple[StableDiffusion, Path]) -> None:
    model, folder = saved
    before = (folder / "model.json").read_bytes()
    with pytest.raises(FileExistsError, match="force"):
        model.save(folder)
    assert (folder / "model.json").read_bytes() == before
    model.save(folder, force=True)
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []  # no temp leftovers


def _corrupt(tmp_path: Path, folder: Path, edit) -> Path:
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(folder), str(copy)], check=True)
    tensors = load_file(str(copy / "unet.safetensors"))
    edit(tensors)
    save_file(tensors, str(copy / "unet.safetensors"))
    return copy


def test_missing_extra_and_misshaped_tensors_are_named(tmp_path: Path, saved: tuple[StableDiffusion, Path]) -> None:
    _, folder = saved
    first, second = sorted(load_file(str(folder / "unet.safetensors")))[:2]

    def edit(t: dict[str, torch.Tensor]) -> None:
        del t[first]
        t["surplus.weight"] = torch.zeros(3)
        t[second] = torch.zeros(7, 7)

    with pytest.raises(ValueError) as info:
        load(_corrupt(tmp_path, folder, edit))
    message = str(info.value)
    assert "unet" in message and first in message and "surplus.weight" in message and second in message


def test_bad_folders(tmp_path: Path, saved: tuple[StableDiffusion, Path]) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="model.json"):
        load(tmp_path)
    copy = _corrupt(tmp_path, saved[1], lambda t: None)
    meta = json.loads((copy / "model.json").read_text())
    (copy / "model.json").write_text(json.dumps({**meta, "format": "something-else"}))
    with pytest.raises(ValueError, match="unsupported format"):
        load(copy)


def test_classifier_free_guidance_is_one_batched_call(saved: tuple[StableDiffusion, Path]) -> None:
    model, _ = saved
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond, uncond = model.encode_prompt(["a red circle", "a blue square"]), model.encode_prompt(["", ""])
    e_c, e_u = model.unet(x, 501, cond.tokens), model.unet(x, 501, uncond.tokens)
    guided = model.unet_output(x, 501, cond, uncond, guidance=7.5)
    assert_rel(guided, e_u + 7.5 * (e_c - e_u))
    torch.testing.assert_close(model.unet_output(x, 501, cond, uncond, guidance=1.0), e_c, rtol=0, atol=0)
    # per-sample timesteps stay aligned with their rows under CFG batching
    t = torch.tensor([101, 701])
    rows = [model.unet_output(x[i : i + 1], int(t[i]), cond[i : i + 1], uncond[i : i + 1], 3.0) for i in range(2)]
    assert_rel(model.unet_output(x, t, cond, uncond, 3.0), torch.cat(rows))


def test_noise_estimate_converts_v(saved: tuple[StableDiffusion, Path]) -> None:
    model, _ = saved  # a v-prediction model
    x, cond = torch.randn(1, 4, 8, 8), model.encode_prompt("a")
    v, abar = model.unet(x, 301, cond.tokens), model.schedule.abar(301)
    # v = sqrt(abar) eps - sqrt(1 - abar) x0 and x = sqrt(abar) x0 + sqrt(1 - abar) eps => eps below
    torch.testing.assert_close(model.noise_estimate(x, 301, cond), abar.sqrt() * v + (1 - abar).sqrt() * x)


def test_images_round_trip_through_latents(saved: tuple[StableDiffusion, Path]) -> None:
    model, _ = saved
    images = torch.rand(2, 3, 32, 32)
    z = model.encode_image(images)
    assert z.shape == (2, 4, 16, 16)  # TINY's VAE downsamples by 2
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(model.encode_image(images, g1, sample=True), model.encode_image(images, g2, sample=True))
    assert not torch.equal(model.encode_image(images, sample=True), z)
    out = model.decode_latents(z)
    assert out.shape == images.shape and 0 <= out.min() and out.max() <= 1


@pytest.mark.parametrize("bad", [torch.rand(3, 32, 32), torch.rand(1, 1, 32, 32), torch.rand(1, 3, 31, 32)])
def test_encode_image_rejects_bad_images(saved: tuple[StableDiffusion, Path], bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="images|multiples"):
        saved[0].encode_image(bad)


def test_ddim_inversion_then_sampling_returns_to_the_start(tokenizer_dir: Path) -> None:
    """DDIM encoding is the deterministic ODE run backwards (Song et al. 2021, §4.3): inverting to a
    noise level and sampling back at guidance 1 must land near the start, closer with more steps."""
    model = make_tiny_model(tokenizer_dir, "epsilon", seed=1)
    with torch.no_grad():  # a gentler random denoiser (output std ~0.2): the ODE of a trained model is smooth
        model.unet.out_conv.weight.mul_(0.1)
        model.unet.out_conv.bias.mul_(0.1)
    cond = model.encode_prompt("a bowl of fruits")
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    errors = []
    for steps in (10, 50):
        ts = timesteps(model.schedule, steps, 0.6)
        x, level = z0, -1
        for t in reversed(ts):  # up: 1, 1 + k, ...
            x = ddim_inverse_step(model.schedule, model.unet_output(x, t, cond), x, level, t).x
            level = t
        for t in ts:  # down: the same timesteps, ending at the final alpha (the level of z0)
            x = ddim_step(model.schedule, model.unet_output(x, t, cond), x, t, t - step_size(model.schedule, steps)).x
        errors.append(((x - z0).norm() / z0.norm()).item())
    noised = ((add_noise(model.schedule, z0, torch.randn_like(z0), ts[0]) - z0).norm() / z0.norm()).item()
    assert errors[1] < errors[0] and errors[1] < 0.05 * noised, (errors, noised)


def test_saved_files_get_the_usual_permissions(tmp_path: Path, tokenizer_dir: Path) -> None:
    import os
    import stat

    umask = os.umask(0o022)
    try:
        folder = make_tiny_model(tokenizer_dir).save(tmp_path / "m")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755  # not mkdtemp's private 0700
    assert stat.S_IMODE((folder / "unet.safetensors").stat().st_mode) == 0o644
