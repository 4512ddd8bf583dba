"""The metrics of a dataset run, as PIE-Bench (cure-lab/PnPInversion, evaluation/matrics_calculator.py) computes them.

Weight-free, here in plain torch (float64), always:
- background ("unedit part") PSNR, MSE and SSIM: PIE-Bench multiplies *both* pictures, scaled to [0, 1], by
  (1 - mask) and scores the whole products, so the masked-out pixels count as agreeing zeros in the means. PSNR is
  torchmetrics' PeakSignalNoiseRatio(data_range=1): 10 log10(1 / MSE) over every value; MSE is MeanSquaredError over
  every value (3 x H x W); SSIM is StructuralSimilarityIndexMeasure(data_range=1): a Gaussian window (sigma 1.5,
  11 taps), k1 = 0.01, k2 = 0.03, averaged over the channels and the positions whose window lies inside the picture.
  That is torchmetrics' SSIM as PIE-Bench ran it (2023): its reflect padding cropped off again before the mean.
  torchmetrics since September 2024 (Lightning-AI/torchmetrics PR 2721) averages the padded border positions too,
  which gives a slightly different number. An all-edit mask gives "nan", as PIE-Bench's.
- mask IoU of the predicted (or given) edit mask against the ground-truth mask.

The model metrics, computed when `torchmetrics` (the `metrics` extra), torchvision and the weights are at hand
(load_model_metrics; it never downloads), each as PIE-Bench's MetricsCalculator computes it:
- structure_distance: DINO ViT-B/8 (torch.hub facebookresearch/dino, dino_vitb8), the cosine self-similarity of
  the last block's keys of the source and of the edit, their mean squared difference (LossG.calculate_global_ssim_loss);
- lpips_unedit_part: torchmetrics LearnedPerceptualImagePatchSimilarity(net_type="squeeze") of both pictures times
  (1 - mask), in [-1, 1] (MetricsCalculator.calculate_lpips);
- clip_similarity_target_image and clip_similarity_target_image_edit_part: torchmetrics CLIPScore with
  openai/clip-vit-large-patch14 of the edit (whole, or times the mask) against the target prompt
  (MetricsCalculator.calculate_clip_similarity). What is missing is reported as "not computed: needs ...".
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

SSIM_SIGMA = 1.5
SSIM_TAPS = 11  # torchmetrics: int(3.5 * sigma + 0.5) * 2 + 1
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _unit(picture: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float64 in [0, 1], as PIE-Bench's np.array(img).astype(float32) / 255."""
    return torch.from_numpy(np.asarray(picture, np.float64) / 255.0).permute(2, 0, 1)


def masked_pair(edited: np.ndarray, original: np.ndarray, keep: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Both pictures in [0, 1], multiplied by `keep` (H, W) in {0, 1}: PIE-Bench's img * mask before every metric."""
    weight = torch.from_numpy(np.asarray(keep, np.float64))[None]
    return _unit(edited) * weight, _unit(original) * weight


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    """torchmetrics MeanSquaredError: the mean of (a - b)^2 over every value."""
    return float(((a - b) ** 2).mean())


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """torchmetrics PeakSignalNoiseRatio(data_range=1.0): 10 log10(1 / MSE); +inf for identical pictures."""
    error = mse(a, b)
    return math.inf if error == 0 else 10 * math.log10(1.0 / error)


def gaussian_window(taps: int = SSIM_TAPS, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """(taps, taps) Gaussian weights summing to 1 (the outer product of the normalised 1-d window)."""
    x = torch.arange(taps, dtype=torch.float64) - (taps - 1) / 2
    g = torch.exp(-(x / sigma) ** 2 / 2)
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """torchmetrics StructuralSimilarityIndexMeasure(data_range=1.0) of two (3, H, W) pictures (Wang et al. 2004)."""
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    window = gaussian_window().expand(a.shape[0], 1, SSIM_TAPS, SSIM_TAPS)
    blur = lambda x: F.conv2d(x[None], window, groups=a.shape[0])[0]  # noqa: E731  (valid positions only)
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(index.mean())


def background_metrics(edited: np.ndarray, original: np.ndarray, gt_mask: np.ndarray) -> dict[str, float | str]:
    """PIE-Bench's psnr / mse / ssim "_unedit_part" of an edit against its input outside `gt_mask` (1 = edited)."""
    keep = 1.0 - np.asarray(gt_mask, np.float64)
    if keep.sum() == 0:
        return {"psnr_unedit_part": "nan", "mse_unedit_part": "nan", "ssim_unedit_part": "nan"}
    a, b = masked_pair(edited, original, keep)
    return {"psnr_unedit_part": psnr(a, b), "mse_unedit_part": mse(a, b), "ssim_unedit_part": ssim(a, b)}


def mask_iou(mask: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two (H, W) masks (nonzero = edit); 1.0 when both are empty."""
    m, t = np.asarray(mask) > 0, np.asarray(truth) > 0
    union = (m | t).sum()
    return 1.0 if union == 0 else float((m & t).sum() / union)


# ---- the model metrics (PIE-Bench's MetricsCalculator) ---------------------------------------------------------
Picture = np.ndarray  # (H, W, 3) uint8, as np.array(PIL image) in PIE-Bench's evaluate.py
Keys = Callable[[torch.Tensor], torch.Tensor]  # (1, 3, h, w) DINO input -> last-block keys (heads, tokens, dim)
Lpips = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # two (1, 3, H, W) in [-1, 1] -> a scalar
ClipScore = Callable[[torch.Tensor, str], torch.Tensor]  # (3, H, W) uint8 picture, prompt -> max(100 cos, 0)

STRUCTURE, LPIPS, CLIP_WHOLE, CLIP_EDITED = ("structure_distance", "lpips_unedit_part", "clip_similarity_target_image",
                                             "clip_similarity_target_image_edit_part")
MODEL_METRIC_NAMES = (STRUCTURE, LPIPS, CLIP_WHOLE, CLIP_EDITED)
DINO_HUB_REPO, DINO_MODEL = "facebookresearch_dino_main", "dino_vitb8"  # torch.hub's folder of facebookresearch/dino
DINO_CHECKPOINT = "dino_vitbase8_pretrain.pth"  # what hubconf.dino_vitb8 fetches into <hub>/checkpoints
DINO_LAYER, DINO_HEADS = 11, 12  # LossG: get_keys_self_sim_from_input(..., layer_num=11); ViT-B: 12 heads of 64
DINO_SIZE, DINO_MAX_SIZE = 224, 480  # LossG: Resize(cfg["dino_global_patch_size"] = 224, max_size=480)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIM_EPS = 1e-8  # VitExtractor.attn_cosine_sim's clamp of the norm products
LPIPS_NET, SQUEEZENET_CHECKPOINT = "squeeze", "squeezenet1_1-b8a52dc0.pth"  # torchvision's SqueezeNet1_1 weights
CLIP_MODEL = "openai/clip-vit-large-patch14"


def resized_size(height: int, width: int, size: int = DINO_SIZE, max_size: int = DINO_MAX_SIZE) -> tuple[int, int]:
    """torchvision Resize(size, max_size=max_size)'s output (h, w) (transforms.functional._compute_resized_output_size):
    the shorter side becomes `size`, the longer int(size * long / short); if that passes max_size, both shrink."""
    short, long = min(height, width), max(height, width)
    new_short, new_long = size, int(size * long / short)
    if new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_long, new_short) if width <= height else (new_short, new_long)


def dino_input(picture: Picture, device: torch.device | str = "cpu") -> torch.Tensor:
    """PIE-Bench's DINO input (calculate_structure_distance, then LossG.global_transform) as (1, 3, h, w) float32.

    calculate_structure_distance keeps the picture in [0, 255] (np.array(img).astype(np.float32), no / 255); LossG
    resizes it (torchvision Resize(224, max_size=480) on a tensor: bilinear, align_corners=False, and no antialias in
    the torchvision 0.13.1 that PnPInversion's environment installs; 512 x 512 -> 224 x 224) and then applies
    Normalize(ImageNet mean, std) to those [0, 255] values, as they are, without rescaling first.
    """
    x = torch.from_numpy(np.asarray(picture, np.float32).transpose(2, 0, 1).copy()).to(device)[None]
    size = resized_size(x.shape[2], x.shape[3])
    if size != tuple(x.shape[2:]):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device)[:, None, None]
    return (x - mean) / std


def keys_self_similarity(keys: torch.Tensor) -> torch.Tensor:
    """VitExtractor.get_keys_self_sim_from_input: the (heads, tokens, dim) keys as tokens x (heads * dim), then the
    cosine of every pair of tokens, x x^T / max(|x| |x|^T, 1e-8) (attn_cosine_sim); (tokens, tokens)."""
    heads, tokens, dim = keys.shape
    x = keys.transpose(0, 1).reshape(tokens, heads * dim)
    norm = x.norm(dim=1, keepdim=True)
    return (x @ x.T) / torch.clamp(norm @ norm.T, min=SIM_EPS)


def structure_distance(extractor: Keys, source: Picture, edited: Picture, device: torch.device | str = "cpu") -> float:
    """PIE-Bench's structure_distance (MetricsCalculator.calculate_structure_distance, no mask): LossG's
    calculate_global_ssim_loss(source, edited) = F.mse_loss(self-sim(keys(edited)), self-sim(keys(source)))."""
    with torch.no_grad():
        target = keys_self_similarity(extractor(dino_input(source, device)))
        ours = keys_self_similarity(extractor(dino_input(edited, device)))
        return float(F.mse_loss(ours, target))


@dataclass(frozen=True)
class DinoKeys:
    """VitExtractor.get_keys_from_input(x, layer_num): a forward hook on blocks[layer].attn.qkv of a DINO ViT catches
    its (1, tokens, 3 * dim) output, read as (tokens, 3, heads, dim / heads) and permuted to keys (heads, tokens, d)
    (get_keys_from_qkv). The picture goes to the network's device."""

    vit: torch.nn.Module
    layer: int = DINO_LAYER
    heads: int = DINO_HEADS

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        caught: list[torch.Tensor] = []
        hook = self.vit.blocks[self.layer].attn.qkv.register_forward_hook(lambda m, i, out: caught.append(out))
        try:
            with torch.no_grad():
                self.vit(x.to(next(self.vit.parameters()).device))
        finally:
            hook.remove()
        qkv = caught[0]
        tokens, dim = qkv.shape[1], qkv.shape[2] // 3
        return qkv.reshape(tokens, 3, self.heads, dim // self.heads).permute(1, 2, 0, 3)[1]


def background_lpips(lpips: Lpips, source: Picture, edited: Picture, mask: np.ndarray,
                     device: torch.device | str = "cpu") -> float | str:
    """PIE-Bench's lpips_unedit_part (evaluate.calculate_metric -> MetricsCalculator.calculate_lpips(src, tgt,
    1 - mask, 1 - mask)): both pictures as float32 / 255, times (1 - mask), as (1, 3, H, W), fed to
    LearnedPerceptualImagePatchSimilarity(net_type="squeeze") as x * 2 - 1, the source first. "nan" when the mask
    covers everything, as PIE-Bench's."""
    keep = 1.0 - np.asarray(mask, np.float32)
    if keep.sum() == 0:
        return "nan"

    def tensor(picture: Picture) -> torch.Tensor:
        x = (np.asarray(picture).astype(np.float32) / 255) * keep[:, :, None]
        return torch.from_numpy(x.transpose(2, 0, 1).copy())[None].to(device)

    with torch.no_grad():
        return float(lpips(tensor(source) * 2 - 1, tensor(edited) * 2 - 1))


def clip_similarity(clip_score: ClipScore, image: Picture, prompt: str, mask: np.ndarray | None = None,
                    device: torch.device | str = "cpu") -> float | str:
    """PIE-Bench's clip_similarity_target_image (mask None) and _edit_part (MetricsCalculator
    .calculate_clip_similarity): the uint8 picture, or np.uint8(picture * mask) for the edited region, as a (3, H, W)
    uint8 tensor with the prompt into CLIPScore(openai/clip-vit-large-patch14), which scores max(100 cos, 0) of the
    CLIP image and text embeddings. "nan" for an empty mask, as PIE-Bench's."""
    picture = np.array(image)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.sum() == 0:
            return "nan"
        picture = np.uint8(picture * mask[:, :, None])
    with torch.no_grad():
        return float(clip_score(torch.tensor(picture).permute(2, 0, 1).to(device), prompt))


@dataclass(frozen=True)
class ModelMetrics:
    """The networks of PIE-Bench's model metrics that could be loaded (None: not), and why the others are not."""

    extractor: Keys | None = None
    lpips: Lpips | None = None
    clip_score: ClipScore | None = None
    device: torch.device = torch.device("cpu")
    reasons: Mapping[str, str] = field(default_factory=dict)  # metric -> "not computed: needs ..."

    def status(self) -> dict[str, str]:
        """Each model metric -> how it is computed, or why not."""
        how = {STRUCTURE: (self.extractor, f"DINO ViT-B/8 (torch.hub facebookresearch/dino, {DINO_MODEL})"),
               LPIPS: (self.lpips, f"torchmetrics LearnedPerceptualImagePatchSimilarity(net_type={LPIPS_NET!r})"),
               CLIP_WHOLE: (self.clip_score, f"torchmetrics CLIPScore({CLIP_MODEL})"),
               CLIP_EDITED: (self.clip_score, f"torchmetrics CLIPScore({CLIP_MODEL})")}
        return {name: f"computed: {what}, as PIE-Bench" if net is not None
                else self.reasons.get(name, "not computed: needs its network") for name, (net, what) in how.items()}

    def item(self, source: Picture, edited: Picture, target: str, truth: np.ndarray | None) -> dict[str, float | str]:
        """The model metrics of one edit that can be computed (lpips and the edited region need a mask)."""
        out: dict[str, float | str] = {}
        if self.extractor is not None:
            out[STRUCTURE] = structure_distance(self.extractor, source, edited, self.device)
        if self.lpips is not None and truth is not None:
            out[LPIPS] = background_lpips(self.lpips, source, edited, truth, self.device)
        if self.clip_score is not None:
            out[CLIP_WHOLE] = clip_similarity(self.clip_score, edited, target, None, self.device)
            if truth is not None:
                out[CLIP_EDITED] = clip_similarity(self.clip_score, edited, target, truth, self.device)
        return out


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _torchvision() -> Any:
    """torchvision if it imports (a build for another torch may be installed yet fail), else None."""
    if not _has("torchvision"):
        return None
    try:
        import torchvision
    except Exception:  # noqa: BLE001  (e.g. "operator torchvision::nms does not exist": built for another torch)
        return None
    return torchvision


def _torchvision_needs() -> str:
    minor = torch.__version__.split("+")[0].split(".")[:2]
    pair = f"0.{int(minor[1]) + 15}" if len(minor) == 2 and minor[0] == "2" and minor[1].isdigit() else "?"
    return (f"torchvision built for this torch {torch.__version__} (torch 2.N pairs with torchvision 0.(N+15), here "
            f"{pair}.x, of the same build: a +cpu torch takes the +cpu torchvision of PyTorch's own wheel index; not "
            "in the `metrics` extra, since any other would replace torch or fail to import)")


def _failed(what: str, error: Exception) -> str:
    message = " ".join(str(error).split())
    return f"not computed: needs {what} that loads; it failed with {type(error).__name__}: {message}"


def _load_dino(device: torch.device, hub: Path) -> tuple[Keys | None, str | None]:
    """DINO ViT-B/8 from torch.hub's cache only (source="local": nothing fetched; hubconf imports torchvision)."""
    repo, weights = hub / DINO_HUB_REPO, hub / "checkpoints" / DINO_CHECKPOINT
    needs = [] if _torchvision() is not None else [_torchvision_needs()]
    if not (repo / "hubconf.py").is_file():
        needs.append(f"the facebookresearch/dino hub code in {repo}")
    if not weights.is_file():
        needs.append(f"the DINO ViT-B/8 weights {weights}")
    if needs:
        return None, ("not computed: needs " + " and ".join(needs) + " (torch.hub.load('facebookresearch/dino:main', "
                      f"'{DINO_MODEL}') on a machine online fills {hub}; copy it here or set TORCH_HOME)")
    try:
        vit = torch.hub.load(str(repo), DINO_MODEL, source="local", trust_repo=True, verbose=False)
    except Exception as e:  # noqa: BLE001  (reported, never a number)
        return None, _failed(f"DINO ViT-B/8 in {repo}", e)
    return DinoKeys(vit.to(device).eval()), None


def _load_lpips(device: torch.device, hub: Path) -> tuple[Lpips | None, str | None]:
    """torchmetrics' LPIPS (SqueezeNet) with torchvision's SqueezeNet 1.1 weights already in torch.hub's cache."""
    needs = [] if _has("torchmetrics") else ["torchmetrics (pip install 'diffedit-reference[metrics]')"]
    name, torchvision = SQUEEZENET_CHECKPOINT, _torchvision()
    if torchvision is None:
        needs.append(_torchvision_needs())
    else:
        name = Path(torchvision.models.SqueezeNet1_1_Weights.DEFAULT.url).name
    if not (hub / "checkpoints" / name).is_file():
        needs.append(f"torchvision's SqueezeNet 1.1 weights {hub / 'checkpoints' / name} (torchvision.models"
                     ".squeezenet1_1(weights='DEFAULT') on a machine online puts them there; or set TORCH_HOME)")
    if needs:
        return None, "not computed: needs " + " and ".join(needs)
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        return LearnedPerceptualImagePatchSimilarity(net_type=LPIPS_NET).to(device), None
    except Exception as e:  # noqa: BLE001
        return None, _failed("torchmetrics' LPIPS (SqueezeNet)", e)


def _load_clip(device: torch.device) -> tuple[ClipScore | None, str | None]:
    """torchmetrics' CLIPScore on openai/clip-vit-large-patch14 from the Hugging Face cache only (its local snapshot
    folder is what CLIPScore gets, so transformers never asks the hub)."""
    from huggingface_hub import constants, snapshot_download

    needs = [] if _has("torchmetrics") else ["torchmetrics (pip install 'diffedit-reference[metrics]')"]
    try:
        folder = snapshot_download(CLIP_MODEL, local_files_only=True)
    except Exception:  # noqa: BLE001  (not in the cache)
        needs.append(f"{CLIP_MODEL} in the Hugging Face cache {constants.HF_HUB_CACHE} (huggingface-cli download "
                     f"{CLIP_MODEL} on a machine online; copy the cache here or set HF_HOME)")
    if needs:
        return None, "not computed: needs " + " and ".join(needs)
    try:
        from torchmetrics.multimodal import CLIPScore

        return CLIPScore(model_name_or_path=folder).to(device), None
    except Exception as e:  # noqa: BLE001
        return None, _failed(f"CLIP ViT-L/14 in {folder}", e)


def load_model_metrics(device: torch.device | str = "cpu") -> ModelMetrics:
    """The networks of PIE-Bench's model metrics from local caches only (torch.hub's folder, the Hugging Face cache;
    nothing is downloaded), on `device`; each one missing is a "not computed: needs <what, where>" reason."""
    device = torch.device(device)
    hub = Path(torch.hub.get_dir())
    (extractor, why_dino), (lpips, why_lpips), (clip, why_clip) = (_load_dino(device, hub), _load_lpips(device, hub),
                                                                    _load_clip(device))
    reasons = {name: why for name, why in ((STRUCTURE, why_dino), (LPIPS, why_lpips), (CLIP_WHOLE, why_clip),
                                           (CLIP_EDITED, why_clip)) if why is not None}
    return ModelMetrics(extractor, lpips, clip, device, reasons)
