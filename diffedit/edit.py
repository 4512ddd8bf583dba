"""DiffEdit: mask generation, DDIM encoding and masked decoding, top to bottom.

Reference: Couairon, Verbeek, Schwenk, Cord 2022, "DiffEdit: Diffusion-based semantic image editing with
mask guidance", arXiv 2210.11427. §3.2: the mask from the contrast of two noise estimates; §3.1 / §3.3:
DDIM encoding of the input to ratio r, then DDIM decoding with the query, where the latent outside the
mask is replaced at every step by the input's own encoding at the same noise level.

    mask = generate_mask(model, image, "a bowl of fruits", "a bowl of pears")
    inversion = invert(model, latents=mask.latents)        # the VAE encodes the image once
    result = edit(model, inversion, mask, "a bowl of pears", negative_prompt="a bowl of fruits")

Batches are rows: the images (or latents), the prompts and the masks of a call each have 1 or N entries;
a single entry is shared by all N rows. `edit` makes `num_images_per_prompt` images per row, row by row.

`diffusers_compat=True` on each stage reproduces diffusers 0.42's StableDiffusionDiffEditPipeline numbers,
its defects included (DESIGN.md lists them); the default is the paper-faithful, fixed behaviour.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm  # plain text bars: the same in terminals and notebooks, no widget dependency

from .ddim import add_noise, ddim_inverse_step, ddim_step, eps_from_v, timesteps, to_x0_and_eps
from .image import ImageInput, MaskInput, mask_to_pil, to_mask, to_numpy, to_pil, to_tensor
from .model import StableDiffusion
from .text import Prompts, as_prompt_list
from .vae import DiagonalGaussian

Callback = Callable[[dict[str, Any]], None]  # gets dict(i, t, x, pred_x0) after every step, k-diffusion style
OutputType = Literal["pil", "np", "pt", "latent"]
_FORMAT = "diffedit-inversion-v1"


@dataclass(frozen=True, eq=False)
class MaskResult:
    latent_mask: Tensor  # (N, 1, h, w) float in {0, 1}; 1 = the region to edit
    difference: Tensor  # (N, 1, h, w) the continuous map D that was thresholded (mean |eps_Q - eps_R|)
    image_mask: list[Image.Image]  # the mask at image resolution (nearest), mode L, 255 = edit: for any inpainter
    latents: Tensor | None  # z0 of the input images, one per image; None in compat mode (it samples per map)
    timestep: int  # the noise level of the maps
    threshold_ratio: float
    # compat mode, from an image: the VAE posterior the maps sampled, for invert(posterior=...) to draw its own z0
    # from without running the encoder again (diffusers encodes the image anew for its inversion: same numbers)
    posterior: DiagonalGaussian | None = None
    # the encoded source and target prompts (one row per prompt, the mask's clip_skip), for the next stages'
    # prompt_embeddings= / negative_embeddings=: the chain then runs the text encoder once per prompt
    source_embeddings: Tensor | None = None
    target_embeddings: Tensor | None = None


@dataclass(frozen=True, eq=False)
class Inversion:
    z0: Tensor  # (N, 4, h, w) the scaled VAE latents of the inputs
    latents: Tensor  # (N, K, 4, h, w): latents[:, i] is the encoding at noise level timesteps[i]
    timesteps: tuple[int, ...]  # descending: 781, 761, ..., 1 for strength 0.8 of 50 steps
    steps: int
    strength: float
    prediction_type: str
    guidance: float
    diffusers_compat: bool

    def save(self, path: str | os.PathLike[str]) -> None:
        """A .safetensors file: the tensors, and the settings as JSON metadata (no pickle)."""
        settings = dict(format=_FORMAT, steps=self.steps, strength=self.strength, guidance=self.guidance,
                        prediction_type=self.prediction_type, diffusers_compat=self.diffusers_compat)
        tensors = dict(z0=self.z0, latents=self.latents, timesteps=torch.tensor(self.timesteps))
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path),
                  metadata={"diffedit": json.dumps(settings)})

    @staticmethod
    def load(path: str | os.PathLike[str]) -> "Inversion":
        try:
            with safe_open(str(path), "pt") as f:
                settings = json.loads((f.metadata() or {}).get("diffedit", "{}"))
            t = load_file(str(path))
        except (SafetensorError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a diffedit inversion file: {e}") from None
        keys = ["diffusers_compat", "format", "guidance", "prediction_type", "steps", "strength"]
        if settings.get("format") != _FORMAT or sorted(settings) != keys or sorted(t) != ["latents", "timesteps", "z0"]:
            raise ValueError(f"{path} is not a diffedit inversion file ({_FORMAT})")
        del settings["format"]
        return Inversion(t["z0"], t["latents"], tuple(t["timesteps"].tolist()), **settings)


@dataclass(frozen=True, eq=False)
class EditResult:
    images: list[Image.Image] | np.ndarray | Tensor  # N * num_images_per_prompt, row by row
    latents: Tensor  # the final latents


@torch.no_grad()
def generate_mask(
    model: StableDiffusion, image: ImageInput | None = None, source_prompt: Prompts | None = None,
    target_prompt: Prompts | None = None, *, latents: Tensor | None = None, num_maps: int = 10,
    encode_strength: float = 0.5, threshold_ratio: float = 3.0, steps: int = 50, guidance: float = 7.5,
    source_negative_prompt: Prompts | None = None, target_negative_prompt: Prompts | None = None,
    source_embeddings: Tensor | None = None, target_embeddings: Tensor | None = None,
    source_negative_embeddings: Tensor | None = None, target_negative_embeddings: Tensor | None = None,
    generator: torch.Generator | None = None, clip_skip: int = 0, diffusers_compat: bool = False,
    progress: bool = True,
) -> MaskResult:
    """§3.2: where do the noise estimates under the target prompt Q and the source prompt R disagree?

    z0 (from `image`, or `latents=` as they are) is noised to the level of `encode_strength` of `steps`
    with `num_maps` independent noises; D = mean over maps and channels of |eps_Q - eps_R| (each guided by
    its negative prompt, "" by default); M = 1[D > threshold_ratio / 2 * mean(D)] for each image.
    """
    _check_common(model, steps, guidance, generator, diffusers_compat)
    _check_int(num_maps, "num_maps", 1)
    _check_number(threshold_ratio, "threshold_ratio", low=0.0, open_low=True)
    t = _timesteps(model, steps, encode_strength, "encode_strength")[0]  # 0.5 of 50 steps -> t = 481
    # Both negatives left at "": in the default mode they cancel (below), so they are never encoded (as without
    # guidance); diffusers' map uses them, so compat encodes "" once for both (the cache).
    defaults = all(n is None for n in (source_negative_prompt, source_negative_embeddings, target_negative_prompt,
                                       target_negative_embeddings))
    pair_guidance = guidance if diffusers_compat or not defaults else 1.0  # 1: default negatives not encoded
    cache: dict = {}
    src, src_neg = _prompt_pair(model, source_prompt, source_embeddings, source_negative_prompt,
                                source_negative_embeddings, "source_prompt", clip_skip, diffusers_compat,
                                pair_guidance, cache)
    tgt, tgt_neg = _prompt_pair(model, target_prompt, target_embeddings, target_negative_prompt,
                                target_negative_embeddings, "target_prompt", clip_skip, diffusers_compat,
                                pair_guidance, cache)
    posterior = None
    if diffusers_compat:
        z0 = latents
        if image is not None:  # one encoder pass; the maps and invert(posterior=...) sample from it
            posterior = model.encode_posterior(to_tensor(image, model.config.vae.downsample_factor))
        diff = _diffusers_mask_map(model, posterior, latents, t, src, src_neg, tgt, tgt_neg, num_maps, guidance,
                                   generator)
    else:
        z0 = _encode(model, image, latents)  # the posterior mean, encoded once (invert(latents=...) shares it)
        rows = _batch(images=len(z0), source_prompt=len(src), target_prompt=len(tgt))
        z = _rows(z0, rows)
        cond = torch.cat([_rows(src, rows), _rows(tgt, rows)])  # R and Q side by side: one batched UNet call
        # With one negative for both prompts (the default "") or no guidance, the unconditional estimate cancels:
        # eps_Q~ - eps_R~ = g (eps_Q - eps_R). Only the two conditional rows are evaluated then, half the work.
        negatives = None if src_neg is None else (_rows(src_neg, rows), _rows(tgt_neg, rows))
        shared = negatives is None or torch.equal(*negatives)
        uncond = None if shared else torch.cat(negatives)
        scale = guidance if shared else 1.0
        diff = torch.zeros(rows, 1, *z.shape[-2:], device=z.device)
        for _ in tqdm(range(num_maps), desc="mask", disable=not progress):
            x = add_noise(model.schedule, z, _randn(z.shape, generator, z), t)  # DDPM eq. 4, fresh noise per map
            eps_src, eps_tgt = model.predict_noise(torch.cat([x, x]), t, cond, uncond, guidance).chunk(2)
            # mean over maps and channels
            diff += scale * (eps_tgt - eps_src).abs().float().mean(1, keepdim=True) / num_maps
    mask = binarize(diff, threshold_ratio, per_image=not diffusers_compat)
    image_size = tuple(s * model.config.vae.downsample_factor for s in mask.shape[-2:])
    return MaskResult(mask, diff, mask_to_pil(mask, image_size), z0, t, threshold_ratio, posterior, src, tgt)


def binarize(difference: Tensor, threshold_ratio: float = 3.0, per_image: bool = True) -> Tensor:
    """§3.2: clip D at rho * mean(D), rescale to [0, 1], threshold at 0.5, i.e. M = 1[D > rho/2 * mean(D)].

    per_image=True takes each image's own mean, and a zero map (source == target) gives an empty mask;
    per_image=False is diffusers': one mean over the batch, and a zero map gives 0/0 = NaN -> all ones.
    """
    mean = difference.mean(dim=(1, 2, 3), keepdim=True) if per_image else difference.mean()
    clip = mean * threshold_ratio
    scaled = torch.minimum(difference.clamp(min=0), clip) / clip
    if per_image:
        return ((scaled > 0.5) & (clip > 0)).float()
    return torch.where(scaled <= 0.5, 0.0, 1.0)


@torch.no_grad()
def invert(
    model: StableDiffusion, image: ImageInput | None = None, prompt: Prompts | None = None, *,
    latents: Tensor | None = None, posterior: DiagonalGaussian | None = None, strength: float = 0.8,
    steps: int = 50, guidance: float = 1.0,
    negative_prompt: Prompts | None = None, prompt_embeddings: Tensor | None = None,
    negative_embeddings: Tensor | None = None, generator: torch.Generator | None = None, clip_skip: int = 0,
    lambda_auto_corr: float = 20.0, lambda_kl: float = 20.0, num_reg_steps: int = 0,
    num_auto_corr_rolls: int = 5, callback: Callback | None = None, diffusers_compat: bool = False,
    progress: bool = True,
) -> Inversion:
    """§3.1: DDIM encoding of z0 (from `image`, `latents=`, or `posterior=mask.posterior`, which compat mode
    samples without a second encoder pass) up to ratio `strength`, every latent kept.

    The paper encodes unconditionally (the default: prompt "", guidance 1; strong guidance breaks DDIM
    inversion). The
    optional regulariser (num_reg_steps > 0; diffusers', after pix2pix-zero) pulls each noise estimate
    towards i.i.d. N(0, 1) with an auto-correlation and a KL penalty.
    """
    _check_common(model, steps, guidance, generator, diffusers_compat)
    for value, name in ((lambda_auto_corr, "lambda_auto_corr"), (lambda_kl, "lambda_kl")):
        _check_number(value, name, low=0.0)
    _check_int(num_reg_steps, "num_reg_steps", 0)
    _check_int(num_auto_corr_rolls, "num_auto_corr_rolls", 1)
    _check_callback(callback)
    ts = _timesteps(model, steps, strength, "strength")  # 781, 761, ..., 1
    prompt = "" if prompt is None and prompt_embeddings is None else prompt
    cond, uncond = _prompt_pair(model, prompt, prompt_embeddings, negative_prompt, negative_embeddings, "prompt",
                                clip_skip, diffusers_compat, guidance)
    z0 = _encode(model, image, latents, generator, sample=diffusers_compat, posterior=posterior)  # compat: sampled
    rows = _batch(images=len(z0), prompt=len(cond))
    z0, cond, uncond = _rows(z0, rows), _rows(cond, rows), _rows(uncond, rows) if guidance > 1 else None
    if diffusers_compat and num_reg_steps and uncond is not None and rows > 1 and _is_v(model):
        raise ValueError("diffusers' inversion regulariser fails for v-models with guidance at batch > 1")
    x, trajectory = z0, []
    levels = [-1, *reversed(ts)]  # -1: the clean latent's level (abar = the schedule's final alpha)
    for i, (t_cur, t_next) in enumerate(tqdm(list(zip(levels[:-1], levels[1:])), desc="invert", disable=not progress)):
        out = model.predict(x, t_next, cond, uncond, guidance)  # at the level moved to, as in every SD inversion
        if num_reg_steps:
            out = _regularise(model, out, x, t_cur, t_next, uncond is not None, generator, lambda_auto_corr,
                              lambda_kl, num_reg_steps, num_auto_corr_rolls, diffusers_compat)
        step = ddim_inverse_step(model.schedule, out, x, t_cur, t_next)  # DDIM eq. 12 run upwards
        x = step.x
        trajectory.append(x)
        if callback is not None:
            callback(dict(i=i, t=t_next, x=x, pred_x0=step.pred_x0))
    return Inversion(z0, torch.stack(trajectory[::-1], 1), tuple(ts), steps, float(strength),
                     model.config.schedule.prediction_type, float(guidance), diffusers_compat)


@torch.no_grad()
def noise_inversion(
    model: StableDiffusion, latents: Tensor, *, strength: float = 0.8, steps: int = 50,
    generator: torch.Generator | None = None,
) -> Inversion:
    """The ablation "without encoding" (§4.2, Fig. 6): z0 noised with ONE random draw at every level,
    x_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) n, in place of the DDIM encoding.

    With an all-ones mask, `edit` from this is SDEdit (Meng et al. 2022); with DiffEdit's mask it is DiffEdit
    without encoding (the background follows the noised input, as in blended / RePaint-style inpainting).
    """
    _check_common(model, steps, 1.0, generator, False)
    ts = _timesteps(model, steps, strength, "strength")
    z0 = _encode(model, None, latents)
    noise = _randn(z0.shape, generator, z0)
    levels = torch.stack([add_noise(model.schedule, z0, noise, t) for t in ts], 1)
    return Inversion(z0, levels, tuple(ts), steps, float(strength), model.config.schedule.prediction_type, 1.0, False)


@torch.no_grad()
def edit(
    model: StableDiffusion, inversion: Inversion, mask: MaskResult | MaskInput, prompt: Prompts | None = None, *,
    negative_prompt: Prompts | None = None, prompt_embeddings: Tensor | None = None,
    negative_embeddings: Tensor | None = None, guidance: float = 7.5, eta: float = 0.0,
    num_images_per_prompt: int = 1, generator: torch.Generator | None = None, clip_skip: int = 0,
    callback: Callback | None = None, output_type: OutputType = "pil", background_image: ImageInput | None = None,
    diffusers_compat: bool = False, progress: bool = True,
) -> EditResult:
    """§3.3: DDIM decoding from x_r with the query; outside the mask the latent follows the input's encoding.

    `mask` is a MaskResult or any binary mask (PIL, numpy, tensor) at latent or image resolution.
    negative_prompt defaults to "" (unconditional); DESIGN.md's recipe passes the source prompt R.
    Steps and strength are the inversion's own, so they cannot disagree.

    `background_image` (off by default; not in the paper, nor in diffusers): the input image(s), whose pixels the
    output takes outside the mask (the latent mask upsampled, nearest). The latents there are z0's exactly, but
    the decoder sees the whole picture (its GroupNorm statistics and attention span it), so an edited region
    shifts the decoded colours of the untouched ones, and the VAE's reconstruction error is everywhere; this
    pastes the input back instead. `EditResult.latents` stay the latents that were decoded.
    """
    if not isinstance(inversion, Inversion):
        raise TypeError(f"inversion must be the Inversion returned by invert(), got {type(inversion).__name__}")
    _check_common(model, inversion.steps, guidance, generator, diffusers_compat)
    _check_number(eta, "eta", low=0.0)
    _check_int(num_images_per_prompt, "num_images_per_prompt", 1)
    _check_callback(callback)
    if output_type not in ("pil", "np", "pt", "latent"):
        raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
    if background_image is not None and output_type == "latent":
        raise ValueError("background_image is pasted into decoded images: it needs output_type 'pil', 'np' or 'pt'")
    ts = _check_inversion(model, inversion)
    size = tuple(inversion.z0.shape[-2:])
    mask = mask.latent_mask if isinstance(mask, MaskResult) else to_mask(mask, size)
    if tuple(mask.shape[-2:]) != size:
        raise ValueError(f"the mask is {tuple(mask.shape[-2:])} latents, the inversion {size}")
    cond, uncond = _prompt_pair(model, prompt, prompt_embeddings, negative_prompt, negative_embeddings, "prompt",
                                clip_skip, diffusers_compat, guidance)
    rows = _batch(inversion=len(inversion.z0), mask=len(mask), prompt=len(cond))
    k, dev = num_images_per_prompt, model.device
    per_image = lambda v: _rows(v.to(dev), rows).repeat_interleave(k, 0)  # noqa: E731  (row r -> r*k .. r*k+k-1)
    cond, uncond = per_image(cond), per_image(uncond) if guidance > 1 else None
    # diffusers tiles the masks instead (m0, m1, m0, m1): with k > 1 they land on the wrong images
    mask = (torch.cat([_rows(mask.to(dev), rows)] * k) if diffusers_compat else per_image(mask)).to(model.dtype)
    original = None if background_image is None else per_image(_background(model, background_image, size, rows))
    x_at = {t: per_image(inversion.latents[:, i]) for i, t in enumerate(ts)}  # the input's encoding, by level
    x_at[-1] = per_image(inversion.z0)  # past the last step: z0 itself
    x = x_at[ts[0]].clone()  # x_r
    for i, (t_cur, t_next) in enumerate(tqdm(list(zip(ts, [*ts[1:], -1])), desc="edit", disable=not progress)):
        out = model.predict(x, t_cur, cond, uncond, guidance)
        step = ddim_step(model.schedule, out, x, t_cur, t_next, eta=eta, generator=generator)  # DDIM eq. 12
        # §3.3: y <- M y + (1 - M) x_inv, with the input's encoding at the level y now has (t_next). diffusers
        # takes the level it stepped *from* (one step noisier), and so ends at x_1 instead of z0.
        background = x_at[t_cur] if diffusers_compat else x_at[t_next]
        x = step.x * mask + background * (1 - mask)
        if callback is not None:
            callback(dict(i=i, t=t_cur, x=x, pred_x0=step.pred_x0))
    images = x if output_type == "latent" else model.decode_latents(x)  # §3.3: the VAE decodes the result
    if original is not None:  # the decoded pixels where the latent was edited, the input's elsewhere
        inside = torch.nn.functional.interpolate(mask.to(images.dtype), size=images.shape[-2:], mode="nearest")
        images = images * inside + original.to(images.dtype) * (1 - inside)
    if output_type in ("np", "pil"):
        images = to_numpy(images) if output_type == "np" else to_pil(images)
    return EditResult(images, x)


def _background(model: StableDiffusion, image: ImageInput, latent_size: tuple[int, ...], rows: int) -> Tensor:
    """edit()'s background_image as (1 or rows, 3, H, W) in [0, 1], checked against the inversion before any work."""
    original = to_tensor(image, model.config.vae.downsample_factor)
    size = tuple(s * model.config.vae.downsample_factor for s in latent_size)
    if tuple(original.shape[-2:]) != size:
        raise ValueError(f"background_image is {tuple(original.shape[-2:])} pixels, the inversion's images {size}: "
                         "pass the image that was inverted")
    if len(original) not in (1, rows):
        raise ValueError(f"background_image has {len(original)} images for {rows} rows: give 1 or {rows}")
    return original


# ---- diffusers' mask, numbers included ----------------------------------------------------------------------
def _diffusers_mask_map(model, posterior, latents, t, src, src_neg, tgt, tgt_neg, num_maps, guidance, generator):
    """The map of diffusers' generate_mask: one posterior sample per map, its batch layout, its swapped guidance."""
    # diffusers encodes each map's copy anew; one encoder pass, the posterior repeated, draws the same samples
    z = _encode(model, None, latents, generator, sample=True, repeat=num_maps, posterior=posterior)
    n_images = len(z) // num_maps
    rows = _batch(images=n_images, source_prompt=len(src), target_prompt=len(tgt))
    z = torch.cat([z] * (rows // n_images))  # a shared image is tiled
    x = add_noise(model.schedule, z, _randn(z.shape, generator, z), t)
    rep = lambda e: _rows(e, rows).repeat_interleave(num_maps, 0)  # noqa: E731
    if guidance > 1:  # the halves of each pair are swapped: it guides *away* from the prompt, towards ""
        if torch.equal(_rows(src_neg, rows), _rows(tgt_neg, rows)):  # both "" (the default): the same rows twice,
            out_neg_src, out_src, out_uncond = model.predict(  # so 3 of diffusers' 4 row groups suffice
                torch.cat([x] * 3), t, torch.cat([rep(src), rep(src_neg), rep(tgt)])).chunk(3)
            out_tgt = out_src  # (diffusers' names, swapped as its guidance is: this is the negative's output)
        else:
            out_neg_src, out_src, out_uncond, out_tgt = model.predict(
                torch.cat([x] * 4), t, torch.cat([rep(src), rep(src_neg), rep(tgt), rep(tgt_neg)])).chunk(4)
        out_src = out_neg_src + guidance * (out_src - out_neg_src)
        out_tgt = out_uncond + guidance * (out_tgt - out_uncond)
    else:  # (diffusers itself fails without guidance)
        out_src, out_tgt = model.predict(torch.cat([x] * 2), t, torch.cat([rep(src), rep(tgt)])).chunk(2)
    # raw outputs (v for v-models, a scaled eps difference), averaged over maps and channels
    return (out_tgt - out_src).abs().reshape(rows, num_maps, *out_tgt.shape[-3:]).mean([1, 2])[:, None]


# ---- the inversion regulariser (diffusers', after pix2pix-zero) ---------------------------------------------
def _regularise(model, out, x, t_cur, t_next, cfg, generator, lambda_ac, lambda_kl, num_steps, rolls, compat):
    schedule = model.schedule
    if compat:  # diffusers converts v with abar(t_next) against the CFG-doubled input, and one KL over the batch
        x_in, abar = (torch.cat([x, x]) if cfg else x), schedule.abar(t_next)
        to_eps = (lambda o: eps_from_v(o, x_in, abar)) if _is_v(model) else (lambda o: o)
        kl = _kl
    else:  # the noise estimate the DDIM step will use; the KL of each image on its own
        to_eps = lambda o: to_x0_and_eps(o, x, schedule.abar(t_cur), schedule.prediction_type)[1]  # noqa: E731
        kl = lambda e: sum(_kl(row) for row in e)  # noqa: E731
    with torch.enable_grad():
        for _ in range(num_steps):
            if lambda_ac > 0:
                for _ in range(rolls):
                    var = out.detach().clone().requires_grad_(True)
                    (grad,) = torch.autograd.grad(_auto_corr_loss(to_eps(var), generator), var)
                    out = out - lambda_ac * (grad / rolls)
            if lambda_kl > 0:
                var = out.detach().clone().requires_grad_(True)
                (grad,) = torch.autograd.grad(kl(to_eps(var)), var)
                out = out - lambda_kl * grad
            out = out.detach()
    return out


def _auto_corr_loss(eps: Tensor, generator: torch.Generator | None) -> Tensor:
    """Squared auto-correlation of each noise map with a random roll of itself, over a pyramid of scales."""
    loss = 0.0
    for i in range(eps.shape[0]):
        for j in range(eps.shape[1]):
            noise = eps[i : i + 1, j : j + 1]
            while True:
                roll = torch.randint(noise.shape[2] // 2, (1,), generator=generator).item()
                loss += (noise * torch.roll(noise, shifts=roll, dims=2)).mean() ** 2
                loss += (noise * torch.roll(noise, shifts=roll, dims=3)).mean() ** 2
                if noise.shape[2] <= 8:
                    break
                noise = torch.nn.functional.avg_pool2d(noise, kernel_size=2)
    return loss  # type: ignore[return-value]


def _kl(eps: Tensor) -> Tensor:
    """KL(N(mean, var) || N(0, 1)) up to constants, as diffusers writes it."""
    return eps.var() + eps.mean() ** 2 - 1 - torch.log(eps.var() + 1e-7)


# ---- inputs -------------------------------------------------------------------------------------------------
def _encode(model, image, latents, generator=None, sample=False, repeat=1, posterior=None) -> Tensor:
    """§3.1: the input -> z0 (scaled VAE latents), or the given `latents` as they are, or from a `posterior`."""
    if sum(x is not None for x in (image, latents, posterior)) != 1:
        raise ValueError("give an image, latents= or posterior=, exactly one of them")
    if posterior is not None:
        if not isinstance(posterior, DiagonalGaussian):
            what = type(posterior).__name__
            raise TypeError(f"posterior must be a DiagonalGaussian (a MaskResult's .posterior), not {what}")
        return model.posterior_latents(posterior, generator, sample, repeat)
    if latents is not None:
        c = model.config.vae.latent_channels
        ok = isinstance(latents, Tensor) and latents.is_floating_point() and latents.ndim == 4
        if not ok or latents.shape[1] != c:
            raise ValueError(f"latents must be a float (B, {c}, h, w) tensor, got {getattr(latents, 'shape', latents)}")
        return latents.to(model.device, model.dtype).repeat_interleave(repeat, 0)
    images = to_tensor(image, model.config.vae.downsample_factor)
    return model.encode_image(images, generator, sample, repeat)


def _prompt_pair(model, prompt, embeddings, negative, negative_embeddings, what, clip_skip, compat, guidance,
                 cache=None):
    """(cond, uncond) embeddings, as many of each; the negative defaults to "" for every prompt.

    Without guidance (<= 1) a default negative is never used, so it is not encoded: uncond is None.
    `cache` (a dict shared by the calls of one stage) encodes each distinct prompt list once.
    """
    cond = _embed(model, prompt, embeddings, what, clip_skip, cache)
    if negative is None and negative_embeddings is None:
        if guidance <= 1:
            return cond, None
        negative = [""] * len(cond)
    # diffusers applies clip_skip to the prompt only, never to its negative
    uncond = _embed(model, negative, negative_embeddings, f"negative of {what}", 0 if compat else clip_skip, cache)
    if len(uncond) not in (1, len(cond)):
        raise ValueError(f"{len(uncond)} negative prompts for {len(cond)} prompts ({what})")
    return cond, _rows(uncond, len(cond))


def _embed(model, prompt, embeddings, what, clip_skip, cache=None) -> Tensor:
    if embeddings is not None:
        if prompt is not None:
            raise ValueError(f"give {what} or its embeddings, not both")
        return model.check_embeddings(embeddings, f"{what} embeddings")
    if prompt is None:
        raise ValueError(f"{what} is missing: give a string, a list of strings or embeddings")
    if cache is None:
        return model.encode_prompt(prompt, clip_skip)
    key = (tuple(as_prompt_list(prompt)), clip_skip)
    if key not in cache:
        cache[key] = model.encode_prompt(prompt, clip_skip)
    return cache[key]


def _batch(**counts: int) -> int:
    """The number of rows: every count must be 1 (shared) or the largest one."""
    rows = max(counts.values())
    if any(n not in (1, rows) for n in counts.values()):
        raise ValueError(f"batch sizes must be 1 or equal: {', '.join(f'{k}={v}' for k, v in counts.items())}")
    return rows


def _rows(v: Tensor, rows: int) -> Tensor:
    return v if len(v) == rows else v.repeat(rows, *[1] * (v.ndim - 1))


def _randn(shape, generator: torch.Generator | None, like: Tensor) -> Tensor:
    # Drawn on the generator's device (CPU by default), so the same seed gives the same bits on any device.
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def _timesteps(model, steps, strength, name) -> list[int]:
    _check_number(strength, name, low=0.0, high=1.0)
    ts = timesteps(model.schedule, steps, strength)
    if not ts:
        raise ValueError(f"{name}={strength} of {steps} steps leaves no step: int(steps * {name}) must be >= 1")
    return ts


def _check_inversion(model, inv: Inversion) -> list[int]:
    if inv.prediction_type != model.config.schedule.prediction_type:
        raise ValueError(f"the inversion was made by a {inv.prediction_type} model, this one is "
                         f"{model.config.schedule.prediction_type}")
    ts = _timesteps(model, inv.steps, inv.strength, "strength")
    shape_ok = inv.latents.ndim == 5 and inv.latents.shape[:2] == (len(inv.z0), len(ts))
    if tuple(ts) != tuple(inv.timesteps) or not shape_ok or inv.latents.shape[2:] != inv.z0.shape[1:]:
        raise ValueError(f"inconsistent inversion: timesteps {inv.timesteps[:2]}..., latents {tuple(inv.latents.shape)}"
                         f", z0 {tuple(inv.z0.shape)} for {inv.steps} steps of strength {inv.strength}")
    return ts


def _check_common(model, steps, guidance, generator, compat) -> None:
    if not isinstance(model, StableDiffusion):
        raise TypeError(f"model must be a StableDiffusion (diffedit.load), got {type(model).__name__}")
    _check_int(steps, "steps", 1)
    _check_number(guidance, "guidance", low=1.0)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if not isinstance(compat, bool):
        raise TypeError(f"diffusers_compat must be True or False, got {compat!r}")


def _check_int(value, name, low) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_number(value, name, low=None, high=None, open_low=False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))
    if ok and low is not None:
        ok = value > low if open_low else value >= low
    if not ok or (high is not None and value > high):
        bounds = f"{'>' if open_low else '>='} {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be a number {bounds}, got {value!r}")


def _check_callback(callback) -> None:
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable (it gets dict(i, t, x, pred_x0)), got {type(callback).__name__}")


def _is_v(model) -> bool:
    return model.config.schedule.prediction_type == "v_prediction"
