"""diffusers-format UNet / VAE state dicts <-> ours: one readable table per network, used in both directions.

A table row is (diffusers module, our module). In both, `#` stands for a block index (copied across in order),
and every row covers the module's `.weight` and `.bias`. Rows are built as "where the block sits" x "what is
inside that kind of block", so each rename is written once. Conversion is renaming only, plus one named reshape:
VAE attention projections stored as 1x1 convs (C, C, 1, 1) by ldm-origin files become Linear weights (C, C).

Every input name must match exactly one row; anything else raises a ValueError that lists the names, so a
tensor is never silently dropped. Tensors are not copied.
"""

from __future__ import annotations

import re
from typing import Iterable

from torch import Tensor

Table = list[tuple[str, str]]

# --- what is inside each kind of block (diffusers leaf -> ours); "" is the module itself -----------------------
_LEAF = {"": ""}
_RES = {
    "norm1": "norm1", "conv1": "conv1", "time_emb_proj": "time_proj",
    "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "skip",
}
_ATTENTION = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "out"}
_TRANSFORMER = {
    "norm": "norm", "proj_in": "proj_in", "proj_out": "proj_out",
    "transformer_blocks.#.norm1": "blocks.#.norm1",
    **{f"transformer_blocks.#.attn1.{d}": f"blocks.#.self_attn.{o}" for d, o in _ATTENTION.items()},
    "transformer_blocks.#.norm2": "blocks.#.norm2",
    **{f"transformer_blocks.#.attn2.{d}": f"blocks.#.cross_attn.{o}" for d, o in _ATTENTION.items()},
    "transformer_blocks.#.norm3": "blocks.#.norm3",
    "transformer_blocks.#.ff.net.0.proj": "blocks.#.ff.proj",
    "transformer_blocks.#.ff.net.2": "blocks.#.ff.out",
}
_VAE_ATTENTION = {"group_norm": "norm", **_ATTENTION}

# --- where each block sits (diffusers module, ours, what is inside) -------------------------------------------
_UNET_PLACES: list[tuple[str, str, dict[str, str]]] = [
    ("time_embedding.linear_1", "time_embed.linear1", _LEAF),
    ("time_embedding.linear_2", "time_embed.linear2", _LEAF),
    ("add_embedding.linear_1", "add_embed.linear1", _LEAF),  # SDXL's added (pooled text + sizes) embedding
    ("add_embedding.linear_2", "add_embed.linear2", _LEAF),
    ("conv_in", "in_conv", _LEAF),
    ("down_blocks.#.resnets.#", "down.#.res.#", _RES),
    ("down_blocks.#.attentions.#", "down.#.attn.#", _TRANSFORMER),
    ("down_blocks.#.downsamplers.0.conv", "down.#.downsample.conv", _LEAF),
    ("mid_block.resnets.0", "mid.res1", _RES),
    ("mid_block.attentions.0", "mid.attn", _TRANSFORMER),
    ("mid_block.resnets.1", "mid.res2", _RES),
    ("up_blocks.#.resnets.#", "up.#.res.#", _RES),  # both sides in execution order: 0 is the coarsest
    ("up_blocks.#.attentions.#", "up.#.attn.#", _TRANSFORMER),
    ("up_blocks.#.upsamplers.0.conv", "up.#.upsample.conv", _LEAF),
    ("conv_norm_out", "out_norm", _LEAF),
    ("conv_out", "out_conv", _LEAF),
]
_VAE_PLACES: list[tuple[str, str, dict[str, str]]] = [
    *[(f"{part}.{d}", f"{part}.{o}", inside) for part in ("encoder", "decoder") for d, o, inside in [
        ("conv_in", "in_conv", _LEAF),
        ("down_blocks.#.resnets.#", "down.#.res.#", _RES),
        ("down_blocks.#.downsamplers.0.conv", "down.#.downsample.conv", _LEAF),
        ("mid_block.resnets.0", "mid.res1", _RES),
        ("mid_block.attentions.0", "mid.attn", _VAE_ATTENTION),
        ("mid_block.resnets.1", "mid.res2", _RES),
        ("up_blocks.#.resnets.#", "up.#.res.#", _RES),
        ("up_blocks.#.upsamplers.0.conv", "up.#.upsample.conv", _LEAF),
        ("conv_norm_out", "out_norm", _LEAF),
        ("conv_out", "out_conv", _LEAF),
    ]],
    ("quant_conv", "quant_conv", _LEAF),
    ("post_quant_conv", "post_quant_conv", _LEAF),
]


def _expand(places: list[tuple[str, str, dict[str, str]]]) -> Table:
    return [
        (".".join(filter(None, (dp, dl))), ".".join(filter(None, (op, ol))))
        for dp, op, inside in places
        for dl, ol in inside.items()
    ]


UNET_TABLE: Table = _expand(_UNET_PLACES)
VAE_TABLE: Table = _expand(_VAE_PLACES)

# diffusers < 0.14 named the VAE mid-block attention differently; the hub's SD 1.5 / 2.1 VAE files still do.
VAE_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_VAE = re.compile(r"((?:en|de)coder\.mid_block\.attentions\.0)\.(query|key|value|proj_attn)\.(weight|bias)")
# Our Linear weights that ldm-origin VAE files store as 1x1 convs.
_VAE_LINEAR_AS_CONV = re.compile(r"(?:en|de)coder\.mid\.attn\.(?:q|k|v|out)\.weight")


def _compile(table: Table, reverse: bool) -> list[tuple[re.Pattern[str], str]]:
    """Rows -> (regex matching a full parameter name, str.format template for the new name)."""
    rules = []
    for src, dst in table:
        if reverse:
            src, dst = dst, src
        pattern = r"(\d+)".join(re.escape(part) for part in src.split("#")) + r"\.(weight|bias)"
        rules.append((re.compile(pattern), dst.replace("#", "{}") + ".{}"))
    return rules


def _rename(state_dict: dict[str, Tensor], table: Table, reverse: bool, what: str) -> dict[str, Tensor]:
    rules = _compile(table, reverse)
    out: dict[str, Tensor] = {}
    unmatched: list[str] = []
    for name, tensor in state_dict.items():
        matches = [template.format(*m.groups()) for pattern, template in rules if (m := pattern.fullmatch(name))]
        if len(matches) != 1:
            unmatched.append(name)  # no rule (or, by a table bug, several): refuse rather than guess
            continue
        if matches[0] in out:
            raise ValueError(f"{what}: two input tensors map to {matches[0]!r} (e.g. both old and new names given)")
        out[matches[0]] = tensor
    if unmatched:
        raise ValueError(f"{what}: {len(unmatched)} tensor name(s) match no mapping rule: {_listing(unmatched)}")
    return out


def _listing(names: Iterable[str], limit: int = 20) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def unet_from_diffusers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers UNet2DConditionModel state dict -> our `diffedit.unet.UNet` names."""
    return _rename(state_dict, UNET_TABLE, reverse=False, what="diffusers UNet")


def unet_to_diffusers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our UNet state dict -> diffusers UNet2DConditionModel names (inverse of `unet_from_diffusers`)."""
    return _rename(state_dict, UNET_TABLE, reverse=True, what="our UNet")


def vae_current_names(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The deprecated VAE mid-block attention names (query/key/value/proj_attn) -> the current ones; others kept."""
    current = {}
    for name, tensor in state_dict.items():
        m = _LEGACY_VAE.fullmatch(name)
        current[f"{m[1]}.{VAE_LEGACY_ATTENTION_NAMES[m[2]]}.{m[3]}" if m else name] = tensor
    if len(current) != len(state_dict):
        raise ValueError("diffusers VAE: the mid-block attention is given under both its old and its new names")
    return current


def vae_from_diffusers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers AutoencoderKL state dict -> our `diffedit.vae.AutoencoderKL` names.

    Accepts the current mid-block attention names (to_q/to_k/to_v/to_out.0) and the deprecated ones
    (query/key/value/proj_attn), with Linear (C, C) or 1x1-conv (C, C, 1, 1) weights.
    """
    ours = _rename(vae_current_names(state_dict), VAE_TABLE, reverse=False, what="diffusers VAE")
    for name, tensor in ours.items():
        if _VAE_LINEAR_AS_CONV.fullmatch(name) and tensor.ndim == 4:
            if tensor.shape[2:] != (1, 1):
                raise ValueError(f"{name}: expected a Linear or 1x1 conv weight, got shape {tuple(tensor.shape)}")
            ours[name] = tensor[:, :, 0, 0]
    return ours


def vae_to_diffusers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our VAE state dict -> current diffusers AutoencoderKL names (to_q/..., Linear-shaped attention weights)."""
    return _rename(state_dict, VAE_TABLE, reverse=True, what="our VAE")
