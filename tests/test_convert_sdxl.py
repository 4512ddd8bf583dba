"""SDXL through weights_convert: single files, diffusers folders, hub repos, the export, and what is refused.

The full-size layouts (shared/weights_layouts/sdxl_*.json: 2515 single-file tensors, ~7 GB in fp16) go through the
very mapping code on the meta device (names, shapes, dtypes; no memory). Values are compared at TINY_XL, SDXL's
structure at test size (two text encoders, the added embedding, per-level depth, an attention-free first level):
one single file written with the ldm names, one diffusers pipeline folder saved by diffusers itself, one export.
Tolerance: relative error max|ours - ref| / max|ref| <= 1e-5 in fp32. Nothing here touches the network: hub
downloads go to a fake snapshot_download serving a local folder.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import json
import shutil
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

import weights_convert.convert as convert_module
from diffedit import load
from diffedit.configs import SDXL, TINY_XL, ModelConfig
from diffedit.text import build_text_model, tokenize, write_tokenizer
from diffedit.weights import sha256_file
from weights_convert.__main__ import main
from weights_convert.convert import ConversionError, config_from_diffusers, convert, find_tokenizers, our_shapes
from weights_convert.convert import to_ours
from weights_convert.detect import detect_single_file
from weights_convert.diffusers import unet_to_diffusers, vae_to_diffusers
from weights_convert.diffusers_config import diffusers_configs
from weights_convert.ldm import ignore_reason, ldm_layout, split_ldm

from ._reference import diffusers_unet_kwargs, diffusers_vae_kwargs, layout, randomize_, relative_error
from .conftest import WORDS
from .test_convert import RandomFill

RTOL = 1e-5
PROMPT = "a photo of a bowl of pears"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "int64": torch.int64}
CLIP_L, BIG_G = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
NETWORKS = ("unet", "vae", "text_encoder", "text_encoder_2")


# ---- sources ------------------------------------------------------------------------------------------------------


def meta_single_file(dtype: torch.dtype = torch.float16, drop: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """sd_xl_base_1.0.safetensors as shape-only tensors (its names and shapes; floats in `dtype`)."""
    spec = layout("sdxl_ldm_single_file")
    exceptions = spec["dtype_exceptions"]
    return {k: torch.empty(s, dtype=DTYPES[exceptions[k]] if k in exceptions else dtype, device="meta")
            for k, s in spec["tensors"].items() if k not in drop}  # fmt: skip


def meta_diffusers(component: str, optional: bool = True) -> dict[str, Tensor]:
    spec = layout(f"sdxl_diffusers_{component}")
    shapes = spec["tensors"] | (spec.get("optional_tensors", {}) if optional else {})
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def hub_configs() -> dict[str, dict[str, Any]]:
    """The config files of stabilityai/stable-diffusion-xl-base-1.0 as config_from_diffusers takes them: each
    component's config from its layout, and the repo's scheduler and model_index."""
    text = {"model_type": "clip_text_model", "layer_norm_eps": 1e-05}
    return {
        "unet": {"_class_name": "UNet2DConditionModel", **layout("sdxl_diffusers_unet")["config"],
                 "num_attention_heads": None},
        "vae": {"_class_name": "AutoencoderKL", **layout("sdxl_diffusers_vae")["config"]},
        "text_encoder": {**text, "architectures": ["CLIPTextModel"], **layout("sdxl_diffusers_text_encoder")["config"]},
        "text_encoder_2": {**text, "architectures": ["CLIPTextModelWithProjection"],
                           **layout("sdxl_diffusers_text_encoder_2")["config"]},
        "scheduler": {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                      "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
                      "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
                      "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                      "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False},
        "model_index": {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True},
    }  # fmt: skip


def tiny_single_file(dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, Tensor]:
    """A TINY_XL single file with the ldm names (what an SDXL training script would save at that size)."""
    fill = RandomFill(seed)
    sd = {k: fill(k, shape).to(dtype) for k, shape in ldm_layout(TINY_XL, "sdxl").items()}
    sd[CLIP_L + "text_model.embeddings.position_ids"] = torch.arange(77).reshape(1, 77)
    return sd


def as_tiny_xl(monkeypatch: pytest.MonkeyPatch) -> None:
    """Detection knows SDXL base's shapes only; the tiny file is told to be TINY_XL, after checking that detection
    does recognise it as SDXL-like (and refuses it: not SDXL base's shapes)."""
    real = convert_module.detect_single_file

    def detect(state_dict: dict[str, Tensor], **overrides: Any) -> ModelConfig:
        with pytest.raises(ValueError, match="SDXL-(like|style)"):
            real(state_dict, **overrides)
        return TINY_XL

    monkeypatch.setattr(convert_module, "detect_single_file", detect)


def tiny_pipeline_folder(folder: Path, seed: int = 0) -> Path:
    """A TINY_XL StableDiffusionXLPipeline with random weights, saved by diffusers itself (save_pretrained)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    write_tokenizer(folder / "tok1", WORDS)
    write_tokenizer(folder / "tok2", WORDS, pad_token="!")
    pipe = StableDiffusionXLPipeline(
        unet=randomize_(UNet2DConditionModel(**diffusers_unet_kwargs(TINY_XL.unet), sample_size=32), seed),
        vae=randomize_(AutoencoderKL(**diffusers_vae_kwargs(TINY_XL.vae), force_upcast=True), seed + 1),
        text_encoder=randomize_(build_text_model(TINY_XL.text), seed + 2),
        text_encoder_2=randomize_(build_text_model(TINY_XL.text_2), seed + 3),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tok1"),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tok2"),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         steps_offset=1, timestep_spacing="leading"),
    )  # fmt: skip
    pipe.save_pretrained(folder / "pipe")
    shutil.rmtree(folder / "tok1"), shutil.rmtree(folder / "tok2")
    return folder / "pipe"


@pytest.fixture(scope="module")
def pipe_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_pipeline_folder(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def converted(pipe_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(str(pipe_src), tmp_path_factory.mktemp("ours") / "tiny-xl", quiet=True)


def shapes_of(state: dict[str, dict[str, Tensor]]) -> dict[str, dict[str, tuple[int, ...]]]:
    return {c: {k: tuple(t.shape) for k, t in s.items()} for c, s in state.items()}


# ---- full size on the meta device ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_full_single_file_layout_maps_onto_sdxl(dtype: torch.dtype) -> None:
    """All 2515 tensors of sd_xl_base_1.0: detected as SDXL, every network tensor consumed (the ignored one is
    position_ids), the output names and shapes are those of the hub's diffusers files and of our SDXL model, the
    source dtype is kept."""
    sd = meta_single_file(dtype)
    assert len(sd) == 2515
    config = detect_single_file(sd)
    assert config == SDXL and config.name == "sdxl"
    assert {k for k in sd if ignore_reason(k) is not None} == {CLIP_L + "text_model.embeddings.position_ids"}
    assert ldm_layout(SDXL, "sdxl") == {k: tuple(t.shape) for k, t in sd.items() if ignore_reason(k) is None}

    out = split_ldm(sd, config)
    for component in NETWORKS:
        ref = layout(f"sdxl_diffusers_{component}")
        aliases = ref.get("aliases", {})
        expected = {aliases.get(k, k): tuple(s) for k, s in ref["tensors"].items()}
        assert shapes_of(out)[component] == expected, component
    ours = to_ours(out, config)
    assert shapes_of(ours) == {c: {k: tuple(s) for k, s in v.items()} for c, v in our_shapes(SDXL).items()}
    assert {t.dtype for s in ours.values() for t in s.values()} == {dtype}

    # v-prediction fine-tunes carry no flag either: the override names the variant
    v = detect_single_file(sd, prediction_type="v_prediction")
    assert v.schedule.prediction_type == "v_prediction" and v.unet == SDXL.unet and v.name == "sdxl-v-1024"


def test_full_single_file_matches_diffusers_converters() -> None:
    """diffusers' own single-file converters, on the same 2515 meta tensors, give exactly our diffusers-format names
    and shapes for the four networks (values: the tiny round trip below)."""
    from diffusers.loaders import single_file_utils as sfu

    sd = meta_single_file()
    ours = split_ldm(sd, SDXL)
    unet_config = {"layers_per_block": 2, "addition_embed_type": "text_time"}
    vae_config = {"down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
    stub = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=1280))
    theirs = {
        "unet": sfu.convert_ldm_unet_checkpoint(sd, unet_config),
        "vae": sfu.convert_ldm_vae_checkpoint(sd, vae_config),
        "text_encoder": sfu.convert_ldm_clip_checkpoint(sd, remove_prefix=CLIP_L),
        "text_encoder_2": sfu.convert_open_clip_checkpoint(stub, sd, prefix=BIG_G),
    }
    # Documented difference: diffusers passes the old position_ids buffer through; we drop it.
    del theirs["text_encoder"]["text_model.embeddings.position_ids"]
    assert shapes_of(ours) == shapes_of(theirs)


def test_droppable_tensors() -> None:
    """Fine-tunes drop what SDXL never reads: CLIP-L's last layer and final norm (zeros stand in), position_ids and
    logit_scale. OpenCLIP bigG's last layer and ln_final feed the pooled embedding: without them, a clear refusal."""
    droppable = layout("sdxl_ldm_single_file")["droppable_tensors"]
    clip_only = tuple(k for k in droppable if not k.startswith(BIG_G) or k.endswith("logit_scale"))
    sd = meta_single_file(drop=clip_only)
    ours = to_ours(split_ldm(sd, detect_single_file(sd)), SDXL)
    assert shapes_of(ours) == {c: {k: tuple(s) for k, s in v.items()} for c, v in our_shapes(SDXL).items()}
    small = tiny_single_file(torch.bfloat16)  # the stand-ins, on real tensors: zeros in the network's dtype
    small = {k: t.float() if k.startswith("model.") else t for k, t in small.items()}  # a merge's mixed dtypes
    last = f"text_model.encoder.layers.{TINY_XL.text.num_layers - 1}."
    dropped = [k for k in small if k.startswith(CLIP_L + last)]
    out = split_ldm({k: t for k, t in small.items() if k not in dropped}, TINY_XL)["text_encoder"]
    stand_in = out[last + "mlp.fc1.weight"]
    assert stand_in.dtype == torch.bfloat16 and not stand_in.any()

    with pytest.raises(ValueError, match="pooled text embedding needs every layer"):
        split_ldm(meta_single_file(drop=tuple(droppable)), SDXL)


def test_full_diffusers_layout_maps_onto_sdxl() -> None:
    """The hub repo's configs give our SDXL preset (force_zeros_for_empty_prompt -> zeros, penultimate outputs,
    fp32 VAE); its four component files map onto our model with and without position_ids, and back to the same
    names; our export's configs read back as SDXL."""
    configs = hub_configs()
    assert config_from_diffusers(configs, None, None, name="stable-diffusion-xl-base-1.0") == SDXL
    expected = {c: {k: tuple(s) for k, s in v.items()} for c, v in our_shapes(SDXL).items()}
    for optional in (True, False):
        folder = {c: meta_diffusers(c, optional) for c in NETWORKS}
        got = to_ours(folder, SDXL)
        assert shapes_of(got) == expected
    aliases = layout("sdxl_diffusers_vae").get("aliases", {})
    assert unet_to_diffusers(got["unet"]).keys() == folder["unet"].keys()
    assert vae_to_diffusers(got["vae"]).keys() == {aliases.get(k, k) for k in folder["vae"]}
    assert got["text_encoder_2"].keys() == folder["text_encoder_2"].keys()

    exported = {rel.split("/")[0].removesuffix(".json"): c for rel, c in diffusers_configs(SDXL).items()}
    assert exported["model_index"]["force_zeros_for_empty_prompt"] is True
    assert config_from_diffusers(exported, None, None) == SDXL
    encoded = copy.deepcopy(configs)
    encoded["model_index"]["force_zeros_for_empty_prompt"] = False
    assert config_from_diffusers(encoded, None, None).empty_prompt == "encoded"


# ---- tiny: values against diffusers --------------------------------------------------------------------------------


@torch.no_grad()
def compare_with_diffusers(ours: Any, unet: Any, vae: Any, text: Any, text_2: Any) -> dict[str, float]:
    """Relative errors of our networks and prompt encoding against diffusers' / transformers' modules."""
    g = torch.Generator().manual_seed(1)
    x, pixels = torch.randn(2, 4, 8, 8, generator=g), torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    ids = [tokenize(tok, [PROMPT, "red apples"], 77) for tok in (ours.tokenizer, ours.tokenizer_2)]
    ref_1 = text(ids[0], output_hidden_states=True)
    ref_2 = text_2(ids[1], output_hidden_states=True)
    cond = ours.encode_prompt([PROMPT, "red apples"])
    tokens = torch.cat([ref_1.hidden_states[-2], ref_2.hidden_states[-2]], dim=-1)  # SDXL: penultimate, both
    sizes = torch.tensor([[64.0, 64, 0, 0, 64, 64], [48, 80, 8, 16, 64, 64]])
    mine = ours.unet(x, 481, cond.tokens, pooled=cond.pooled, sizes=sizes)
    theirs = unet(x, 481, tokens, added_cond_kwargs={"text_embeds": ref_2.text_embeds, "time_ids": sizes}).sample
    return {
        "text tokens": relative_error(cond.tokens, tokens),
        "pooled": relative_error(cond.pooled, ref_2.text_embeds),
        "unet": relative_error(mine, theirs),
        "vae.encode": relative_error(ours.vae.encode(pixels).mode(), vae.encode(pixels).latent_dist.mode()),
        "vae.decode": relative_error(ours.vae.decode(x), vae.decode(x).sample),
    }


def test_tiny_single_file_round_trip(tmp_path: Path, tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A TINY_XL single file (ldm names, fused bigG q/k/v, OpenCLIP's (width, proj) text_projection) -> convert ->
    our model agrees with diffusers' models holding diffusers' own single-file conversion of the same tensors
    (UNet with added conditioning, both encoders' penultimate states, bigG's pooled embedding, VAE). A plain CLIP
    tokenizer folder gives tokenizer/ and, with "!" padding, tokenizer_2/."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    src = tmp_path / "tiny_xl.safetensors"
    sd = tiny_single_file()
    save_file(sd, str(src))
    as_tiny_xl(monkeypatch)
    assert main([str(src), str(tmp_path / "ours"), "--tokenizer", str(tokenizer_dir), "--quiet"]) == 0
    ours = load(tmp_path / "ours")
    assert ours.config == TINY_XL
    assert ours.tokenizer.pad_token == "<|endoftext|>" and ours.tokenizer_2.pad_token == "!"
    assert ours.tokenizer_2.get_vocab() == ours.tokenizer.get_vocab()
    prov = ours.provenance
    assert prov["files"] == {src.name: sha256_file(src)} and prov["tokenizer"]["source"] == str(tokenizer_dir)
    assert prov["tokenizer_2"] == {"derived_from": "tokenizer", "pad_token": "!"}
    # the transposed projection: transformers' Linear weight is OpenCLIP's matrix transposed
    assert torch.equal(load_file(str(tmp_path / "ours/text_encoder_2.safetensors"))["text_projection.weight"],
                       sd[BIG_G + "text_projection"].T)  # fmt: skip

    u = TINY_XL.unet
    unet_config = {"layers_per_block": u.layers_per_block, "addition_embed_type": "text_time"}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**diffusers_unet_kwargs(u))
        vae = AutoencoderKL(**diffusers_vae_kwargs(TINY_XL.vae))
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(sd, unet_config), strict=True, assign=True)
    vae_config = {"down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2}
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(sd, vae_config), strict=True, assign=True)
    text, text_2 = build_text_model(TINY_XL.text), build_text_model(TINY_XL.text_2)
    assert isinstance(text, CLIPTextModel) and isinstance(text_2, CLIPTextModelWithProjection)
    # transformers 5 flattened CLIPTextModel (not CLIPTextModelWithProjection); the files keep "text_model.".
    clip = {k.removeprefix("text_model."): v for k, v in sfu.convert_ldm_clip_checkpoint(sd, CLIP_L).items()}
    result = text.load_state_dict(clip, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys in ([], ["embeddings.position_ids"]), result
    stub = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=TINY_XL.text_2.hidden_size))
    text_2.load_state_dict(sfu.convert_open_clip_checkpoint(stub, sd, prefix=BIG_G), strict=True)
    errors = compare_with_diffusers(ours, unet.eval(), vae.eval(), text.eval(), text_2.eval())
    print("TINY_XL single file, relative errors:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert all(e <= RTOL for e in errors.values()), errors


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_single_files(tmp_path: Path, tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                     dtype: str) -> None:  # fmt: skip
    """fp16 (the released file) and bf16 (fine-tunes) sources keep their dtype bit for bit, or are cast by --dtype."""
    src = tmp_path / "half.safetensors"
    sd = tiny_single_file(DTYPES[dtype], seed=4)
    save_file(sd, str(src))
    as_tiny_xl(monkeypatch)
    kept = load(convert(str(src), tmp_path / "kept", tokenizer=str(tokenizer_dir), quiet=True), dtype=DTYPES[dtype])
    assert kept.provenance["dtype"] == dtype
    written = {c: load_file(str(tmp_path / f"kept/{c}.safetensors")) for c in NETWORKS}
    assert {t.dtype for s in written.values() for t in s.values()} == {DTYPES[dtype]}
    w = sd[BIG_G + "transformer.resblocks.2.attn.in_proj_weight"]
    h = TINY_XL.text_2.hidden_size
    assert torch.equal(written["text_encoder_2"]["text_model.encoder.layers.2.self_attn.v_proj.weight"], w[2 * h :])
    assert torch.equal(written["unet"]["add_embed.linear1.weight"], sd["model.diffusion_model.label_emb.0.0.weight"])
    fp16 = convert(str(src), tmp_path / "fp16", tokenizer=str(tokenizer_dir), dtype="fp16", quiet=True)
    assert {t.dtype for t in load_file(str(fp16 / "unet.safetensors")).values()} == {torch.float16}
    cond = kept.encode_prompt(PROMPT)
    assert cond.tokens.dtype == DTYPES[dtype] and torch.isfinite(cond.pooled).all()


def test_tiny_diffusers_folder_round_trip(pipe_src: Path, converted: Path) -> None:
    """A StableDiffusionXLPipeline folder saved by diffusers -> our TINY_XL model: networks and prompt encoding
    agree with diffusers' (its encode_prompt too, the zeroed negative included)."""
    from diffusers import StableDiffusionXLPipeline

    ours = load(converted)
    assert ours.config == TINY_XL and ours.config.empty_prompt == "zeros" and ours.config.vae.force_upcast
    assert ours.tokenizer_2.pad_token == "!"
    files = ours.provenance["files"]
    for rel in ("text_encoder_2/model.safetensors", "text_encoder_2/config.json", "tokenizer_2/tokenizer.json"):
        assert files[rel] == sha256_file(pipe_src / rel), rel
    pipe = StableDiffusionXLPipeline.from_pretrained(pipe_src)
    errors = compare_with_diffusers(ours, pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
    with torch.no_grad():
        tokens, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPT, device="cpu",
                                                                       do_classifier_free_guidance=True)
        cond, empty = ours.encode_prompt(PROMPT), ours.encode_prompt("")
    errors["encode_prompt"] = relative_error(cond.tokens, tokens)
    errors["encode_prompt pooled"] = relative_error(cond.pooled, pooled)
    print("TINY_XL diffusers folder, relative errors:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert all(e <= RTOL for e in errors.values()), errors
    assert torch.equal(empty.tokens, negative) and torch.equal(empty.pooled, negative_pooled)  # zeros, both


def test_folder_without_tokenizer_2_derives_it(tmp_path: Path, pipe_src: Path, converted: Path) -> None:
    """An SDXL folder without tokenizer_2/: its tokenizer/ with "!" padding, which is what SDXL's is."""
    src = tmp_path / "no-tokenizer-2"
    shutil.copytree(pipe_src, src, ignore=shutil.ignore_patterns("*.safetensors"))
    for rel in ("unet", "vae", "text_encoder", "text_encoder_2"):  # the weights as links: no copy needed
        for f in (pipe_src / rel).glob("*.safetensors"):
            (src / rel / f.name).symlink_to(f)
    shutil.rmtree(src / "tokenizer_2")
    model = load(convert(str(src), tmp_path / "out", quiet=True))
    assert model.provenance["tokenizer_2"] == {"derived_from": "tokenizer", "pad_token": "!"}
    reference = load(converted)
    assert model.tokenizer_2.pad_token == "!" and model.tokenizer_2.get_vocab() == reference.tokenizer_2.get_vocab()
    assert torch.equal(tokenize(model.tokenizer_2, PROMPT, 77), tokenize(reference.tokenizer_2, PROMPT, 77))


def test_export_loads_in_sdxl_pipeline(tmp_path: Path, pipe_src: Path, converted: Path) -> None:
    """--to diffusers on an SDXL folder: StableDiffusionXLPipeline.from_pretrained loads it (text_encoder_2 with its
    projection, tokenizer_2 padding with "!", the added-embedding UNet config, force_zeros_for_empty_prompt), its
    tensors are the source's bit for bit, a 2-step generation runs, and converting it back gives our model again."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    back = tmp_path / "exported"
    assert main([str(converted), str(back), "--to", "diffusers", "--quiet"]) == 0
    index = json.loads((back / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    for rel in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors", "text_encoder_2/model.safetensors"):  # fmt: skip
        a = {k.removeprefix("text_model."): v for k, v in load_file(str(pipe_src / rel)).items()}
        b = {k.removeprefix("text_model."): v for k, v in load_file(str(back / rel)).items()}
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel

    pipe = StableDiffusionXLPipeline.from_pretrained(back)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection) and pipe.tokenizer_2.pad_token == "!"
    assert pipe.unet.config.addition_embed_type == "text_time" and pipe.unet.config.addition_time_embed_dim == 8
    assert list(pipe.unet.config.transformer_layers_per_block) == [1, 2] and pipe.vae.config.force_upcast
    assert pipe.config.force_zeros_for_empty_prompt
    ours = load(converted)
    errors = compare_with_diffusers(ours, pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
    assert all(e <= RTOL for e in errors.values()), errors
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(PROMPT, num_inference_steps=2, height=64, width=64, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert latents.shape == (1, 4, 32, 32) and torch.isfinite(latents).all()

    again = load(convert(str(back), tmp_path / "again", quiet=True))
    assert again.config == ours.config
    for (k, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


# ---- hub repos and tokenizers (a fake hub: nothing leaves the machine) ---------------------------------------------


class FakeHub:
    """snapshot_download over local 'remote' repos: copies the files allow_patterns select, records each call."""

    def __init__(self, root: Path, repos: dict[str, Path]) -> None:
        self.root, self.repos, self.calls = root, repos, []

    def __call__(self, repo_id: str, allow_patterns: list[str] | None = None, **kwargs: Any) -> str:
        self.calls.append((repo_id, list(allow_patterns or ["*"])))
        if repo_id not in self.repos:
            raise FileNotFoundError(f"Repository Not Found for {repo_id}")
        remote, snapshot = self.repos[repo_id], self.root / repo_id.replace("/", "--") / "snapshots" / "0123abcd"
        for path in remote.rglob("*"):
            rel = path.relative_to(remote).as_posix()
            if path.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns or ["*"]):
                (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, snapshot / rel)
        snapshot.mkdir(parents=True, exist_ok=True)
        return str(snapshot)

    def fetched(self) -> set[str]:
        return {p.relative_to(s).as_posix() for s in self.root.glob("*/snapshots/*") for p in s.rglob("*")
                if p.is_file()}  # fmt: skip


@pytest.fixture
def hub(tmp_path: Path, pipe_src: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    import huggingface_hub

    remote = tmp_path / "remote-sdxl"
    shutil.copytree(pipe_src, remote)
    (remote / "sd_xl_base_1.0.safetensors").write_bytes(b"the single file: never fetched")
    (remote / "vae_1_0").mkdir()
    (remote / "vae_1_0/diffusion_pytorch_model.safetensors").write_bytes(b"another VAE: never fetched")
    for rel in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model",
                "text_encoder_2/model"):  # fmt: skip
        full = load_file(str(remote / f"{rel}.safetensors"))
        save_file({k: v.half() for k, v in full.items()}, str(remote / f"{rel}.fp16.safetensors"),
                  metadata={"format": "pt"})  # fmt: skip
    refiner = tmp_path / "remote-refiner"
    shutil.copytree(remote, refiner)
    shutil.rmtree(refiner / "text_encoder"), shutil.rmtree(refiner / "tokenizer")
    index = json.loads((refiner / "model_index.json").read_text())
    index |= {"_class_name": "StableDiffusionXLImg2ImgPipeline", "requires_aesthetics_score": True,
              "text_encoder": [None, None], "tokenizer": [None, None]}  # fmt: skip
    (refiner / "model_index.json").write_text(json.dumps(index))
    fake = FakeHub(tmp_path / "cache", {DEFAULT_XL: remote, "stabilityai/stable-diffusion-xl-refiner-1.0": refiner})
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return fake


DEFAULT_XL = "stabilityai/stable-diffusion-xl-base-1.0"


@pytest.mark.parametrize("dtype", [None, "fp16"])
def test_hub_repo_fetches_only_the_needed_files(tmp_path: Path, hub: FakeHub, dtype: str | None) -> None:
    """stabilityai/stable-diffusion-xl-base-1.0: configs first, then one weight file per network (text_encoder_2
    too; the fp16 variants when fp16 is asked for), both tokenizers; never the root single file or vae_1_0/."""
    out = convert(DEFAULT_XL, tmp_path / "out", dtype=dtype, quiet=True)
    fetched = hub.fetched()
    variant = ".fp16" if dtype else ""
    weights = {f"{c}/diffusion_pytorch_model{variant}.safetensors" for c in ("unet", "vae")}
    weights |= {f"{c}/model{variant}.safetensors" for c in ("text_encoder", "text_encoder_2")}
    assert {f for f in fetched if f.endswith(".safetensors")} == weights
    assert {"model_index.json", "text_encoder_2/config.json", "tokenizer_2/tokenizer.json", "tokenizer/tokenizer.json",
            "scheduler/scheduler_config.json"} <= fetched  # fmt: skip
    assert not any(p.endswith(".safetensors") for p in hub.calls[0][1])  # the configs alone first
    model = load(out)
    assert model.config == TINY_XL and model.provenance["source"] == DEFAULT_XL
    assert model.provenance["dtype"] == ("float16" if dtype else "float32")
    assert model.provenance["revision"] == "0123abcd" and model.tokenizer_2.pad_token == "!"


def test_hub_tokenizers_for_single_files(tmp_path: Path, hub: FakeHub, pipe_src: Path) -> None:
    """An SDXL single file's tokenizers: by default both from the SDXL base repo (tokenizer/ and tokenizer_2/,
    nothing else fetched); from a diffusers SDXL folder given with --tokenizer, its own tokenizer_2/."""
    (first, prov), (second, prov_2) = find_tokenizers(None, SDXL, quiet=True)
    assert first.name == "tokenizer" and second is not None and second.name == "tokenizer_2"
    assert prov["source"] == DEFAULT_XL and prov_2["files"]["tokenizer.json"] == sha256_file(second / "tokenizer.json")
    assert all(f.startswith(("tokenizer/", "tokenizer_2/")) for f in hub.fetched())
    (first, _), (second, _) = find_tokenizers(str(pipe_src), SDXL, quiet=True)
    assert (first, second) == (pipe_src / "tokenizer", pipe_src / "tokenizer_2")
    with pytest.raises(ConversionError, match="could not be fetched"):
        find_tokenizers("org/missing", SDXL, quiet=True)


def test_refiner_hub_repo_is_refused_before_any_weights(tmp_path: Path, hub: FakeHub) -> None:
    with pytest.raises(ConversionError, match="SDXL refiner.*only Stable Diffusion 1.x, 2.x and SDXL base"):
        convert("stabilityai/stable-diffusion-xl-refiner-1.0", tmp_path / "out", quiet=True)
    assert not any(f.endswith(".safetensors") for f in hub.fetched()) and not (tmp_path / "out").exists()


# ---- refusals ------------------------------------------------------------------------------------------------------


def refused_single_files() -> dict[str, dict[str, Tensor]]:
    """The keys that tell each model apart (shapes of the released files, on meta)."""
    e = lambda *shape: torch.empty(shape, device="meta")  # noqa: E731
    unet = "model.diffusion_model."
    return {
        "the SDXL refiner": {  # bigG alone as embedders.0, 384-wide UNet, 2560 = 1280 pooled + 5 x 256 added inputs
            "conditioner.embedders.0.model.text_projection": e(1280, 1280),
            "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": e(1280),
            unet + "label_emb.0.0.weight": e(1536, 2560), unet + "input_blocks.0.0.weight": e(384, 4, 3, 3),
        },
        "Stable Diffusion 3": {
            unet + "joint_blocks.0.context_block.adaLN_modulation.1.bias": e(9216),
            "text_encoders.clip_g.transformer.text_model.embeddings.position_embedding.weight": e(77, 1280),
        },
        "FLUX": {"double_blocks.0.img_attn.norm.key_norm.scale": e(128),
                 "single_blocks.0.linear1.weight": e(21504, 3072)},
        "FLUX (ComfyUI prefix)": {unet + "double_blocks.0.img_attn.norm.key_norm.scale": e(128)},
    }


@pytest.mark.parametrize("name", list(refused_single_files()))
def test_other_single_files_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match=rf"{name.split(' (')[0]}.*only Stable Diffusion 1.x, 2.x and SDXL base"):
        detect_single_file(refused_single_files()[name])


def test_refusals_through_the_cli(tmp_path: Path, pipe_src: Path, capsys: pytest.CaptureFixture) -> None:
    """One line on stderr, exit code 2, nothing written: refiner / SD3 / FLUX single files and diffusers folders."""
    cases = {}
    for name, sd in refused_single_files().items():
        path = tmp_path / f"{name.split()[-1].strip('()')}.safetensors"
        save_file({k: torch.zeros(t.shape[:1] or (1,)) for k, t in sd.items()}, str(path))  # shapes irrelevant
        cases[path] = name.split(" (")[0]
    # diffusers folders
    refiner = tmp_path / "refiner"
    shutil.copytree(pipe_src, refiner)
    shutil.rmtree(refiner / "text_encoder")
    unet = json.loads((refiner / "unet/config.json").read_text())
    (refiner / "unet/config.json").write_text(json.dumps(unet | {"projection_class_embeddings_input_dim": 2560,
                                                                 "addition_time_embed_dim": 256}))  # fmt: skip
    cases[refiner] = "SDXL refiner"
    for folder, pipeline, transformer in (("sd3", "StableDiffusion3Pipeline", "SD3Transformer2DModel"),
                                          ("flux", "FluxPipeline", "FluxTransformer2DModel")):  # fmt: skip
        (tmp_path / folder / "transformer").mkdir(parents=True)
        (tmp_path / folder / "transformer/config.json").write_text(json.dumps({"_class_name": transformer}))
        index = {"_class_name": pipeline, "transformer": ["diffusers", transformer], "vae": ["diffusers", "x"]}
        (tmp_path / folder / "model_index.json").write_text(json.dumps(index))
        cases[tmp_path / folder] = {"sd3": "Stable Diffusion 3", "flux": "FLUX"}[folder]
    for src, what in cases.items():
        out = tmp_path / f"out-{src.name}"
        assert main([str(src), str(out), "--quiet"]) == 2, src
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and what in err and "SDXL base are supported" in err, err
        assert not out.exists()


def test_inconsistent_sdxl_configs_are_refused() -> None:
    configs = hub_configs()
    for change, expected in [
        (lambda c: c.pop("text_encoder_2"), "needs text_encoder_2/config.json"),
        (lambda c: c["unet"].update(projection_class_embeddings_input_dim=2048), "not the pooled 1280 \\+ 6 size"),
        (lambda c: c["unet"].update(addition_embed_type="text"), "addition_embed_type"),
        (lambda c: c["text_encoder_2"].pop("projection_dim"), "projection_dim is missing"),
        (lambda c: c["unet"].update(addition_time_embed_dim="256"), "addition_time_embed_dim '256' must be a positive"),
        (lambda c: c["unet"].update(addition_embed_type=None), "without the UNet's SDXL added embedding"),
        (lambda c: c["model_index"].update(_class_name="FluxPipeline"), "FLUX"),
        (lambda c: c["model_index"].update(requires_aesthetics_score=True), "SDXL refiner"),
    ]:
        bad = copy.deepcopy(configs)
        change(bad)
        with pytest.raises(ConversionError, match=expected):
            config_from_diffusers(bad, None, None)
    # SD 1.x / 2.x configs keep refusing the added embedding's keys on their own
    sd = {k: v for k, v in copy.deepcopy(configs).items() if k != "text_encoder_2"}
    sd["unet"] |= {"addition_embed_type": None, "addition_time_embed_dim": 256}
    with pytest.raises(ConversionError, match="addition_time_embed_dim"):
        config_from_diffusers(sd, None, None)
    small = dataclasses.replace(SDXL, name="x")  # a same-architecture config is named by the preset
    assert config_from_diffusers({k.split("/")[0].removesuffix(".json"): v
                                  for k, v in diffusers_configs(small).items()}, None, None).name == "sdxl"
