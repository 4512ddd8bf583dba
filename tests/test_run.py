"""`diffedit run` (diffedit/run.py) on the shipped toy model: a shapes-world manifest of 12 edits with ground-truth
masks, run by one process, by `torchrun --nproc-per-node 2`, killed and resumed; a PIE-Bench-format folder built
here; every bad input refused in one line with nothing written; the metrics against independent computations.

Every process runs one intra-op thread (OMP_NUM_THREADS=1): torch's CPU kernels may split a reduction by the
thread count, so "the same bits" holds between processes with the same number of threads (one here).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffedit import run as run_module
from diffedit.cli import main
from diffedit.pie_bench import mask_decode, strip_brackets
from diffedit.run import item_seed, shard
from diffedit.run_metrics import background_metrics, mask_iou
from diffedit.toy import WEIGHTS
from diffedit.toy.world import heldout_edit_pairs, render

pytestmark = pytest.mark.skipif(not (WEIGHTS / "model.json").is_file(), reason="the toy model is not built")

FAST = ["--steps", "4", "--num-maps", "2"]
REPO = Path(__file__).resolve().parents[1]
VOLATILE = ("seconds", "rank", "world_size")  # what a record may differ in between runs of the same items


def one_thread_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def diffedit(*args: str | Path, torchrun: int = 0) -> subprocess.CompletedProcess:
    """`python -m diffedit ARGS` (or under `torchrun --standalone --nproc-per-node N`) on one thread a process."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}"] if torchrun else []
    command = [sys.executable, *launcher, "-m", "diffedit", *map(str, args)]
    done = subprocess.run(command, cwd=REPO, env=one_thread_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def write_manifest(root: Path, count: int = 12) -> Path:
    """Shapes-world edits (colour and shape changes) with their ground-truth masks; the last one with a given mask."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, pair in enumerate(heldout_edit_pairs(count)):
        picture, _ = render(pair.source)
        Image.fromarray(picture).save(root / f"e{i:02d}.png")
        Image.fromarray(pair.mask.astype(np.uint8) * 255).save(root / f"e{i:02d}.gt.png")
        entry = {"id": f"e{i:02d}", "image": f"e{i:02d}.png", "source": pair.source.caption,
                 "target": pair.target.caption, "gt_mask": f"e{i:02d}.gt.png", "edit_type": pair.kind}
        if i == count - 1:
            entry["mask"] = entry["gt_mask"]  # a given mask: no mask estimation
        if i == 5:
            entry.update(seed=123, steps=5, guidance=5.0)  # its own seed and settings
        lines.append(json.dumps(entry))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root / "manifest.jsonl"


def run_args(manifest: Path, out: Path, *rest: str | Path) -> list[str]:
    return ["run", "--model", str(WEIGHTS), "--out", str(out), str(manifest), *FAST, *map(str, rest)]


def records(out: Path) -> dict[str, dict]:
    found = {}
    for path in sorted((out / "items").glob("*.json")):
        record = json.loads(path.read_text())
        found[record["id"]] = {k: v for k, v in record.items() if k not in VOLATILE}
    return found


def file_digests(out: Path) -> dict[str, str]:
    """sha256 of every output picture of a run folder."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "items").glob("*.png"))}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_manifest(tmp_path_factory.mktemp("shapes") / "data")


@pytest.fixture(scope="module")
def single(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The manifest run by one process (one thread), uninterrupted: the reference of the tests below."""
    out = tmp_path_factory.mktemp("single") / "run"
    diffedit(*run_args(manifest, out, "--quiet"))
    return out


# ---- seeds and shards -------------------------------------------------------------------------------------------
def test_item_seeds_follow_the_stated_derivation_and_shards_cover_every_id_once() -> None:
    digest = hashlib.sha256(b"7:e03").digest()
    assert item_seed(7, "e03") == int.from_bytes(digest[:8], "big") & (2**63 - 1)
    assert item_seed(7, "e03") != item_seed(8, "e03") != item_seed(7, "e04")
    ids = [f"x{i}" for i in range(11)][::-1]
    for world in (1, 2, 3, 5):
        shares = [shard(ids, rank, world) for rank in range(world)]
        assert sorted(sum(shares, [])) == sorted(ids) and sum(map(len, shares)) == len(ids)
        assert shares == [shard(list(reversed(ids)), rank, world) for rank in range(world)]  # order-free


# ---- bits: one process, two ranks, `diffedit edit` ------------------------------------------------------------
def test_two_torchrun_ranks_give_the_bits_of_one_process_and_of_diffedit_edit(manifest, single, tmp_path) -> None:
    out = tmp_path / "two"
    diffedit(*run_args(manifest, out, "--quiet"), torchrun=2)
    assert file_digests(out) == file_digests(single) and len(file_digests(single)) == 24
    assert records(out) == records(single)
    ranks = {json.loads(p.read_text())["rank"] for p in (out / "items").glob("*.json")}
    assert ranks == {0, 1}  # both ranks worked, each on its share
    by_rank = {r: sorted(json.loads(p.read_text())["id"] for p in (out / "items").glob("*.json")
                         if json.loads(p.read_text())["rank"] == r) for r in ranks}
    assert by_rank == {r: shard(list(records(single)), r, 2) for r in ranks}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"]["edits"] == 12 and sorted(summary["per_edit_type"]) == ["colour", "shape"]

    # sample items edited by `diffedit edit` with their seeds: the same files, bit for bit. e03 has the derived
    # seed and the run's settings; e05 its own seed, steps and guidance
    for item_id, seed, flags in (("e03", item_seed(0, "e03"), FAST),
                                 ("e05", 123, ["--steps", "5", "--num-maps", "2", "--guidance", "5"])):
        record = json.loads((single / "items" / f"{item_id}.json").read_text())
        assert record["seed"] == seed
        edit, mask = tmp_path / f"{item_id}.png", tmp_path / f"{item_id}.mask.png"
        diffedit("edit", "--model", WEIGHTS, "--image", manifest.parent / f"{item_id}.png", "--source",
                 record["source"], "--target", record["target"], "--seed", seed, *flags, "--out", edit,
                 "--mask-out", mask, "--quiet")
        assert edit.read_bytes() == (single / "items" / f"{item_id}.edit.png").read_bytes(), item_id
        assert mask.read_bytes() == (single / "items" / f"{item_id}.mask.png").read_bytes(), item_id
    assert json.loads((single / "items" / "e05.json").read_text())["settings"]["steps"] == 5

    # the item with a given mask: that mask is its mask, and no estimation ran
    given = json.loads((single / "items" / "e11.json").read_text())
    assert given["mask_given"] and given["metrics"]["mask_iou"] == 1.0
    assert np.array_equal(np.asarray(Image.open(single / "items" / "e11.mask.png")),
                          np.asarray(Image.open(manifest.parent / "e11.gt.png")))


# ---- SIGKILL part-way, then the same command again -------------------------------------------------------------
def test_a_run_killed_part_way_then_rerun_equals_the_uninterrupted_run(manifest, single, tmp_path) -> None:
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "diffedit", *run_args(manifest, out, "--quiet")]
    process = subprocess.Popen(command, cwd=REPO, env=one_thread_env(), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while len(list((out / "items").glob("*.json"))) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = len(list((out / "items").glob("*.json")))
    assert 3 <= finished < 12, finished
    # what a kill in the middle of a write leaves: a temporary of files.atomic_write, and an edit without a record
    (out / "items" / ".e10.edit.png.k1ll3d_x.tmp.png").write_bytes(b"half a picture")
    shutil.copy(single / "items" / "e10.edit.png", out / "items" / "e10.edit.png")
    diffedit(*run_args(manifest, out, "--quiet"))
    assert file_digests(out) == file_digests(single)
    assert records(out) == records(single)
    names = sorted(p.name for p in (out / "items").iterdir())
    assert names == sorted(f"e{i:02d}.{kind}" for i in range(12) for kind in ("edit.png", "mask.png", "json"))
    assert sorted(p.name for p in out.iterdir()) == ["contact_sheet.png", "items", "run.json", "summary.json",
                                                     "summary.md"]


# ---- a folder that holds a run ----------------------------------------------------------------------------------
def test_another_runs_folder_is_refused_without_resume_or_force(manifest, single, tmp_path, capsys) -> None:
    out = tmp_path / "copy"
    shutil.copytree(single, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(run_args(manifest, out, "--seed", "5", "--quiet")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings (seed: 0, now 5)" in err[0] and "--resume" in err[0], err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # --resume continues it with its recorded settings: everything is done, the items stay as they are
    assert main(run_args(manifest, out, "--seed", "5", "--resume", "--quiet")) == 0
    assert file_digests(out) == file_digests(single) and json.loads((out / "run.json").read_text())["settings"][
        "seed"] == 0
    # a folder that is not a run at all
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(run_args(manifest, tmp_path / "other", "--quiet")) == 2
    assert "no diffedit run" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["notes.txt"]


def test_force_starts_a_run_over(tmp_path) -> None:
    data = write_manifest(tmp_path / "data", count=2)
    out = tmp_path / "run"
    assert main(run_args(data, out, "--quiet")) == 0
    (out / "items" / "e09.json").write_text("{}")  # an item of no manifest of this run
    (out / ".run.json.abcd1234.tmp.json").write_text("")  # a killed write's temporary
    assert main(run_args(data, out, "--seed", "9", "--force", "--quiet")) == 0
    assert json.loads((out / "run.json").read_text())["settings"]["seed"] == 9
    assert {i: r["seed"] for i, r in records(out).items()} == {"e00": item_seed(9, "e00"), "e01": item_seed(9, "e01")}
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


# ---- bad input: one line naming the manifest line, nothing written ------------------------------------------------
def good_line(i: int) -> dict:
    return {"id": f"e{i:02d}", "image": f"e{i:02d}.png", "source": "a red circle", "target": "a blue circle"}


BAD_LINES = {  # the second line of a two-line manifest -> words of the message
    "missing image": ({**good_line(1), "image": "nowhere.png"}, ["line 2", "nowhere.png", "does not exist"]),
    "unreadable image": ({**good_line(1), "image": "truncated.png"}, ["line 2", "not a readable picture"]),
    "missing prompt": ({k: v for k, v in good_line(1).items() if k != "target"}, ["line 2", "missing prompt 'target'"]),
    "empty prompt": ({**good_line(1), "source": "  "}, ["line 2", "prompt 'source' must be a non-empty string"]),
    "prompt not a string": ({**good_line(1), "source": 5}, ["line 2", "prompt 'source' must be a non-empty string, "
                                                                      "got 5"]),
    "a JSON array": ([good_line(1)], ["line 2", "must be a JSON object, got list", "JSON Lines: one object per line"]),
    "duplicate id": ({**good_line(1), "id": "E00"}, ["line 2", "duplicate id 'E00'", "line 1"]),
    "mask of another size": ({**good_line(1), "mask": "small.png"}, ["line 2", "mask", "32 x 32, the image 64 x 64"]),
    "gt mask of another size": ({**good_line(1), "gt_mask": "small.png"}, ["line 2", "gt_mask", "32 x 32"]),
    "unsafe id": ({**good_line(1), "id": "../up"}, ["line 2", "'../up' is not safe as a file name"]),
    "bad JSON": ('{"id": "e01", "image": ', ["line 2", "not valid JSON"]),
    "unknown field": ({**good_line(1), "prompt": "x"}, ["line 2", "unknown field 'prompt'"]),
    "bad seed": ({**good_line(1), "seed": -1}, ["line 2", "seed must be an integer"]),
    "bad setting": ({**good_line(1), "strength": 2}, ["line 2", "strength 2 is out of range (it must be in [0, 1])"]),
    "eta above 1": ({**good_line(1), "eta": 5}, ["line 2", "eta 5 is out of range (it must be in [0, 1])"]),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_each_bad_input_is_one_line_naming_the_manifest_line_and_nothing_is_written(
        case, manifest, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(run_module, "load", lambda *a, **kw: pytest.fail("the model was loaded"))
    data = manifest.parent
    bad, words = BAD_LINES[case]
    (tmp_path / "truncated.png").write_bytes((data / "e00.png").read_bytes()[:60])
    Image.new("L", (32, 32)).save(tmp_path / "small.png")
    for name in ("e00.png", "e01.png"):
        shutil.copy(data / name, tmp_path / name)
    text = json.dumps(good_line(0)) + "\n" + (bad if isinstance(bad, str) else json.dumps(bad)) + "\n"
    (tmp_path / "m.jsonl").write_text(text)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["run", "--model", str(WEIGHTS), "--out", str(tmp_path / "out"), str(tmp_path / "m.jsonl"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diffedit: error:"), err
    assert all(w in err[0] for w in [str(tmp_path / "m.jsonl"), *words]), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no out/, nothing else


def test_a_byte_order_mark_does_not_break_the_first_line(manifest, tmp_path, capsys, monkeypatch) -> None:
    """Windows editors start UTF-8 files with U+FEFF: line 1 still parses, so the error is line 2's."""
    monkeypatch.setattr(run_module, "load", lambda *a, **kw: pytest.fail("the model was loaded"))
    shutil.copy(manifest.parent / "e00.png", tmp_path / "e00.png")
    (tmp_path / "m.jsonl").write_text("\ufeff" + json.dumps(good_line(0)) + "\n{\n", encoding="utf-8")
    assert main(["run", "--model", str(WEIGHTS), "--out", str(tmp_path / "out"), str(tmp_path / "m.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "line 2: not valid JSON" in err and "line 1" not in err, err


def test_a_missing_pie_bench_folder_is_said_so(tmp_path, capsys) -> None:
    assert main(["run", "--model", str(WEIGHTS), "--out", str(tmp_path / "out"), "--pie-bench",
                 str(tmp_path / "nowhere")]) == 2
    assert "--pie-bench" in (err := capsys.readouterr().err) and "nowhere: does not exist" in err, err


# ---- PIE-Bench ---------------------------------------------------------------------------------------------------
def rle_encode(mask: np.ndarray) -> list[int]:
    """Runs of ones of the row-major flattened mask as (start, length) pairs (written here, not run.py's)."""
    flat, runs, i = mask.reshape(-1).astype(bool), [], 0
    while i < flat.size:
        if flat[i]:
            j = i
            while j < flat.size and flat[j]:
                j += 1
            runs += [i, j - i]
            i = j
        else:
            i += 1
    return runs


def with_border(mask: np.ndarray) -> np.ndarray:
    framed = mask.astype(bool).copy()
    framed[[0, -1], :] = True
    framed[:, [0, -1]] = True
    return framed


def test_pie_bench_mask_decoding_reproduces_mask_decode_with_its_border_quirk() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((12, 20)) > 0.6
    decoded = mask_decode(rle_encode(mask), (12, 20))
    assert decoded.dtype == np.float64 and decoded.shape == (12, 20)
    assert np.array_equal(decoded.astype(bool), with_border(mask))  # the border is "edited" whatever the code says
    assert mask_decode([], (4, 4)).sum() == 12  # only the border
    clipped = mask_decode([14, 100, 99, 5], (4, 4))  # a run past the end is clipped; one starting past it does nothing
    assert clipped.reshape(-1)[14:].tolist() == [1, 1] and clipped[1:3, 1:3].sum() == 0
    assert mask_decode([0, 3], (512, 512)).shape == (512, 512)  # PIE-Bench's default size
    assert strip_brackets("a [red] circle on [beige]") == "a red circle on beige"
    assert strip_brackets("[a cat]] [") == "a cat "


def pie_folder(root: Path, pairs: list, types: list[str]) -> tuple[Path, dict[str, np.ndarray]]:
    """A PIE-Bench-format folder: annotation_images/<type>/<id>.jpg-like paths, RLE masks, bracketed prompts."""
    mapping, truths = {}, {}
    for n, (pair, kind) in enumerate(zip(pairs, types)):
        key = f"{kind}{n:011d}"
        picture, _ = render(pair.source)
        relative = f"{kind}_type/{key}.png"
        (root / "annotation_images" / f"{kind}_type").mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).save(root / "annotation_images" / relative)
        words = pair.target.caption.split()
        mapping[key] = {"image_path": relative, "original_prompt": "[" + pair.source.caption + "]",
                        "editing_prompt": " ".join(words[:-1]) + f" [{words[-1]}]", "editing_instruction": "edit it",
                        "editing_type_id": kind, "blended_word": words[-1], "mask": rle_encode(pair.mask)}
        truths[key] = with_border(pair.mask)
    (root / "mapping_file.json").write_text(json.dumps(mapping))
    return root, truths


def ssim_by_loops(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM (Wang et al. 2004) with an 11-tap Gaussian window of sigma 1.5, window by window, over the positions whose
    window lies inside the picture, averaged over channels: torchmetrics' definition, written out directly."""
    g = np.array([math.exp(-(x * x) / (2 * 1.5**2)) for x in range(-5, 6)])
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2, values = 0.01**2, 0.03**2, []
    for c in range(a.shape[2]):
        for y in range(a.shape[0] - 10):
            for x in range(a.shape[1] - 10):
                pa, pb = a[y:y + 11, x:x + 11, c], b[y:y + 11, x:x + 11, c]
                ma, mb = (w * pa).sum(), (w * pb).sum()
                va, vb = (w * pa * pa).sum() - ma**2, (w * pb * pb).sum() - mb**2
                cov = (w * pa * pb).sum() - ma * mb
                values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def independent_background(edited: np.ndarray, original: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    keep = (~truth.astype(bool)).astype(np.float64)[..., None]
    a, b = edited / 255.0 * keep, original / 255.0 * keep  # PIE-Bench: both pictures times (1 - mask), whole
    mse = float(np.mean((a - b) ** 2))
    return {"psnr_unedit_part": 10 * math.log10(1 / mse), "mse_unedit_part": mse,
            "ssim_unedit_part": ssim_by_loops(a, b)}


def test_weight_free_metrics_match_independent_computations() -> None:
    rng = np.random.default_rng(1)
    original = rng.integers(0, 256, (24, 30, 3)).astype(np.uint8)
    edited = np.clip(original.astype(int) + rng.integers(-30, 31, original.shape), 0, 255).astype(np.uint8)
    truth = np.zeros((24, 30))
    truth[5:15, 8:20] = 1
    ours, theirs = background_metrics(edited, original, truth), independent_background(edited, original, truth)
    for key in theirs:
        assert ours[key] == pytest.approx(theirs[key], rel=1e-9), key
    assert background_metrics(edited, original, np.ones((24, 30)))["psnr_unedit_part"] == "nan"  # as PIE-Bench
    assert background_metrics(original, original, truth)["psnr_unedit_part"] == math.inf
    assert background_metrics(original, original, truth)["ssim_unedit_part"] == pytest.approx(1.0)
    assert mask_iou(truth, truth) == 1.0 and mask_iou(truth * 255, np.zeros_like(truth)) == 0.0


def test_the_metrics_agree_with_torchmetrics_where_it_is_installed() -> None:
    pytest.importorskip("torchmetrics")
    import torch
    from torchmetrics.functional.image import structural_similarity_index_measure
    from torchmetrics.image import PeakSignalNoiseRatio
    from torchmetrics.regression import MeanSquaredError

    rng = np.random.default_rng(2)
    original = rng.integers(0, 256, (40, 48, 3)).astype(np.uint8)
    edited = np.clip(original.astype(int) + rng.integers(-40, 41, original.shape), 0, 255).astype(np.uint8)
    truth = np.zeros((40, 48))
    truth[8:20, 10:30] = 1
    keep = (1 - truth)[..., None].astype(np.float32)  # PIE-Bench's own steps, in float32
    a, b = (torch.tensor(x.astype(np.float32) / 255 * keep).permute(2, 0, 1)[None] for x in (edited, original))
    ours = background_metrics(edited, original, truth)
    assert ours["psnr_unedit_part"] == pytest.approx(PeakSignalNoiseRatio(data_range=1.0)(a, b).item(), rel=1e-5)
    mse = MeanSquaredError()(a[0].contiguous(), b[0].contiguous()).item()
    assert ours["mse_unedit_part"] == pytest.approx(mse, rel=1e-5)
    _, full = structural_similarity_index_measure(a, b, data_range=1.0, return_full_image=True)
    assert ours["ssim_unedit_part"] == pytest.approx(full[..., 5:-5, 5:-5].mean().item(), rel=1e-5)  # 2023's crop


def test_a_pie_bench_folder_is_read_run_and_scored(tmp_path, capsys) -> None:
    pairs = heldout_edit_pairs(4)
    folder, truths = pie_folder(tmp_path / "PIE-Bench", pairs, ["1", "6", "1", "6"])
    out = tmp_path / "run"
    assert main(["run", "--model", str(WEIGHTS), "--out", str(out), "--pie-bench", str(folder), *FAST, "--quiet"]) == 0
    for (key, truth), pair in zip(truths.items(), pairs):
        record = json.loads((out / "items" / f"{key}.json").read_text())
        assert record["source"] == pair.source.caption and record["target"] == pair.target.caption  # no brackets
        assert record["edit_type"] == key[0] and record["seed"] == item_seed(0, key)
        picture, _ = render(pair.source)
        edited = np.asarray(Image.open(out / "items" / f"{key}.edit.png"))
        predicted = np.asarray(Image.open(out / "items" / f"{key}.mask.png")) > 0
        expected = independent_background(edited, picture, truth)
        for metric, value in expected.items():
            assert record["metrics"][metric] == pytest.approx(value, rel=1e-9), metric
        iou = (predicted & truth).sum() / (predicted | truth).sum()
        assert record["metrics"]["mask_iou"] == pytest.approx(iou)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"]["edits"] == 4 and {t: r["edits"] for t, r in summary["per_edit_type"].items()} == {
        "1": 2, "6": 2}
    psnrs = [json.loads((out / "items" / f"{k}.json").read_text())["metrics"]["psnr_unedit_part"] for k in truths]
    assert summary["overall"]["psnr_unedit_part"]["mean"] == pytest.approx(np.mean(psnrs))
    assert all(s.startswith("not computed: needs") for s in summary["model_metrics"].values())
    assert set(summary["model_metrics"]) == {"structure_distance", "lpips_unedit_part", "clip_similarity_target_image",
                                             "clip_similarity_target_image_edit_part"}
    table = (out / "summary.md").read_text()
    assert "| 6 change attribute (color) | 2 |" in table and "| 1 change object | 2 |" in table
    with Image.open(out / "contact_sheet.png") as sheet:
        width, height = sheet.size
    assert height == 4 * 64 + 3 * 4 and width == 3 * 64 + 2 * 4  # 4 rows of input | mask | edit


def test_a_bad_pie_bench_record_is_one_line_naming_it(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(run_module, "load", lambda *a, **kw: pytest.fail("the model was loaded"))
    folder, _ = pie_folder(tmp_path / "PIE", heldout_edit_pairs(2), ["1", "2"])
    mapping = json.loads((folder / "mapping_file.json").read_text())
    key = sorted(mapping)[1]
    mapping[key]["editing_prompt"] = "[]"
    (folder / "mapping_file.json").write_text(json.dumps(mapping))
    assert main(["run", "--model", str(WEIGHTS), "--out", str(tmp_path / "out"), "--pie-bench", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"record {key!r}" in err[0] and "missing editing_prompt" in err[0], err
    assert not (tmp_path / "out").exists()


# ---- batches -----------------------------------------------------------------------------------------------------
def test_batches_of_two_keep_the_masks_and_nearly_the_edits(tmp_path) -> None:
    data = write_manifest(tmp_path / "data", count=5)
    assert main(run_args(data, tmp_path / "one", "--quiet")) == 0
    assert main(run_args(data, tmp_path / "two", "--batch-size", "2", "--quiet")) == 0
    batched = records(tmp_path / "two")
    assert sorted(r["id"] for r in batched.values() if r["batch"] == 2) == ["e00", "e01", "e02", "e03"]
    for i in range(5):
        one, two = (np.asarray(Image.open(tmp_path / run / "items" / f"e{i:02d}.{kind}.png")).astype(int)
                    for run in ("one", "two") for kind in ("mask",))
        assert np.array_equal(one, two)  # each mask is still its own call with its own seed
        a, b = (np.asarray(Image.open(tmp_path / run / "items" / f"e{i:02d}.edit.png")).astype(int)
                for run in ("one", "two"))
        assert np.abs(a - b).max() <= 2, i  # the last float bits only
