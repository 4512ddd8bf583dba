"""The `diffedit` command on a tiny saved model: files written, no overwrite without --force, one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffedit import Inversion, edit, generate_mask, invert, load
from diffedit.cli import main

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


def test_compat_edit_is_the_library_chain(files, tmp_path: Path) -> None:
    # --compat: the library's compat stages with the CLI's seeds (0 per stage), which match diffusers' numbers
    # (tests/test_edit_compat.py); the inversion samples the mask's posterior instead of encoding again
    out = tmp_path / "out.png"
    cmd = args(files, "edit", "--source", "a red square", "--target", "a blue circle", "--out", out, "--compat", *FAST)
    assert main(cmd) == 0
    model, image = load(files["model"]), Image.open(files["image"])
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    mask = generate_mask(model, image, "a red square", "a blue circle", num_maps=2, steps=6, generator=gen(),
                         diffusers_compat=True, progress=False)
    inversion = invert(model, image, steps=6, generator=gen(), diffusers_compat=True, progress=False)
    expected = edit(model, inversion, mask, "a blue circle", negative_prompt="a red square", generator=gen(),
                    diffusers_compat=True, progress=False).images[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))


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
