"""Shared fixtures: a tiny random Stable Diffusion (TINY config) with its own small tokenizer."""

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
