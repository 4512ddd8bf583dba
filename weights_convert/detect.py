"""Which Stable Diffusion an original single-file checkpoint holds: SD 1.x, 2.x or XL base, epsilon or v-prediction.
Other models (the SDXL refiner, SD3, FLUX, ...) are named and refused."""

from __future__ import annotations

import dataclasses

from torch import Tensor

from diffedit.configs import SD15, SD21, SD21_BASE, SDXL, ModelConfig

# The probes diffusers' single_file_utils uses too (CHECKPOINT_KEY_NAMES "v2", "clip", "open_clip").
CONTEXT_KEY = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"  # (C, context dim)
CONV_IN_KEY = "model.diffusion_model.input_blocks.0.0.weight"  # (320, in_channels, 3, 3)
CLIP_KEY = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
OPENCLIP_KEY = "cond_stage_model.model.token_embedding.weight"
# SDXL: its first level has no attention, so the cross-attention width is read one level down.
SDXL_CONTEXT_KEY = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"  # (640, 2048)
SDXL_CLIP_KEY = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
SDXL_OPENCLIP_KEY = "conditioner.embedders.1.model.token_embedding.weight"
SDXL_ADDED_KEY = "model.diffusion_model.label_emb.0.0.weight"  # (1280, 2816): pooled 1280 + 6 sizes x 256
SUPPORTED = "only Stable Diffusion 1.x, 2.x and SDXL base are supported"


def other_model(keys: set[str]) -> str | None:
    """The name of a model we know and do not support, from its single file's keys (diffusers' probes too)."""
    def has(*parts: str) -> bool:
        return any(any(k.startswith(p) or k.startswith("model.diffusion_model." + p) for p in parts) for k in keys)

    if has("joint_blocks.") or any(k.startswith("text_encoders.") for k in keys):
        return "Stable Diffusion 3 (an MMDiT transformer, not a UNet)"
    if has("double_blocks.", "single_blocks."):
        return "FLUX (a rectified-flow transformer, not a UNet)"
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        return "the SDXL refiner (OpenCLIP bigG alone, aesthetic-score conditioning)"
    return None


def detect_single_file(
    state_dict: dict[str, Tensor], prediction_type: str | None = None, image_size: int | None = None
) -> ModelConfig:
    """The ModelConfig of an original SD 1.x / 2.x / XL base single file (as read by ldm.read_checkpoint).

    SDXL base is recognised by its OpenCLIP bigG tower (conditioner.embedders.1.model.*) and checked by its UNet's
    2048-wide cross-attention and 2816-input added embedding; it is epsilon at 1024 px unless overridden.

    SD 1.x vs 2.x is certain: the UNet's cross-attention width (to_k of input_blocks.2.1's attn2) is 768 for
    CLIP ViT-L (SD 1.x) and 1024 for OpenCLIP ViT-H (SD 2.x), and the text encoder's keys must agree.

    epsilon vs v-prediction is a guess: the weights carry no flag (the original code read `parameterization`
    from a separate yaml). Like diffusers (single_file_utils: "v2" -> stabilityai/stable-diffusion-2-1), we take
      - SD 1.x: epsilon at 512 px (SD15), whatever the overrides leave open;
      - SD 2.x: v-prediction at 768 px (SD21), or epsilon at 512 px (SD21_BASE) when image_size=512 or
        prediction_type="epsilon" is given.
    Limits: SD 2.x-base (512, epsilon) files and SD 2.x 768 (v) files have identical names and shapes, so a
    2.x-base file needs prediction_type="epsilon" (or image_size=512); v-prediction fine-tunes of SD 1.x need
    prediction_type="v_prediction". diffusers also reads a .ckpt's top-level `global_step` (875000 means
    SD 2.0-base to it); .safetensors files never carry it and a step count names no release, so we do not.
    The two overrides are used as given; the other one follows from them as above.
    """
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be None, 'epsilon' or 'v_prediction', got {prediction_type!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size <= 0 or image_size % 64):
        raise ValueError(f"image_size must be a positive multiple of 64, got {image_size!r}")
    other = other_model(set(state_dict))
    if other is not None:
        raise ValueError(f"this checkpoint is {other}: {SUPPORTED}")
    if SDXL_OPENCLIP_KEY in state_dict:
        return _sdxl(state_dict, prediction_type, image_size)
    if CONTEXT_KEY not in state_dict or CONV_IN_KEY not in state_dict:
        hint = " (SDXL's conditioner.* keys, but no OpenCLIP bigG tower)" if any(
            k.startswith("conditioner.") for k in state_dict) else ""
        raise ValueError(f"not an original SD 1.x / 2.x / XL checkpoint{hint}: it lacks {CONTEXT_KEY}")
    _check_in_channels(state_dict)

    context = state_dict[CONTEXT_KEY].shape[1]
    text = "clip" if CLIP_KEY in state_dict else "openclip" if OPENCLIP_KEY in state_dict else None
    if (context, text) == (768, "clip"):
        preset = SD15
        v = prediction_type == "v_prediction"
        size = image_size or 512
    elif (context, text) == (1024, "openclip"):
        v = prediction_type == "v_prediction" if prediction_type else image_size != 512
        preset = SD21 if v else SD21_BASE
        size = image_size or preset.image_size
    else:
        raise ValueError(f"unknown model: cross-attention width {context} with text encoder {text or 'missing'}")
    return _with(preset, v, size)


def _check_in_channels(state_dict: dict[str, Tensor]) -> None:
    in_channels = state_dict[CONV_IN_KEY].shape[1]
    if in_channels != 4:
        raise ValueError(f"the UNet takes {in_channels} input channels (inpainting or depth?); only 4 is supported")


def _sdxl(state_dict: dict[str, Tensor], prediction_type: str | None, image_size: int | None) -> ModelConfig:
    """SDXL base: CLIP-L + bigG, 2048-wide context, the added embedding of 2816 inputs. epsilon at 1024 px unless
    overridden (v-prediction fine-tunes exist; the file says nothing)."""
    shapes = {k: tuple(state_dict[k].shape) for k in (SDXL_CONTEXT_KEY, CONV_IN_KEY, SDXL_ADDED_KEY, SDXL_CLIP_KEY)
              if k in state_dict}
    if len(shapes) < 4:
        lacks = sorted({SDXL_CONTEXT_KEY, CONV_IN_KEY, SDXL_ADDED_KEY, SDXL_CLIP_KEY} - shapes.keys())
        raise ValueError(f"an SDXL-style file (OpenCLIP bigG keys) without SDXL base's UNet or CLIP-L: it lacks "
                         f"{', '.join(lacks)}")
    _check_in_channels(state_dict)
    u = SDXL.unet
    added = u.pooled_text_dim + 6 * u.size_embed_dim
    if shapes[SDXL_CONTEXT_KEY][1] != u.cross_attention_dim or shapes[SDXL_ADDED_KEY][1] != added:
        raise ValueError(f"unknown SDXL-like model: cross-attention width {shapes[SDXL_CONTEXT_KEY][1]} (SDXL: "
                         f"{u.cross_attention_dim}), added embedding of {shapes[SDXL_ADDED_KEY][1]} inputs (SDXL: "
                         f"{added}); {SUPPORTED}")
    return _with(SDXL, prediction_type == "v_prediction", image_size or SDXL.image_size)


def _with(preset: ModelConfig, v: bool, size: int) -> ModelConfig:
    """The preset, or a copy with the prediction type / training size the overrides ask for (and its own name)."""
    if (v, size) == (preset.schedule.prediction_type == "v_prediction", preset.image_size):
        return preset
    schedule = dataclasses.replace(preset.schedule, prediction_type="v_prediction" if v else "epsilon")
    name = f"{preset.name}-{'v' if v else 'eps'}-{size}"
    return dataclasses.replace(preset, schedule=schedule, image_size=size, name=name)
