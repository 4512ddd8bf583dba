"""diffusers reference networks built from our configs, with seeded random weights, and copies into ours.

diffusers is a test-only dependency: it is the numerical reference our hand-written networks must match.
Weights reach our models only through `weights_convert.diffusers`, so every parity test also tests the mapping.
"""

from __future__ import annotations

import copy
import os

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from diffedit.configs import UNetConfig, VAEConfig
from diffedit.unet import UNet
from diffedit.vae import AutoencoderKL
from weights_convert.diffusers import unet_from_diffusers, vae_from_diffusers

# The project's shared folder sits beside the checkout (../shared), as CI lays it out; nowhere else is looked at.
LAYOUTS = Path(__file__).resolve().parents[2] / "shared" / "weights_layouts"


def require_layouts() -> None:
    """Skip where the layouts are absent (a bare clone), but fail in CI, which always has ../shared beside it."""
    if LAYOUTS.is_dir():
        return
    message = f"no weights layouts at {LAYOUTS} (the project's shared folder beside the checkout)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def diffusers_unet_kwargs(c: UNetConfig) -> dict[str, Any]:
    return dict(
        in_channels=c.in_channels,
        out_channels=c.out_channels,
        block_out_channels=c.channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in c.attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(c.attention)),
        mid_block_type="UNetMidBlock2DCrossAttn",
        layers_per_block=c.layers_per_block,
        transformer_layers_per_block=c.transformer_depth,
        attention_head_dim=c.heads,  # diffusers' naming quirk: for SD this is the number of heads
        cross_attention_dim=c.cross_attention_dim,
        use_linear_projection=c.linear_projection,
        upcast_attention=c.upcast_attention,
        norm_num_groups=c.norm_groups,
        norm_eps=c.norm_eps,
        flip_sin_to_cos=True,
        freq_shift=0,
        act_fn="silu",
        downsample_padding=1,
        **(dict(addition_embed_type="text_time", addition_time_embed_dim=c.size_embed_dim,
                projection_class_embeddings_input_dim=c.pooled_text_dim + 6 * c.size_embed_dim)
           if c.added_conditioning else {}),
    )


def diffusers_vae_kwargs(c: VAEConfig) -> dict[str, Any]:
    levels = len(c.channels)
    return dict(
        in_channels=c.in_channels,
        out_channels=c.in_channels,
        latent_channels=c.latent_channels,
        block_out_channels=c.channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=c.layers_per_block,
        norm_num_groups=c.norm_groups,
        act_fn="silu",
        scaling_factor=c.scaling_factor,
    )


@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Overwrite every parameter with seeded noise, norms and biases included, so that no parity test passes
    because of a zero bias or a unit norm scale. Weights ~ N(0, 1/fan_in) keep activations of order one."""
    gen = torch.Generator().manual_seed(seed)
    norms = {id(m.weight) for m in model.modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm))}
    for p in model.parameters():
        noise = torch.randn(p.shape, generator=gen)
        if id(p) in norms:
            p.copy_(1.0 + 0.2 * noise)
        elif p.ndim == 1:
            p.copy_(0.1 * noise)
        else:
            p.copy_(noise / (p[0].numel() ** 0.5))
    return model


def _build(cls: type, kwargs: dict[str, Any], seed: int) -> nn.Module:
    # Built on the meta device and then filled: skips diffusers' default initialisation of ~860M parameters.
    with torch.device("meta"):
        model = cls(**kwargs)
    assert not list(model.buffers()), "a buffer would be left uninitialised by to_empty"
    return randomize_(model.to_empty(device="cpu"), seed).eval()


def reference_unet(config: UNetConfig, seed: int = 0) -> nn.Module:
    from diffusers import UNet2DConditionModel

    return _build(UNet2DConditionModel, diffusers_unet_kwargs(config), seed)


def reference_vae(config: VAEConfig, seed: int = 0) -> nn.Module:
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    return _build(DiffusersAutoencoderKL, diffusers_vae_kwargs(config), seed)


def _ours(cls: type, config: Any, state_dict: dict[str, Tensor], share: bool) -> nn.Module:
    """Our model holding `state_dict` (strict). share=True builds it on meta and adopts the tensors themselves
    (no second copy of a full-size network in memory); share=False copies them into a fresh model."""
    if share:
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state_dict, strict=True, assign=True)
    else:
        model = cls(config)
        model.load_state_dict(state_dict, strict=True)
    return model.eval()


def our_unet_from(reference: nn.Module, config: UNetConfig, share: bool = False) -> UNet:
    return _ours(UNet, config, unet_from_diffusers(reference.state_dict()), share)


def our_vae_from(reference: nn.Module, config: VAEConfig, share: bool = False) -> AutoencoderKL:
    return _ours(AutoencoderKL, config, vae_from_diffusers(reference.state_dict()), share)


def layout(name: str) -> dict[str, Any]:
    """A real checkpoint's tensor names and shapes, from shared/weights_layouts/<name>.json."""
    require_layouts()
    return json.loads((LAYOUTS / f"{name}.json").read_text())


def relative_error(ours: Tensor, reference: Tensor) -> float:
    """max |ours - reference| / max |reference|: the tolerance measure used by every parity test."""
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def diffusers_pipeline(model: Any, sample_size: int = 64) -> Any:
    """diffusers' StableDiffusionDiffEditPipeline whose UNet and VAE *are* our model's tensors (renamed through
    weights_convert.diffusers, not copied), with the same text encoder object and SD's DDIM settings spelled out.
    Used by the compat tests and by bench/."""
    from diffusers import AutoencoderKL, DDIMInverseScheduler, DDIMScheduler, StableDiffusionDiffEditPipeline
    from diffusers import UNet2DConditionModel

    from weights_convert.diffusers import unet_to_diffusers, vae_to_diffusers

    with torch.device("meta"):
        unet = UNet2DConditionModel(**diffusers_unet_kwargs(model.config.unet), sample_size=sample_size)
        vae = AutoencoderKL(**diffusers_vae_kwargs(model.config.vae))
    unet.load_state_dict(unet_to_diffusers(model.unet.state_dict()), strict=True, assign=True)
    vae.load_state_dict(vae_to_diffusers(model.vae.state_dict()), strict=True, assign=True)
    for m in (unet, vae):
        left = [n for n, t in [*m.named_parameters(), *m.named_buffers()] if t.is_meta]
        assert not left, f"diffusers tensors left on meta: {left[:5]}"
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, set_alpha_to_one=False, clip_sample=False,
        prediction_type=model.config.schedule.prediction_type,
    )
    tokenizer = copy.deepcopy(model.tokenizer)
    tokenizer.model_max_length = model.config.text.max_length  # diffusers pads to the tokenizer's length
    pipe = StableDiffusionDiffEditPipeline(
        vae=vae.eval(), text_encoder=model.text_encoder, tokenizer=tokenizer, unet=unet.eval(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None,
        inverse_scheduler=DDIMInverseScheduler.from_config(scheduler.config), requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
