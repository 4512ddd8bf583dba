"""Train the toy model of the shapes world from scratch, on CPU:

    python -m diffedit.toy.train --out diffedit/toy/weights [--minutes 75] [--seed 0]

Three phases, each with its own time budget (or a fixed number of steps, which makes a run bit-reproducible):
  (a) the VAE: L1 + MSE reconstruction with a small KL penalty (Rombach et al. 2022, §3.1, without the
      perceptual and adversarial terms, which flat-coloured shapes do not need); then its scaling factor is
      measured as 1 / std of the latents of world images, as SD's 0.18215 was;
  (a2) the decoder alone, on DiffEdit-like latents (the source's latent outside an object mask, an edited
      scene's latent, over-scaled as strong guidance makes it, inside), so that decoding keeps the untouched
      background: otherwise the decoder's GroupNorm statistics, which span the whole image, let an edited
      object tint all of it (`--from MODEL` runs this phase alone on a trained model);
  (b) the text-conditioned latent UNet jointly with the CLIP text encoder: the epsilon loss of DDPM
      (Ho et al. 2020, eq. 14) on SD's noise schedule, with 10% of the captions dropped to the empty prompt
      so the model also learns the unconditional prediction that classifier-free guidance needs
      (Ho & Salimans 2022). EMA weights are what is saved. `--unet-from MODEL` runs this phase alone on a
      trained model, going on with the scenes after those it was trained on (a longer run in two sittings).
Scenes are rendered on the fly from the world (world.py) with the seed. Periodic checkpoints (the full model
folder, EMA weights) go to <out>.work/checkpoint, together with a sample grid; the final model is written to
--out with `StableDiffusion.save` (fp16).

One thread by default: on a machine whose cores are shared, two OpenMP threads were 3-5x slower per step
than one (they spin waiting for each other). `--device cuda --workers 12` trains on a GPU, with
scenes rendered ahead by DataLoader processes (noise and timesteps still come from the CPU generator, so the draws
do not depend on the device); on an H100 a VAE step (batch 64) took 0.03 s, a UNet step (batch 128) 0.09 s.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from diffedit.ddim import add_noise, ddim_sample, timesteps
from diffedit.model import StableDiffusion
from diffedit.text import load_tokenizer, tokenize, write_tokenizer
from diffedit.toy import TOY_CONFIG
from diffedit.toy.world import COLOURS, SHAPES, WORDS, edit_object, heldout_scene, render, to_tensor, training_scene

# Index offsets of the two phases' scenes within the seed's stream.
VAE_STREAM, UNET_STREAM, LOCALITY_STREAM = 0, 10**9, 2 * 10**9
SAMPLE_PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle",
                  "a red square and a blue circle", "a green circle and a yellow triangle"]


def world_batch(seed: int, start: int, count: int) -> tuple[Tensor, list[str]]:
    """Scenes start .. start + count of the stream: images (count, 3, 64, 64) in [0, 1] and captions."""
    scenes = [training_scene(seed, start + i) for i in range(count)]
    return to_tensor(np.stack([render(s)[0] for s in scenes])), [s.caption for s in scenes]


class WorldBatches(torch.utils.data.Dataset):
    """Batch `step` of a phase = scenes offset + step * batch ..: the same batches whether rendered here or by
    DataLoader workers (`--workers`, for a GPU that renders faster than one core can draw)."""

    def __init__(self, seed: int, offset: int, batch: int) -> None:
        self.seed, self.offset, self.batch = seed, offset, batch

    def __len__(self) -> int:
        return 10**8

    def __getitem__(self, step: int) -> tuple[Tensor, list[str]]:
        return world_batch(self.seed, self.offset + step * self.batch, self.batch)


def batches(seed: int, offset: int, batch: int, workers: int) -> Iterator[tuple[Tensor, list[str]]]:
    """The phase's batches in order, step 0, 1, ...; rendered ahead by `workers` processes when > 0."""
    data = WorldBatches(seed, offset, batch)
    if workers == 0:
        return (data[step] for step in range(len(data)))
    loader = torch.utils.data.DataLoader(data, batch_size=None, shuffle=False, num_workers=workers,
                                         prefetch_factor=4, persistent_workers=False)
    return iter(loader)


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Per-image PSNR in dB of images in [0, 1]."""
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return -10 * torch.log10(mse)


def lr_factor(progress: float, warmup: float = 0.03) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak learning rate."""
    if progress < warmup:
        return max(progress / warmup, 0.01)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min((progress - warmup) / (1 - warmup), 1.0)))


class Budget:
    """Progress in [0, 1] of a phase limited by steps and / or minutes (whichever ends first)."""

    def __init__(self, minutes: float | None, steps: int | None) -> None:
        if minutes is None and steps is None:
            raise ValueError("a phase needs a time or a step budget")
        self.minutes, self.steps, self.start = minutes, steps, time.monotonic()

    def progress(self, step: int) -> float:
        parts = []
        if self.steps is not None:
            parts.append(step / self.steps)
        if self.minutes is not None:
            parts.append((time.monotonic() - self.start) / (60 * self.minutes))
        return max(parts)

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---- phase (a): the autoencoder ----------------------------------------------------------------------
def train_vae(model: StableDiffusion, args: argparse.Namespace, generator: torch.Generator) -> int:
    vae = model.vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    budget, step, running = Budget(args.vae_minutes, args.vae_steps), 0, None
    stream = batches(args.seed, VAE_STREAM, args.vae_batch, args.workers)
    while (progress := budget.progress(step)) < 1:
        for group in opt.param_groups:
            group["lr"] = args.vae_lr * lr_factor(progress)
        images, _ = next(stream)
        x = images.to(args.device) * 2 - 1
        posterior = vae.encode(x)
        recon = vae.decode(posterior.sample(generator))
        kl = 0.5 * (posterior.mean.pow(2) + posterior.logvar.exp() - 1 - posterior.logvar).mean()
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        loss = rec + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        running = rec.item() if running is None else 0.95 * running + 0.05 * rec.item()
        if step % 25 == 0:
            log(f"vae step {step} rec {running:.4f} kl {kl.item():.3f} lr {opt.param_groups[0]['lr']:.2e} "
                f"({budget.elapsed() / step:.2f} s/step)")
    vae.eval()
    return step


@torch.no_grad()
def measure_vae(vae: torch.nn.Module, count: int = 256) -> tuple[float, float]:
    """(mean reconstruction PSNR in dB on held-out scenes, 1 / std of their latents (posterior means))."""
    device = next(vae.parameters()).device
    images = to_tensor(np.stack([render(heldout_scene(i))[0] for i in range(count)])).to(device)
    psnrs, latents = [], []
    for chunk in images.split(64):
        z = vae.encode(chunk * 2 - 1).mode()
        latents.append(z)
        psnrs.append(psnr(((vae.decode(z) + 1) / 2).clamp(0, 1), chunk))
    return torch.cat(psnrs).mean().item(), 1.0 / torch.cat(latents).std().item()


# ---- phase (a2): a decoder that keeps the background where the latent keeps it ----------------------------
def locality_batch(args: argparse.Namespace, step: int, rng: np.random.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(source images, edited images, masks (B, 1, 64, 64)): each scene with one object recoloured or reshaped."""
    sources, targets, masks = [], [], []
    for i in range(args.vae_batch):
        scene = training_scene(args.seed, LOCALITY_STREAM + step * args.vae_batch + i)
        j = int(rng.integers(len(scene.objects)))
        obj = scene.objects[j]
        if rng.random() < 0.5:
            edited = edit_object(scene, j, colour=str(rng.choice([c for c in COLOURS if c != obj.colour])))
        else:
            edited = edit_object(scene, j, shape=str(rng.choice([s for s in SHAPES if s != obj.shape])))
        (src, src_masks), (tgt, tgt_masks) = render(scene), render(edited)
        sources.append(src), targets.append(tgt), masks.append(src_masks[j] | tgt_masks[j])
    masks_tensor = torch.from_numpy(np.stack(masks))[:, None].float()
    return to_tensor(np.stack(sources)), to_tensor(np.stack(targets)), masks_tensor


def train_decoder_locality(model: StableDiffusion, args: argparse.Namespace, generator: torch.Generator) -> int:
    """Fine-tune the decoder on DiffEdit-like latents: the source's latent outside a (latent-resolution, dilated)
    object mask, the edited scene's latent inside, there scaled away from the image's mean latent by 1..3x, as
    classifier-free guidance overshoots. The target is the edited image. Without this, the decoder's global
    GroupNorm statistics let an over-saturated edited object tint the whole untouched background.
    The encoder (and so the scaling factor and the UNet's latents) is unchanged."""
    vae = model.vae
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=args.locality_lr, weight_decay=0.0)
    rng = np.random.default_rng([args.seed, 2])
    f = model.config.vae.downsample_factor
    budget, step, running = Budget(args.locality_minutes, args.locality_steps), 0, None
    vae.decoder.train()
    while (progress := budget.progress(step)) < 1:
        for group in opt.param_groups:
            group["lr"] = args.locality_lr * lr_factor(progress)
        src, tgt, mask = (x.to(args.device) for x in locality_batch(args, step, rng))
        with torch.no_grad():
            z_src, z_tgt = vae.encode(src * 2 - 1).mode(), vae.encode(tgt * 2 - 1).mode()
            m = F.max_pool2d(F.max_pool2d(mask, f), 3, 1, 1)  # like a DiffEdit mask: latent cells, a little larger
            mean = z_src.mean((2, 3), keepdim=True)
            scale = 1 + 2 * torch.rand(len(src), 1, 1, 1, generator=generator)
            scale = torch.where(torch.rand(len(src), 1, 1, 1, generator=generator) < 0.25, 1.0, scale).to(args.device)
            z = z_src * (1 - m) + (mean + scale * (z_tgt - mean)) * m
        recon = vae.decode(z)
        x = tgt * 2 - 1
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        rec.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        running = rec.item() if running is None else 0.95 * running + 0.05 * rec.item()
        if step % 25 == 0:
            log(f"decoder step {step} rec {running:.4f} ({budget.elapsed() / step:.2f} s/step)")
    vae.eval()
    return step


# ---- phase (b): the UNet and the text encoder ----------------------------------------------------------
def train_unet(model: StableDiffusion, args: argparse.Namespace, generator: torch.Generator, work: Path,
               first_scene: int = 0) -> tuple[int, float]:
    """Phase (b) on the UNet stream's scenes from `first_scene` on (a continued run skips those already seen)."""
    unet, text = model.unet.train(), model.text_encoder.train()
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=0.01)
    ema = [p.detach().clone() for p in params]
    budget, step, running = Budget(args.unet_minutes, args.unet_steps), 0, None
    last_checkpoint = time.monotonic()
    token_cache: dict[str, Tensor] = {}

    def ids_of(captions: list[str]) -> Tensor:
        for c in set(captions) - set(token_cache):
            token_cache[c] = tokenize(model.tokenizer, [c], model.config.text.max_length)[0]
        return torch.stack([token_cache[c] for c in captions]).to(args.device)

    stream = batches(args.seed, UNET_STREAM + first_scene, args.unet_batch, args.workers)

    while (progress := budget.progress(step)) < 1:
        for group in opt.param_groups:
            group["lr"] = args.unet_lr * lr_factor(progress)
        images, captions = next(stream)
        drop = torch.rand(len(captions), generator=generator) < args.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        with torch.no_grad():
            z0 = model.vae.encode(images.to(args.device) * 2 - 1).mode() * model.config.vae.scaling_factor
        # noise and timesteps from the CPU generator: the same draws on any device
        noise = torch.randn(z0.shape, generator=generator).to(args.device)
        t = torch.randint(0, model.schedule.num_train_timesteps, (len(z0),), generator=generator)
        x_t = add_noise(model.schedule, z0, noise, t)
        context = text(ids_of(captions)).last_hidden_state
        loss = F.mse_loss(unet(x_t, t.to(args.device), context), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 25 == 0:
            log(f"unet step {step} loss {running:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"({budget.elapsed() / step:.2f} s/step, {100 * progress:.0f}%)")
        if time.monotonic() - last_checkpoint > 60 * args.checkpoint_minutes:
            checkpoint(model, params, ema, work, step, running)
            last_checkpoint = time.monotonic()
    with torch.no_grad():  # keep the EMA weights
        for e, p in zip(ema, params):
            p.copy_(e)
    unet.eval(), text.eval()
    return step, float(running if running is not None else float("nan"))


def checkpoint(
    model: StableDiffusion, params: list[Tensor], ema: list[Tensor], work: Path, step: int, loss: float
) -> None:
    """Write the model with its EMA weights to work/checkpoint, and a sample grid beside it."""
    with torch.no_grad():
        current = [p.detach().clone() for p in params]
        for e, p in zip(ema, params):
            p.copy_(e)
        model.provenance = {"source": "checkpoint of diffedit.toy.train", "unet_steps": step, "loss": loss}
        model.eval()
        model.save(work / "checkpoint", force=True)
        grid = sample(model, SAMPLE_PROMPTS, torch.Generator().manual_seed(0), steps=25)
        save_grid(grid, work / f"samples_{step:06d}.png")
        for c, p in zip(current, params):
            p.copy_(c)
    model.unet.train(), model.text_encoder.train()
    log(f"checkpoint at step {step} -> {work / 'checkpoint'}")


# ---- sampling, for checks ----------------------------------------------------------------------------
@torch.no_grad()
def sample(
    model: StableDiffusion, prompts: list[str], generator: torch.Generator, steps: int = 50, guidance: float = 5.0
) -> Tensor:
    """Text-to-image with DDIM (eta = 0) and classifier-free guidance: images (B, 3, 64, 64) in [0, 1]."""
    cond = model.encode_prompt(prompts)
    uncond = model.encode_prompt([""] * len(prompts))
    size = model.config.image_size // model.config.vae.downsample_factor
    x = torch.randn((len(prompts), model.config.unet.in_channels, size, size), generator=generator)
    x = x.to(model.device, model.dtype)
    # the raw output (eps or v): ddim_sample reads it by the model's prediction type
    denoise = lambda x, t: model.unet_output(x, t, cond, uncond, guidance)  # noqa: E731
    return model.decode_latents(ddim_sample(model.schedule, denoise, x, timesteps(model.schedule, steps)))


def save_grid(images: Tensor, path: Path, scale: int = 4) -> None:
    from PIL import Image

    row = (images.detach().cpu().clamp(0, 1) * 255).round().byte().permute(2, 0, 3, 1).reshape(images.shape[2], -1, 3)
    Image.fromarray(row.numpy()).resize((row.shape[1] * scale, row.shape[0] * scale), Image.NEAREST).save(path)


# ---- the whole run -----------------------------------------------------------------------------------
def build_model(seed: int) -> StableDiffusion:
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="diffedit-toy-") as tmp:
        vocab = write_tokenizer(tmp, WORDS, pad_token=TOY_CONFIG.text.pad_token)
        if vocab != TOY_CONFIG.text.vocab_size:
            raise RuntimeError(
                f"the world's tokenizer has {vocab} tokens; update TOY_VOCAB_SIZE ({TOY_CONFIG.text.vocab_size})"
            )
        tokenizer = load_tokenizer(tmp, TOY_CONFIG.text)
    return StableDiffusion(TOY_CONFIG, tokenizer)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffedit.toy.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="model folder to write (replaced if it exists)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="time budget of phases (a) and (b), split 2:13 "
                             "(default 10 + 65 minutes; (a2) has its own, 6)")
    parser.add_argument("--vae-minutes", type=float, default=None)
    parser.add_argument("--unet-minutes", type=float, default=None)
    parser.add_argument("--vae-steps", type=int, default=None, help="a fixed step count (reproducible run)")
    parser.add_argument("--unet-steps", type=int, default=None, help="a fixed step count (reproducible run)")
    parser.add_argument("--locality-minutes", type=float, default=None, help="phase (a2), default 6 minutes")
    parser.add_argument("--locality-steps", type=int, default=None)
    parser.add_argument("--locality-lr", type=float, default=3e-4)
    parser.add_argument("--from", dest="start_from", type=Path, default=None,
                        help="start from this model folder and run phase (a2) only (its UNet and encoder are kept)")
    parser.add_argument("--unet-from", type=Path, default=None,
                        help="start from this model folder and run phase (b) only, continuing its UNet and text "
                             "encoder on the scenes after those it has seen (its VAE is kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: the same recipe, faster")
    parser.add_argument("--workers", type=int, default=0,
                        help="processes rendering scenes ahead (0: in the training loop; a GPU needs several)")
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-5)
    parser.add_argument("--unet-batch", type=int, default=64)
    parser.add_argument("--unet-lr", type=float, default=1e-3)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--ema", type=float, default=0.998)
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--work", type=Path, default=None, help="checkpoints and sample grids (default <out>.work)")
    args = parser.parse_args(argv)
    total = args.minutes
    if args.vae_minutes is None and args.vae_steps is None:
        args.vae_minutes = total * 2 / 15 if total is not None else 10.0
    if args.unet_minutes is None and args.unet_steps is None:
        args.unet_minutes = total * 13 / 15 if total is not None else 65.0

    if args.locality_minutes is None and args.locality_steps is None:
        args.locality_minutes = 6.0
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    work = args.work or args.out.with_name(args.out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    generator = torch.Generator().manual_seed(args.seed)
    if args.start_from is not None and args.unet_from is not None:
        raise SystemExit("--from and --unet-from each run one phase: pass one of them")
    if args.unet_from is not None:  # phase (b) only, continuing a trained model
        from diffedit.model import load

        model = load(args.unet_from, device=args.device)
        provenance = model.provenance
        # a model this script trained says how many scenes it saw; any other starts the stream from its beginning
        done = int(provenance.get("unet_steps", 0))
        seen = done * int(provenance.get("settings", {}).get("unet_batch", args.unet_batch))
        log(f"phase (b), continued from step {done}: {args.unet_minutes} min / {args.unet_steps} steps")
        unet_steps, loss = train_unet(model, args, generator, work, first_scene=seen)
        provenance["unet_continued"] = provenance.get("unet_continued", []) + [dict(
            steps=unet_steps, loss=round(loss, 4), minutes=round((time.monotonic() - started) / 60, 1),
            settings={k: str(v) for k, v in vars(args).items() if k not in ("out", "work")})]
        provenance["unet_steps"] = done + unet_steps
        provenance["unet_loss"] = round(loss, 4)
        provenance["minutes"] = round(provenance.get("minutes", 0.0) + (time.monotonic() - started) / 60, 1)
        log(f"UNet: {unet_steps} more steps, final loss (running mean) {loss:.4f}")
        model.provenance = provenance
        model.save(args.out, force=True, dtype=torch.float16)
        save_grid(sample(model, SAMPLE_PROMPTS, torch.Generator().manual_seed(0)), work / "samples_final.png")
        log(f"wrote {args.out}")
        return
    if args.start_from is not None:  # phase (a2) only, on a trained model
        from diffedit.model import load

        model = load(args.start_from, device=args.device)
        provenance = model.provenance
        log(f"phase (a2): decoder locality, {args.locality_minutes} min / {args.locality_steps} steps")
        provenance["decoder_locality_steps"] = train_decoder_locality(model, args, generator)
        provenance["vae_psnr_db"] = round(measure_vae(model.vae)[0], 2)
        provenance["decoder_locality_settings"] = {k: str(v) for k, v in vars(args).items() if k.startswith("locality")}
        provenance["minutes"] = round(provenance["minutes"] + (time.monotonic() - started) / 60, 1)
        log(f"decoder: {provenance['decoder_locality_steps']} steps, held-out PSNR {provenance['vae_psnr_db']} dB")
        model.provenance = provenance
        model.save(args.out, force=True, dtype=torch.float16)
        log(f"wrote {args.out}")
        return
    model = build_model(args.seed).to(args.device)

    log(f"phase (a): VAE, {args.vae_minutes} min / {args.vae_steps} steps")
    vae_steps = train_vae(model, args, generator)
    vae_psnr, scaling = measure_vae(model.vae)
    vae_config = dataclasses.replace(model.config.vae, scaling_factor=round(scaling, 5))
    model.config = dataclasses.replace(model.config, vae=vae_config)
    log(f"VAE: {vae_steps} steps, held-out PSNR {vae_psnr:.2f} dB, scaling factor {scaling:.5f}")
    log(f"phase (a2): decoder locality, {args.locality_minutes} min / {args.locality_steps} steps")
    locality_steps = train_decoder_locality(model, args, generator)
    vae_psnr = measure_vae(model.vae)[0]
    log(f"decoder: {locality_steps} steps, held-out PSNR {vae_psnr:.2f} dB")

    log(f"phase (b): UNet + text encoder, {args.unet_minutes} min / {args.unet_steps} steps")
    unet_steps, loss = train_unet(model, args, generator, work)
    minutes = (time.monotonic() - started) / 60
    log(f"UNet: {unet_steps} steps, final loss (running mean) {loss:.4f}; total {minutes:.1f} min")

    model.provenance = {
        "source": "trained by diffedit.toy.train",
        "seed": args.seed,
        "vae_steps": vae_steps,
        "decoder_locality_steps": locality_steps,
        "unet_steps": unet_steps,
        "minutes": round(minutes, 1),
        "vae_psnr_db": round(vae_psnr, 2),
        "unet_loss": round(loss, 4),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work")},
        "torch": torch.__version__,
    }
    settings = model.provenance["settings"]
    settings["vae_steps"], settings["locality_steps"], settings["unet_steps"] = vae_steps, locality_steps, unet_steps
    model.save(args.out, force=True, dtype=torch.float16)
    save_grid(sample(model, SAMPLE_PROMPTS, torch.Generator().manual_seed(0)), work / "samples_final.png")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
