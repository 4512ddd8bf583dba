"""diffusers' config files (unet, vae, text_encoder[, text_encoder_2], scheduler, model_index) <-> our ModelConfig:
the config half of the diffusers format, beside its tensor-name table (diffusers.py). Anything we do not implement
(the SDXL refiner, SD3, FLUX, ...) is refused by name."""

from __future__ import annotations

import dataclasses
from typing import Any

from diffedit.configs import PRESETS, ModelConfig, ScheduleConfig, TextConfig, UNetConfig, VAEConfig

DIFFUSERS_VERSION = "0.42.1"  # the config format written (and the version the tests load it with)

# The config file of each component in a diffusers folder.
CONFIG_FILES = {
    "unet": "unet/config.json",
    "vae": "vae/config.json",
    "text_encoder": "text_encoder/config.json",
    "scheduler": "scheduler/scheduler_config.json",
}
# SDXL's second text encoder (OpenCLIP bigG as CLIPTextModelWithProjection), read where the folder has it.
SDXL_CONFIG_FILES = {"text_encoder_2": "text_encoder_2/config.json"}
SUPPORTED = "only Stable Diffusion 1.x, 2.x and SDXL base are supported"
# Pipelines of models that are not SD 1.x / 2.x / XL base (model_index.json's _class_name), by what they are.
OTHER_PIPELINES = {
    "StableDiffusion3Pipeline": "Stable Diffusion 3 (an MMDiT transformer, not a UNet)",
    "FluxPipeline": "FLUX (a rectified-flow transformer, not a UNet)",
}


class ConversionError(ValueError):
    """A problem with the user's input (not a bug): reported as one message, nothing written."""


# The pad token of each text encoder family (it shapes the padding embeddings the UNet attends to):
# OpenAI CLIP ViT-L (quick_gelu, SD 1.x) pads with its end token, OpenCLIP ViT-H (gelu, SD 2.x) with "!" (id 0).
PAD_TOKEN = {"quick_gelu": "<|endoftext|>", "gelu": "!"}


# ---- diffusers configs -> ModelConfig -----------------------------------------------------------------------------

# Keys of diffusers' config files whose value is fixed in SD 1.x / 2.x, and so in our networks. A config that states
# another value describes a model we do not implement, and is refused. Keys absent from a file take diffusers'
# defaults, which are these values.
UNET_FIXED = {
    "_class_name": "UNet2DConditionModel", "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "dual_cross_attention": False, "num_attention_heads": None,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "class_embed_type": None,
    "num_class_embeds": None, "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional", "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "attention_type": "default",
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None, "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
}  # fmt: skip
# SD 1.x / 2.x: no added embedding. SDXL base: "text_time", the pooled text embedding and 6 size numbers of
# addition_time_embed_dim each (projection_class_embeddings_input_dim = pooled + 6 x that).
UNET_NO_ADDED = {"addition_embed_type": None, "addition_time_embed_dim": None,
                 "projection_class_embeddings_input_dim": None}  # fmt: skip
SIZE_NUMBERS = 6  # original (h, w), crop top-left (top, left), target (h, w)
VAE_FIXED = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "shift_factor": None, "latents_mean": None,
    "latents_std": None, "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
}  # fmt: skip
TEXT_FIXED = {"model_type": "clip_text_model"}
# The schedulers of SD 1.x / 2.x repos and the samplers that share their discrete DDPM training schedule.
SCHEDULERS = {
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
    "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
}  # fmt: skip
SCHEDULER_FIXED = {"trained_betas": None, "rescale_betas_zero_snr": False, "thresholding": False}
TEXT_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "max_position_embeddings")  # fmt: skip


def config_from_diffusers(
    configs: dict[str, dict[str, Any]], prediction_type: str | None, image_size: int | None, name: str = "custom"
) -> ModelConfig:
    """unet/vae/text_encoder/scheduler config dicts (SDXL: text_encoder_2 too; model_index where the folder has one)
    -> our ModelConfig; anything we do not implement is refused."""
    u, v, t, s = configs["unet"], configs["vae"], configs["text_encoder"], configs["scheduler"]
    t2, index = configs.get("text_encoder_2"), configs.get("model_index") or {}
    other = other_pipeline(index, u)
    if other is not None:
        raise ConversionError(f"this is {other}: {SUPPORTED}")
    problems = [
        *_fixed_problems(u, UNET_FIXED, CONFIG_FILES["unet"]),
        *_fixed_problems(v, VAE_FIXED, CONFIG_FILES["vae"]),
        *_fixed_problems(t, TEXT_FIXED, CONFIG_FILES["text_encoder"]),
        *_fixed_problems(s, SCHEDULER_FIXED, CONFIG_FILES["scheduler"]),
        *(_fixed_problems(t2, TEXT_FIXED, SDXL_CONFIG_FILES["text_encoder_2"]) if t2 is not None else []),
    ]

    def need(d: dict[str, Any], key: str, where: str) -> Any:
        if key not in d:  # no library default is trusted for a value that shapes the model
            problems.append(f"{where}: {key} is missing")
        return d.get(key)

    # UNet
    down, up = list(u.get("down_block_types", [])), list(u.get("up_block_types", []))
    attention = tuple(b == "CrossAttnDownBlock2D" for b in down)
    if not down or any(b not in ("CrossAttnDownBlock2D", "DownBlock2D") for b in down):
        problems.append(f"unet: unsupported down_block_types {down}")
    if up != ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]:
        problems.append(f"unet: up_block_types {up} do not mirror down_block_types {down}")
    channels = tuple(need(u, "block_out_channels", "unet") or ())
    heads = need(u, "attention_head_dim", "unet")  # diffusers' naming quirk: for SD this is the number of heads
    heads = tuple(heads) if isinstance(heads, list) else (heads,) * len(channels)
    for key in ("in_channels", "out_channels"):
        if u.get(key, 4) != 4:
            problems.append(f"unet: {key} {u[key]} (inpainting or depth model?): only 4 is supported")
    layers, depth = u.get("layers_per_block", 2), u.get("transformer_layers_per_block", 1)
    if not isinstance(layers, int):
        problems.append(f"unet: layers_per_block {layers!r}: only one value for all levels is supported")
    depth = tuple(depth) if isinstance(depth, list) else (depth,) * len(channels)  # one value: every level
    sdxl = u.get("addition_embed_type") == "text_time"
    size_dim = 0
    if sdxl:
        size_dim = need(u, "addition_time_embed_dim", "unet")
        added = need(u, "projection_class_embeddings_input_dim", "unet")
        pooled = t2.get("projection_dim") if isinstance(t2, dict) else None
        for key, value in (("addition_time_embed_dim", size_dim), ("projection_class_embeddings_input_dim", added)):
            if key in u and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                problems.append(f"unet: {key} {value!r} must be a positive integer")
        if t2 is None:
            problems.append(f"unet: addition_embed_type 'text_time' (SDXL) needs {SDXL_CONFIG_FILES['text_encoder_2']}")
        elif not isinstance(pooled, int):
            problems.append("text_encoder_2: projection_dim is missing (the pooled text embedding's width)")
        elif isinstance(size_dim, int) and isinstance(added, int) and added != pooled + SIZE_NUMBERS * size_dim:
            problems.append(f"unet: projection_class_embeddings_input_dim {added} is not the pooled {pooled} + "
                            f"{SIZE_NUMBERS} size numbers x {size_dim} of SDXL base")
    else:
        problems += _fixed_problems(u, UNET_NO_ADDED, CONFIG_FILES["unet"])
        if t2 is not None:
            problems.append(f"{SDXL_CONFIG_FILES['text_encoder_2']} without the UNet's SDXL added embedding "
                            "(addition_embed_type 'text_time')")
    # VAE
    vae_levels = len(v.get("block_out_channels", ()))
    if v.get("down_block_types") != ["DownEncoderBlock2D"] * vae_levels or v.get("up_block_types") != [
        "UpDecoderBlock2D"
    ] * vae_levels:
        problems.append("vae: down/up_block_types must be DownEncoderBlock2D / UpDecoderBlock2D on every level")
    if v.get("in_channels", 3) != v.get("out_channels", 3):
        problems.append("vae: in_channels and out_channels differ")
    # text encoder
    activation = need(t, "hidden_act", "text_encoder")
    if activation not in PAD_TOKEN:
        problems.append(f"text_encoder: hidden_act {activation!r} (expected one of {sorted(PAD_TOKEN)})")
    activation_2 = need(t2, "hidden_act", "text_encoder_2") if t2 is not None else None
    if t2 is not None and activation_2 not in PAD_TOKEN:
        problems.append(f"text_encoder_2: hidden_act {activation_2!r} (expected one of {sorted(PAD_TOKEN)})")
    # scheduler: only the training schedule and the prediction type describe the model; sampler settings do not
    if s.get("_class_name") not in SCHEDULERS:
        problems.append(f"scheduler: {s.get('_class_name')!r} is not a Stable Diffusion 1.x / 2.x scheduler")
    if s.get("beta_schedule") not in ("scaled_linear", "linear"):
        problems.append(f"scheduler: beta_schedule {s.get('beta_schedule')!r} (expected scaled_linear or linear)")
    file_prediction = s.get("prediction_type", "epsilon")  # absent in SD 1.x repos: diffusers' default, epsilon
    if file_prediction not in ("epsilon", "v_prediction"):
        problems.append(f"scheduler: prediction_type {file_prediction!r} (expected epsilon or v_prediction)")
    sample_size = u.get("sample_size")
    if image_size is None and not isinstance(sample_size, int):
        problems.append("unet: no sample_size, so the training resolution is unknown: pass --image-size")
    for where, c in (("text_encoder", t), ("text_encoder_2", t2)):
        problems += [f"{where}: {k} is missing" for k in TEXT_KEYS if c is not None and k not in c]
    problems += [f"scheduler: {k} is missing" for k in ("num_train_timesteps", "beta_start", "beta_end") if k not in s]
    if problems:
        raise ConversionError("unsupported diffusers config:\n  " + "\n  ".join(problems))

    try:
        unet = UNetConfig(
            in_channels=4, out_channels=4, channels=channels, attention=attention, heads=heads,
            layers_per_block=layers, transformer_depth=depth, cross_attention_dim=u["cross_attention_dim"],
            linear_projection=u.get("use_linear_projection", False), upcast_attention=u.get("upcast_attention", False),
            norm_groups=u.get("norm_num_groups", 32), norm_eps=u.get("norm_eps", 1e-5),
            size_embed_dim=size_dim if sdxl else 0, pooled_text_dim=t2["projection_dim"] if sdxl else 0,
        )  # fmt: skip
        vae = VAEConfig(
            in_channels=v.get("in_channels", 3), latent_channels=v.get("latent_channels", 4),
            channels=tuple(v["block_out_channels"]), layers_per_block=v.get("layers_per_block", 1),
            norm_groups=v.get("norm_num_groups", 32), scaling_factor=v.get("scaling_factor", 0.18215),
            # SD 1.x / 2.x folders carry no flag, or diffusers' default True, which our pre-SDXL models never
            # meant; SDXL's VAE overflows in fp16 and says so (the fp16-fix VAEs say false).
            force_upcast=bool(v.get("force_upcast", True)) if sdxl else False,
        )  # fmt: skip
        # SDXL: both encoders give the UNet their penultimate hidden states; CLIP-L pads with its end token even
        # there (quick_gelu), bigG with "!" (gelu): PAD_TOKEN's rule holds for both.
        output = "penultimate" if sdxl else "final"
        text = _text_config(t, activation, output, projection_dim=0)
        text_2 = _text_config(t2, activation_2, output, projection_dim=t2["projection_dim"]) if sdxl else None
        schedule = ScheduleConfig(
            num_train_timesteps=s["num_train_timesteps"], beta_start=s["beta_start"], beta_end=s["beta_end"],
            beta_schedule=s["beta_schedule"], prediction_type=prediction_type or file_prediction,
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"unsupported diffusers config: {type(e).__name__}: {e}") from e
    size = image_size or sample_size * vae.downsample_factor
    empty = "zeros" if sdxl and index.get("force_zeros_for_empty_prompt", True) else "encoded"  # diffusers' default
    try:
        config = ModelConfig(unet=unet, vae=vae, text=text, schedule=schedule, image_size=size, name=name,
                             text_2=text_2, empty_prompt=empty)
    except ValueError as e:
        raise ConversionError(f"unsupported diffusers config: {e}") from e
    return named(config)


def _text_config(t: dict[str, Any], activation: str, output: str, projection_dim: int) -> TextConfig:
    return TextConfig(
        vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], num_layers=t["num_hidden_layers"],
        num_heads=t["num_attention_heads"], intermediate_size=t["intermediate_size"],
        max_length=t["max_position_embeddings"], activation=activation,  # type: ignore[arg-type]
        layer_norm_eps=t.get("layer_norm_eps", 1e-5), pad_token=PAD_TOKEN[activation],
        output=output, projection_dim=projection_dim,  # type: ignore[arg-type]
    )  # fmt: skip


def other_pipeline(model_index: dict[str, Any], unet: dict[str, Any] | None) -> str | None:
    """What a diffusers folder holds, when it is a model we know and do not support (None: not one of those).

    The SDXL refiner: model_index says requires_aesthetics_score, or its UNet's added embedding takes 5 size
    numbers (original size, crop, aesthetic score: 2560 = 1280 pooled + 5 x 256) instead of base's 6."""
    name = model_index.get("_class_name")
    if model_index.get("requires_aesthetics_score") or (
        isinstance(unet, dict) and unet.get("addition_embed_type") == "text_time"
        and unet.get("projection_class_embeddings_input_dim") == 2560 and unet.get("addition_time_embed_dim") == 256
    ):  # fmt: skip
        return "the SDXL refiner (aesthetic-score conditioning, OpenCLIP bigG alone)"
    if name in OTHER_PIPELINES:
        return OTHER_PIPELINES[name]
    if "transformer" in model_index:  # SD3, FLUX, PixArt, ...: a transformer/ where SD has its unet/
        return f"a transformer-based model ({name or 'unknown pipeline'}, not a UNet)"
    return None


def named(config: ModelConfig) -> ModelConfig:
    """A config equal to one of our presets gets the preset's name."""
    for preset in PRESETS.values():
        if dataclasses.replace(config, name=preset.name) == preset:
            return preset
    return config


def _fixed_problems(d: dict[str, Any], fixed: dict[str, Any], where: str) -> list[str]:
    def same(value: Any, expected: Any) -> bool:  # per-level lists of one repeated value count as that value
        return value == expected or (isinstance(value, list) and bool(value) and all(x == expected for x in value))

    return [f"{where}: {k} = {d[k]!r} (supported: {v!r})" for k, v in fixed.items() if k in d and not same(d[k], v)]


# ---- ModelConfig -> diffusers configs (the export) -----------------------------------------------------------------


def diffusers_configs(config: ModelConfig, dtype_name: str = "float32") -> dict[str, dict[str, Any]]:
    """The JSON files of a diffusers-format SD folder (SDXL: StableDiffusionXLPipeline, with text_encoder_2/), for
    `config`. The fixed values are the ones the import insists on (the *_FIXED tables above), so an exported folder
    always converts back."""
    u, v, t, s = config.unet, config.vae, config.text, config.schedule
    sdxl = config.text_2 is not None
    version = {"_diffusers_version": DIFFUSERS_VERSION}
    unet = {
        **UNET_FIXED, **version, **UNET_NO_ADDED,
        "sample_size": config.image_size // v.downsample_factor,
        "in_channels": u.in_channels, "out_channels": u.out_channels,
        "block_out_channels": list(u.channels),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in u.attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(u.attention)],
        "attention_head_dim": list(u.heads),  # diffusers' name for the number of heads in SD's UNet
        "layers_per_block": u.layers_per_block, "transformer_layers_per_block": list(u.transformer_depth),
        "cross_attention_dim": u.cross_attention_dim, "use_linear_projection": u.linear_projection,
        "upcast_attention": u.upcast_attention, "norm_num_groups": u.norm_groups, "norm_eps": u.norm_eps,
        "dropout": 0.0,
    }  # fmt: skip
    if u.added_conditioning:  # SDXL base's "text_time": pooled text + 6 sinusoidally embedded size numbers
        unet |= {
            "addition_embed_type": "text_time", "addition_time_embed_dim": u.size_embed_dim,
            "projection_class_embeddings_input_dim": u.pooled_text_dim + SIZE_NUMBERS * u.size_embed_dim,
            "addition_embed_type_num_heads": 64,  # read by diffusers' "text" embedding only; SDXL's value
        }  # fmt: skip
    vae = {
        **VAE_FIXED, **version,
        "in_channels": v.in_channels, "out_channels": v.in_channels, "latent_channels": v.latent_channels,
        "block_out_channels": list(v.channels), "layers_per_block": v.layers_per_block,
        "down_block_types": ["DownEncoderBlock2D"] * len(v.channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(v.channels),
        "norm_num_groups": v.norm_groups, "scaling_factor": v.scaling_factor, "sample_size": config.image_size,
        # A runtime hint: decode fp16 models in fp32. SD 1.x / 2.x: always (what these folders have always said);
        # SDXL: the config's policy, which the import reads back.
        "force_upcast": v.force_upcast if sdxl else True,
    }  # fmt: skip
    scheduler = {
        "_class_name": "DDIMScheduler", **version,
        "num_train_timesteps": s.num_train_timesteps, "beta_start": s.beta_start, "beta_end": s.beta_end,
        "beta_schedule": s.beta_schedule, "trained_betas": None, "prediction_type": s.prediction_type,
        "timestep_spacing": "leading", "steps_offset": s.steps_offset, "set_alpha_to_one": s.final_alpha_is_one,
        "clip_sample": False, "clip_sample_range": 1.0, "thresholding": False, "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0, "rescale_betas_zero_snr": False,
    }  # fmt: skip
    networks = {
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }  # fmt: skip
    if sdxl:
        model_index = {
            "_class_name": "StableDiffusionXLPipeline", **version, **networks,
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "image_encoder": [None, None], "feature_extractor": [None, None],
            "force_zeros_for_empty_prompt": config.empty_prompt == "zeros",
        }  # fmt: skip
    else:
        model_index = {
            "_class_name": "StableDiffusionPipeline", **version, **networks,
            "safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None],
            "requires_safety_checker": False,
        }  # fmt: skip
    files = {
        "model_index.json": model_index,
        "unet/config.json": unet,
        "vae/config.json": vae,
        "text_encoder/config.json": _text_json(t, "CLIPTextModel", dtype_name),
        "scheduler/scheduler_config.json": scheduler,
    }
    if config.text_2 is not None:
        files["text_encoder_2/config.json"] = _text_json(config.text_2, "CLIPTextModelWithProjection", dtype_name)
    return files


def _text_json(t: TextConfig, architecture: str, dtype_name: str) -> dict[str, Any]:
    return {
        **TEXT_FIXED, "architectures": [architecture],
        "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads, "intermediate_size": t.intermediate_size,
        "max_position_embeddings": t.max_length, "hidden_act": t.activation, "layer_norm_eps": t.layer_norm_eps,
        # The token ids of the SD repos' configs (and of diffedit.text.build_text_model); they pick the pooled
        # token (transformers' argmax over the ids when eos is 2), which only SDXL's bigG uses.
        "bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2,
        "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02,
        **({"projection_dim": t.projection_dim} if t.projection_dim else {}),
        "dtype": dtype_name,
    }  # fmt: skip
