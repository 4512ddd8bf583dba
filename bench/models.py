"""The models the benchmark runs, and diffusers' StableDiffusionDiffEditPipeline holding the very same tensors.

- "tiny": diffedit.configs.TINY with seeded random weights (64x64 images).
- "sd15": the full SD 1.5 architecture (860M UNet, 84M VAE, 123M CLIP text encoder) with seeded random weights,
  built on the meta device and filled once; run at 256x256 (32x32 latents).
- "toy": the trained toy model (diffedit.toy.load_toy_model), when it has been built.

diffusers' modules are built on the meta device and adopt our tensors (`load_state_dict(assign=True)` through
weights_convert.diffusers' name tables), and both sides use the same CLIPTextModel object: one copy of the
weights in memory, and identical weights by construction.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import CLIPTokenizer

from diffedit.configs import SD15, TINY, ModelConfig
from diffedit.ddim import NoiseSchedule
from diffedit.model import StableDiffusion, use_fast_layout
from diffedit.text import build_text_model, load_tokenizer, write_tokenizer
from tests._reference import diffusers_pipeline as _reference_pipeline
from tests._reference import randomize_

from .sdxl import fill_on

WORDS = ["a", "and", "photo", "of", "bowl", "fruits", "pears", "red", "blue", "circle", "square"]
MODELS = ("tiny", "sd15", "toy")


@dataclass
class Subject:
    """A model and the input it is benchmarked on."""

    name: str
    model: StableDiffusion
    image: Tensor  # (1, 3, H, W) in [0, 1]
    source: str
    target: str
    note: str = ""


def build(
    name: str, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0, size: int | None = None
) -> Subject:
    """The named model on `device` / `dtype`, with a fixed input image; size overrides the image side."""
    if name == "tiny":
        model = _random_model(TINY, seed, meta=False)
        size = size or TINY.image_size
        source, target, note = "a bowl of fruits", "a bowl of pears", "random weights"
    elif name == "sd15":
        model = _random_model(SD15, seed, meta=True)
        size = size or 256
        source, target, note = "a bowl of fruits", "a bowl of pears", "SD 1.5 architecture, random weights"
    elif name == "toy":
        from diffedit.toy import load_toy_model  # raises FileNotFoundError until `make toy-model` has run

        model = load_toy_model()
        size = size or model.config.image_size
        source, target, note = _toy_prompts()
    else:
        raise ValueError(f"unknown model {name!r}: choose from {MODELS}")
    model = use_fast_layout(model.to(device=device, dtype=dtype).eval())  # load()'s layout: NHWC on CUDA in half
    image = _image(name, size, seed)
    return Subject(name, model, image, source, target, note)


def _toy_prompts() -> tuple[str, str, str]:
    try:  # a held-out edit pair of the shapes world: its captions before and after
        from diffedit.toy import world

        pair = world.heldout_edit_pairs(1)[0]
        return pair.source.caption, pair.target.caption, f"trained toy model, held-out {pair.kind} edit"
    except Exception:  # the world's API is not what is measured here
        return "a red circle", "a blue square", "trained toy model"


def _image(name: str, size: int, seed: int) -> Tensor:
    if name == "toy":
        try:
            from diffedit.toy import world

            picture, _ = world.render(world.heldout_edit_pairs(1)[0].source, size)
            return world.to_tensor(picture[None]).float()
        except Exception:  # fall back to a smooth random picture
            pass
    g = torch.Generator().manual_seed(seed + 1)
    coarse = torch.rand(1, 3, max(size // 16, 1), max(size // 16, 1), generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


# ---- random models ------------------------------------------------------------------------------------------
def _tokenizers(config: ModelConfig) -> tuple[CLIPTokenizer, CLIPTokenizer | None]:
    """Small BPE tokenizers of WORDS, padding as the config's encoders do (SDXL's second with "!")."""
    with tempfile.TemporaryDirectory(prefix="bench-tok-") as tmp:
        write_tokenizer(f"{tmp}/1", WORDS, pad_token=config.text.pad_token)
        if config.text_2 is None:
            return load_tokenizer(f"{tmp}/1", config.text), None
        write_tokenizer(f"{tmp}/2", WORDS, pad_token=config.text_2.pad_token)
        return load_tokenizer(f"{tmp}/1", config.text), load_tokenizer(f"{tmp}/2", config.text_2)


def _random_model(config: ModelConfig, seed: int, meta: bool) -> StableDiffusion:
    tokenizer, _ = _tokenizers(config)
    if not meta:
        model = StableDiffusion(config, tokenizer)
    else:
        # Skip PyTorch's default initialisation of ~1B parameters: build on meta, then allocate and fill once.
        with torch.device("meta"):
            model = StableDiffusion(config, tokenizer)
        model.unet.to_empty(device="cpu")
        model.vae.to_empty(device="cpu")
        model.text_encoder = build_text_model(config.text)  # it has constant buffers (position ids): build it for real
        model.schedule = NoiseSchedule.from_config(config.schedule)  # the schedule was created on meta too
    randomize_(model.unet, seed)
    randomize_(model.vae, seed + 1)
    randomize_(model.text_encoder, seed + 2)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    left += [f.name for f in dataclasses.fields(model.schedule) if isinstance(getattr(model.schedule, f.name), Tensor)
             and getattr(model.schedule, f.name).is_meta]
    assert not left, f"tensors left on the meta device: {left[:5]}"
    return model.eval()


def random_model_on(config: ModelConfig, device: str, dtype: torch.dtype, seed: int = 0) -> StableDiffusion:
    """`config` (SD or SDXL) with seeded random weights, filled where it runs: the UNet and VAE are built without
    storage and filled on `device` (an SDXL UNet is 10 GB in fp32: never made on the host first), the text encoders
    are built for real (constant position-id buffers) and randomised on the CPU. The VAE stays fp32 where its config
    says `force_upcast`."""
    tokenizer, tokenizer_2 = _tokenizers(config)
    model = StableDiffusion(config, tokenizer, empty=True, tokenizer_2=tokenizer_2)
    model.unet = fill_on(model.unet, device, dtype, seed)
    model.vae = fill_on(model.vae, device, torch.float32 if config.vae.force_upcast else dtype, seed + 1)
    for i, encoder in enumerate(e for e in (model.text_encoder, model.text_encoder_2) if e is not None):
        randomize_(encoder, seed + 2 + i)
    return use_fast_layout(model.to(device=device, dtype=dtype).eval())


# ---- diffusers on the same tensors --------------------------------------------------------------------------
def diffusers_pipeline(model: StableDiffusion, sample_size: int = 64):
    """The compat tests' pipeline (tests/_reference.py: our tensors, renamed), channels_last on CUDA."""
    pipe = _reference_pipeline(model, sample_size)
    if model.device.type == "cuda":
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    return pipe


def shares_weights(model: StableDiffusion, pipe: Any) -> bool:
    """True when every UNet / VAE tensor of the pipeline is one of our model's tensors (same storage)."""
    ours = {t.data_ptr() for t in [*model.unet.parameters(), *model.vae.parameters()]}
    theirs = [t.data_ptr() for t in [*pipe.unet.parameters(), *pipe.vae.parameters()]]
    return all(p in ours for p in theirs) and pipe.text_encoder is model.text_encoder
