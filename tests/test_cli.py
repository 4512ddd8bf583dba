"""The `diffedit` command on a tiny saved model: files written, no overwrite without --force, one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffedit import Inversion, load
from diffedit.cli import main

from ._reference import relative_error
from .conftest import make_tiny_model

FAST = ["--steps", "6", "--num-maps", "2", "--quiet"]


def saved_model_and_picture(root: Path, tokenizer_dir: Path) -> dict[str, Path]:
    """A saved tiny model and a 16 x 16 picture (a red square on blue) in `root`."""
    make_tiny_model(tokenizer_dir, "epsilon", seed=7).save(root / "model")
    picture = Image.new("RGB", (16, 16), (30, 60, 200))
    picture.paste((220, 20, 20), (4, 4, 12, 12))
    picture.save(root / "in.png")
    return {"model": root / "model", "image": root / "in.png"}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Path]:
    return saved_model_and_picture(tmp_path_factory.mktemp("cli"), tokenizer_dir)


def args(files: dict[str, Path], command: str, *rest: str | Path) -> list[str]:
    return [command, "--model", str(files["model"]), "--image", str(files["image"]), *map(str, rest)]


def one_line_error(capsys: pytest.CaptureFixture[str], *words: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diffedit: error:"), err
    assert all(w in err[0] for w in words), err


def test_edit_writes_every_output_and_never_overwrites(files, tmp_path: Path, capsys) -> None:
    out, mask, figure = tmp_path / "out.png", tmp_path / "mask.png", tmp_path / "fig.png"
    cmd = args(files, "edit", "--source", "a bowl of fruits", "--target", "a bowl of pears", "--out", out,
               "--mask-out", mask, "--figure", figure, *FAST)
    assert main(cmd) == 0
    assert Image.open(out).size == (16, 16) and Image.open(mask).mode == "L" and Image.open(figure).width > 3 * 16
    before = out.read_bytes()
    assert main(cmd) == 2
    one_line_error(capsys, "exists", "--force")
    assert main([*cmd, "--force"]) == 0
    assert out.read_bytes() == before  # same seed, same bits


# float32 CPU parity, as tests/test_edit_compat.py states it: max |ours - diffusers| / max |diffusers|
RTOL = 1e-5


def png_matches(levels: np.ndarray, reference: np.ndarray, rtol: float) -> tuple[bool, str]:
    """uint8 `levels` against diffusers' float image in [0, 1] to `rtol`, through the PNG's rounding: each level
    within 0.5 + 255 * rtol * max|reference| of 255 * reference, i.e. its rounding, or one level off where the
    reference lies within the tolerance of a rounding boundary (those are counted in the returned note)."""
    scaled = 255 * reference.astype(np.float64).clip(0, 1)
    off = np.abs(levels.astype(np.float64) - scaled)
    apart = int((levels != scaled.round()).sum())
    note = f"max |level - 255 x diffusers| {off.max():.4f}, {apart} levels rounded apart"
    return bool(off.max() <= 0.5 + 255 * rtol * np.abs(reference).max()), note


def test_compat_edit_is_diffusers_pipeline(files, tmp_path: Path) -> None:
    """`edit --compat` and `invert --compat` against diffusers' StableDiffusionDiffEditPipeline, built on the very
    folder the CLI loads (tests/_reference.py shares the loaded tensors), fed the same PNG as a PIL picture.

    The CLI's compat chain (cli.py `_edit` -> chain.py `edit_image`): a fresh CPU generator seeded 0 per stage; the
    mask with 2 maps, 6 steps, mask strength 0.5, guidance 7.5, both mask negatives "", threshold 3 (diffusers'
    mask_thresholding_ratio); the inversion unconditional (prompt "", guidance 1) at strength 0.8, its z0 drawn from
    the image's posterior with the inversion's generator as diffusers' `invert` draws it (the CLI reuses the mask's
    encoder pass for the posterior, diffusers encodes again: the same numbers); the edit with the target prompt,
    the source prompt as its negative, guidance 7.5, eta 0, strength 0.8.

    Stage by stage, as tests/test_edit_compat.py does it:
    - the mask PNG is diffusers' binary mask exactly (nearest-upsampled to the picture, 255 = edit);
    - `invert --compat` (the same seed: the edit's inversion) agrees with diffusers' `invert` to 10 x RTOL: the
      encoders differ by ~1e-7 and the inversion grows that (tests/test_edit_compat.py);
    - the edit PNG is diffusers' edit, fed that inversion and the mask, to RTOL through the PNG's rounding
      (`png_matches`: at most one level off where diffusers' float lies within RTOL of a rounding boundary).
    diffusers' whole chain (its own inversion) is only held to 1e-3: on this random tiny network the guided edit
    amplifies the inversion's 1e-6 rounding differences into the 1e-4 range (measured 1.8e-4). The picture's
    memory layout alone moves the edit that much: the CLI's tensor is channels-last (a permuted PIL array), as is
    diffusers' from a PIL picture; a contiguous copy of the same pixels gives another 4e-4 on either side. So exact
    parity of the whole chain through the PNG holds only where the reference is fed the CLI's own inversion.
    """
    pytest.importorskip("diffusers")
    from ._reference import diffusers_pipeline

    out, mask_out, inv = tmp_path / "out.png", tmp_path / "mask.png", tmp_path / "in.inversion.safetensors"
    source, target = "a red square", "a blue circle"
    assert main(args(files, "edit", "--source", source, "--target", target, "--out", out, "--mask-out", mask_out,
                     "--compat", *FAST)) == 0
    assert main(args(files, "invert", "--out", inv, "--steps", "6", "--compat", "--quiet")) == 0
    model = load(files["model"])
    pipe = diffusers_pipeline(model)
    picture = Image.open(files["image"]).convert("RGB")
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731

    theirs_mask = pipe.generate_mask(image=picture, source_prompt=source, target_prompt=target, num_maps_per_mask=2,
                                     mask_encode_strength=0.5, num_inference_steps=6, guidance_scale=7.5,
                                     mask_thresholding_ratio=3.0, generator=gen(), output_type="np")
    factor = model.config.vae.downsample_factor
    cli_mask = np.asarray(Image.open(mask_out))
    assert set(np.unique(cli_mask)) <= {0, 255}
    assert np.array_equal(cli_mask > 0, np.kron(theirs_mask[0], np.ones((factor, factor))) > 0)
    assert 0 < theirs_mask.mean() < 1  # both values: the masked blend below is tested

    ours_inv = Inversion.load(inv).latents
    theirs_inv = pipe.invert(prompt="", image=picture, num_inference_steps=6, inpaint_strength=0.8,
                             guidance_scale=1.0, generator=gen()).latents
    inv_err = relative_error(ours_inv, theirs_inv)
    assert inv_err < 10 * RTOL

    def theirs_edit(latents: torch.Tensor) -> np.ndarray:
        return pipe(prompt=target, mask_image=torch.from_numpy(theirs_mask).float()[:, None], image_latents=latents,
                    inpaint_strength=0.8, num_inference_steps=6, guidance_scale=7.5, negative_prompt=source, eta=0.0,
                    generator=gen(), output_type="np").images[0]

    cli = np.asarray(Image.open(out))
    from_ours, chain = theirs_edit(ours_inv), theirs_edit(theirs_inv)
    assert cli.shape == from_ours.shape == (16, 16, 3)
    staged, note = png_matches(cli, from_ours, RTOL)
    whole, whole_note = png_matches(cli, chain, 1e-3)
    print(f"\ninversion {inv_err:.1e}; edit PNG vs diffusers from our inversion: {note}; "
          f"vs diffusers' whole chain: {whole_note}", end=" ")
    assert staged and whole


def test_paste_background_keeps_the_input_outside_the_mask(files, tmp_path: Path) -> None:
    out, mask_out, plain = tmp_path / "out.png", tmp_path / "mask.png", tmp_path / "plain.png"
    common = ["--source", "a red square", "--target", "a blue circle", *FAST]
    assert main(args(files, "edit", *common, "--out", out, "--mask-out", mask_out, "--paste-background")) == 0
    assert main(args(files, "edit", *common, "--out", plain)) == 0
    inside = np.asarray(Image.open(mask_out)) > 0
    assert 0 < inside.mean() < 1
    pasted, decoded, original = (np.asarray(Image.open(p)) for p in (out, plain, files["image"]))
    assert np.array_equal(pasted[~inside], original[~inside]) and np.array_equal(pasted[inside], decoded[inside])


def test_mask_invert_then_edit_from_the_file(files, tmp_path: Path, capsys) -> None:
    mask, inv = tmp_path / "mask.png", tmp_path / "in.inversion.safetensors"
    assert main(args(files, "mask", "--source", "a red square", "--target", "a blue circle", "--out", mask, *FAST)) == 0
    assert set(Image.open(mask).histogram()[1:255]) == {0}  # only 0 and 255
    assert main(args(files, "invert", "--out", inv, "--steps", "6", "--strength", "0.5", "--quiet")) == 0
    loaded = Inversion.load(inv)
    assert loaded.steps == 6 and loaded.strength == 0.5 and loaded.latents.shape == (1, 3, 4, 8, 8)
    out = tmp_path / "out.png"
    edit = args(files, "edit", "--source", "a red square", "--target", "a blue circle", "--out", out,
                "--inversion", inv, "--num-maps", "2", "--quiet")
    assert main(edit) == 0 and out.is_file()
    out.unlink()
    assert main([*edit, "--steps", "8"]) == 2  # the file says 6
    one_line_error(capsys, "--steps", "inversion")
    assert not out.exists()


@pytest.mark.parametrize(
    "bad, words",
    [
        (["--strength", "1.5"], ["strength"]),
        (["--guidance", "0.2"], ["guidance"]),
        (["--num-maps", "zero"], ["--num-maps"]),
        (["--image", "/nowhere/in.png"], ["does not exist"]),
        (["--model", "/nowhere/model"], ["does not exist"]),
        (["--out", "out.nope"], ["format"]),
        (["--bogus"], ["unrecognized"]),
        (["--inversion", "{image}"], ["inversion file"]),
    ],
)
def test_bad_input_exits_2_with_one_line(files, tmp_path: Path, capsys, bad: list[str], words: list[str]) -> None:
    cmd = args(files, "edit", "--source", "a", "--target", "b", "--out", tmp_path / "out.png", *FAST)
    bad = [b.format(image=files["image"]) for b in bad]
    # later occurrences of an option win in argparse, so appending overrides the good value
    assert main([*cmd, *bad]) == 2
    one_line_error(capsys, *words)
    assert not (tmp_path / "out.png").exists()


def test_usage_errors_and_help(capsys) -> None:
    assert main([]) == 2
    one_line_error(capsys)
    assert main(["--help"]) == 0
    assert "edit" in capsys.readouterr().out


def test_demo_without_the_toy_weights_is_a_smoke_run(tmp_path: Path, capsys, monkeypatch) -> None:
    import diffedit.toy

    monkeypatch.setattr(diffedit.toy, "WEIGHTS", tmp_path / "no-weights")  # as in a checkout without them
    assert main(["demo", "--out", str(tmp_path / "demo"), "--quiet"]) == 0
    assert "RANDOM weights" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["edit.png", "figure.png", "input.png", "mask.png"]
    assert main(["demo", "--out", str(tmp_path / "demo"), "--quiet"]) == 2
    one_line_error(capsys, "exists")


def test_demo_edits_with_the_toy_model(tmp_path: Path, capsys) -> None:
    from diffedit.toy import WEIGHTS

    if not (WEIGHTS / "model.json").is_file():
        pytest.skip(f"the toy model's weights are not in {WEIGHTS}")
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "RANDOM" not in out and "the square is now red" in out, out
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["edit.png", "figure.png", "input.png", "mask.png"]
    assert Image.open(tmp_path / "demo" / "edit.png").size == (64, 64)
    assert Image.open(tmp_path / "demo" / "figure.png").size == (3 * 256 + 2 * 4, 256)  # three panels, 4x enlarged
