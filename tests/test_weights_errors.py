"""Bad model folders and bad conversions: each refusal is one line naming the file (and the field), and nothing
appears, changes or is left behind: no OUT, no hidden `.OUT.*.tmp`, no tokenizer folder in the system temp dir.

The sources are TINY models: our folder (StableDiffusion.save) and its diffusers export (export_diffusers), so no
test here needs diffusers itself. Every expected message is written out in full; where part of it is a library's
own reason (json, safetensors, huggingface_hub), that part is taken from the library, not from our code.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import diffedit.weights
from diffedit import load
from weights_convert.__main__ import main
from weights_convert.export import export_diffusers

from . import _reference
from .conftest import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]


# ---- sources and snapshots ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Path]:
    """{"ours": a TINY diffedit model folder, "diffusers": the same model in diffusers format}."""
    root = tmp_path_factory.mktemp("sources")
    ours = make_tiny_model(tokenizer_dir).save(root / "ours")
    return {"ours": ours, "diffusers": export_diffusers(ours, root / "diffusers", quiet=True)}


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every file (hidden ones too) under `folder` with its bytes, every folder and link by name."""
    out: dict[str, bytes | str] = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = f"-> {os.readlink(p)}" if p.is_symlink() else "folder" if p.is_dir() else p.read_bytes()
    return out


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The system temp dir, for this test only: whatever the code under test leaves there can be seen."""
    folder = tmp_path / "system-tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = main([*argv, "--quiet"])
    return code, capsys.readouterr().err


def assert_refused_by_load_and_export(folder: Path, expected: str, capsys: pytest.CaptureFixture) -> None:
    """`load(folder)` raises ValueError(expected), and the export CLI says `error: {expected}` (exit 2) and writes
    nothing beside the folder."""
    with pytest.raises(ValueError) as error:
        load(folder)
    assert str(error.value) == expected

    before = snapshot(folder.parent)
    argv = [str(folder), str(folder.parent / "exported"), "--to", "diffusers"]
    assert run_cli(argv, capsys) == (2, f"error: {expected}\n")
    assert snapshot(folder.parent) == before


# ---- model.json read strictly ---------------------------------------------------------------------------------------


def _drop(key: str) -> Callable[[dict], Any]:
    return lambda m: {k: v for k, v in m.items() if k != key}


def _field(part: str | None, key: str, value: Any) -> Callable[[dict], Any]:
    def change(m: dict) -> dict:
        m = json.loads(json.dumps(m))
        (m["config"] if part is None else m["config"][part])[key] = value
        return m

    return change


def _unset(part: str, key: str) -> Callable[[dict], Any]:
    def change(m: dict) -> dict:
        m = json.loads(json.dumps(m))
        del m["config"][part][key]
        return m

    return change


BAD_MODEL_JSON = [  # (what, change of model.json, the message after "<folder>/model.json")
    ("top-level list", lambda m: [m], " must hold a JSON object, got a list"),
    ("no config", _drop("config"), ": config must be a JSON object, got None (the key is missing)"),
    ("no provenance", _drop("provenance"), ": provenance must be a JSON object, got None (the key is missing)"),
    ("config null", lambda m: {**m, "config": None}, ": config must be a JSON object, got None"),
    ("config a list", lambda m: {**m, "config": []}, ": config must be a JSON object, got []"),
    ("no unet", lambda m: {**m, "config": _drop("unet")(m["config"])}, ": model config lacks ['unet']"),
    ("heads 0", _field("unet", "heads", [2, 0]), ": config.unet.heads[1] must be a positive integer, got 0"),
    ("negative channels", _field("vae", "channels", [-32, 64]),
     ": config.vae.channels[0] must be a positive integer, got -32"),
    ("0 train timesteps", _field("schedule", "num_train_timesteps", 0),
     ": config.schedule.num_train_timesteps must be a positive integer, got 0"),
    ("channels 'abc'", _field("unet", "channels", "abc"), ": config.unet.channels must be a non-empty list, got 'abc'"),
    ("channels as strings", _field("unet", "channels", ["32", "64"]),
     ": config.unet.channels[0] must be a positive integer, got '32'"),
    ("attention as 0/1", _field("unet", "attention", [0, 1]),
     ": config.unet.attention[0] must be true or false, got 0"),
    ("image_size a string", _field(None, "image_size", "64"),
     ": config.image_size must be a positive integer, got '64'"),
    ("name a number", _field(None, "name", 5), ": config.name must be a string, got 5"),
    ("prediction type", _field("schedule", "prediction_type", "sample"),
     ": config.schedule.prediction_type must be one of ['epsilon', 'v_prediction'], got 'sample'"),
    ("steps_offset -1", _field("schedule", "steps_offset", -1),
     ": config.schedule.steps_offset must be a non-negative integer, got -1"),
    ("a field missing", _unset("unet", "channels"), ": config.unet.channels is missing"),
    ("an unknown field", _field("text", "dropout", 0.1), ": unknown TextConfig fields in config.text: ['dropout']"),
    ("heads per level", _field("unet", "heads", [2, 4, 4]),
     ": config.unet.heads must have one entry per level (2), got [2, 4, 4]"),
    ("heads split", _field("unet", "heads", [3, 4]),
     ": config.unet.heads must divide each level's channels, got 3 heads for 32 channels"),
    ("norm groups", _field("vae", "norm_groups", 7),
     ": config.vae.norm_groups must divide every level's channels, got 7 for channels [32, 64]"),
    ("text heads", _field("text", "num_heads", 5), ": config.text.num_heads must divide hidden_size 32, got 5"),
    ("beta_end 1.5", _field("schedule", "beta_end", 1.5),
     ": config.schedule.beta_end must lie between beta_start 0.00085 and 1, got 1.5"),
    ("image_size odd", _field(None, "image_size", 63),
     ": config.image_size must be a multiple of 2 (the VAE's downsampling), got 63"),
]  # fmt: skip


@pytest.mark.parametrize("what, change, message", BAD_MODEL_JSON, ids=[c[0] for c in BAD_MODEL_JSON])
def test_bad_model_json_is_one_error_naming_file_and_field(tmp_path: Path, sources: dict[str, Path], capsys,
                                                           what: str, change: Callable, message: str) -> None:
    folder = tmp_path / "model"
    shutil.copytree(sources["ours"], folder)
    meta = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps(change(meta)))
    expected = f"{folder / 'model.json'}{message}"
    assert_refused_by_load_and_export(folder, expected, capsys)


@pytest.mark.parametrize("content", ["{not json", "", "[" * 100_000 + "]" * 100_000])
def test_model_json_that_is_not_json_names_the_file(tmp_path: Path, sources: dict[str, Path], content: str) -> None:
    folder = tmp_path / "model"
    shutil.copytree(sources["ours"], folder)
    (folder / "model.json").write_text(content)
    try:
        json.loads(content)
    except json.JSONDecodeError as e:
        reason = str(e)
    except RecursionError:
        reason = "nested too deeply"
    with pytest.raises(ValueError) as error:
        load(folder)
    assert str(error.value) == f"{folder / 'model.json'} is not valid JSON: {reason}"


# ---- corrupt tensor files --------------------------------------------------------------------------------------------


CORRUPTIONS = {
    "truncated": lambda data: data[: len(data) // 2],
    "seven bytes": lambda data: data[:7],
    "text": lambda data: b"this is not a safetensors file, it is a note",
}


def _reason(path: Path) -> str:
    """safetensors' own reason for refusing the file (whitespace collapsed: one line)."""
    try:
        load_file(str(path))
    except SafetensorError as e:
        return " ".join(str(e).split())
    raise AssertionError(f"{path} reads fine")


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder"])
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_component_names_the_file(tmp_path: Path, sources: dict[str, Path], capsys, component: str,
                                          corruption: str) -> None:
    folder = tmp_path / "model"
    shutil.copytree(sources["ours"], folder)
    path = folder / f"{component}.safetensors"
    path.write_bytes(CORRUPTIONS[corruption](path.read_bytes()))
    expected = f"{path} is not a readable safetensors file: {_reason(path)}"
    assert_refused_by_load_and_export(folder, expected, capsys)


def test_corrupt_diffusers_weights_name_the_file(tmp_path: Path, sources: dict[str, Path], capsys) -> None:
    src = tmp_path / "src"
    shutil.copytree(sources["diffusers"], src)
    path = src / "vae" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    before = snapshot(tmp_path)
    expected = f"error: {path}: cannot read it: SafetensorError: {_reason(path)}\n"
    assert run_cli([str(src), str(tmp_path / "out")], capsys) == (2, expected)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("content", ["[1, 2]", "{not json", "null"])
@pytest.mark.parametrize("rel", ["unet/config.json", "scheduler/scheduler_config.json"])
def test_bad_diffusers_config_is_one_line_naming_the_file(tmp_path: Path, sources: dict[str, Path], capsys,
                                                          rel: str, content: str) -> None:
    src = tmp_path / "src"
    shutil.copytree(sources["diffusers"], src)
    (src / rel).write_text(content)
    try:
        json.loads(content)
        problem = {"[1, 2]": "must hold a JSON object, got a list",
                   "null": "must hold a JSON object, got null"}[content]
    except json.JSONDecodeError as e:
        problem = f"is not valid JSON: {e}"
    before = snapshot(tmp_path)
    assert run_cli([str(src), str(tmp_path / "out")], capsys) == (2, f"error: {src / rel} {problem}\n")
    assert snapshot(tmp_path) == before


# ---- OUT: an existing file, a link, SRC itself, nested ---------------------------------------------------------------


@pytest.mark.parametrize("direction", ["convert", "export"])
def test_force_over_a_regular_file_replaces_it_and_strands_nothing(tmp_path: Path, sources: dict[str, Path], capsys,
                                                                   direction: str) -> None:
    # Before: the file was replaced, yet the run said "error: Not a directory: .../.out.old" and left that file.
    src, extra = (sources["diffusers"], []) if direction == "convert" else (sources["ours"], ["--to", "diffusers"])
    out = tmp_path / "out"
    out.write_text("a file where the model goes")
    assert run_cli([str(src), str(out), *extra], capsys) == (2, f"error: {out} exists; pass --force to replace it\n")
    assert snapshot(tmp_path) == {"out": b"a file where the model goes"}

    assert run_cli([str(src), str(out), *extra, "--force"], capsys) == (0, "")
    assert out.is_dir() and [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing hidden beside it
    if direction == "convert":
        assert load(out).config == load(sources["ours"]).config  # a whole model
    else:
        assert snapshot(out)["unet/diffusion_pytorch_model.safetensors"] == (
            sources["diffusers"] / "unet/diffusion_pytorch_model.safetensors").read_bytes()


def test_force_over_a_link_replaces_the_link_not_its_target(tmp_path: Path, sources: dict[str, Path], capsys) -> None:
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("kept")
    out = tmp_path / "out"
    out.symlink_to(target)
    assert run_cli([str(sources["diffusers"]), str(out), "--force"], capsys) == (0, "")
    assert not out.is_symlink() and (out / "model.json").is_file()
    assert snapshot(target) == {"keep.txt": b"kept"} and sorted(p.name for p in tmp_path.iterdir()) == ["out", "target"]


def test_a_failed_swap_puts_the_old_out_back(tmp_path: Path, sources: dict[str, Path], capsys,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.write_text("the old one")
    rename = Path.rename

    def failing_rename(self: Path, target: Any) -> Path:  # the old one is moved aside; the new one cannot move in
        if Path(target) == out and self.name.startswith(".out.") and not self.name.endswith(".old.tmp"):
            raise OSError("rename failed (injected)")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_rename)
    assert run_cli([str(sources["diffusers"]), str(out), "--force"], capsys) == (2, "error: rename failed (injected)\n")
    assert snapshot(tmp_path) == {"out": b"the old one"}


@pytest.mark.parametrize("force", [[], ["--force"]])
@pytest.mark.parametrize("direction", ["convert", "export"])
@pytest.mark.parametrize("where, clash", [("same", "OUT is SRC"), ("inside", "OUT is inside SRC"),
                                          ("around", "SRC is inside OUT")])
def test_out_that_would_destroy_the_source_is_refused(tmp_path: Path, sources: dict[str, Path], capsys, where: str,
                                                      clash: str, direction: str, force: list[str]) -> None:
    src = tmp_path / "parent" / "model"
    shutil.copytree(sources["diffusers" if direction == "convert" else "ours"], src)
    out = {"same": src, "inside": src / "sub", "around": tmp_path / "parent"}[where]
    extra = ["--to", "diffusers"] if direction == "export" else []
    before = snapshot(tmp_path)
    expected = f"error: {clash} ({src} -> {out}): writing OUT would destroy the source\n"
    assert run_cli([str(src), str(out), *extra, *force], capsys) == (2, expected)
    assert snapshot(tmp_path) == before


# ---- interruptions ---------------------------------------------------------------------------------------------------


@pytest.fixture
def own_handlers() -> Any:
    """Handlers of the caller's own, to see that they are put back."""
    def mine(signum: int, frame: object) -> None:
        raise AssertionError("the caller's handler ran")

    previous = {s: signal.signal(s, mine) for s in (signal.SIGINT, signal.SIGTERM)}
    yield mine
    for s, handler in previous.items():
        signal.signal(s, handler)


@pytest.mark.parametrize("direction", ["convert", "export"])
def test_sigterm_midway_removes_every_temporary(tmp_path: Path, sources: dict[str, Path], capsys, private_tmp: Path,
                                                monkeypatch: pytest.MonkeyPatch, own_handlers: Any,
                                                direction: str) -> None:
    import weights_convert.export

    module = diffedit.weights if direction == "convert" else weights_convert.export
    src, extra = (sources["diffusers"], []) if direction == "convert" else (sources["ours"], ["--to", "diffusers"])
    calls = []

    def terminated_save(tensors: Any, path: str, *args: Any, **kwargs: Any) -> None:  # while the weights are written
        calls.append(path)
        if len(calls) == 2:
            if direction == "convert":  # so the check below means something: the staged tokenizer is there now
                assert len(list(private_tmp.glob("diffedit-tokenizer-*"))) == 1
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
        save_file(tensors, path, *args, **kwargs)

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("the previous OUT")
    before = snapshot(tmp_path)
    monkeypatch.setattr(module, "save_file", terminated_save)
    expected = "interrupted (SIGTERM): nothing was written\n"
    assert run_cli([str(src), str(out), *extra, "--force"], capsys) == (130, expected)
    assert len(calls) == 2
    assert snapshot(tmp_path) == before  # the old OUT as it was, no .out.*.tmp, nothing in the system temp dir
    assert signal.getsignal(signal.SIGTERM) is own_handlers and signal.getsignal(signal.SIGINT) is own_handlers


def _fake_safe_open(reword: bool) -> Any:
    """safe_open whose get_tensor receives Ctrl-C. safetensors' Rust code meets the KeyboardInterrupt inside a torch
    call and may report "could not determine the shape of object type 'torch.storage.UntypedStorage'" instead (seen
    here with a real Ctrl-C while reading; it depends on where the signal lands, so it is staged)."""
    import safetensors

    real = safetensors.safe_open

    class Interrupted:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.file = real(*args, **kwargs)

        def __enter__(self) -> "Interrupted":
            self.file.__enter__()
            return self

        def __exit__(self, *exc: Any) -> None:
            self.file.__exit__(*exc)

        def keys(self) -> list[str]:
            return list(self.file.keys())

        def get_tensor(self, key: str) -> Any:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)  # the handler raises here
            except KeyboardInterrupt:
                if reword:
                    raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'")
                raise
            raise AssertionError("no KeyboardInterrupt")

    return Interrupted


@pytest.mark.parametrize("reword", [False, True], ids=["plain", "reworded-by-safetensors"])
def test_ctrl_c_while_reading_tensors_is_reported_as_interrupted(tmp_path: Path, sources: dict[str, Path], capsys,
                                                                 private_tmp: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 reword: bool) -> None:
    import safetensors

    monkeypatch.setattr(safetensors, "safe_open", _fake_safe_open(reword))
    before = snapshot(tmp_path)
    expected = "interrupted: nothing was written\n"
    assert run_cli([str(sources["diffusers"]), str(tmp_path / "out")], capsys) == (130, expected)
    assert snapshot(tmp_path) == before


def test_a_stale_temporary_of_a_killed_run_is_removed_and_named(tmp_path: Path, sources: dict[str, Path]) -> None:
    """A real SIGKILL while the weights are written leaves `.out.*.tmp`; the next run to the same OUT removes it and
    says so, and leaves the temporaries of another OUT (`out.v2`) alone."""
    out = tmp_path / "out"
    hang = (
        "import time, diffedit.weights as w\n"
        "from safetensors.torch import save_file\n"
        "def save(*a, **k):\n"
        "    save_file(*a, **k)\n"
        "    print('written', flush=True)\n"
        "    time.sleep(600)\n"
        "w.save_file = save\n"
        "from weights_convert.__main__ import main\n"
        f"main([{str(sources['diffusers'])!r}, {str(out)!r}, '--quiet'])\n"
    )
    child = subprocess.Popen([sys.executable, "-c", hang], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert child.stdout is not None and child.stdout.readline() == "written\n"
    finally:
        child.kill()  # SIGKILL: no handler runs
        child.wait()
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert len(stale) == 1 and stale[0].name.endswith(".tmp") and (stale[0] / "unet.safetensors").is_file()
    aside = tmp_path / ".out.k1ll3d_x.old.tmp"  # an old OUT moved aside when the kill came mid-swap
    aside.write_text("old")
    sibling = tmp_path / ".out.v2.abcd1234.tmp"  # another OUT's (out.v2) temporary: not ours to remove
    sibling.mkdir()

    run = subprocess.run([sys.executable, "-m", "weights_convert", str(sources["diffusers"]), str(out), "--quiet"],
                         capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert run.returncode == 0, run.stderr
    expected = "".join(f"removing {p}, left behind by an interrupted write of {out}\n" for p in sorted([*stale, aside]))
    assert run.stderr == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == [sibling.name, "out"] and (out / "model.json").is_file()


# ---- mistyped sources ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("src", ["./models/sd15x", "foo/bar/baz", "../nowhere/model", "models/sd15x.safetensors"])
def test_a_mistyped_local_path_says_it_does_not_exist(tmp_path: Path, capsys, monkeypatch, src: str) -> None:
    monkeypatch.chdir(tmp_path)
    expected = f"error: {src}: no such file or folder, and not a hub repo id (org/name)\n"
    assert run_cli([src, "out"], capsys) == (2, expected)
    assert snapshot(tmp_path) == {}


def test_a_missing_path_that_looks_like_a_hub_id_says_both(tmp_path: Path, capsys,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hub
    from huggingface_hub import snapshot_download

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    try:
        snapshot_download("models/sd15x", allow_patterns=["model_index.json"])
    except Exception as e:  # the hub library's own words, first line
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0].strip()}"
    code, err = run_cli(["models/sd15x", "out"], capsys)
    assert code == 2
    assert err == (f"error: models/sd15x: no such local file or folder, so it was tried as a hub repo id: cannot "
                   f"fetch models/sd15x from the hub: {reason}\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("what", ["missing", "a file"])
def test_export_of_a_missing_folder_says_so(tmp_path: Path, capsys, what: str) -> None:
    src = tmp_path / "models" / "sd15x"
    if what == "a file":
        src.parent.mkdir()
        src.write_text("x")
    before = snapshot(tmp_path)
    expected = {"missing": f"{src}: no such diffedit model folder",
                "a file": f"{src} is a file, not a diffedit model folder"}[what]
    assert run_cli([str(src), str(tmp_path / "out"), "--to", "diffusers"], capsys) == (2, f"error: {expected}\n")
    assert snapshot(tmp_path) == before


# ---- the weights layouts of the tests --------------------------------------------------------------------------------


def test_layouts_are_found_beside_the_repository_only() -> None:
    assert _reference.LAYOUTS == ROOT.parent / "shared" / "weights_layouts"
    assert "/work/shared" not in Path(_reference.__file__).read_text()  # the old absolute fallback


@pytest.mark.parametrize("ci, outcome", [("true", pytest.fail.Exception), ("", pytest.skip.Exception),
                                         (None, pytest.skip.Exception)])
def test_missing_layouts_fail_in_ci_and_skip_elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      ci: str | None, outcome: type) -> None:
    monkeypatch.setattr(_reference, "LAYOUTS", tmp_path / "shared" / "weights_layouts")
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome) as info:
        _reference.require_layouts()
    assert str(info.value.msg) == (f"no weights layouts at {tmp_path / 'shared' / 'weights_layouts'} "
                                   "(the project's shared folder beside the checkout)")


def test_a_folder_of_neither_layout_and_a_file_that_is_no_checkpoint_say_what_they_are(tmp_path: Path,
                                                                                          capsys) -> None:
    (tmp_path / "empty").mkdir()
    expected = (f"error: {tmp_path / 'empty'}: a folder, but neither a diffedit model (no model.json) nor a "
                "diffusers-format one (no model_index.json, no unet/)\n")
    assert run_cli([str(tmp_path / "empty"), str(tmp_path / "out")], capsys) == (2, expected)
    (tmp_path / "notes.ckpt").write_text("not a checkpoint\n")
    code, err = run_cli([str(tmp_path / "notes.ckpt"), str(tmp_path / "out")], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"{tmp_path / 'notes.ckpt'}: cannot read it as a PyTorch checkpoint (corrupt, truncated" in err
    assert not (tmp_path / "out").exists()
