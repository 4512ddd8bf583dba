"""The toy model: a small text-to-image latent diffusion model of the shapes world (world.py), trained here
from scratch with this project's own UNet / VAE / CLIP text code (train.py), so that DiffEdit can be run,
tested and shown without the real Stable Diffusion weights.

Same structure as SD 1.x at toy scale: 64x64 RGB images, a 4x-downsampling VAE with 4 latent channels
(16x16 latents), a three-level UNet with cross-attention on its two coarser levels, a two-layer CLIP text encoder over a
word-level vocabulary, and SD's own noise schedule (epsilon prediction, scaled_linear 0.00085 -> 0.012).
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffedit.configs import ModelConfig, ScheduleConfig, TextConfig, UNetConfig, VAEConfig

WEIGHTS = Path(__file__).parent / "weights"  # the shipped model folder (StableDiffusion.save layout, fp16)

TOY_VOCAB_SIZE = 547  # len() of the tokenizer write_tokenizer builds over world.WORDS (checked in train.py)

TOY_CONFIG = ModelConfig(
    unet=UNetConfig(
        channels=(32, 64, 64),  # 16x16, 8x8 and 4x4 latents
        # Transformer blocks (self- and cross-attention) at 8x8 and 4x4 only: at 16x16 they tripled the cost
        # of a training step on CPU; 8x8 cells are 8 image pixels, finer than the smallest object (16 px).
        attention=(False, True, True),
        heads=(2, 4, 4),  # 16-dim heads
        layers_per_block=1,
        transformer_depth=(1, 1, 1),
        cross_attention_dim=64,  # = text hidden size
        norm_groups=8,
    ),
    vae=VAEConfig(
        channels=(16, 32, 64),  # two downsamplings: 64x64 images <-> 16x16 latents
        latent_channels=4,
        layers_per_block=1,
        norm_groups=8,
        # 1 / std of the trained VAE's latents (posterior means of held-out world images): train.py measures
        # it after phase (a) and stores it in the saved model.json, which is what `load` uses. The value here
        # is the shipped model's (seed 0), so TOY_CONFIG describes the shipped weights exactly.
        scaling_factor=0.42064,
    ),
    text=TextConfig(
        vocab_size=TOY_VOCAB_SIZE,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        intermediate_size=256,
        max_length=77,  # as SD, so prompts and embeddings have the shapes the rest of the code expects
        activation="quick_gelu",
        pad_token="<|endoftext|>",  # SD 1.x padding
    ),
    schedule=ScheduleConfig(),  # SD's: 1000 steps, scaled_linear 0.00085 -> 0.012, epsilon, leading + 1
    image_size=64,
    name="toy",
)


def load_toy_model(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):  # -> StableDiffusion
    """The shipped toy model (diffedit/toy/weights), loaded strictly with `diffedit.model.load`."""
    from diffedit.model import load

    if not (WEIGHTS / "model.json").is_file():
        raise FileNotFoundError(f"the toy model is not in {WEIGHTS}: build it with `make toy-model`")
    return load(WEIGHTS, device=device, dtype=dtype)
