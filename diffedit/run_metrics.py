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

The model metrics (structure distance with DINO ViT-B/8, LPIPS with SqueezeNet, CLIP ViT-L/14 similarity of the whole
edit and of its edited region) need `torchmetrics` (the `metrics` extra) and their weights; this run does not download
weights, so each is reported as "not computed: needs ..." instead of a number.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import torch
import torch.nn.functional as F

SSIM_SIGMA = 1.5
SSIM_TAPS = 11  # torchmetrics: int(3.5 * sigma + 0.5) * 2 + 1
SSIM_K1, SSIM_K2 = 0.01, 0.03
MODEL_METRICS = {  # PIE-Bench's model metric -> what it needs
    "structure_distance": "DINO ViT-B/8 weights (torch.hub facebookresearch/dino, dino_vitb8)",
    "lpips_unedit_part": "LPIPS SqueezeNet weights (torchmetrics LearnedPerceptualImagePatchSimilarity)",
    "clip_similarity_target_image": "CLIP ViT-L/14 weights (openai/clip-vit-large-patch14)",
    "clip_similarity_target_image_edit_part": "CLIP ViT-L/14 weights (openai/clip-vit-large-patch14)",
}


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


def model_metric_status() -> dict[str, str]:
    """Each PIE-Bench model metric -> why it is not computed in this run (never a made-up number)."""
    if importlib.util.find_spec("torchmetrics") is None:
        extra = "torchmetrics (pip install 'diffedit-reference[metrics]')"
        return {name: f"not computed: needs {extra} and {needs}" for name, needs in MODEL_METRICS.items()}
    return {name: f"not computed: needs {needs}; diffedit run does not download weights"
            for name, needs in MODEL_METRICS.items()}
