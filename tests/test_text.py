"""Text encoding against diffusers' StableDiffusionPipeline.encode_prompt on the same CLIPTextModel.

The encoder is transformers' own module on both sides, so what is tested is everything around it:
tokenisation, padding (SD 1.x end token vs SD 2.x "!"), truncation, clip_skip and the final layer norm.
Tolerance: 1e-6 relative (same module, same ids -> the same float operations).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from diffedit.configs import TINY, TextConfig
from diffedit.text import build_text_model, encode_text, load_text_state_dict, load_tokenizer, text_state_dict
from diffedit.text import tokenize, write_tokenizer

from .conftest import WORDS

PROMPTS = ["a photo of a bowl of fruits", "a red circle and a blue square!"]


def reference_pipeline(text_model, tokenizer) -> StableDiffusionPipeline:
    # The smallest UNet / VAE diffusers accepts: encode_prompt never touches them.
    unet = UNet2DConditionModel(
        block_out_channels=(8, 8), norm_num_groups=4, cross_attention_dim=TINY.text.hidden_size,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1, attention_head_dim=2,
    )
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",))
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_model, tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def text_setup(folder: Path, pad_token: str) -> tuple[TextConfig, object, object]:
    write_tokenizer(folder, WORDS, pad_token=pad_token)
    config = dataclasses.replace(TINY.text, pad_token=pad_token, num_layers=3)
    torch.manual_seed(0)
    return config, build_text_model(config), load_tokenizer(folder, config)


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])  # SD 1.x and SD 2.x padding
@pytest.mark.parametrize("clip_skip", [0, 1, 2])
def test_embeddings_equal_diffusers(tmp_path: Path, pad_token: str, clip_skip: int) -> None:
    config, model, tokenizer = text_setup(tmp_path, pad_token)
    ours = encode_text(model, tokenize(tokenizer, PROMPTS, config.max_length), clip_skip)
    pipe = reference_pipeline(model, tokenizer)
    if not hasattr(model, "text_model"):
        # diffusers 0.42 reaches the final norm through `text_encoder.text_model`, a level transformers 5
        # removed; alias it (outside nn.Module registration) so the reference runs unchanged.
        object.__setattr__(model, "text_model", model)
    # diffusers' clip_skip=None and 0 both mean the last layer
    ref, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False, clip_skip=clip_skip or None)
    assert ours.shape == (2, 77, config.hidden_size)
    err = (ours - ref).abs().max() / ref.abs().max()
    assert err <= 1e-6, err


def test_padding_token_is_the_models(tmp_path: Path) -> None:
    config, _, tokenizer = text_setup(tmp_path, "!")
    ids = tokenize(tokenizer, "a red circle", config.max_length)[0]
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    end = int((ids == eos).nonzero()[0])
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|startoftext|>")
    assert (ids[end + 1 :] == tokenizer.convert_tokens_to_ids("!")).all()
    # a model that pads differently refuses the tokenizer instead of silently changing its context
    with pytest.raises(ValueError, match="pads with"):
        load_tokenizer(tmp_path, dataclasses.replace(config, pad_token="<|endoftext|>"))


def test_long_prompts_are_truncated_with_a_warning(tmp_path: Path) -> None:
    config, model, tokenizer = text_setup(tmp_path, "<|endoftext|>")
    with pytest.warns(UserWarning, match="truncated"):
        ids = tokenize(tokenizer, ["red " * 100, "a blue square"], config.max_length)
    assert ids.shape == (2, 77)
    assert ids[0, -1] == tokenizer.convert_tokens_to_ids("<|endoftext|>")  # cut, then closed


def test_state_dict_round_trip_uses_file_names(tmp_path: Path) -> None:
    config, model, _ = text_setup(tmp_path, "!")
    tensors = text_state_dict(model)
    assert all(k.startswith("text_model.") for k in tensors)  # the names of real SD files
    other = build_text_model(config)
    load_text_state_dict(other, {**tensors, "text_model.embeddings.position_ids": torch.arange(77)[None]})
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    del tensors["text_model.final_layer_norm.weight"]
    with pytest.raises(ValueError, match="missing: .*final_layer_norm.weight"):
        load_text_state_dict(other, tensors)


@pytest.mark.parametrize("bad", [3, [], ["ok", 5], None])
def test_bad_prompts_are_rejected(tmp_path: Path, bad: object) -> None:
    config, _, tokenizer = text_setup(tmp_path, "!")
    with pytest.raises((TypeError, ValueError)):
        tokenize(tokenizer, bad, config.max_length)  # type: ignore[arg-type]


def test_clip_skip_out_of_range(tmp_path: Path) -> None:
    config, model, tokenizer = text_setup(tmp_path, "!")
    with pytest.raises(ValueError, match="clip_skip"):
        encode_text(model, tokenize(tokenizer, "a", 77), clip_skip=3)


def test_missing_tokenizer_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path, TINY.text)
