"""The KL-regularised autoencoder of Stable Diffusion (images <-> 8x smaller, 4-channel latents).

References:
- Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models" (arXiv 2112.10752), §3.1
  and App. G: the perceptual-compression autoencoder with a slight KL penalty.
- Kingma & Welling 2014, "Auto-Encoding Variational Bayes" (arXiv 1312.6114): the diagonal Gaussian posterior
  and its reparameterised sample.
- Esser et al. 2021, "Taming Transformers" (arXiv 2012.09841): the encoder / decoder architecture it reuses.

Scaling: `encode` returns the posterior of the raw latent z and `decode` takes a raw z. The diffusion model works
on `to_latent(z) = z * config.scaling_factor` (unit variance); `from_latent` undoes it before decoding. The
caller applies them, so encode/decode stay the plain autoencoder.

Module tree: encoder.{in_conv, down[i].res[j], down[i].downsample, mid.{res1, attn, res2}, out_norm, out_conv},
quant_conv, post_quant_conv, decoder.{in_conv, mid, up[i].res[j], up[i].upsample, out_norm, out_conv}
(decoder.up in execution order: up[0] is the coarsest level).

Large inputs: `encode` and `decode` show a tqdm bar, one tick per block, above PROGRESS_PIXELS image pixels
(`progress=` forces it on or off). They are not tiled: every GroupNorm normalises over the whole image, so tiles
would change the output; a bar changes nothing (the same modules run in the same order, bit for bit).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from diffedit.configs import VAEConfig
from diffedit.noise import randn
from diffedit.unet import Attention, Downsample, ResBlock, Upsample, to_feature_map, to_tokens

EPS = 1e-6  # every GroupNorm of the released autoencoder uses this epsilon
# Above this many image pixels an SD encode or decode takes seconds even on an accelerator (minutes on a CPU).
PROGRESS_PIXELS = 1024 * 1024

Tick = Callable[[], object]  # called once after each block: a progress bar's update


def _no_tick() -> None:
    pass


class SpatialSelfAttention(Attention):
    """Single-head self-attention over all pixels with a GroupNorm in front and a residual around it."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__(channels, heads=1, qkv_bias=True)
        self.norm = nn.GroupNorm(groups, channels, eps=EPS)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return x + to_feature_map(super().forward(to_tokens(self.norm(x))), x.shape[-2:])


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.res1 = ResBlock(channels, channels, None, groups, EPS)
        self.attn = SpatialSelfAttention(channels, groups)
        self.res2 = ResBlock(channels, channels, None, groups, EPS)
        self.steps = 3  # ticks of the progress bar

    def forward(self, x: Tensor, tick: Tick = _no_tick) -> Tensor:
        for block in (self.res1, self.attn, self.res2):
            x = block(x)
            tick()
        return x


class Level(nn.Module):
    """Res blocks at one resolution, then optionally a change of resolution."""

    def __init__(self, in_ch: int, out_ch: int, blocks: int, groups: int, downsample: bool = False,
                 upsample: bool = False) -> None:
        super().__init__()
        self.res = nn.ModuleList(
            ResBlock(in_ch if j == 0 else out_ch, out_ch, None, groups, EPS) for j in range(blocks)
        )
        self.downsample = Downsample(out_ch, asymmetric_padding=True) if downsample else None
        self.upsample = Upsample(out_ch) if upsample else None
        self.steps = blocks + downsample + upsample  # ticks of the progress bar

    def forward(self, x: Tensor, tick: Tick = _no_tick) -> Tensor:
        for res in self.res:
            x = res(x)
            tick()
        for resample in (self.downsample, self.upsample):
            if resample is not None:
                x = resample(x)
                tick()
        return x


class Encoder(nn.Module):
    """Image -> mean and log-variance of the latent (2 * latent_channels maps, before quant_conv)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        ch, groups, levels = config.channels, config.norm_groups, len(config.channels)
        self.in_conv = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList(
            Level(ch[max(i - 1, 0)], ch[i], config.layers_per_block, groups, downsample=i < levels - 1)
            for i in range(levels)
        )
        self.mid = MidBlock(ch[-1], groups)
        self.out_norm = nn.GroupNorm(groups, ch[-1], eps=EPS)
        self.out_conv = nn.Conv2d(ch[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: Tensor, progress: bool = False) -> Tensor:
        with _bar(self, "VAE encode", progress) as bar:
            h = self.in_conv(x)
            for level in self.down:
                h = level(h, bar.update)
            return self.out_conv(F.silu(self.out_norm(self.mid(h, bar.update))))


class Decoder(nn.Module):
    """Latent -> image; mirrors the encoder with one extra res block per level."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        ch, groups, levels = config.channels, config.norm_groups, len(config.channels)
        self.in_conv = nn.Conv2d(config.latent_channels, ch[-1], 3, padding=1)
        self.mid = MidBlock(ch[-1], groups)
        self.up = nn.ModuleList(
            Level(ch[min(i + 1, levels - 1)], ch[i], config.layers_per_block + 1, groups, upsample=i > 0)
            for i in reversed(range(levels))
        )
        self.out_norm = nn.GroupNorm(groups, ch[0], eps=EPS)
        self.out_conv = nn.Conv2d(ch[0], config.in_channels, 3, padding=1)

    def forward(self, z: Tensor, progress: bool = False) -> Tensor:
        with _bar(self, "VAE decode", progress) as bar:
            h = self.mid(self.in_conv(z), bar.update)
            for level in self.up:
                h = level(h, bar.update)
            return self.out_conv(F.silu(self.out_norm(h), inplace=not torch.is_grad_enabled()))  # see ResBlock


def _bar(network: Encoder | Decoder, desc: str, enabled: bool) -> tqdm:
    """One tick per res block, attention block and resampling conv of `network`."""
    total = sum(m.steps for m in network.modules() if isinstance(m, (Level, MidBlock)))
    return tqdm(total=total, desc=desc, unit="block", disable=not enabled, leave=False)


@dataclass(frozen=True)
class DiagonalGaussian:
    """The posterior q(z | x) = N(mean, exp(logvar)), per latent element."""

    mean: Tensor
    logvar: Tensor

    @staticmethod
    def from_moments(moments: Tensor) -> "DiagonalGaussian":
        mean, logvar = moments.chunk(2, dim=1)
        # The clamp keeps exp() finite for untrained or extreme inputs; the released weights never reach it.
        return DiagonalGaussian(mean, logvar.clamp(-30.0, 20.0))

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """mean + std * noise (reparameterisation). The noise is drawn with one torch.randn call on the
        generator's device, exactly as diffusers does, so the same generator state gives the same bits."""
        return self.mean + self.std * randn(self.mean.shape, generator, self.mean)

    def mode(self) -> Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        # 1x1 convs named after the VQGAN's codebook quantiser they replaced; here they only mix the moments / latents.
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)
        self.decoder = Decoder(config)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "AutoencoderKL":
        """.to() / .half() / .cuda() all come here. With `force_upcast` (SDXL's VAE overflows in fp16) the floats
        move to the device asked for and are fp32: `fn` is probed on an empty tensor for its target, so no weight
        makes a lossy round trip through the low precision."""
        if not self.config.force_upcast:
            return super()._apply(fn, recurse)

        def keep_fp32(t: Tensor) -> Tensor:
            if not t.is_floating_point():
                return fn(t)
            if t.is_meta:  # no values to lose (to_empty, or a meta model being moved)
                return fn(t).float()
            return t.to(fn(torch.empty(0, dtype=t.dtype, device=t.device)).device, torch.float32)

        return super()._apply(keep_fp32, recurse)

    def encode(self, images: Tensor, *, progress: bool | None = None) -> DiagonalGaussian:
        """images: (B, in_channels, H, W) in [-1, 1], H and W multiples of the downsample factor (any multiple:
        e.g. 72 x 88). progress: a bar per block; None shows it above PROGRESS_PIXELS pixels."""
        c = self.config
        f = c.downsample_factor
        if images.ndim != 4 or images.shape[1] != c.in_channels:
            raise ValueError(f"images must be (batch, {c.in_channels}, height, width), got {tuple(images.shape)}")
        if images.shape[2] % f or images.shape[3] % f:
            raise ValueError(f"image height and width must be multiples of {f}, got {tuple(images.shape[2:])}")
        if progress is None:
            progress = images.shape[2] * images.shape[3] > PROGRESS_PIXELS
        return DiagonalGaussian.from_moments(self.quant_conv(self.encoder(images, progress)))

    def decode(self, z: Tensor, *, progress: bool | None = None) -> Tensor:
        """z: raw (unscaled) latents (B, latent_channels, h, w), any h and w -> images in about [-1, 1] (not
        clamped). progress: a bar per block; None shows it above PROGRESS_PIXELS pixels of the decoded image."""
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"latents must be (batch, {self.config.latent_channels}, h, w), got {tuple(z.shape)}")
        if progress is None:
            progress = z.shape[2] * z.shape[3] * self.config.downsample_factor**2 > PROGRESS_PIXELS
        return self.decoder(self.post_quant_conv(z), progress)

    def to_latent(self, z: Tensor) -> Tensor:
        """Raw autoencoder latent -> the unit-variance latent the diffusion model works on."""
        return z * self.config.scaling_factor

    def from_latent(self, latent: Tensor) -> Tensor:
        """Diffusion latent -> raw autoencoder latent, ready for `decode`."""
        return latent / self.config.scaling_factor
