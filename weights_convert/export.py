"""A diffedit model folder -> a diffusers-format folder (`python -m weights_convert OURS OUT --to diffusers`).

The result loads with diffusers' `StableDiffusionPipeline.from_pretrained(OUT)` (SDXL: `StableDiffusionXLPipeline`),
and each network with its class's `from_pretrained`. It is written without importing diffusers: the config files are
plain JSON in which every value of SD's architecture and schedule is stated, not left to diffusers' defaults
(diffusers_config.py, beside the import's translation); the tensors are renamed with the same tables as the import
(diffusers.py), so diffusers -> ours -> diffusers returns the very same tensors.

    model_index.json                         StableDiffusionPipeline, no safety checker / feature extractor
    unet/config.json + diffusion_pytorch_model.safetensors
    vae/config.json + diffusion_pytorch_model.safetensors      current attention names (to_q, ...), Linear shapes
    text_encoder/config.json + model.safetensors               the hub files' names ("text_model.*")
    tokenizer/                                                 copied from our folder
    text_encoder_2/ tokenizer_2/                               SDXL (StableDiffusionXLPipeline): bigG, with projection
    scheduler/scheduler_config.json          DDIMScheduler with SD's schedule and sampling conventions
    diffedit.json                            where it came from: our config and provenance
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file
from tqdm import tqdm

from diffedit.weights import TOKENIZER_2_DIR, TOKENIZER_DIR, atomic_folder, check_state_dict, components
from diffedit.weights import read_component, read_config

from .convert import CONVERTER, DTYPES, ConversionError, check_out, our_shapes, _say
from .diffusers_config import diffusers_configs
from .diffusers import unet_to_diffusers, vae_to_diffusers

WEIGHTS = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
    "text_encoder_2": "text_encoder_2/model.safetensors",
}


def export_diffusers(
    src: str | Path, out: str | Path, *, dtype: str | None = None, force: bool = False, quiet: bool = False
) -> Path:
    """Write our model folder SRC as the diffusers-format folder OUT (atomically; OUT replaced only with force)."""
    src, out = Path(src), Path(out)
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if not src.is_dir():  # before read_config, whose "model.json is missing" would hide a mistyped path
        raise ConversionError(f"{src} is a file, not a diffedit model folder" if src.exists()
                              else f"{src}: no such diffedit model folder")  # fmt: skip
    check_out(src, out, force)
    config, provenance = read_config(src)
    networks = components(config)
    ours = {c: read_component(src, c) for c in networks}
    expected = our_shapes(config)
    problems = []
    for c in networks:
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
        **{c: ours[c] for c in networks if c.startswith("text_encoder")},  # already under the real files' names
    }
    cast = DTYPES.get(dtype or "")
    dtype_name = str(cast or next(iter(ours["unet"].values())).dtype).removeprefix("torch.")
    with atomic_folder(out, force) as tmp:
        for component in tqdm(networks, desc="writing", unit="network", disable=quiet):
            path = tmp / WEIGHTS[component]
            path.parent.mkdir(parents=True, exist_ok=True)
            state = {k: (v.to(cast) if cast is not None and v.is_floating_point() else v).contiguous()
                     for k, v in tensors[component].items()}  # fmt: skip
            save_file(state, str(path), metadata={"format": "pt"})  # transformers wants the "format" entry
        for rel, content in diffusers_configs(config, dtype_name).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
        shutil.copytree(src / TOKENIZER_DIR, tmp / "tokenizer")
        if config.text_2 is not None:
            shutil.copytree(src / TOKENIZER_2_DIR, tmp / "tokenizer_2")
        origin = {"exported_by": CONVERTER, "from": str(src), "config": config.to_dict(), "provenance": provenance}
        (tmp / "diffedit.json").write_text(json.dumps(origin, indent=2) + "\n", encoding="utf-8")
    _say(quiet, f"wrote {out} (diffusers format, {dtype_name})")
    return out
