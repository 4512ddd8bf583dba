"""A diffedit model folder -> a diffusers-format folder (`python -m weights_convert OURS OUT --to diffusers`).

The result loads with diffusers' `StableDiffusionPipeline.from_pretrained(OUT)` (and each network with its class's
`from_pretrained`). It is written without importing diffusers: the config files are plain JSON in which every value
of SD's architecture and schedule is stated, not left to diffusers' defaults; the tensors are renamed with the
same tables as the import (diffusers.py), so diffusers -> ours -> diffusers returns the very same tensors.

    model_index.json                         StableDiffusionPipeline, no safety checker / feature extractor
    unet/config.json + diffusion_pytorch_model.safetensors
    vae/config.json + diffusion_pytorch_model.safetensors      current attention names (to_q, ...), Linear shapes
    text_encoder/config.json + model.safetensors               the hub files' names ("text_model.*")
    tokenizer/                                                 copied from our folder
    scheduler/scheduler_config.json          DDIMScheduler with SD's schedule and sampling conventions
    diffedit.json                            where it came from: our config and provenance
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from tqdm import tqdm

from diffedit.configs import ModelConfig
from diffedit.weights import COMPONENTS, TOKENIZER_DIR, atomic_folder, check_state_dict, read_component, read_config

from .convert import CONVERTER, DTYPES, ConversionError, our_shapes, _say
from .diffusers_config import TEXT_FIXED, UNET_FIXED, VAE_FIXED
from .diffusers import unet_to_diffusers, vae_to_diffusers

DIFFUSERS_VERSION = "0.42.1"  # the config format written (and the version the tests load it with)
WEIGHTS = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
}


def export_diffusers(
    src: str | Path, out: str | Path, *, dtype: str | None = None, force: bool = False, quiet: bool = False
) -> Path:
    """Write our model folder SRC as the diffusers-format folder OUT (atomically; OUT replaced only with force)."""
    src, out = Path(src), Path(out)
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if out.exists() and not force:
        raise ConversionError(f"{out} exists; pass --force to replace it")
    config, provenance = read_config(src)
    ours = {c: read_component(src, c) for c in COMPONENTS}
    expected = our_shapes(config)
    problems = []
    for c in COMPONENTS:
        try:
            check_state_dict(ours[c], expected[c], c)
        except ValueError as e:
            problems.append(str(e))
    if problems:
        heading = f"{src} does not hold the model its {config.name!r} config describes:"
        raise ConversionError("\n".join([heading, *problems]))
    tensors = {
        "unet": unet_to_diffusers(ours["unet"]),
        "vae": vae_to_diffusers(ours["vae"]),
        "text_encoder": ours["text_encoder"],  # already under the real files' names
    }
    cast = DTYPES.get(dtype or "")
    dtype_name = str(cast or next(iter(ours["unet"].values())).dtype).removeprefix("torch.")
    with atomic_folder(out, force) as tmp:
        for component in tqdm(COMPONENTS, desc="writing", unit="network", disable=quiet):
            path = tmp / WEIGHTS[component]
            path.parent.mkdir(parents=True, exist_ok=True)
            state = {k: (v.to(cast) if cast is not None and v.is_floating_point() else v).contiguous()
                     for k, v in tensors[component].items()}  # fmt: skip
            save_file(state, str(path), metadata={"format": "pt"})  # transformers wants the "format" entry
        for rel, content in diffusers_configs(config, dtype_name).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
        shutil.copytree(src / TOKENIZER_DIR, tmp / "tokenizer")
        origin = {"exported_by": CONVERTER, "from": str(src), "config": config.to_dict(), "provenance": provenance}
        (tmp / "diffedit.json").write_text(json.dumps(origin, indent=2) + "\n", encoding="utf-8")
    _say(quiet, f"wrote {out} (diffusers format, {dtype_name})")
    return out


def diffusers_configs(config: ModelConfig, dtype_name: str = "float32") -> dict[str, dict[str, Any]]:
    """The JSON files of a diffusers-format SD folder, for `config`. The fixed values are the ones the import
    insists on (convert.py's *_FIXED tables), so an exported folder always converts back."""
    u, v, t, s = config.unet, config.vae, config.text, config.schedule
    version = {"_diffusers_version": DIFFUSERS_VERSION}
    unet = {
        **UNET_FIXED, **version,
        "sample_size": config.image_size // v.downsample_factor,
        "in_channels": u.in_channels, "out_channels": u.out_channels,
        "block_out_channels": list(u.channels),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in u.attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(u.attention)],
        "attention_head_dim": list(u.heads),  # diffusers' name for the number of heads in SD's UNet
        "layers_per_block": u.layers_per_block, "transformer_layers_per_block": u.transformer_depth,
        "cross_attention_dim": u.cross_attention_dim, "use_linear_projection": u.linear_projection,
        "upcast_attention": u.upcast_attention, "norm_num_groups": u.norm_groups, "norm_eps": u.norm_eps,
        "dropout": 0.0,
    }  # fmt: skip
    vae = {
        **VAE_FIXED, **version,
        "in_channels": v.in_channels, "out_channels": v.in_channels, "latent_channels": v.latent_channels,
        "block_out_channels": list(v.channels), "layers_per_block": v.layers_per_block,
        "down_block_types": ["DownEncoderBlock2D"] * len(v.channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(v.channels),
        "norm_num_groups": v.norm_groups, "scaling_factor": v.scaling_factor, "sample_size": config.image_size,
        "force_upcast": True,  # a runtime hint: decode fp16 models in fp32 (SD's VAE overflows in fp16)
    }  # fmt: skip
    text = {
        **TEXT_FIXED, "architectures": ["CLIPTextModel"],
        "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads, "intermediate_size": t.intermediate_size,
        "max_position_embeddings": t.max_length, "hidden_act": t.activation, "layer_norm_eps": t.layer_norm_eps,
        # The token ids of the SD repos' configs (and of diffedit.text.build_text_model); they only pick the
        # pooled token, which SD never uses.
        "bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2,
        "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02,
        "dtype": dtype_name,
    }  # fmt: skip
    scheduler = {
        "_class_name": "DDIMScheduler", **version,
        "num_train_timesteps": s.num_train_timesteps, "beta_start": s.beta_start, "beta_end": s.beta_end,
        "beta_schedule": s.beta_schedule, "trained_betas": None, "prediction_type": s.prediction_type,
        "timestep_spacing": "leading", "steps_offset": s.steps_offset, "set_alpha_to_one": s.final_alpha_is_one,
        "clip_sample": False, "clip_sample_range": 1.0, "thresholding": False, "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0, "rescale_betas_zero_snr": False,
    }  # fmt: skip
    model_index = {
        "_class_name": "StableDiffusionPipeline", **version,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None],
        "requires_safety_checker": False,
    }  # fmt: skip
    return {
        "model_index.json": model_index,
        "unet/config.json": unet,
        "vae/config.json": vae,
        "text_encoder/config.json": text,
        "scheduler/scheduler_config.json": scheduler,
    }
