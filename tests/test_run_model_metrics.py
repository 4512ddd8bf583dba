"""PIE-Bench's model metrics (diffedit/run_metrics.py) without torchmetrics or weights: tiny fake networks are
injected, and what our code feeds them (value ranges, masking, resizing, normalisation, the order of the pictures)
and how it combines their outputs are checked against independent computations written here, following
cure-lab/PnPInversion evaluation/matrics_calculator.py (MetricsCalculator, LossG, VitExtractor) and evaluate.py.
The loader's per-metric "not computed" reasons offline, and a run's records and summary with injected networks.
The real torchmetrics / torchvision classes are exercised where they import (skipped otherwise, saying why).
"""

from __future__ import annotations

import importlib.util
import json
import math
import socket
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffedit import run_metrics
from diffedit.run_metrics import (CLIP_EDITED, CLIP_WHOLE, LPIPS, MODEL_METRIC_NAMES, STRUCTURE, DinoKeys,
                                  ModelMetrics, background_lpips, clip_similarity, dino_input, keys_self_similarity,
                                  load_model_metrics, resized_size, structure_distance)

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def picture(seed: int, size: tuple[int, int] = (512, 512)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def pie_mask(seed: int, size: tuple[int, int] = (512, 512)) -> np.ndarray:
    """A float64 {0, 1} (H, W) mask with a box and PIE-Bench's border quirk (mask_decode sets the border to 1)."""
    mask = np.zeros(size)
    r = np.random.default_rng(seed)
    y, x = r.integers(10, size[0] // 2), r.integers(10, size[1] // 2)
    mask[y:y + size[0] // 3, x:x + size[1] // 4] = 1
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 1
    return mask


# ---- independent computations ------------------------------------------------------------------------------------
def bilinear_by_indices(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """(C, H, W) -> (C, out_h, out_w): bilinear, align_corners=False, no antialias (source = (i + 0.5) s - 0.5,
    clamped at 0; neighbours clamped at the last row / column), as torchvision 0.13's tensor Resize."""
    def taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo
    y0, y1, wy = taps(x.shape[1], out_h)
    x0, x1, wx = taps(x.shape[2], out_w)
    rows = x[:, y0, :] * (1 - wy)[None, :, None] + x[:, y1, :] * wy[None, :, None]
    return rows[:, :, x0] * (1 - wx)[None, None, :] + rows[:, :, x1] * wx[None, None, :]


def expected_dino_input(pic: np.ndarray) -> np.ndarray:
    """LossG.global_transform on calculate_structure_distance's [0, 255] float picture: Resize(224) then Normalize
    with the ImageNet mean / std applied to the [0, 255] values as they are."""
    x = pic.astype(np.float64).transpose(2, 0, 1)
    if x.shape[1:] != (224, 224):
        x = bilinear_by_indices(x, 224, 224)
    return (x - MEAN[:, None, None]) / STD[:, None, None]


def self_similarity_by_loops(keys: np.ndarray) -> np.ndarray:
    """VitExtractor.get_keys_self_sim_from_input: token t's keys of all heads side by side, the cosine of each pair."""
    heads, tokens, dim = keys.shape
    rows = [np.concatenate([keys[h, t] for h in range(heads)]) for t in range(tokens)]
    out = np.zeros((tokens, tokens))
    for i in range(tokens):
        for j in range(tokens):
            out[i, j] = rows[i] @ rows[j] / max(np.linalg.norm(rows[i]) * np.linalg.norm(rows[j]), 1e-8)
    return out


# ---- fake networks -----------------------------------------------------------------------------------------------
@dataclass
class FakeExtractor:
    """Deterministic 'keys' (2 heads, 1 + 16 tokens, 3 dims) from 56 x 56 patch means of the (1, 3, 224, 224) input;
    remembers what it was given."""

    seen: list[torch.Tensor] = field(default_factory=list)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        patches = x[0].reshape(3, 4, 56, 4, 56).mean(dim=(2, 4)).reshape(3, 16).T  # (16 tokens, 3)
        tokens = torch.cat([patches.mean(0, keepdim=True), patches])  # a 'CLS' token first
        return torch.stack([tokens, tokens.flip(1) * 2 - 1])  # (heads, tokens, dim)


def fake_keys_numpy(x: np.ndarray) -> np.ndarray:
    patches = x.reshape(3, 4, 56, 4, 56).mean(axis=(2, 4)).reshape(3, 16).T
    tokens = np.concatenate([patches.mean(0, keepdims=True), patches])
    return np.stack([tokens, tokens[:, ::-1] * 2 - 1])


@dataclass
class FakeLpips:
    """A stand-in for LearnedPerceptualImagePatchSimilarity: the mean absolute difference; remembers its inputs."""

    seen: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        self.seen.append((a.detach().clone(), b.detach().clone()))
        return (a - b).abs().mean()


def image_features(image: np.ndarray) -> np.ndarray:
    """(3, H, W) uint8 -> 3 features: each channel's mean, centred."""
    return image.astype(np.float64).mean(axis=(1, 2)) - 100.0


def text_features(text: str) -> np.ndarray:
    return np.array([len(text) % 7 - 3.0, text.count("a") - 1.0, text.count(" ") - 2.0])


@dataclass
class FakeClipScore:
    """CLIPScore's formula, max(100 cos(E_image, E_text), 0), on the simple features above; remembers its inputs."""

    seen: list[tuple[torch.Tensor, str]] = field(default_factory=list)

    def __call__(self, image: torch.Tensor, text: str) -> torch.Tensor:
        self.seen.append((image.clone(), text))
        a = torch.from_numpy(image_features(image.numpy()))
        b = torch.from_numpy(text_features(text))
        return torch.clamp(100 * (a / a.norm()) @ (b / b.norm()), min=0)


def clip_by_hand(image: np.ndarray, text: str) -> float:
    a, b = image_features(image), text_features(text)
    return max(100 * float(a @ b) / (math.sqrt(a @ a) * math.sqrt(b @ b)), 0.0)


# ---- structure distance ------------------------------------------------------------------------------------------
def test_resized_size_is_torchvision_resize_224_max_480() -> None:
    assert resized_size(512, 512) == (224, 224)
    assert resized_size(512, 768) == (224, 336) and resized_size(768, 512) == (336, 224)
    assert resized_size(200, 1000) == (96, 480)  # the longer side capped at 480, the shorter int(480 * 224 / 1120)


def test_structure_distance_feeds_dino_the_pie_bench_input_and_takes_the_mse_of_key_self_similarities() -> None:
    source, edited = picture(0), picture(1)
    extractor = FakeExtractor()
    value = structure_distance(extractor, source, edited)
    assert len(extractor.seen) == 2
    for pic, seen in zip((source, edited), extractor.seen):  # the source first, as LossG's target
        assert seen.shape == (1, 3, 224, 224) and seen.dtype == torch.float32
        # torch computes the source coordinates in float32 (an ulp of 6e-5 near 500): up to ~0.02 of a pixel value
        np.testing.assert_allclose(seen[0].double().numpy(), expected_dino_input(pic), rtol=0, atol=0.1)
    assert float(extractor.seen[0].max()) > 255 / 0.229 * 0.9  # [0, 255] normalised as is, not / 255 first
    sims = [self_similarity_by_loops(fake_keys_numpy(expected_dino_input(p))) for p in (source, edited)]
    assert value == pytest.approx(float(((sims[1] - sims[0]) ** 2).mean()), rel=1e-4)
    assert structure_distance(extractor, source, source) == 0.0


def test_keys_self_similarity_is_the_cosine_of_concatenated_heads() -> None:
    keys = torch.randn(3, 9, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    keys[1, 4] = 0  # a zero row: the clamp at 1e-8 keeps it finite
    np.testing.assert_allclose(keys_self_similarity(keys).numpy(), self_similarity_by_loops(keys.numpy()), atol=1e-12)


class TinyVit(torch.nn.Module):
    """Just what DinoKeys touches of a DINO ViT: blocks[i].attn.qkv, run in order on (1, tokens, dim) tokens."""

    def __init__(self, dim: int = 8, depth: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Linear(3, dim)
        self.blocks = torch.nn.ModuleList()
        for _ in range(depth):
            block = torch.nn.Module()
            block.attn = torch.nn.Module()
            block.attn.qkv = torch.nn.Linear(dim, 3 * dim)
            self.blocks.append(block)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x.flatten(2).transpose(1, 2))  # (1, h * w, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x)
        for block in self.blocks:
            t = t + block.attn.qkv(t)[..., : t.shape[-1]].tanh()
        return t[:, 0]


def test_dino_keys_are_the_k_of_the_hooked_qkv_as_vit_extractor_reads_them() -> None:
    vit, x = TinyVit(), torch.randn(1, 3, 2, 3)
    with torch.no_grad():
        t = vit.tokens(x)
        for block in vit.blocks[:1]:
            t = t + block.attn.qkv(t)[..., :8].tanh()
        qkv = vit.blocks[1].attn.qkv(t)[0]  # (tokens, 3 * dim): q | k | v, each heads x (dim / heads)
    expected = qkv[:, 8:16].reshape(6, 2, 4).permute(1, 0, 2)  # keys (heads, tokens, dim / heads)
    keys = DinoKeys(vit, layer=1, heads=2)(x)
    assert keys.shape == (2, 6, 4)
    torch.testing.assert_close(keys, expected)
    assert not any(block.attn.qkv._forward_hooks for block in vit.blocks)  # the hook is removed again


# ---- LPIPS -------------------------------------------------------------------------------------------------------
def test_background_lpips_feeds_both_masked_pictures_in_minus_one_to_one_source_first() -> None:
    source, edited, mask = picture(2), picture(3), pie_mask(0)
    lpips = FakeLpips()
    value = background_lpips(lpips, source, edited, mask)
    (a, b), = lpips.seen
    keep = (1 - mask)[:, :, None]
    for pic, seen in ((source, a), (edited, b)):
        assert seen.shape == (1, 3, 512, 512) and seen.dtype == torch.float32
        expected = ((pic.astype(np.float64) / 255) * keep) * 2 - 1
        np.testing.assert_allclose(seen[0].permute(1, 2, 0).double().numpy(), expected, atol=1e-6)
        assert float(seen.min()) >= -1 and float(seen.max()) <= 1
        assert bool((seen[0][:, mask > 0] == -1).all())  # the edit region zeroed in [0, 1], so -1 here
    assert value == pytest.approx(float(np.abs(((source / 255.0) - (edited / 255.0)) * keep * 2).mean()), rel=1e-5)


def test_background_lpips_of_an_all_edit_mask_is_nan_without_calling_the_network() -> None:
    lpips = FakeLpips()
    assert background_lpips(lpips, picture(0), picture(1), np.ones((512, 512))) == "nan" and not lpips.seen


# ---- CLIP --------------------------------------------------------------------------------------------------------
def test_clip_similarity_feeds_the_uint8_picture_and_the_prompt_and_scores_100_cos_clipped_at_0() -> None:
    edited, prompt = picture(4), "a cat wearing a red hat"
    clip = FakeClipScore()
    value = clip_similarity(clip, edited, prompt)
    (image, text), = clip.seen
    assert image.dtype == torch.uint8 and image.shape == (3, 512, 512) and text == prompt
    assert np.array_equal(image.numpy(), edited.transpose(2, 0, 1))
    assert value == pytest.approx(clip_by_hand(edited.transpose(2, 0, 1), prompt), rel=1e-9) and value > 0
    assert clip_similarity(clip, edited, "ab") == 0.0 and clip_by_hand(edited.transpose(2, 0, 1), "ab") == 0.0


def test_clip_similarity_of_the_edited_region_is_the_picture_times_the_mask() -> None:
    edited, mask, prompt = picture(5), pie_mask(1), "a dog sitting on a sofa"
    clip = FakeClipScore()
    value = clip_similarity(clip, edited, prompt, mask)
    (image, _), = clip.seen
    region = np.uint8(edited * mask[:, :, None].repeat(3, axis=2))  # evaluate.py: mask repeated to 3 channels
    assert image.dtype == torch.uint8 and np.array_equal(image.numpy(), region.transpose(2, 0, 1))
    assert value == pytest.approx(clip_by_hand(region.transpose(2, 0, 1), prompt), rel=1e-9)
    assert clip_similarity(clip, edited, prompt, np.zeros((512, 512))) == "nan" and len(clip.seen) == 1


def test_model_metrics_item_computes_what_its_networks_allow() -> None:
    source, edited, mask = picture(6, (64, 64)), picture(7, (64, 64)), pie_mask(2, (64, 64))
    everything = ModelMetrics(FakeExtractor(), FakeLpips(), FakeClipScore())
    got = everything.item(source, edited, "a red square", mask)
    assert set(got) == set(MODEL_METRIC_NAMES)
    assert got[LPIPS] == background_lpips(FakeLpips(), source, edited, mask)
    assert got[CLIP_EDITED] == clip_similarity(FakeClipScore(), edited, "a red square", mask)
    assert set(everything.item(source, edited, "a red square", None)) == {STRUCTURE, CLIP_WHOLE}  # no mask
    assert all(s.startswith("computed: ") for s in everything.status().values())
    only_clip = ModelMetrics(clip_score=FakeClipScore(), reasons={STRUCTURE: "not computed: needs x"})
    assert set(only_clip.item(source, edited, "a", mask)) == {CLIP_WHOLE, CLIP_EDITED}
    assert only_clip.status()[STRUCTURE] == "not computed: needs x"


# ---- the loader offline ------------------------------------------------------------------------------------------
@pytest.fixture
def empty_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty torch.hub and Hugging Face caches, and no network at all (a connection attempt fails the test)."""
    import huggingface_hub.constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(socket.socket, "connect", lambda *a: pytest.fail(f"a connection was attempted: {a}"))
    return tmp_path


def test_offline_every_model_metric_says_what_it_needs_and_where(empty_caches: Path) -> None:
    status = load_model_metrics("cpu").status()
    assert set(status) == set(MODEL_METRIC_NAMES)
    assert all(s.startswith("not computed: needs ") for s in status.values()), status
    hub = empty_caches / "torch" / "hub"
    assert str(hub / "checkpoints" / "dino_vitbase8_pretrain.pth") in status[STRUCTURE]
    assert str(hub / "facebookresearch_dino_main") in status[STRUCTURE]
    assert "squeezenet1_1" in status[LPIPS] and str(hub / "checkpoints") in status[LPIPS]
    for name in (CLIP_WHOLE, CLIP_EDITED):
        assert "openai/clip-vit-large-patch14" in status[name] and str(empty_caches / "hf") in status[name]
    for name in (LPIPS, CLIP_WHOLE):
        assert ("torchmetrics" in status[name]) == (importlib.util.find_spec("torchmetrics") is None)


def test_offline_without_torchmetrics_or_torchvision_each_reason_names_them(empty_caches, monkeypatch) -> None:
    monkeypatch.setattr(run_metrics, "_has", lambda module: False)
    status = load_model_metrics("cpu").status()
    assert "pip install 'diffedit-reference[metrics]'" in status[LPIPS] and "torchmetrics" in status[CLIP_EDITED]
    pair = f"0.{int(torch.__version__.split('.')[1]) + 15}.x"
    for name in (STRUCTURE, LPIPS):
        assert f"torchvision built for this torch {torch.__version__}" in status[name] and pair in status[name]
    assert "torchvision" not in status[CLIP_WHOLE]  # CLIPScore on an openai model needs no torchvision


def test_dino_code_and_weights_present_but_no_torchvision_is_still_a_reason(empty_caches, monkeypatch) -> None:
    hub = empty_caches / "torch" / "hub"
    (hub / "facebookresearch_dino_main").mkdir(parents=True)
    (hub / "facebookresearch_dino_main" / "hubconf.py").write_text("raise SystemExit('not to be run')\n")
    (hub / "checkpoints").mkdir()
    (hub / "checkpoints" / "dino_vitbase8_pretrain.pth").write_bytes(b"")
    monkeypatch.setattr(run_metrics, "_torchvision", lambda: None)
    reason = load_model_metrics("cpu").reasons[STRUCTURE]
    assert reason.startswith("not computed: needs torchvision") and "dino_vitbase8_pretrain.pth" not in reason


# ---- a run with the networks injected ----------------------------------------------------------------------------
def test_a_run_records_and_summarises_the_model_metrics_when_the_loader_has_them(tmp_path, monkeypatch) -> None:
    from tests.test_run import FAST, WEIGHTS, pie_folder
    from diffedit.cli import main
    from diffedit.toy.world import heldout_edit_pairs, render

    if not (WEIGHTS / "model.json").is_file():
        pytest.skip("the toy model is not built")
    calls: list[torch.device] = []

    def loader(device: torch.device) -> ModelMetrics:
        calls.append(device)
        return ModelMetrics(FakeExtractor(), FakeLpips(), FakeClipScore(), torch.device(device))

    monkeypatch.setattr(run_metrics, "load_model_metrics", loader)
    pairs = heldout_edit_pairs(3)
    folder, truths = pie_folder(tmp_path / "PIE-Bench", pairs, ["1", "6", "1"])
    out = tmp_path / "run"
    assert main(["run", "--model", str(WEIGHTS), "--out", str(out), "--pie-bench", str(folder), *FAST, "--quiet"]) == 0
    assert len(calls) == 1  # once for the rank
    records = {}
    for (key, truth), pair in zip(truths.items(), pairs):
        record = records[key] = json.loads((out / "items" / f"{key}.json").read_text())
        source, _ = render(pair.source)
        edited = np.asarray(Image.open(out / "items" / f"{key}.edit.png").convert("RGB"))
        expected = ModelMetrics(FakeExtractor(), FakeLpips(), FakeClipScore()).item(source, edited, pair.target.caption,
                                                                                    truth.astype(np.float64))
        for name in MODEL_METRIC_NAMES:
            assert record["metrics"][name] == pytest.approx(expected[name], rel=1e-9, abs=1e-12), (key, name)
    summary = json.loads((out / "summary.json").read_text())
    assert all(s.startswith("computed: ") for s in summary["model_metrics"].values())
    for name in MODEL_METRIC_NAMES:
        values = [r["metrics"][name] for r in records.values()]
        assert summary["overall"][name] == {"mean": pytest.approx(np.mean(values)), "count": 3}
        ones = [r["metrics"][name] for r in records.values() if r["edit_type"] == "1"]
        assert summary["per_edit_type"]["1"][name] == {"mean": pytest.approx(np.mean(ones)), "count": 2}
    table = (out / "summary.md").read_text()
    assert "structure x1e3" in table and "CLIP edited" in table and "- structure_distance: computed: DINO" in table
    clip_whole = summary["overall"][CLIP_WHOLE]["mean"]
    assert f"{clip_whole:.4g}" in table.splitlines()[2]


# ---- the real classes, where they import -------------------------------------------------------------------------
def _importable(module: str) -> bool:
    try:
        __import__(module)
    except Exception:  # noqa: BLE001  (absent, or built for another torch)
        return False
    return True


@pytest.mark.skipif(not _importable("torchmetrics"), reason="torchmetrics is not installed (the `metrics` extra)")
def test_real_torchmetrics_clipscore_scores_as_the_fake_does() -> None:
    """torchmetrics' CLIPScore class itself (its processing and its max(100 cos, 0)) on a duck-typed tiny model
    whose features are the fake's: what clip_similarity returns equals the fake scorer's number."""
    from torchmetrics.multimodal import CLIPScore

    class Model(torch.nn.Module):
        config = type("Config", (), {})()

        def get_image_features(self, pixels: torch.Tensor) -> torch.Tensor:
            return torch.stack([torch.from_numpy(image_features(p.numpy())) for p in pixels]).float()

        def get_text_features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return torch.stack([torch.from_numpy(text_features(self.texts[int(i)])) for i in ids[:, 0]]).float()

    model = Model()

    def processor(images: list | None = None, text: list | None = None, **kw: object) -> dict:
        if images is not None:
            return {"pixel_values": torch.stack(images)}
        model.texts = list(text)
        ids = torch.arange(len(text))[:, None]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    try:
        metric = CLIPScore(model_name_or_path=lambda: (model, processor))
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"this torchmetrics' CLIPScore takes no callable model: {e}")
    edited, mask = picture(8, (32, 32)), pie_mask(3, (32, 32))
    for prompt, region in (("a cat wearing a red hat", None), ("a cat wearing a red hat", mask), ("ab", None)):
        ours = clip_similarity(metric, edited, prompt, region)
        assert ours == pytest.approx(clip_similarity(FakeClipScore(), edited, prompt, region), rel=1e-5, abs=1e-4)


@pytest.mark.skipif(not _importable("torchvision"), reason="no torchvision that imports with this torch")
def test_dino_input_equals_torchvision_resize_and_normalize_as_pie_bench_calls_them() -> None:
    from torchvision import transforms

    transform = transforms.Compose([transforms.Resize(224, max_size=480, antialias=False),
                                    transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    for pic in (picture(9), picture(10, (300, 200))):
        x = torch.from_numpy(np.transpose(pic.astype(np.float32), (2, 0, 1)))
        torch.testing.assert_close(dino_input(pic), transform(x)[None], rtol=1e-5, atol=1e-4)


def test_real_networks_from_the_local_caches_where_they_are() -> None:
    """With the weights in the caches (never in CI): each loaded metric of a picture against itself is PIE-Bench's
    zero (structure, LPIPS), and CLIP scores lie in [0, 100]."""
    networks = load_model_metrics("cpu")
    if all(s.startswith("not computed") for s in networks.status().values()):
        pytest.skip("no PIE-Bench network in the local caches: " + "; ".join(sorted(set(networks.reasons.values()))))
    source, mask = picture(11), pie_mask(4)
    got = networks.item(source, source, "a photo", mask)
    if STRUCTURE in got:
        assert got[STRUCTURE] == pytest.approx(0.0, abs=1e-9)
    if LPIPS in got:
        assert got[LPIPS] == pytest.approx(0.0, abs=1e-6)
    for name in (CLIP_WHOLE, CLIP_EDITED):
        if name in got:
            assert 0.0 <= got[name] <= 100.0
