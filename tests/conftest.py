"""Shared fixtures: a tiny random Stable Diffusion (TINY config) with its own small tokenizer.

A stage test module (test_edit, test_chain, test_stage_properties) gets its own module-scoped `model` and `images`
from here: it names the weights' seed in MODEL_SEED and its input batch in IMAGE_COUNT / IMAGE_SEED (16x16 images,
8x8 latents)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from diffedit.configs import TINY, ModelConfig, ScheduleConfig
from diffedit.text import load_tokenizer, write_tokenizer

WORDS = ["a", "and", "photo", "of", "bowl", "fruits", "pears", "apples", "red", "blue", "circle", "square"]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(folder, WORDS)
    return folder


def tiny_config(prediction_type: str = "epsilon") -> ModelConfig:
    return dataclasses.replace(TINY, schedule=ScheduleConfig(prediction_type=prediction_type))  # type: ignore[arg-type]


def make_tiny_model(tokenizer_dir: Path, prediction_type: str = "epsilon", seed: int = 0):  # -> StableDiffusion
    """A TINY StableDiffusion whose every parameter (norms and biases too) is random, so that parity
    tests cannot pass by accident on zero- or one-initialised tensors."""
    from diffedit.model import StableDiffusion

    config = tiny_config(prediction_type)
    model = StableDiffusion(config, load_tokenizer(tokenizer_dir, config.text))
    # Norm scales stay near one so activations keep their scale through the deep stacks.
    norm_weights = {id(m.weight) for m in model.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            scale = 0.2 if p.ndim > 1 else 0.05
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if id(p) in norm_weights else 0.0))
    return model.eval()


@pytest.fixture(scope="session", params=["epsilon", "v_prediction"])
def tiny_model(request: pytest.FixtureRequest, tokenizer_dir: Path):
    return make_tiny_model(tokenizer_dir, request.param)


def seeded(seed: int = 0) -> torch.Generator:
    """A CPU generator: the same bits on every device."""
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def model(request: pytest.FixtureRequest, tokenizer_dir: Path):
    """The module's TINY epsilon model, its weights seeded with the module's MODEL_SEED."""
    return make_tiny_model(tokenizer_dir, "epsilon", seed=request.module.MODEL_SEED)


@pytest.fixture(scope="module")
def images(request: pytest.FixtureRequest) -> torch.Tensor:
    """The module's input: IMAGE_COUNT uniform random 16x16 RGB images in [0, 1], drawn with IMAGE_SEED."""
    return torch.rand(request.module.IMAGE_COUNT, 3, 16, 16, generator=seeded(request.module.IMAGE_SEED))
