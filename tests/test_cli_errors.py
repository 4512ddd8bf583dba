"""Hardening of the `diffedit` command: one-line errors (exit 2) for bad values, devices, files and outputs, all
before the model is loaded; atomic outputs; inversion files tied to what they were made from."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from PIL import Image

import diffedit.cli as cli
from diffedit.cli import main
from diffedit.files import atomic_write

from .test_cli import FAST, one_line_error, saved_model_and_picture


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Path]:
    """test_cli's saved tiny model and picture, with the odd inputs of these tests beside them."""
    root = tmp_path_factory.mktemp("cli-errors")
    given = saved_model_and_picture(root, tokenizer_dir)
    Image.new("RGB", (16, 16), (200, 200, 20)).save(root / "other.png")
    (root / "truncated.png").write_bytes(given["image"].read_bytes()[:40])
    (root / "folder").mkdir()
    (root / "a-file").write_text("not a folder")
    return {**given, "root": root}


def edit_args(files: dict[str, Path], *rest: str | Path, image: Path | None = None) -> list[str]:
    return ["edit", "--model", str(files["model"]), "--image", str(image or files["image"]), "--source", "a red square",
            "--target", "a blue square", *FAST, *map(str, rest)]


def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*a, **kw):
        raise AssertionError("the model was loaded before the bad input was refused")
    monkeypatch.setattr(cli, "load", refuse)


BAD_VALUES = {  # (extra arguments, words of the message); all refused by the parser or before loading
    "steps 0": (["--steps", "0"], ["--steps", "must be an integer >= 1, got 0"]),
    "strength": (["--strength", "1.5"], ["--strength", "must be a number in [0, 1], got 1.5"]),
    "eta": (["--eta", "-1"], ["--eta", "must be a number in [0, 1], got -1"]),
    "eta above 1": (["--eta", "5"], ["--eta", "must be a number in [0, 1], got 5"]),  # DDIM's sigma: NaN pictures
    "threshold": (["--threshold", "0"], ["--threshold", "must be a number > 0"]),
    "guidance": (["--guidance", "0.5"], ["--guidance", "must be a number >= 1"]),
    "num maps": (["--num-maps", "0"], ["--num-maps"]),
    "seed 2**64": (["--seed", str(2**64)], ["--seed", "must be an integer in [0, 9223372036854775807]"]),
    "seed text": (["--seed", "abc"], ["--seed", "must be an integer, got 'abc'"]),
    "no step": (["--steps", "2", "--strength", "0.2"], ["--strength 0.2 of 2 steps leaves no step"]),
    "dtype": (["--dtype", "fp8"], ["--dtype", "invalid choice"]),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_values_fail_fast_naming_the_flag(files, tmp_path, capsys, monkeypatch, case: str) -> None:
    extra, words = BAD_VALUES[case]
    no_model_load(monkeypatch)
    start = time.perf_counter()
    assert main(edit_args(files, "--out", tmp_path / "o.png", *extra)) == 2
    assert time.perf_counter() - start < 1.0
    one_line_error(capsys, *words)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("device, words", [
    ("banana", ["--device 'banana' is not a device"]), ("mps", ["diffedit runs on cpu or cuda, not mps"]),
    ("meta", ["diffedit runs on cpu or cuda, not meta"]),
    ("cuda", ["--device cuda: this torch has no CUDA device"]),
])
def test_bad_devices_are_one_line(files, tmp_path, capsys, monkeypatch, device: str, words: list[str]) -> None:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    no_model_load(monkeypatch)
    assert main(edit_args(files, "--out", tmp_path / "o.png", "--device", device)) == 2
    one_line_error(capsys, *words)


def test_bad_outputs_are_refused_before_any_work(files, tmp_path, capsys, monkeypatch) -> None:
    no_model_load(monkeypatch)
    root = files["root"]
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    cases = {
        "out is the input": ([files["image"]], "is an input of this command"),
        "xbm cannot hold RGB": ([tmp_path / "o.xbm"], "format cannot hold this picture"),
        "parent is a file": ([root / "a-file" / "o.png"], "is a file, not a folder"),
        "dangling symlink": ([tmp_path / "dangling.png"], "exists; pass --force"),
        "inside the model": ([files["model"] / "o.png"], "inside the model folder"),
        "unknown extension": ([tmp_path / "o.abc"], "cannot tell the image format"),
        "edit and mask on one path": ([tmp_path / "o.png", "--mask-out", tmp_path / "o.png"],
                                      "two outputs have the same path"),
        "figure and mask on one path": ([tmp_path / "o.png", "--mask-out", tmp_path / "f.png", "--figure",
                                         tmp_path / "f.png"], "two outputs have the same path"),
        "empty --out": ([""], "--out: is empty"),
    }
    before = sorted(p.name for p in root.iterdir())
    for name, (out, words) in cases.items():
        assert main(edit_args(files, "--out", *out)) == 2, name
        one_line_error(capsys, words)
    assert sorted(p.name for p in root.iterdir()) == before and not (tmp_path / "nowhere.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling.png"]
    assert main(["invert", "--model", str(files["model"]), "--image", str(files["image"]), "--quiet",
                 "--out", str(tmp_path / "x.png")]) == 2
    one_line_error(capsys, "--out", "an inversion file is written as .safetensors")


@pytest.mark.parametrize("image, words", [
    ("folder", ["image", "is a folder, not a file"]), ("missing.png", ["image", "does not exist"]),
    ("truncated.png", ["is not a readable picture"]),
])
def test_bad_images_are_one_line(files, tmp_path, capsys, image: str, words: list[str]) -> None:
    assert main(edit_args(files, "--out", tmp_path / "o.png", image=files["root"] / image)) == 2
    one_line_error(capsys, *words)
    assert not list(tmp_path.iterdir())


def test_max_pixels_refuses_large_inputs(files, tmp_path, capsys) -> None:
    assert main(edit_args(files, "--out", tmp_path / "o.png", "--max-pixels", "100")) == 2
    one_line_error(capsys, "16 x 16 = 256 pixels, above the limit of 100 (--max-pixels)")


def test_inversion_files_are_tied_to_their_image(files, tmp_path, capsys) -> None:
    inv = tmp_path / "in.inversion.safetensors"
    common = ["--model", str(files["model"]), "--steps", "6", "--quiet"]
    assert main(["invert", "--image", str(files["image"]), *common, "--out", str(inv)]) == 0
    assert (inv.stat().st_mode & 0o777) == 0o644  # as the images: no private 0600 temp-file mode left
    other = files["root"] / "other.png"
    assert main(edit_args(files, "--out", tmp_path / "o.png", "--inversion", inv, image=other)) == 2
    one_line_error(capsys, "was made from another image than", "--ignore-inversion-source")
    assert main(edit_args(files, "--out", tmp_path / "o.png", "--inversion", inv, "--compat")) == 2
    one_line_error(capsys, "was made from the default mode")
    assert main(edit_args(files, "--out", tmp_path / "o.png", "--inversion", inv, "--ignore-inversion-source",
                          image=other)) == 0
    # with the file, the edit of the image it was made from equals the edit without it, bit for bit
    assert main(edit_args(files, "--out", tmp_path / "with.png", "--inversion", inv)) == 0
    assert main(edit_args(files, "--out", tmp_path / "without.png")) == 0
    assert Image.open(tmp_path / "with.png").tobytes() == Image.open(tmp_path / "without.png").tobytes()
    assert main(edit_args(files, "--out", tmp_path / "f.png", "--inversion", files["root"] / "folder")) == 2
    one_line_error(capsys, "is a folder, not an inversion file")


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path) -> None:
    path = tmp_path / "result.png"
    path.write_bytes(b"old")

    def fail(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["result.png"]
    atomic_write(path, lambda tmp: tmp.write_bytes(b"new"))
    assert path.read_bytes() == b"new" and sorted(os.listdir(tmp_path)) == ["result.png"]


def test_a_failed_image_write_under_force_keeps_the_old_output(files, tmp_path, monkeypatch) -> None:
    out = tmp_path / "o.png"
    out.write_bytes(b"previous result")

    def broken_save(self, fp, *a, **kw):
        raise OSError("No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    assert main(edit_args(files, "--out", out, "--force")) == 2
    assert out.read_bytes() == b"previous result" and sorted(os.listdir(tmp_path)) == ["o.png"]


def test_the_demos_printed_command_gives_the_same_edit_bit_for_bit(tmp_path, capsys) -> None:
    import shlex

    from diffedit.toy import WEIGHTS

    if not (WEIGHTS / "model.json").is_file():
        pytest.skip("the toy model is not built")
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("the same edit, bit for bit: "))
    command = shlex.split(line.split(": ", 1)[1])
    assert command[0] == "diffedit" and command[-2:] == ["--out", "edit.png"]
    assert main([*command[1:-1], str(tmp_path / "again.png"), "--quiet"]) == 0
    demo = Image.open(tmp_path / "demo" / "edit.png")
    assert demo.tobytes() == Image.open(tmp_path / "again.png").tobytes()


def test_a_uint8_mask_reads_alike_from_numpy_and_torch() -> None:
    import numpy as np
    import torch

    from diffedit.image import to_mask

    array = np.zeros((16, 16), np.uint8)
    array[4:12, 4:12] = 255
    expected = torch.zeros(1, 1, 8, 8)
    expected[..., 2:6, 2:6] = 1  # nearest downsampling of the 0/255 square, independently written
    assert torch.equal(to_mask(array, (8, 8)), expected)
    assert torch.equal(to_mask(torch.from_numpy(array), (8, 8)), expected)
    with pytest.raises(ValueError, match="uint8 masks must hold only 0 and 255"):
        to_mask(torch.full((8, 8), 7, dtype=torch.uint8), (8, 8))


@pytest.mark.parametrize("change, words", [
    (lambda m: [m], ["must hold a JSON object, got a list"]),
    (lambda m: {k: v for k, v in m.items() if k != "config"}, ["config must be a JSON object, got None"]),
    (lambda m: {k: v for k, v in m.items() if k != "provenance"}, ["provenance must be a JSON object"]),
    (lambda m: {**m, "config": None}, ["config must be a JSON object, got None"]),
    (lambda m: _set(m, "unet", "heads", [0, 0]), ["config.unet.heads[0] must be a positive integer, got 0"]),
    (lambda m: _set(m, "vae", "channels", [-8, 16]), ["config.vae.channels[0] must be a positive integer, got -8"]),
    (lambda m: _set(m, "schedule", "num_train_timesteps", 0), ["config.schedule.num_train_timesteps", "got 0"]),
    (lambda m: _set(m, "unet", "channels", "abc"), ["config.unet.channels must be a non-empty list, got 'abc'"]),
    (lambda m: _set(m, "schedule", "prediction_type", "x0"), ["config.schedule.prediction_type must be one of"]),
])
def test_bad_model_json_is_one_line_naming_file_and_field(files, tmp_path, capsys, change, words) -> None:
    import json
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(files["model"], folder)
    meta = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps(change(meta)))
    args = ["edit", "--model", str(folder), "--image", str(files["image"]), "--source", "a", "--target", "b",
            "--quiet", "--out", str(tmp_path / "o.png")]
    assert main(args) == 2
    one_line_error(capsys, "model.json", *words)
    assert not (tmp_path / "o.png").exists()


def _set(meta: dict, part: str, key: str, value: object) -> dict:
    return {**meta, "config": {**meta["config"], part: {**meta["config"][part], key: value}}}


def test_eval_says_a_missing_diffusers_method_is_skipped_even_when_quiet(tmp_path, capsys, monkeypatch) -> None:
    import builtins

    from diffedit.toy import WEIGHTS

    if not (WEIGHTS / "model.json").is_file():
        pytest.skip("the toy model is not built")
    real_import = builtins.__import__

    def no_diffusers(name, *args, **kwargs):  # as on a machine where only the package itself is installed
        if name == "diffusers" or name.startswith("diffusers."):
            raise ImportError("No module named 'diffusers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_diffusers)
    out = tmp_path / "eval.json"
    assert main(["eval", "--out", str(out), "--count", "1", "--methods", "reconstruction", "diffusers", "--quiet"]) == 0
    assert "diffusers: skipped: diffusers is not installed" in capsys.readouterr().err
    assert "Infinity" not in out.read_text() and "NaN" not in out.read_text()


def test_an_interrupt_reworded_by_a_library_is_still_reported_as_interrupted(files, tmp_path, capsys,
                                                                           monkeypatch) -> None:
    import signal

    def load_then_ctrl_c(*a, **kw):
        try:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while a library is at work...
            time.sleep(5)
        except KeyboardInterrupt:
            raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'") from None
        raise AssertionError("SIGINT was not delivered")  # ...which turns it into an error of its own

    before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(cli, "load", load_then_ctrl_c)
    assert main(edit_args(files, "--out", tmp_path / "o.png")) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["diffedit: interrupted"]
    assert signal.getsignal(signal.SIGINT) is before and not list(tmp_path.iterdir())


def test_the_size_warning_is_told_the_vae_width_and_the_bytes_of_the_dtype(files, tmp_path, monkeypatch) -> None:
    from diffedit import load

    seen: list[dict] = []
    monkeypatch.setattr(cli, "size_warning", lambda *a, **kw: seen.append(kw))
    assert main(edit_args(files, "--out", tmp_path / "o.png")) == 0
    channels = load(files["model"]).config.vae.channels[0]
    assert seen == [{"vae_channels": channels, "bytes_per_value": 4}]
    from diffedit.image import size_warning

    assert size_warning(1024, 1024, 512, **seen[0]) != size_warning(1024, 1024, 512)  # the real one takes both


def test_quiet_also_silences_the_vae_bar(files, tmp_path, capsys, monkeypatch) -> None:
    import diffedit.vae as vae

    monkeypatch.setattr(vae, "PROGRESS_PIXELS", 0)  # every encode / decode would show its bar
    assert main([a for a in edit_args(files, "--out", tmp_path / "loud.png") if a != "--quiet"]) == 0
    assert "VAE encode" in capsys.readouterr().err
    assert main(edit_args(files, "--out", tmp_path / "quiet.png")) == 0
    assert capsys.readouterr().err == "" and vae.PROGRESS_PIXELS == 0  # and the setting is put back


def test_a_folder_that_refuses_new_files_is_refused_before_any_work(files, tmp_path, capsys, monkeypatch) -> None:
    """/proc, /sys, a read-only mount: os.access says yes (as root, always), the file cannot be made. The probe is
    made where the file will go: the output's folder, or the nearest one that exists (the rest is made by mkdir)."""
    import tempfile

    probed = []

    def refuse(*a, dir=None, **kw):
        probed.append(Path(dir))
        raise OSError(30, "Read-only file system")

    no_model_load(monkeypatch)
    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    for out in (tmp_path / "o.png", tmp_path / "new" / "deeper" / "o.png"):
        assert main(edit_args(files, "--out", out)) == 2
        one_line_error(capsys, f"cannot write {out}: {tmp_path} does not take new files (Read-only file system)")
    assert probed == [tmp_path, tmp_path] and not list(tmp_path.iterdir())


def test_an_empty_mask_is_said(files, tmp_path, capsys) -> None:
    """The same prompt twice: no difference, no mask; the edit is then the reconstruction, and the command says so."""
    args = ["edit", "--model", str(files["model"]), "--image", str(files["image"]), "--source", "a red square",
            "--target", "a red square", *FAST, "--out", str(tmp_path / "o.png"), "--quiet"]
    assert main(args) == 0
    assert "diffedit: warning: the mask is empty" in capsys.readouterr().err
    assert (tmp_path / "o.png").is_file()
    assert main(["mask", *args[1:args.index("--out")], "--out", str(tmp_path / "m.png"), "--quiet"]) == 0
    assert "diffedit: warning: the mask is empty" in capsys.readouterr().err


@pytest.mark.parametrize("extra, words", [
    (["--steps", "0"], ["--steps", "must be an integer >= 1, got 0"]),
    (["--count", "0"], ["--count", "must be an integer >= 1, got 0"]),
    (["--sheet-count", "-1"], ["--sheet-count", "must be an integer >= 0, got -1"]),
    (["--guidance", "0.5"], ["--guidance", "must be a number >= 1, got 0.5"]),
    (["--out", ""], ["--out", "is empty"]),
])
def test_eval_refuses_bad_values_naming_the_flag_before_loading(tmp_path, capsys, monkeypatch, extra, words) -> None:
    from diffedit import toy

    monkeypatch.setattr(toy, "load_toy_model", lambda *a, **kw: pytest.fail("the model was loaded"))
    assert main(["eval", "--out", str(tmp_path / "r.json"), *extra]) == 2
    one_line_error(capsys, *words)
    assert not list(tmp_path.iterdir())


def test_eval_refuses_an_out_that_is_also_the_sheet(tmp_path, capsys, monkeypatch) -> None:
    from diffedit import toy

    monkeypatch.setattr(toy, "load_toy_model", lambda *a, **kw: pytest.fail("the model was loaded"))
    assert main(["eval", "--out", str(tmp_path / "r.png")]) == 2
    one_line_error(capsys, "--out", "is also the contact sheet (by default --out with .png)")
    assert not list(tmp_path.iterdir())
