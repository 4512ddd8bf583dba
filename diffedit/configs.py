"""Frozen configuration dataclasses and the presets of the models we support.

Only the knobs that Stable Diffusion 1.x / 2.x / XL (and our tiny test / toy models) actually vary are here;
everything the real models share (sinusoidal time embedding with cos first, GEGLU feed-forward, 3x3
convolutions, ...) is written directly in the network code instead of being configurable.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Literal

PredictionType = Literal["epsilon", "v_prediction"]


@dataclass(frozen=True)
class UNetConfig:
    """The latent noise-prediction UNet (Rombach et al. 2022, Fig. 3)."""

    in_channels: int = 4
    out_channels: int = 4
    channels: tuple[int, ...] = (320, 640, 1280, 1280)  # width of each resolution level
    attention: tuple[bool, ...] = (True, True, True, False)  # does the level have transformer blocks
    heads: tuple[int, ...] = (8, 8, 8, 8)  # attention heads per level (SD 1.x: 8; SD 2.x: 64-dim heads)
    layers_per_block: int = 2  # res blocks per down level (the up path has one more)
    # Transformer blocks after each res block, per level (used where `attention` is true; the mid block takes the
    # last level's): SD 1.x / 2.x have 1 everywhere, SDXL (1, 2, 10) with its first level attention-free.
    transformer_depth: tuple[int, ...] = (1, 1, 1, 1)
    cross_attention_dim: int = 768  # width of the text embeddings
    linear_projection: bool = False  # SD 2.x projects in/out of transformers with Linear, SD 1.x with 1x1 conv
    upcast_attention: bool = False  # compute q.k in fp32 (SD 2.1-v overflows in fp16 otherwise)
    norm_groups: int = 32
    norm_eps: float = 1e-5
    # SDXL's added conditioning (Podell et al. 2023, §2.2): six size numbers (original size, crop top-left, target
    # size), each a `size_embed_dim`-dim sinusoidal embedding, after the `pooled_text_dim`-dim pooled text
    # embedding, through a 2-layer MLP added to the time embedding. 0 and 0: no added conditioning (SD 1.x / 2.x).
    size_embed_dim: int = 0
    pooled_text_dim: int = 0

    def __post_init__(self) -> None:
        levels = len(self.channels)
        if any(len(v) != levels for v in (self.attention, self.heads, self.transformer_depth)):
            raise ValueError(f"channels, attention, heads and transformer_depth need one entry per level ({levels}): "
                             f"{self}")
        if (self.size_embed_dim == 0) != (self.pooled_text_dim == 0):
            raise ValueError("size_embed_dim and pooled_text_dim are both 0 (no added conditioning) or both set, got "
                             f"{self.size_embed_dim} and {self.pooled_text_dim}")
        for c, h in zip(self.channels, self.heads):
            if c % h:
                raise ValueError(f"{c} channels cannot be split into {h} heads")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.channels[0]

    @property
    def added_conditioning(self) -> bool:
        """Does the UNet take SDXL's pooled text embedding and size conditioning."""
        return self.pooled_text_dim > 0


@dataclass(frozen=True)
class VAEConfig:
    """The KL-regularised autoencoder (AutoencoderKL) that maps 8x8 pixel patches to 4 latent channels."""

    in_channels: int = 3
    latent_channels: int = 4
    channels: tuple[int, ...] = (128, 256, 512, 512)  # encoder widths per level (decoder mirrors them)
    layers_per_block: int = 2  # res blocks per encoder level (the decoder has one more)
    norm_groups: int = 32
    scaling_factor: float = 0.18215  # latents are multiplied by this so they have ~unit variance
    # Run the VAE in fp32 whatever the model's dtype: SDXL's VAE overflows in fp16 (diffusers' `force_upcast`).
    force_upcast: bool = False

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)


@dataclass(frozen=True)
class TextConfig:
    """A CLIP text transformer, as built by transformers' CLIPTextModel."""

    vocab_size: int = 49408
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_length: int = 77
    activation: Literal["quick_gelu", "gelu"] = "quick_gelu"  # CLIP ViT-L: quick_gelu, OpenCLIP ViT-H: gelu
    layer_norm_eps: float = 1e-5
    # The tokenizer pads with this token. SD 1.x pads with the end token, SD 2.x (OpenCLIP) with "!" (id 0).
    # The padding changes the embeddings of the padding positions, which cross-attention sees.
    pad_token: str = "<|endoftext|>"
    # What the UNet sees: "final", the last layer's hidden states through the final layer norm (SD 1.x; SD 2.x's
    # files hold the layers up to the penultimate), or "penultimate", the hidden states entering the last layer,
    # not normalised (SDXL, both encoders).
    output: Literal["final", "penultimate"] = "final"
    # Width of the projected pooled (end-of-text) embedding, 0 without projection (SDXL's OpenCLIP bigG: 1280).
    projection_dim: int = 0


@dataclass(frozen=True)
class ScheduleConfig:
    """The DDPM noise schedule SD was trained with, and the DDIM sampling conventions it is used with.

    Every value is stated here on purpose; none is left to a library default.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: Literal["scaled_linear", "linear"] = "scaled_linear"  # scaled_linear: sqrt-linear betas
    prediction_type: PredictionType = "epsilon"
    steps_offset: int = 1  # "leading" timesteps are shifted by one: 981, 961, ..., 1 for 50 steps
    # Past the last step DDIM needs abar of "timestep -1". SD uses abar[0] (set_alpha_to_one=False),
    # not 1.0, so the final step does not fully denoise.
    final_alpha_is_one: bool = False


@dataclass(frozen=True)
class ModelConfig:
    unet: UNetConfig
    vae: VAEConfig
    text: TextConfig
    schedule: ScheduleConfig
    image_size: int = 512  # the resolution the model was trained at
    name: str = ""
    # SDXL's second text encoder (OpenCLIP ViT-bigG): its token embeddings follow `text`'s in the UNet's context,
    # and its projected pooled embedding conditions the UNet (unet.pooled_text_dim).
    text_2: TextConfig | None = None
    # The embeddings of the empty prompt "": "encoded" (SD 1.x / 2.x) or "zeros", what SDXL base was trained with
    # for dropped captions and what its pipeline uses for an absent negative (force_zeros_for_empty_prompt).
    empty_prompt: Literal["encoded", "zeros"] = "encoded"

    def __post_init__(self) -> None:
        u, texts = self.unet, [self.text] + ([self.text_2] if self.text_2 is not None else [])
        width = sum(t.hidden_size for t in texts)
        if width != u.cross_attention_dim:
            raise ValueError(f"the text encoders give {width}-wide embeddings, the UNet cross-attends to "
                             f"{u.cross_attention_dim}")
        pooled = self.text_2.projection_dim if self.text_2 is not None else 0
        if u.pooled_text_dim != pooled:
            raise ValueError(f"the UNet takes a {u.pooled_text_dim}-dim pooled text embedding, the second text "
                             f"encoder gives {pooled}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "ModelConfig":
        """A config read from JSON, every field checked against its declared type and range, naming the field
        ("config.unet.heads must be a list of positive integers, got [8, 0]")."""

        def build(cls: type, values: Any, where: str) -> Any:
            if not isinstance(values, dict):
                raise ValueError(f"{where} must be a JSON object, got {values!r}")
            hints = {k: _optional_dataclass(h) or h for k, h in typing.get_type_hints(cls).items()}
            unknown = set(values) - set(hints)
            if unknown:
                raise ValueError(f"unknown {cls.__name__} fields in {where}: {sorted(unknown)}")
            missing = [k for k in hints if k not in values]  # no default stands in for a value the file lacks
            if missing:
                raise ValueError(f"{where}.{missing[0]} is missing")
            checked = {k: _checked(v, hints[k], f"{where}.{k}") for k, v in values.items()
                       if not dataclasses.is_dataclass(hints[k])}
            _check_consistent(cls, checked, where)
            try:
                return cls(**checked, **{k: v for k, v in values.items() if k not in checked})
            except (TypeError, ValueError) as e:
                raise ValueError(f"{where}: {e}") from None

        if not isinstance(d, dict):
            raise ValueError(f"config must be a JSON object, got {d!r}")
        required = {"unet": UNetConfig, "vae": VAEConfig, "text": TextConfig, "schedule": ScheduleConfig}
        missing = set(required) - set(d)
        if missing:
            raise ValueError(f"model config lacks {sorted(missing)}")
        d = _upgrade_pre_sdxl(d)
        parts = {k: build(cls, d[k], f"config.{k}") for k, cls in required.items()}
        if "text_2" in d and d["text_2"] is not None:
            parts["text_2"] = build(TextConfig, d["text_2"], "config.text_2")
        config = build(ModelConfig, {**d, **parts}, "config")
        factor = config.vae.downsample_factor
        if config.image_size % factor:  # the latents of a training-size image would not be whole
            raise ValueError(f"config.image_size must be a multiple of {factor} (the VAE's downsampling), "
                             f"got {config.image_size}")
        return config


SD15 = ModelConfig(
    unet=UNetConfig(),
    vae=VAEConfig(),
    text=TextConfig(),
    schedule=ScheduleConfig(),
    image_size=512,
    name="sd15",
)

_SD2_UNET = UNetConfig(
    heads=(5, 10, 20, 20),  # 64-dim heads everywhere
    cross_attention_dim=1024,
    linear_projection=True,
)
# OpenCLIP ViT-H/14 text tower; SD 2 uses the output of its penultimate layer, so the converted model keeps
# 23 of its 24 layers (and applies the final layer norm), exactly as the diffusers-format weights do.
_SD2_TEXT = TextConfig(
    hidden_size=1024, num_layers=23, num_heads=16, intermediate_size=4096, activation="gelu", pad_token="!"
)

SD21_BASE = ModelConfig(
    unet=_SD2_UNET, vae=VAEConfig(), text=_SD2_TEXT, schedule=ScheduleConfig(), image_size=512, name="sd21-base"
)
SD21 = ModelConfig(
    unet=dataclasses.replace(_SD2_UNET, upcast_attention=True),
    vae=VAEConfig(),
    text=_SD2_TEXT,
    schedule=ScheduleConfig(prediction_type="v_prediction"),
    image_size=768,
    name="sd21",
)

# A tiny model with the same structure (two levels, attention on one), for fast tests on random weights.
TINY = ModelConfig(
    unet=UNetConfig(
        channels=(32, 64),
        attention=(False, True),
        heads=(2, 4),
        layers_per_block=1,
        transformer_depth=(1, 1),
        cross_attention_dim=32,
        norm_groups=8,
    ),
    vae=VAEConfig(channels=(32, 64), layers_per_block=1, norm_groups=8),
    text=TextConfig(
        vocab_size=1000, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37, max_length=77
    ),
    schedule=ScheduleConfig(),
    image_size=64,
    name="tiny",
)

# SDXL base 1.0 (Podell et al. 2023, arXiv 2307.01952), as its released configs state it (weights_layouts/sdxl_*.json).
SDXL = ModelConfig(
    unet=UNetConfig(
        channels=(320, 640, 1280),
        attention=(False, True, True),
        heads=(5, 10, 20),  # 64-dim heads
        transformer_depth=(1, 2, 10),  # the mid block has 10 too; level 0 has no transformers
        cross_attention_dim=2048,  # 768 (CLIP ViT-L) + 1280 (OpenCLIP ViT-bigG)
        linear_projection=True,
        size_embed_dim=256,
        pooled_text_dim=1280,
    ),
    vae=VAEConfig(scaling_factor=0.13025, force_upcast=True),
    text=TextConfig(output="penultimate"),  # CLIP ViT-L/14, all 12 layers kept
    # OpenCLIP ViT-bigG/14 in CLIP form: all 32 layers (the pooled embedding needs the last), pads with "!".
    text_2=TextConfig(hidden_size=1280, num_layers=32, num_heads=20, intermediate_size=5120, activation="gelu",
                      pad_token="!", output="penultimate", projection_dim=1280),
    schedule=ScheduleConfig(),
    image_size=1024,
    name="sdxl",
    empty_prompt="zeros",
)

# SDXL's structure at test size: two encoders, added conditioning, per-level depth, a first level without attention.
TINY_XL = ModelConfig(
    unet=UNetConfig(
        channels=(32, 64),
        attention=(False, True),
        heads=(2, 4),
        layers_per_block=1,
        transformer_depth=(1, 2),
        cross_attention_dim=64,
        linear_projection=True,
        norm_groups=8,
        size_embed_dim=8,
        pooled_text_dim=16,
    ),
    vae=VAEConfig(channels=(32, 64), layers_per_block=1, norm_groups=8, scaling_factor=0.13025, force_upcast=True),
    text=TextConfig(vocab_size=1000, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=37,
                    output="penultimate"),
    text_2=TextConfig(vocab_size=1000, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=37,
                      activation="gelu", pad_token="!", output="penultimate", projection_dim=16),
    schedule=ScheduleConfig(),
    image_size=64,
    name="tiny-xl",
    empty_prompt="zeros",
)

PRESETS: dict[str, ModelConfig] = {c.name: c for c in (SD15, SD21_BASE, SD21, SDXL, TINY, TINY_XL)}


def _optional_dataclass(hint: Any) -> type | None:
    """C for a hint `C | None` with C a config dataclass (ModelConfig.text_2), else None."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if len(args) == 1 and type(None) in typing.get_args(hint) and dataclasses.is_dataclass(args[0]) \
        else None


def _upgrade_pre_sdxl(d: dict[str, Any]) -> dict[str, Any]:
    """A model.json written before SDXL support (one transformer depth for all levels, a single text encoder) in
    today's fields, with exactly the values that format meant: the depth on every level, no added conditioning,
    fp16-safe VAE, the final-layer text output, no second encoder, the encoded empty prompt."""
    unet = d["unet"]
    if not (isinstance(unet, dict) and isinstance(unet.get("transformer_depth"), int)
            and not isinstance(unet["transformer_depth"], bool) and isinstance(unet.get("channels"), list)):
        return d
    up = lambda part, **new: {**d[part], **new} if isinstance(d[part], dict) else d[part]  # noqa: E731
    return {**d, "text_2": None, "empty_prompt": "encoded",
            "unet": up("unet", transformer_depth=[unet["transformer_depth"]] * len(unet["channels"]), size_embed_dim=0,
                       pooled_text_dim=0),
            "vae": up("vae", force_upcast=False), "text": up("text", output="final", projection_dim=0)}


def _checked(value: Any, hint: Any, where: str) -> Any:
    """A JSON value of a config field, checked against the field's type (numbers positive, except steps_offset
    which may be 0); lists become tuples, so configs stay hashable and comparable."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"{where} must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list) or not value:
            raise ValueError(f"{where} must be a non-empty list, got {value!r}")
        return tuple(_checked(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    zero_ok = where.endswith(("steps_offset", "size_embed_dim", "pooled_text_dim", "projection_dim"))
    low_ok = (lambda v: v >= 0) if zero_ok else (lambda v: v > 0)
    if hint is bool:
        ok, kind = isinstance(value, bool), "true or false"
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and low_ok(value)
        kind = "a non-negative integer" if zero_ok else "a positive integer"
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and low_ok(value)
        kind = "a positive number"
    elif hint is str:
        ok, kind = isinstance(value, str), "a string"
    else:
        return value
    if not ok:
        raise ValueError(f"{where} must be {kind}, got {value!r}")
    return value


def _check_consistent(cls: type, v: dict[str, Any], where: str) -> None:
    """What the fields of a config read from a file must satisfy together, beyond each field's type and range: the
    networks would fail later without naming the file or the field (GroupNorm, attention) or the schedule would
    hold NaNs (betas of 1 and more)."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(f"{where}.{message}")

    if cls in (UNetConfig, VAEConfig):
        channels, groups = list(v["channels"]), v["norm_groups"]
        need(all(c % groups == 0 for c in channels),
             f"norm_groups must divide every level's channels, got {groups} for channels {channels}")  # fmt: skip
    if cls is UNetConfig:
        levels = len(v["channels"])
        for key in ("attention", "heads", "transformer_depth"):
            need(len(v[key]) == levels, f"{key} must have one entry per level ({levels}), got {list(v[key])}")
        for c, h in zip(v["channels"], v["heads"]):
            need(c % h == 0, f"heads must divide each level's channels, got {h} heads for {c} channels")
    if cls is TextConfig:
        need(v["hidden_size"] % v["num_heads"] == 0,
             f"num_heads must divide hidden_size {v['hidden_size']}, got {v['num_heads']}")  # fmt: skip
        need(v["pad_token"] != "", "pad_token must be a token, got ''")
    if cls is ScheduleConfig:
        need(v["beta_start"] < v["beta_end"] < 1,
             f"beta_end must lie between beta_start {v['beta_start']} and 1, got {v['beta_end']}")  # fmt: skip
        need(v["steps_offset"] < v["num_train_timesteps"],
             f"steps_offset must be below num_train_timesteps {v['num_train_timesteps']}, got {v['steps_offset']}")
