"""The Stable Diffusion noise-prediction UNet, in plain PyTorch.

References:
- Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models" (arXiv 2112.10752):
  the latent UNet with cross-attention to text (Fig. 3, App. E).
- Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (arXiv 2006.11239): the residual UNet with
  GroupNorm, SiLU and a timestep embedding added inside each res block.
- Vaswani et al. 2017, "Attention Is All You Need" (arXiv 1706.03762): scaled dot-product attention and the
  sinusoidal position (here: timestep) embedding.
- Shazeer 2020, "GLU Variants Improve Transformer" (arXiv 2002.05202): the GEGLU feed-forward.
- Podell et al. 2023, "SDXL" (arXiv 2307.01952): per-level transformer depth and the added conditioning (pooled
  text embedding and six size numbers, §2.2) summed into the time embedding.

Layout of the module tree (the state-dict names are ours; `weights_convert.diffusers` maps diffusers' names):

    time_embed.linear1/linear2              sinusoidal features of t -> 2-layer SiLU MLP
    add_embed.linear1/linear2               SDXL only: [pooled text; sinusoidal features of 6 sizes] -> MLP
    in_conv
    down[i].res[j], down[i].attn[j]          level i, from the finest resolution to the coarsest
    down[i].downsample                      all levels but the last
    mid.res1, mid.attn, mid.res2
    up[i].res[j], up[i].attn[j]              in execution order: up[0] is the coarsest level (mirrors down[-1])
    up[i].upsample                          all up levels but the last
    out_norm, out_conv

Attention maps can be read or edited with an explicit `attention_hook` argument (prompt-to-prompt style):
`hook(probs, is_cross, place)` gets the softmax probabilities, shape (batch, heads, queries, keys), and may
return replacement probabilities. `place` is the attention module's path in the UNet, e.g.
"down.1.attn.0.blocks.0.cross_attn", so `unet.get_submodule(place)` finds it.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffedit.configs import UNetConfig
from diffedit.conv import Conv2d, upsample_conv, upsample_conv_pays

AttentionHook = Callable[[Tensor, bool, str], "Tensor | None"]
SIZES = 6  # SDXL's size conditioning: original (h, w), crop top-left (top, left), target (h, w)


def timestep_features(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features [cos(t w_k), sin(t w_k)], w_k = max_period^(-k / (dim/2)) (Vaswani et al. §3.5).

    SD was trained with cos first ("flip_sin_to_cos") and no frequency shift; the order matters for the weights.
    Computed in fp32 whatever the model dtype: t reaches 999 and fp16 would lose the high frequencies.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t[:, None].float() * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def to_tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) feature map -> (B, H*W, C) tokens, one per pixel, row-major."""
    return x.flatten(2).transpose(1, 2)


def to_feature_map(tokens: Tensor, size: torch.Size | tuple[int, int]) -> Tensor:
    """Inverse of `to_tokens`."""
    return tokens.transpose(1, 2).unflatten(2, tuple(size))


class EmbeddingMLP(nn.Module):
    """Features -> Linear -> SiLU -> Linear: the time embedding (from the timestep's sinusoidal features) and
    SDXL's added embedding (from the pooled text and the sizes' features)."""

    def __init__(self, in_features: int, dim: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(in_features, dim)
        self.linear2 = nn.Linear(dim, dim)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear2(F.silu(self.linear1(features.to(self.linear1.weight.dtype))))


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, with the (projected) timestep embedding added in between (Ho et al.).

    Without `time_dim` it is the VAE's res block. A 1x1 conv matches the shortcut's width when it changes.
    """

    def __init__(self, in_ch: int, out_ch: int, time_dim: int | None, groups: int, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_ch) if time_dim is not None else None
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        # Without autograd, SiLU overwrites the GroupNorm output it reads and the shortcut is added into h: two
        # activation-sized buffers fewer at the peak (a 256x256 VAE decode peaks in these blocks); same values.
        inplace = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        if self.time_proj is not None:
            if emb is None:
                raise ValueError("this res block needs a timestep embedding")
            # One scalar per channel: the timestep shifts every feature map uniformly.
            h = h + self.time_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h), inplace=inplace))
        return h.add_(self.skip(x)) if inplace else self.skip(x) + h


class Attention(nn.Module):
    """Multi-head scaled dot-product attention over token sequences (Vaswani et al. §3.2).

    Self-attention when `context` is None, cross-attention to `context` (the text embeddings) otherwise.
    `place` is set by the owning network to this module's path, and handed to attention hooks.
    """

    def __init__(
        self, dim: int, heads: int, context_dim: int | None = None, qkv_bias: bool = False, upcast: bool = False
    ) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.upcast = upcast
        self.place = ""
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(context_dim or dim, dim, bias=qkv_bias)
        self.v = nn.Linear(context_dim or dim, dim, bias=qkv_bias)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None, hook: AttentionHook | None = None) -> Tensor:
        source = x if context is None else context
        split_heads = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, N, h*d) -> (B, h, N, d)
        q, k, v = split_heads(self.q(x)), split_heads(self.k(source)), split_heads(self.v(source))
        dtype = q.dtype
        if self.upcast and dtype in (torch.float16, torch.bfloat16):
            # SD 2.1-v's q.k logits overflow fp16; the whole attention is computed in fp32 instead.
            q, k, v = q.float(), k.float(), v.float()
        edited = None
        if hook is not None:  # the probabilities made explicit for the hook (the fused kernel never forms them)
            probs = torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1)
            edited = hook(probs, context is not None, self.place)
            if edited is not None and edited.shape != probs.shape:
                raise ValueError(f"attention hook at {self.place} returned shape {tuple(edited.shape)}, "
                                 f"expected {tuple(probs.shape)}")
        if edited is None:  # no hook, or one that only reads: the fused kernel, so the output is bit-identical
            out = F.scaled_dot_product_attention(q, k, v)  # default scale d^-0.5; fused, no probs tensor
        else:
            out = edited.to(q.dtype) @ v
        return self.out(out.to(dtype).transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    """GEGLU feed-forward (Shazeer 2020): x -> W_out (a * GELU(g)), [a, g] = W_proj x, inner width 4 * dim."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * 4 * dim)
        self.out = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(a * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention over pixels, cross-attention to the text, feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int, upcast: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, heads, context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, context: Tensor, hook: AttentionHook | None) -> Tensor:
        x = x + self.self_attn(self.norm1(x), hook=hook)
        x = x + self.cross_attn(self.norm2(x), context, hook=hook)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Feature map -> tokens (one per pixel) -> transformer blocks -> feature map, added to the input."""

    def __init__(self, channels: int, heads: int, depth: int, config: UNetConfig) -> None:
        super().__init__()
        # eps 1e-6 (not config.norm_eps) is what the released weights were trained with.
        self.norm = nn.GroupNorm(config.norm_groups, channels, eps=1e-6)
        # A 1x1 conv (SD 1.x) and a Linear on the tokens (SD 2.x) are the same map; only the weight shape differs.
        self.linear = config.linear_projection
        if self.linear:
            self.proj_in = nn.Linear(channels, channels)
        else:
            self.proj_in = Conv2d(channels, channels, 1)
        self.blocks = nn.ModuleList(
            TransformerBlock(channels, heads, config.cross_attention_dim, config.upcast_attention)
            for _ in range(depth)
        )
        if self.linear:
            self.proj_out = nn.Linear(channels, channels)
        else:
            self.proj_out = Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, context: Tensor, hook: AttentionHook | None) -> Tensor:
        size = x.shape[-2:]
        y = self.norm(x)
        y = self.proj_in(to_tokens(y)) if self.linear else to_tokens(self.proj_in(y))
        for block in self.blocks:
            y = block(y, context, hook)
        y = to_feature_map(self.proj_out(y), size) if self.linear else self.proj_out(to_feature_map(y, size))
        return x + y


class Downsample(nn.Module):
    """Stride-2 3x3 conv. The VAE pads only right and bottom (its original code did), the UNet both sides."""

    def __init__(self, channels: int, asymmetric_padding: bool = False) -> None:
        super().__init__()
        self.asymmetric_padding = asymmetric_padding
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric_padding else 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.asymmetric_padding else x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv (avoids the checkerboard artefacts of transposed convs)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, ...] | None = None) -> Tensor:
        """`size`: the skip connection's (h, w) where it is not twice x's (an odd size was halved, rounding up)."""
        if size is None or tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1]):
            if upsample_conv_pays(x, self.conv):  # the same conv at x's resolution: under half the work (conv.py)
                return upsample_conv(x, self.conv.weight, self.conv.bias)
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))  # as diffusers' upsample_size


def _res_block(config: UNetConfig, in_ch: int, out_ch: int) -> ResBlock:
    return ResBlock(in_ch, out_ch, config.time_embed_dim, config.norm_groups, config.norm_eps)


def _transformers(config: UNetConfig, level: int, channels: int, count: int) -> nn.ModuleList:
    """One transformer after each of the `count` res blocks of an attention level; none elsewhere."""
    count = count if config.attention[level] else 0
    depth = config.transformer_depth[level]
    return nn.ModuleList(SpatialTransformer(channels, config.heads[level], depth, config) for _ in range(count))


class DownLevel(nn.Module):
    """Res blocks (each followed by a transformer on attention levels), then an optional downsample.

    Returns the output and the skip tensors the up path concatenates: one per res block and one after the downsample.
    """

    def __init__(self, in_ch: int, out_ch: int, level: int, config: UNetConfig, downsample: bool) -> None:
        super().__init__()
        n = config.layers_per_block
        self.res = nn.ModuleList(_res_block(config, in_ch if j == 0 else out_ch, out_ch) for j in range(n))
        self.attn = _transformers(config, level, out_ch, n)
        self.downsample = Downsample(out_ch) if downsample else None

    def forward(
        self, x: Tensor, emb: Tensor, context: Tensor, hook: AttentionHook | None
    ) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for j, res in enumerate(self.res):
            x = res(x, emb)
            if self.attn:
                x = self.attn[j](x, context, hook)
            skips.append(x)
        if self.downsample is not None:
            x = self.downsample(x)
            skips.append(x)
        return x, skips


class UpLevel(nn.Module):
    """layers_per_block + 1 res blocks, each fed the input concatenated with one skip from the down path."""

    def __init__(
        self, in_ch: int, skip_chs: list[int], out_ch: int, level: int, config: UNetConfig, upsample: bool
    ) -> None:
        super().__init__()
        self.res = nn.ModuleList(
            _res_block(config, (in_ch if j == 0 else out_ch) + skip, out_ch) for j, skip in enumerate(skip_chs)
        )
        self.attn = _transformers(config, level, out_ch, len(skip_chs))
        self.upsample = Upsample(out_ch) if upsample else None

    def forward(
        self, x: Tensor, skips: list[Tensor], emb: Tensor, context: Tensor, hook: AttentionHook | None
    ) -> Tensor:
        """Consumes (pops) its skip tensors from the end of `skips`."""
        for j, res in enumerate(self.res):
            x = res(torch.cat([x, skips.pop()], dim=1), emb)
            if self.attn:
                x = self.attn[j](x, context, hook)
        # up to the size of the next level's skip: any latent size works, not only multiples of 2^levels
        return self.upsample(x, skips[-1].shape[-2:]) if self.upsample is not None else x


class MidBlock(nn.Module):
    def __init__(self, channels: int, config: UNetConfig) -> None:
        super().__init__()
        self.res1 = _res_block(config, channels, channels)
        # The bottleneck always attends, with the last level's head count and depth, even where that level does not.
        self.attn = SpatialTransformer(channels, config.heads[-1], config.transformer_depth[-1], config)
        self.res2 = _res_block(config, channels, channels)

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, hook: AttentionHook | None) -> Tensor:
        return self.res2(self.attn(self.res1(x, emb), context, hook), emb)


class UNet(nn.Module):
    """eps (or v) prediction for latents x at timestep t, conditioned on text embeddings `context`."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        ch = config.channels
        levels = len(ch)
        self.time_embed = EmbeddingMLP(ch[0], config.time_embed_dim)
        if config.added_conditioning:
            self.add_embed = EmbeddingMLP(config.pooled_text_dim + SIZES * config.size_embed_dim, config.time_embed_dim)
        self.in_conv = Conv2d(config.in_channels, ch[0], 3, padding=1)

        # Track the width of every skip tensor the down path emits; the up path consumes them in reverse.
        skip_chs = [ch[0]]
        self.down = nn.ModuleList()
        for i in range(levels):
            last = i == levels - 1
            self.down.append(DownLevel(ch[max(i - 1, 0)], ch[i], i, config, downsample=not last))
            skip_chs += [ch[i]] * (config.layers_per_block + (0 if last else 1))

        self.mid = MidBlock(ch[-1], config)

        self.up = nn.ModuleList()
        in_ch = ch[-1]
        for level in reversed(range(levels)):
            level_skips = [skip_chs.pop() for _ in range(config.layers_per_block + 1)]
            self.up.append(UpLevel(in_ch, level_skips, ch[level], level, config, upsample=level > 0))
            in_ch = ch[level]

        self.out_norm = nn.GroupNorm(config.norm_groups, ch[0], eps=config.norm_eps)
        self.out_conv = Conv2d(ch[0], config.out_channels, 3, padding=1)

        # Each attention module learns its own path once, so hooks get stable, readable places.
        for name, module in self.named_modules():
            if isinstance(module, Attention):
                module.place = name

    def forward(
        self, x: Tensor, t: Tensor | int, context: Tensor, attention_hook: AttentionHook | None = None, *,
        pooled: Tensor | None = None, sizes: Tensor | None = None,
    ) -> Tensor:
        """x: (B, in_channels, h, w) latents, any h and w (odd sizes are halved rounding up, and each up level
        returns to its skip's size, as diffusers does); t: an int, a 0-d or a (B,) tensor of timesteps;
        context: (B, tokens, cross_attention_dim) text embeddings. SDXL also takes `pooled` (B, pooled_text_dim),
        the pooled text embedding, and `sizes` (B, 6): original (h, w), crop (top, left), target (h, w) in pixels.
        Returns the prediction, shaped like x."""
        t = self._check_inputs(x, t, context, pooled, sizes)
        emb = self.time_embed(timestep_features(t, self.config.channels[0]))
        if self.config.added_conditioning:  # SDXL §2.2: the conditioning is summed into the time embedding
            size_features = timestep_features(sizes.reshape(-1), self.config.size_embed_dim).reshape(len(x), -1)
            emb = emb + self.add_embed(torch.cat([pooled.float(), size_features], dim=1))
        h = self.in_conv(x)
        skips = [h]
        for level in self.down:
            h, level_skips = level(h, emb, context, attention_hook)
            skips += level_skips
        h = self.mid(h, emb, context, attention_hook)
        for level in self.up:
            h = level(h, skips, emb, context, attention_hook)
        return self.out_conv(F.silu(self.out_norm(h)))

    def _check_inputs(
        self, x: Tensor, t: Tensor | int, context: Tensor, pooled: Tensor | None, sizes: Tensor | None
    ) -> Tensor:
        """Validate shapes with readable messages; return t as a (B,) tensor."""
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"x must be (batch, {c.in_channels}, height, width), got {tuple(x.shape)}")
        batch = x.shape[0]
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != c.cross_attention_dim:
            raise ValueError(
                f"context must be ({batch}, tokens, {c.cross_attention_dim}), got {tuple(context.shape)}"
            )
        if c.added_conditioning:
            if pooled is None or pooled.shape != (batch, c.pooled_text_dim):
                raise ValueError(f"this UNet needs pooled text embeddings ({batch}, {c.pooled_text_dim}), got "
                                 f"{None if pooled is None else tuple(pooled.shape)}")
            if sizes is None or sizes.shape != (batch, SIZES):
                raise ValueError(f"this UNet needs size conditioning ({batch}, {SIZES}), got "
                                 f"{None if sizes is None else tuple(sizes.shape)}")
        elif pooled is not None or sizes is not None:
            raise ValueError("this UNet takes no pooled embedding or size conditioning (an SD 1.x / 2.x model)")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, batch)):
            raise ValueError(f"t must be a number or a ({batch},) tensor, got shape {tuple(t.shape)}")
        return t.reshape(-1).expand(batch)
