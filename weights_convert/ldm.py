"""Original single-file Stable Diffusion checkpoints (CompVis / Stability "ldm" layout) -> diffusers names.

A single file holds the whole LatentDiffusion module:
    model.diffusion_model.*   the UNet (CompVis openaimodel.py: flat input_blocks / middle_block / output_blocks)
    first_stage_model.*       the VAE (taming-style encoder.down.i.block.j / decoder.up.i.block.j)
    cond_stage_model.transformer.text_model.*   SD 1.x: transformers' CLIPTextModel, names already ours
    cond_stage_model.model.*  SD 2.x: the OpenCLIP ViT-H/14 text tower (fused q/k/v, 24 layers)
    conditioner.embedders.0.transformer.text_model.*   SDXL: CLIP ViT-L, transformers' names (as SD 1.x)
    conditioner.embedders.1.model.*                    SDXL: the OpenCLIP ViT-bigG/14 text tower (32 layers, all kept)
    betas, alphas_cumprod, ...  the DDPM schedule as buffers; model_ema.*: EMA bookkeeping

`split_ldm` turns it into diffusers-format state dicts {unet, vae, text_encoder[, text_encoder_2]};
weights_convert.diffusers
then maps those to our names, so ldm -> ours is the composition of the two. Every name the file may hold is
listed by a table built from the ModelConfig (`ldm_rules`), with its expected shape: the converter consumes
all of them or refuses the file with one error naming every problem.

References: CompVis/stable-diffusion ldm/modules/diffusionmodules/{openaimodel,model}.py (the source layout),
diffusers loaders/single_file_utils.py (its converters, which tests/test_convert_ldm.py compares us with).
"""

from __future__ import annotations

import functools
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from diffedit.configs import ModelConfig, ScheduleConfig, TextConfig, UNetConfig, VAEConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD 2.x
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # SDXL: CLIP ViT-L
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL: OpenCLIP ViT-bigG
TEXT_FORMATS = ("clip", "openclip", "sdxl")  # SD 1.x, SD 2.x, SDXL (both)


class Rule(NamedTuple):
    source: str  # name in the single file (without the component prefix)
    target: str | None  # diffusers-format name; None: a known tensor we drop on purpose
    shape: tuple[int, ...]  # shape in the single file, derived from the config
    take: Callable[[Tensor], Tensor] | None = None  # a named reshape / slice; None: the tensor as it is
    # Some files drop it, and the model never reads it (SDXL uses CLIP-L's penultimate layer): zeros stand in.
    unused: bool = False


# ---- building blocks of the tables: one call per layer, weight and bias together -------------------------


def norm(src: str, dst: str, c: int) -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}.weight", (c,)), Rule(f"{src}.bias", f"{dst}.bias", (c,))]


def linear(src: str, dst: str, cin: int, cout: int, bias: bool = True) -> list[Rule]:
    rules = [Rule(f"{src}.weight", f"{dst}.weight", (cout, cin))]
    return rules + [Rule(f"{src}.bias", f"{dst}.bias", (cout,))] if bias else rules


def conv(src: str, dst: str, cin: int, cout: int, k: int) -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}.weight", (cout, cin, k, k)), Rule(f"{src}.bias", f"{dst}.bias", (cout,))]


def under(src_prefix: str, dst_prefix: str, rules: list[Rule]) -> list[Rule]:
    return [r._replace(source=f"{src_prefix}.{r.source}", target=f"{dst_prefix}.{r.target}") for r in rules]


def conv1x1_to_linear(t: Tensor) -> Tensor:
    """The VAE's mid-block attention projects with 1x1 convolutions (C, C, 1, 1); diffusers uses Linear (C, C)."""
    return t.reshape(t.shape[0], t.shape[1])


def transposed(t: Tensor) -> Tensor:
    """OpenCLIP's text_projection is a (width, proj) matrix applied as x @ P; transformers' Linear weight is P.T."""
    return t.T.contiguous()  # a copy: safetensors refuses non-contiguous tensors


def in_proj_part(t: Tensor, index: int, width: int) -> Tensor:
    """q (0), k (1) or v (2) rows of OpenCLIP's fused attention input projection (nn.MultiheadAttention)."""
    # A copy, not a view: safetensors refuses to save tensors that share memory.
    return t[index * width : (index + 1) * width].clone()


# ---- UNet --------------------------------------------------------------------------------------------------


def unet_resblock(cin: int, cout: int, emb: int) -> list[Rule]:
    # openaimodel.ResBlock keeps its layers in nn.Sequentials; the index is the position in the Sequential.
    return [
        *norm("in_layers.0", "norm1", cin),
        *conv("in_layers.2", "conv1", cin, cout, 3),
        *linear("emb_layers.1", "time_emb_proj", emb, cout),
        *norm("out_layers.0", "norm2", cout),
        *conv("out_layers.3", "conv2", cout, cout, 3),
        *(conv("skip_connection", "conv_shortcut", cin, cout, 1) if cin != cout else []),
    ]


def unet_transformer(c: int, depth: int, cfg: UNetConfig) -> list[Rule]:
    """SpatialTransformer: its inner names are the same in both formats; only its prefix moves."""
    if cfg.linear_projection:  # SD 2.x
        proj = linear("proj_in", "proj_in", c, c) + linear("proj_out", "proj_out", c, c)
    else:  # SD 1.x: 1x1 convolutions
        proj = conv("proj_in", "proj_in", c, c, 1) + conv("proj_out", "proj_out", c, c, 1)
    rules = norm("norm", "norm", c) + proj
    for d in range(depth):
        block: list[Rule] = []
        for attn, context in (("attn1", c), ("attn2", cfg.cross_attention_dim)):  # self-, then cross-attention
            block += linear(f"{attn}.to_q", f"{attn}.to_q", c, c, bias=False)
            block += linear(f"{attn}.to_k", f"{attn}.to_k", context, c, bias=False)
            block += linear(f"{attn}.to_v", f"{attn}.to_v", context, c, bias=False)
            block += linear(f"{attn}.to_out.0", f"{attn}.to_out.0", c, c)
        for n in ("norm1", "norm2", "norm3"):
            block += norm(n, n, c)
        block += linear("ff.net.0.proj", "ff.net.0.proj", c, 8 * c)  # GEGLU: value and gate, 4c each
        block += linear("ff.net.2", "ff.net.2", 4 * c, c)
        rules += under(f"transformer_blocks.{d}", f"transformer_blocks.{d}", block)
    return rules


def unet_rules(cfg: UNetConfig) -> list[Rule]:
    """The UNet's names. CompVis numbers its modules as three flat lists; diffusers nests them by level.

    input_blocks[0] is conv_in; then level l owns entries 1 + l*(n+1) + j for its n = layers_per_block
    (ResBlock, [SpatialTransformer]) pairs, j < n, and entry 1 + l*(n+1) + n holds its Downsample (none on the
    deepest level). output_blocks run deepest level first, n + 1 entries per level: entry u*(n+1) + j is
    (ResBlock, [SpatialTransformer], [Upsample on the last j, except at the top level]).
    """
    n, levels, emb, c0 = cfg.layers_per_block, len(cfg.channels), cfg.time_embed_dim, cfg.channels[0]
    rules = [
        *linear("time_embed.0", "time_embedding.linear_1", c0, emb),
        *linear("time_embed.2", "time_embedding.linear_2", emb, emb),
        *conv("input_blocks.0.0", "conv_in", cfg.in_channels, c0, 3),
    ]
    if cfg.added_conditioning:  # SDXL's label_emb: Sequential(Sequential(Linear, SiLU, Linear)), pooled + 6 sizes
        added = cfg.pooled_text_dim + 6 * cfg.size_embed_dim
        rules += linear("label_emb.0.0", "add_embedding.linear_1", added, emb)
        rules += linear("label_emb.0.2", "add_embedding.linear_2", emb, emb)
    skips = [c0]  # the width of every input_blocks output, in order: the up path concatenates them back
    for level, width in enumerate(cfg.channels):
        ch = skips[-1]
        for j in range(n):
            i, dst = 1 + level * (n + 1) + j, f"down_blocks.{level}"
            rules += under(f"input_blocks.{i}.0", f"{dst}.resnets.{j}", unet_resblock(ch, width, emb))
            if cfg.attention[level]:
                rules += under(f"input_blocks.{i}.1", f"{dst}.attentions.{j}",
                              unet_transformer(width, cfg.transformer_depth[level], cfg))
            ch = width
            skips.append(ch)
        if level < levels - 1:
            i = 1 + level * (n + 1) + n
            rules += conv(f"input_blocks.{i}.0.op", f"down_blocks.{level}.downsamplers.0.conv", ch, ch, 3)
            skips.append(ch)

    ch = cfg.channels[-1]  # the middle block always has attention in SD
    rules += under("middle_block.0", "mid_block.resnets.0", unet_resblock(ch, ch, emb))
    rules += under("middle_block.1", "mid_block.attentions.0", unet_transformer(ch, cfg.transformer_depth[-1], cfg))
    rules += under("middle_block.2", "mid_block.resnets.1", unet_resblock(ch, ch, emb))

    for up, level in enumerate(reversed(range(levels))):
        width, dst = cfg.channels[level], f"up_blocks.{up}"
        for j in range(n + 1):
            i = up * (n + 1) + j
            rules += under(f"output_blocks.{i}.0", f"{dst}.resnets.{j}", unet_resblock(ch + skips.pop(), width, emb))
            ch = width
            if cfg.attention[level]:
                rules += under(f"output_blocks.{i}.1", f"{dst}.attentions.{j}",
                              unet_transformer(width, cfg.transformer_depth[level], cfg))
            if level > 0 and j == n:  # the Upsample follows the attention, if there is one
                k = 2 if cfg.attention[level] else 1
                rules += conv(f"output_blocks.{i}.{k}.conv", f"{dst}.upsamplers.0.conv", ch, ch, 3)

    rules += norm("out.0", "conv_norm_out", c0)
    rules += conv("out.2", "conv_out", c0, cfg.out_channels, 3)
    return rules


# ---- VAE ---------------------------------------------------------------------------------------------------


def vae_resblock(cin: int, cout: int) -> list[Rule]:
    return [
        *norm("norm1", "norm1", cin),
        *conv("conv1", "conv1", cin, cout, 3),
        *norm("norm2", "norm2", cout),
        *conv("conv2", "conv2", cout, cout, 3),
        *(conv("nin_shortcut", "conv_shortcut", cin, cout, 1) if cin != cout else []),
    ]


def vae_attention(c: int) -> list[Rule]:
    rules = norm("norm", "group_norm", c)
    for src, dst in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        rules += [Rule(f"{src}.weight", f"{dst}.weight", (c, c, 1, 1), conv1x1_to_linear)]
        rules += [Rule(f"{src}.bias", f"{dst}.bias", (c,))]
    return rules


def vae_mid(c: int) -> list[Rule]:
    return [
        *under("mid.block_1", "mid_block.resnets.0", vae_resblock(c, c)),
        *under("mid.attn_1", "mid_block.attentions.0", vae_attention(c)),
        *under("mid.block_2", "mid_block.resnets.1", vae_resblock(c, c)),
    ]


def vae_rules(cfg: VAEConfig) -> list[Rule]:
    """encoder.down.l / decoder.up.l -> down_blocks.l / up_blocks.(L-1-l): the decoder's ldm numbering
    counts from the highest resolution like the encoder's, diffusers counts in execution order."""
    n, levels, z, top = cfg.layers_per_block, len(cfg.channels), cfg.latent_channels, cfg.channels[-1]
    enc = conv("conv_in", "conv_in", cfg.in_channels, cfg.channels[0], 3)
    ch = cfg.channels[0]
    for level, width in enumerate(cfg.channels):
        for j in range(n):
            enc += under(f"down.{level}.block.{j}", f"down_blocks.{level}.resnets.{j}", vae_resblock(ch, width))
            ch = width
        if level < levels - 1:
            enc += conv(f"down.{level}.downsample.conv", f"down_blocks.{level}.downsamplers.0.conv", ch, ch, 3)
    enc += vae_mid(top) + norm("norm_out", "conv_norm_out", top) + conv("conv_out", "conv_out", top, 2 * z, 3)

    dec = conv("conv_in", "conv_in", z, top, 3) + vae_mid(top)
    ch = top
    for level in reversed(range(levels)):
        width, dst = cfg.channels[level], f"up_blocks.{levels - 1 - level}"
        for j in range(n + 1):
            dec += under(f"up.{level}.block.{j}", f"{dst}.resnets.{j}", vae_resblock(ch, width))
            ch = width
        if level > 0:
            dec += conv(f"up.{level}.upsample.conv", f"{dst}.upsamplers.0.conv", ch, ch, 3)
    dec += norm("norm_out", "conv_norm_out", ch) + conv("conv_out", "conv_out", ch, cfg.in_channels, 3)

    return [
        *under("encoder", "encoder", enc),
        *under("decoder", "decoder", dec),
        *conv("quant_conv", "quant_conv", 2 * z, 2 * z, 1),  # mean and log-variance of the posterior
        *conv("post_quant_conv", "post_quant_conv", z, z, 1),
    ]


# ---- text encoders -----------------------------------------------------------------------------------------


def clip_rules(cfg: TextConfig) -> list[Rule]:
    """SD 1.x and SDXL store transformers' CLIPTextModel itself: same names, nothing to rename. SDXL conditions on
    the penultimate layer, so some SDXL files drop the last layer and final_layer_norm: unused, zeros stand in."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    rules = [
        Rule("embeddings.token_embedding.weight", "embeddings.token_embedding.weight", (cfg.vocab_size, h)),
        Rule("embeddings.position_embedding.weight", "embeddings.position_embedding.weight", (cfg.max_length, h)),
    ]
    unused = cfg.output == "penultimate" and cfg.projection_dim == 0  # no pooled output reads the last layer
    for layer in range(cfg.num_layers):
        block = []
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            block += linear(f"self_attn.{p}", f"self_attn.{p}", h, h)
        block += norm("layer_norm1", "layer_norm1", h) + norm("layer_norm2", "layer_norm2", h)
        block += linear("mlp.fc1", "mlp.fc1", h, i) + linear("mlp.fc2", "mlp.fc2", i, h)
        if unused and layer == cfg.num_layers - 1:
            block = [r._replace(unused=True) for r in block]
        rules += under(f"encoder.layers.{layer}", f"encoder.layers.{layer}", block)
    rules += [r._replace(unused=unused) for r in norm("final_layer_norm", "final_layer_norm", h)]
    return under("text_model", "text_model", rules)


def openclip_rules(cfg: TextConfig) -> list[Rule]:
    """An OpenCLIP text tower -> CLIPTextModel (SD 2.x's ViT-H/14) or CLIPTextModelWithProjection (SDXL's bigG/14).

    SD 2.x (no projection): the file holds num_layers + 1 layers; SD 2 conditions on the penultimate layer's output
    (then ln_final), so the converted model simply stops one layer early, and text_projection is dropped.
    SDXL (projection_dim > 0): every layer is kept, since the pooled embedding is the last layer's end-of-text
    state through ln_final and text_projection (transposed: OpenCLIP applies it as x @ P).
    """
    h, i, proj = cfg.hidden_size, cfg.intermediate_size, cfg.projection_dim
    rules = [
        Rule("token_embedding.weight", "embeddings.token_embedding.weight", (cfg.vocab_size, h)),
        Rule("positional_embedding", "embeddings.position_embedding.weight", (cfg.max_length, h)),
        *norm("ln_final", "final_layer_norm", h),
        Rule("logit_scale", None, (), unused=bool(proj)),  # CLIP's contrastive temperature; SDXL files may drop it
    ]
    if proj:
        rules += [Rule("text_projection", "text_projection.weight", (h, proj), transposed)]
    else:  # maps the pooled token into CLIP's joint space; SD 2 never uses it
        rules += [Rule("text_projection", None, (h, h))]
    file_layers = cfg.num_layers if proj else cfg.num_layers + 1
    for layer in range(file_layers):
        block = norm("ln_1", "layer_norm1", h) + norm("ln_2", "layer_norm2", h)
        for index, p in enumerate(("q_proj", "k_proj", "v_proj")):
            take = functools.partial(in_proj_part, index=index, width=h)
            block += [Rule("attn.in_proj_weight", f"self_attn.{p}.weight", (3 * h, h), take)]
            block += [Rule("attn.in_proj_bias", f"self_attn.{p}.bias", (3 * h,), take)]
        block += linear("attn.out_proj", "self_attn.out_proj", h, h)
        block += linear("mlp.c_fc", "mlp.fc1", h, i) + linear("mlp.c_proj", "mlp.fc2", i, h)
        src = f"transformer.resblocks.{layer}"
        if layer < cfg.num_layers:
            rules += under(src, f"encoder.layers.{layer}", block)
        else:  # the last layer: a known tensor, dropped
            rules += [Rule(f"{src}.{r.source}", None, r.shape) for r in block]
    text = "text_model."
    return [r._replace(target=r.target and (r.target if r.target.startswith("text_projection") else text + r.target))
            for r in rules]


# ---- what the file holds besides the three networks --------------------------------------------------------

SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)  # fmt: skip

# Keys we read past on purpose (regular expressions over the full key), each with the reason.
IGNORED: list[tuple[str, str]] = [
    ("|".join(SCHEDULE_BUFFERS),
     "the DDPM schedule: ScheduleConfig states it; betas and alphas_cumprod are checked against it"),
    (r"model_ema\..*",
     "EMA bookkeeping (decay, num_updates; in unpruned files also an EMA copy of the UNet): we convert "
     "model.diffusion_model.*, the weights the file's own model runs, as diffusers does by default"),
    (f"(?:{re.escape(CLIP_PREFIX)}|{re.escape(SDXL_CLIP_PREFIX)})" + r"text_model\.embeddings\.position_ids",
     "arange(77), a buffer transformers < 4.31 saved; CLIPTextModel rebuilds it"),
]  # fmt: skip


def ignore_reason(key: str) -> str | None:
    return next((reason for pattern, reason in IGNORED if re.fullmatch(pattern, key)), None)


def schedule_problems(state_dict: dict[str, Tensor], schedule: ScheduleConfig) -> list[str]:
    """The file's schedule buffers (if present) must be the schedule our config states."""
    # ldm computes the schedule in float64 (numpy) and stores it as float32 (fp16 in some half-precision
    # copies): compare at the precision of the stored dtype.
    t = schedule.num_train_timesteps
    if schedule.beta_schedule == "scaled_linear":
        betas = torch.linspace(schedule.beta_start**0.5, schedule.beta_end**0.5, t, dtype=torch.float64) ** 2
    else:
        betas = torch.linspace(schedule.beta_start, schedule.beta_end, t, dtype=torch.float64)
    expected = {"betas": betas, "alphas_cumprod": torch.cumprod(1 - betas, 0)}
    problems = []
    for k in SCHEDULE_BUFFERS:
        if k not in state_dict:
            continue
        if tuple(state_dict[k].shape) != (t,):
            problems.append(f"{k} has shape {tuple(state_dict[k].shape)}, expected ({t},)")
        elif k in expected:
            stored = state_dict[k]
            rtol = max(1e-4, 4 * torch.finfo(stored.dtype).eps) if stored.is_floating_point() else 0.0
            if not torch.allclose(stored.double(), expected[k], rtol=rtol, atol=0):
                problems.append(f"{k} differ from those of {schedule}")
    return problems


# ---- the conversion ----------------------------------------------------------------------------------------


def ldm_rules(config: ModelConfig, text_format: str) -> dict[str, tuple[str, list[Rule]]]:
    """component -> (prefix in the single file, its rules).

    text_format: "clip" (SD 1.x), "openclip" (SD 2.x) or "sdxl" (CLIP-L as text_encoder, bigG as text_encoder_2).
    """
    if text_format not in TEXT_FORMATS:
        raise ValueError(f"text_format must be one of {TEXT_FORMATS}, got {text_format!r}")
    if (text_format == "sdxl") != (config.text_2 is not None):
        raise ValueError(f"text_format {text_format!r} does not fit config {config.name!r}")
    rules = {"unet": (UNET_PREFIX, unet_rules(config.unet)), "vae": (VAE_PREFIX, vae_rules(config.vae))}
    if text_format == "sdxl":
        assert config.text_2 is not None
        rules["text_encoder"] = (SDXL_CLIP_PREFIX, clip_rules(config.text))
        rules["text_encoder_2"] = (SDXL_OPENCLIP_PREFIX, openclip_rules(config.text_2))
    elif text_format == "clip":
        rules["text_encoder"] = (CLIP_PREFIX, clip_rules(config.text))
    else:
        rules["text_encoder"] = (OPENCLIP_PREFIX, openclip_rules(config.text))
    return rules


def ldm_layout(config: ModelConfig, text_format: str) -> dict[str, tuple[int, ...]]:
    """Every network tensor a single file of this config holds, with its shape (buffers not included)."""
    return {p + r.source: r.shape for p, rules in ldm_rules(config, text_format).values() for r in rules}


def text_format_of(state_dict: dict[str, Tensor]) -> str:
    if any(k.startswith(SDXL_OPENCLIP_PREFIX) for k in state_dict):
        return "sdxl"
    return "openclip" if any(k.startswith(OPENCLIP_PREFIX) for k in state_dict) else "clip"


def split_ldm(state_dict: dict[str, Tensor], config: ModelConfig) -> dict[str, dict[str, Tensor]]:
    """An original SD 1.x / 2.x / XL single-file state dict -> {"unet", "vae", "text_encoder"[, "text_encoder_2"]}
    in diffusers names.

    Every key must be a known network tensor of the right shape or one of IGNORED; otherwise one ValueError
    lists all missing, unknown and misshapen keys. Tensors are not copied (except OpenCLIP's split q/k/v and
    transposed projection). Tensors the model never reads that a file may drop (`Rule.unused`: SDXL's CLIP-L last
    layer) are zeros when absent, in the file's dtype.
    """
    components = ldm_rules(config, text_format_of(state_dict))
    expected = {p + r.source: r.shape for p, rules in components.values() for r in rules}
    optional = {p + r.source for p, rules in components.values() for r in rules if r.unused}
    missing = sorted(expected.keys() - state_dict.keys() - optional)
    unknown = sorted(k for k in state_dict.keys() - expected.keys() if ignore_reason(k) is None)
    misshapen = [f"{k} {tuple(state_dict[k].shape)} (expected {shape})" for k, shape in expected.items()
                 if k in state_dict and tuple(state_dict[k].shape) != shape]  # fmt: skip
    schedule = schedule_problems(state_dict, config.schedule)
    if missing or unknown or misshapen or schedule:
        parts = [f"{len(v)} {what}: {', '.join(v)}" for what, v in
                 (("missing", missing), ("unknown", unknown), ("with a wrong shape", misshapen),
                  ("schedule mismatches", schedule)) if v]  # fmt: skip
        if any(k.startswith(SDXL_OPENCLIP_PREFIX) for k in missing):
            parts.append("(SDXL's pooled text embedding needs every layer of OpenCLIP bigG, ln_final and "
                         "text_projection)")
        raise ValueError(f"single-file checkpoint does not match config {config.name!r}:\n  " + "\n  ".join(parts))
    out: dict[str, dict[str, Tensor]] = {}
    for component, (prefix, rules) in components.items():
        out[component] = {}
        for r in rules:
            if r.target is None:
                continue
            if prefix + r.source not in state_dict:  # an unused tensor the file dropped (checked above): zeros in
                # the dtype of the network's other tensors (merges mix dtypes across networks, e.g. an fp32 VAE)
                like = next(t for k, t in state_dict.items() if k.startswith(prefix) and t.is_floating_point())
                out[component][r.target] = torch.zeros(r.shape, dtype=like.dtype, device=like.device)
                continue
            tensor = state_dict[prefix + r.source]
            out[component][r.target] = r.take(tensor) if r.take else tensor
    return out


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """Read a .safetensors, or a .ckpt / .pt / .bin pickle with torch's weights-only unpickler.

    The weights-only unpickler builds tensors and plain containers only: a pickle that names any other
    callable (how a malicious file runs code) is refused before anything is called.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        loaded: object = load_file(path, device="cpu")
    elif path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            operand = [line for line in str(e).splitlines() if "Unsupported operand" in line]
            if operand:  # an opcode the weights-only unpickler does not know: most often no pickle at all
                raise ValueError(f"{path}: cannot read it as a PyTorch checkpoint (corrupt, truncated, not one, or "
                                 f"not a weights-only pickle: {operand[0].strip()})") from e
            raise ValueError(
                f"{path}: refused to load: the pickle needs more than tensors (it may run code when loaded).\n"
                f"Only weights-only pickles are read; convert the file to .safetensors with a tool you trust.\n{e}"
            ) from e
    else:
        raise ValueError(f"{path}: unknown checkpoint format {path.suffix!r} (.safetensors, .ckpt, .pt, .pth, .bin)")
    if isinstance(loaded, dict) and "state_dict" in loaded:  # Lightning: {"state_dict": ..., "global_step": ...}
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(loaded).__name__}")
    bad = sorted(str(k) for k, v in loaded.items() if not (isinstance(k, str) and isinstance(v, Tensor)))
    if bad:
        raise ValueError(f"{path}: entries that are not named tensors: {', '.join(bad)}")
    return loaded
