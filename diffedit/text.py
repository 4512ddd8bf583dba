"""Prompts -> the token embeddings the UNet cross-attends to.

The text encoder is transformers' CLIPTextModel (Radford et al. 2021, "Learning Transferable Visual Models
From Natural Language Supervision"), used exactly as Stable Diffusion uses it: the whole 77-token sequence
of the last (or, with clip_skip, an earlier) layer, passed through the final layer norm; no attention
mask, so padding tokens are part of the context. SD 1.x pads with the end token, SD 2.x with "!".

SDXL (Podell et al. 2023, §2.1) has two encoders, CLIP ViT-L and OpenCLIP ViT-bigG (CLIPTextModelWithProjection):
the context is both encoders' penultimate hidden states (no final layer norm) side by side, and the pooled
embedding is bigG's projected end-of-text state of its last layer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .configs import TextConfig
from .weights import check_state_dict



@dataclass(frozen=True, eq=False)
class PromptEmbeddings:
    """What the UNet is conditioned on for a batch of prompts: `StableDiffusion.encode_prompt` returns it, and every
    stage takes it wherever it takes a prompt (so a prompt is encoded once and handed on).

    SD 1.x / 2.x condition on the token embeddings alone. A model that needs more (SDXL: a pooled text embedding
    and size conditioning) adds a field here, and every stage carries it through `map` without a new keyword.
    """

    tokens: Tensor  # (B, tokens, cross_attention_dim): the sequence the UNet cross-attends to
    pooled: Tensor | None = None  # (B, pooled_text_dim): SDXL's pooled text embedding; None for SD 1.x / 2.x
    # (B, 6) SDXL size conditioning in pixels: original (h, w), crop top-left (top, left), target (h, w). None: the
    # image's own size, uncropped (StableDiffusion.unet_output fills it in from the latents).
    sizes: Tensor | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, rows: int | slice) -> "PromptEmbeddings":
        """Some rows of the batch (an int keeps its row dimension)."""
        return self.map(lambda v: v[rows : rows + 1] if isinstance(rows, int) else v[rows])

    def map(self, f: Callable[[Tensor], Tensor]) -> "PromptEmbeddings":
        """The same embeddings with `f` applied to every tensor (rows repeated, moved, cast, concatenated)."""
        changes = {k.name: f(v) for k in dataclasses.fields(self) if isinstance(v := getattr(self, k.name), Tensor)}
        return dataclasses.replace(self, **changes)

    def equal(self, other: "PromptEmbeddings") -> bool:
        """Bit-identical tensors in every field (None where both are None)."""
        pairs = [(getattr(self, k.name), getattr(other, k.name)) for k in dataclasses.fields(self)]
        return all(a is b or (isinstance(a, Tensor) and isinstance(b, Tensor) and torch.equal(a, b)) for a, b in pairs)

    @staticmethod
    def cat(items: Sequence["PromptEmbeddings"]) -> "PromptEmbeddings":
        """The rows of `items` one after another (one batched UNet call for several prompt lists)."""
        first = items[0]
        names = [k.name for k in dataclasses.fields(first) if isinstance(getattr(first, k.name), Tensor)]
        for e in items:
            if [k.name for k in dataclasses.fields(e) if isinstance(getattr(e, k.name), Tensor)] != names:
                raise ValueError(f"cannot join embeddings with fields {names} and embeddings without some of them")
        return dataclasses.replace(first, **{k: torch.cat([getattr(e, k) for e in items]) for k in names})


Prompts = str | Sequence[str]
PromptInput = str | Sequence[str] | PromptEmbeddings  # what a stage takes: text, or what encode_prompt returned


TextModel = CLIPTextModel | CLIPTextModelWithProjection


def build_text_model(config: TextConfig) -> TextModel:
    """A CLIPTextModel (CLIPTextModelWithProjection with a projection) with random weights and exactly the
    architecture of `config`."""
    hf_config = CLIPTextConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_length,
        hidden_act=config.activation,
        layer_norm_eps=config.layer_norm_eps,
        projection_dim=config.projection_dim or 512,
        # Token ids only matter for the pooled output (SDXL's): eos 2 keeps transformers' argmax pooling, the
        # position of the highest id, which is the end token in CLIP's vocabulary (and in write_tokenizer's).
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
    )
    # Stated, not left to the library's choice: SDPA is the same math as the eager path.
    hf_config._attn_implementation = "sdpa"
    return (CLIPTextModelWithProjection if config.projection_dim else CLIPTextModel)(hf_config).eval()


def load_tokenizer(folder: str | os.PathLike[str], config: TextConfig) -> CLIPTokenizer:
    """CLIPTokenizer from a folder written by `save_pretrained` (vocab.json, merges.txt, ...).

    The pad token decides the padding embeddings the UNet sees, so it must be the model's
    (SD 1.x "<|endoftext|>", SD 2.x "!"): a mismatch is an error, not a silent change of the model.
    """
    folder = Path(folder)
    has_bpe_files = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if not has_bpe_files and not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer in {folder}: expected vocab.json + merges.txt or tokenizer.json")
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token != config.pad_token:
        raise ValueError(
            f"tokenizer in {folder} pads with {tokenizer.pad_token!r} but the model expects {config.pad_token!r}"
        )
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the text model only {config.vocab_size}")
    return tokenizer


def tokenize(tokenizer: CLIPTokenizer, prompts: Prompts, max_length: int) -> Tensor:
    """Token ids (B, max_length): start token, prompt, end token, padding. Long prompts are cut, with a warning."""
    prompts = as_prompt_list(prompts)
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    full = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
    if full.shape[1] > max_length:
        cut = [p for p, row in zip(prompts, full) if int((row != tokenizer.pad_token_id).sum()) > max_length]
        shown = [p if len(p) <= 60 else p[:57] + "..." for p in cut[:3]] + (["..."] if len(cut) > 3 else [])
        warnings.warn(f"{len(cut)} prompt(s) longer than {max_length} tokens were truncated: {shown}", stacklevel=3)
    return ids.input_ids


def encode_text(model: TextModel, input_ids: Tensor, clip_skip: int = 0, output: str = "final") -> Tensor:
    """Token ids -> (B, 77, hidden) embeddings (`encode_text_pooled` without the pooled embedding)."""
    return encode_text_pooled(model, input_ids, clip_skip, output)[0]


@torch.no_grad()
def encode_text_pooled(
    model: TextModel, input_ids: Tensor, clip_skip: int = 0, output: str = "final"
) -> tuple[Tensor, Tensor | None]:
    """Token ids -> (B, 77, hidden) embeddings, and the (B, projection_dim) pooled embedding of a model with a
    projection (None otherwise).

    output "final": clip_skip = k takes the output of the k-th layer from the end (k = 0: the last layer), through
    the final layer norm, as the diffusers / A1111 convention does. "penultimate" (SDXL): the hidden states k + 1
    layers from the end, not normalised (diffusers' SDXL `hidden_states[-(clip_skip + 2)]`). The pooled embedding
    always comes from the last layer.
    """
    layers, extra = model.config.num_hidden_layers, int(output == "penultimate")
    if not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or not 0 <= clip_skip < layers - extra:
        raise ValueError(f"clip_skip must be an integer in [0, {layers - 1 - extra}], got {clip_skip!r}")
    skipped = clip_skip + extra  # layers left out at the end
    device = next(model.parameters()).device
    out = model(input_ids.to(device), output_hidden_states=skipped > 0)
    pooled = out.text_embeds if isinstance(model, CLIPTextModelWithProjection) else None
    if output == "penultimate":
        return out.hidden_states[-(skipped + 1)], pooled
    if clip_skip == 0:
        return out.last_hidden_state, pooled
    return model.get_submodule(_prefix(model) + "final_layer_norm")(out.hidden_states[-(clip_skip + 1)]), pooled


# On disk, text encoder tensors keep the names of the real SD files ("text_model.encoder.layers.0...").
# transformers >= 5 dropped the "text_model." level from CLIPTextModel itself, so add / strip it here.
FILE_PREFIX = "text_model."


PROJECTION = "text_projection.weight"  # CLIPTextModelWithProjection's projection, beside text_model.*


def _prefix(model: TextModel) -> str:
    return FILE_PREFIX if hasattr(model, "text_model") else ""


def text_state_dict(model: TextModel) -> dict[str, Tensor]:
    """The model's tensors under the on-disk names."""
    prefix = _prefix(model)
    return {
        FILE_PREFIX + k[len(prefix) :] if k != PROJECTION else k: v
        for k, v in model.state_dict().items() if not k.endswith("position_ids")
    }


def load_text_state_dict(model: TextModel, tensors: dict[str, Tensor], what: str = "text encoder") -> None:
    """Load on-disk tensors strictly (position_ids, a constant buffer in some files, may be present or not)."""
    bad = [k for k in tensors if not k.startswith(FILE_PREFIX) and k != PROJECTION]
    if bad:
        raise ValueError(f"{what} tensors outside {FILE_PREFIX!r}: {bad[:10]}")
    prefix = _prefix(model)
    wanted = {k for k in model.state_dict() if not k.endswith("position_ids")}
    given = {prefix + k[len(FILE_PREFIX) :] if k != PROJECTION else k: v
             for k, v in tensors.items() if not k.endswith("position_ids")}
    check_state_dict(given, {k: model.state_dict()[k].shape for k in wanted}, what)
    model.load_state_dict(given, strict=False)  # strict by the check above; position_ids is a buffer


def as_prompt_list(prompts: Prompts) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"a prompt must be a string or a list of strings, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("empty list of prompts")
    return list(prompts)


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2 / CLIP byte-level BPE: every byte gets a printable unicode character.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def write_tokenizer(
    folder: str | os.PathLike[str], words: Sequence[str], pad_token: str = "<|endoftext|>", max_length: int = 77
) -> int:
    """Write a small CLIP-style BPE tokenizer to `folder` and return its vocabulary size.

    Every byte (alone and word-final) is a token, so any text can be encoded; each of `words` becomes a
    single token through a chain of merges. For tests and for models trained here (the real SD models
    come with OpenAI's 49408-token vocabulary).
    """
    byte_chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for piece in byte_chars + [c + "</w>" for c in byte_chars]:
        vocab.setdefault(piece, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in sorted(set(w.lower() for w in words)):
        if not word.isalpha():
            raise ValueError(f"tokenizer words must be alphabetic, got {word!r}")
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            merge = (left, right)
            if merge not in merges:
                merges.append(merge)
            left = left + right
            vocab.setdefault(left, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=max_length)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    # Also the classic vocab.json + merges.txt pair, which every CLIP tokenizer version (and the SD hub
    # repos) read.
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(vocab)
