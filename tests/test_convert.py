"""`python -m weights_convert`: every real layout converts and matches diffusers, bad input is refused with nothing
written, output is atomic, export to diffusers round-trips bit for bit, hub snapshots and tokenizers resolve.

Full-size files hold seeded random values with the real layouts' names, shapes and dtypes
(shared/weights_layouts); the networks are compared at tiny inputs (8x8 latents, 64x64 pixels, 8 tokens). Forward
parity runs on one SD 1.5 source (single .safetensors) and one SD 2.1 source (diffusers folder, old VAE attention
names, position_ids); the other two layouts are checked name by name on the meta device.
Tolerance: relative error max|ours - ref| / max|ref| <= 1e-5 in fp32 (the networks compute in another order).
"""

from __future__ import annotations

import copy
import gc
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

import diffedit.weights
from diffedit import load
from diffedit.configs import SD15, SD21, TINY
from diffedit.text import encode_text, tokenize, write_tokenizer
from diffedit.weights import sha256_file
from weights_convert.__main__ import main
from weights_convert.convert import ConversionError, config_from_diffusers, convert, find_tokenizer, our_shapes
from weights_convert.convert import to_ours
from weights_convert.detect import detect_single_file
from weights_convert.diffusers import unet_to_diffusers, vae_to_diffusers
from weights_convert.export import export_diffusers
from weights_convert.ldm import split_ldm

from ._reference import diffusers_unet_kwargs, diffusers_vae_kwargs, layout, randomize_, relative_error
from .conftest import WORDS
from .test_convert_ldm import Payload, ldm_schedule_buffers, make_state_dict, read_layout

RTOL = 1e-5
ROOT = Path(__file__).resolve().parents[1]

# The config files of the real hub repos (stable-diffusion-v1-5/stable-diffusion-v1-5,
# stabilityai/stable-diffusion-2-1), as published: old diffusers / transformers versions, keys they did not know
# yet left out.
_UNET_COMMON = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}  # fmt: skip
_VAE_COMMON = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "norm_num_groups": 32, "out_channels": 3, "up_block_types": ["UpDecoderBlock2D"] * 4,
}  # fmt: skip
_TEXT_COMMON = {
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
    "initializer_factor": 1.0, "initializer_range": 0.02, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
    "model_type": "clip_text_model", "pad_token_id": 1, "torch_dtype": "float32", "vocab_size": 49408,
}  # fmt: skip
_SCHEDULE = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
             "clip_sample": False}  # fmt: skip
REAL_CONFIGS = {
    "sd15": {
        "model_index.json": {
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
            "feature_extractor": ["transformers", "CLIPImageProcessor"],
            "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
            "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
        "unet/config.json": {**_UNET_COMMON, "_diffusers_version": "0.6.0", "attention_head_dim": 8,
                             "cross_attention_dim": 768, "sample_size": 64},
        "vae/config.json": {**_VAE_COMMON, "_diffusers_version": "0.6.0", "sample_size": 512},
        "text_encoder/config.json": {**_TEXT_COMMON, "_name_or_path": "openai/clip-vit-large-patch14",
                                     "hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072,
                                     "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768,
                                     "transformers_version": "4.22.0.dev0"},
        "scheduler/scheduler_config.json": {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", **_SCHEDULE},
    },
    "sd21": {
        "model_index.json": {
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.10.0.dev0",
            "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
            "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
        "unet/config.json": {**_UNET_COMMON, "_diffusers_version": "0.10.0.dev0", "attention_head_dim": [5, 10, 20, 20],
                             "cross_attention_dim": 1024, "dual_cross_attention": False, "num_class_embeds": None,
                             "only_cross_attention": False, "sample_size": 96, "use_linear_projection": True,
                             "upcast_attention": True},
        "vae/config.json": {**_VAE_COMMON, "_diffusers_version": "0.10.0.dev0", "sample_size": 768},
        "text_encoder/config.json": {**_TEXT_COMMON,
                                     "_name_or_path": "hf-models/stable-diffusion-v2-768x768/text_encoder",
                                     "hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096,
                                     "num_attention_heads": 16, "num_hidden_layers": 23, "projection_dim": 512,
                                     "transformers_version": "4.25.0.dev0"},
        "scheduler/scheduler_config.json": {"_class_name": "DDIMScheduler", "_diffusers_version": "0.10.0.dev0",
                                            **_SCHEDULE, "prediction_type": "v_prediction"},
    },
}  # fmt: skip
PAD = {"sd15": "<|endoftext|>", "sd21": "!"}


def real_configs(name: str) -> dict[str, dict]:
    """{"unet", "vae", "text_encoder", "scheduler"} -> config dict, as config_from_diffusers takes them."""
    return copy.deepcopy({rel.split("/")[0]: c for rel, c in REAL_CONFIGS[name].items() if "/" in rel})


# ---- making sources -----------------------------------------------------------------------------------------------


class RandomFill:
    """Seeded values of a sensible scale, cheaply: norm scales ~1, biases ~0.1, weights ~N(0, 1/fan_in).

    Every tensor is a slice of one pool of 2^24 + 17 normal draws, at its own random offset (drawing 1.1 billion
    fresh normals costs ~20 s here); the pool is longer than any SD tensor but the token embeddings (where no row
    repeats another), and two tensors of one shape hold different values: a tensor under the wrong name changes
    the outputs.
    """

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.pool = torch.randn(2**24 + 17, generator=self.gen)

    def __call__(self, name: str, shape: tuple[int, ...]) -> Tensor:
        n, size = torch.Size(shape).numel(), len(self.pool)
        start = int(torch.randint(size, (1,), generator=self.gen))
        reps = -(-(start + n) // size)  # > 1 for the token embeddings only, which then repeat after 2^24 values
        noise = (self.pool.repeat(reps) if reps > 1 else self.pool)[start : start + n].reshape(shape)
        if len(shape) == 1:
            is_norm_scale = name.endswith("weight") and ("norm" in name or ".ln_" in name)
            return 1.0 + 0.2 * noise if is_norm_scale else 0.1 * noise
        return noise / (torch.Size(shape[1:]).numel() ** 0.5) if shape else noise.clone()


def layout_tensors(name: str, seed: int, optional: bool = True) -> dict[str, Tensor]:
    """A layout's tensors: its names, shapes and dtypes, seeded random floats; SD's schedule in the buffers."""
    spec = layout(name)
    dtypes = {"float32": torch.float32, "int32": torch.int32, "int64": torch.int64}
    exceptions = spec.get("dtype_exceptions", {}) | spec.get("optional_dtypes", {})
    shapes = spec["tensors"] | (spec.get("optional_tensors", {}) if optional else {})
    schedule, fill, out = ldm_schedule_buffers(), RandomFill(seed), {}
    for key, shape in shapes.items():
        dtype = dtypes[exceptions.get(key, spec["default_dtype"])]
        if key in schedule:
            out[key] = schedule[key]
        elif dtype != torch.float32:
            out[key] = torch.arange(torch.Size(shape).numel(), dtype=dtype).reshape(shape)
        else:
            out[key] = fill(key, tuple(shape))
    return out


def write_configs(folder: Path, configs: dict[str, dict]) -> None:
    for rel, content in configs.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(json.dumps(content, indent=2))


def write_real_diffusers_folder(folder: Path, name: str, seed: int) -> None:
    """A diffusers-format folder as the hub repo holds it (old VAE attention names, position_ids, configs)."""
    write_configs(folder, REAL_CONFIGS[name])
    files = {"unet": "unet/diffusion_pytorch_model.safetensors", "vae": "vae/diffusion_pytorch_model.safetensors",
             "text_encoder": "text_encoder/model.safetensors"}  # fmt: skip
    for i, (component, rel) in enumerate(files.items()):
        tensors = layout_tensors(f"{name}_diffusers_{component}", seed + i)
        save_file(tensors, str(folder / rel), metadata={"format": "pt"})
        del tensors
    write_tokenizer(folder / "tokenizer", WORDS, pad_token=PAD[name])


def tiny_diffusers_folder(folder: Path, seed: int = 0, pad_token: str = "<|endoftext|>") -> Path:
    """TINY as diffusers and transformers save it themselves (their current configs and names)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from diffedit.text import build_text_model

    unet = randomize_(UNet2DConditionModel(**diffusers_unet_kwargs(TINY.unet), sample_size=32), seed)
    unet.save_pretrained(folder / "unet")
    randomize_(AutoencoderKL(**diffusers_vae_kwargs(TINY.vae)), seed + 1).save_pretrained(folder / "vae")
    randomize_(build_text_model(TINY.text), seed + 2).save_pretrained(folder / "text_encoder")
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1).save_pretrained(folder / "scheduler")  # fmt: skip
    write_tokenizer(folder / "tokenizer", WORDS, pad_token=pad_token)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_diffusers_folder(tmp_path_factory.mktemp("src") / "tiny")


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---- full size: forward parity with diffusers ---------------------------------------------------------------------


def tiny_inputs(config) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 8, config.unet.cross_attention_dim, generator=g)
    pixels = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 3821, 49407, 49407]])  # start, 5 words, end, padding
    return latents, context, pixels, ids


@torch.no_grad()
def compare_networks(ours, unet, vae, text, config) -> dict[str, float]:
    """Relative errors of our networks against diffusers' / transformers' on the same weights and inputs."""
    latents, context, pixels, ids = tiny_inputs(config)
    errors = {}
    if unet is not None:
        errors["unet"] = relative_error(ours.unet(latents, 500, context), unet(latents, 500, context).sample)
    if vae is not None:
        ref_mean = vae.encode(pixels).latent_dist.mean
        errors["vae.encode"] = relative_error(ours.vae.encode(pixels).mode(), ref_mean)
        errors["vae.decode"] = relative_error(ours.vae.decode(latents), vae.decode(latents).sample)
    if text is not None:
        errors["text"] = relative_error(encode_text(ours.text_encoder, ids), text(ids).last_hidden_state)
    return errors


@pytest.mark.slow
def test_sd15_single_file_converts_and_matches_diffusers(tmp_path: Path, tokenizer_dir: Path) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel

    src = tmp_path / "v1-5-pruned-emaonly.safetensors"
    save_file(layout_tensors("sd15_ldm_single_file", seed=0), str(src))
    gc.collect()
    out = convert(str(src), tmp_path / "sd15", tokenizer=str(tokenizer_dir), quiet=True)
    ours = load(out)
    assert ours.config == SD15
    prov = ours.provenance
    assert prov["files"] == {src.name: sha256_file(src)} and prov["format"] == "single-file .safetensors"
    assert prov["dtype"] == "float32" and prov["converter"].startswith("weights_convert")
    assert prov["tokenizer"]["source"] == str(tokenizer_dir)

    # diffusers reads the same file its own way: its single-file converters, its models (config from our kwargs:
    # from_single_file would fetch the config from the hub, which is offline here).
    sd = load_file(str(src))
    errors = {}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**diffusers_unet_kwargs(SD15.unet))
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(sd, {"layers_per_block": 2}), strict=True, assign=True)
    errors |= compare_networks(ours, unet.eval(), None, None, SD15)
    del unet
    gc.collect()
    vae_config = {"down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
    with torch.device("meta"):
        vae = AutoencoderKL(**diffusers_vae_kwargs(SD15.vae))
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(sd, vae_config), strict=True, assign=True)
    text = CLIPTextModel(CLIPTextConfig(hidden_act="quick_gelu", hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        vocab_size=49408))  # fmt: skip
    text_sd = sfu.convert_ldm_clip_checkpoint(sd)
    result = text.load_state_dict({k.removeprefix("text_model."): v for k, v in text_sd.items()}, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys in ([], ["embeddings.position_ids"]), result
    errors |= compare_networks(ours, None, vae.eval(), text.eval(), SD15)
    print("SD 1.5 single file, relative errors:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert all(e <= RTOL for e in errors.values()), errors


@pytest.mark.slow
def test_sd21_diffusers_folder_converts_and_matches_diffusers(tmp_path: Path) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    src = tmp_path / "stable-diffusion-2-1"
    write_real_diffusers_folder(src, "sd21", seed=10)
    gc.collect()
    out = convert(str(src), tmp_path / "sd21", quiet=True)
    ours = load(out)
    assert ours.config == SD21  # v-prediction and 768 px from scheduler_config.json and sample_size
    files = ours.provenance["files"]
    vae_file = "vae/diffusion_pytorch_model.safetensors"
    assert files[vae_file] == sha256_file(src / vae_file)
    assert {"model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json"} <= files.keys()

    errors = {}
    unet = UNet2DConditionModel.from_pretrained(src / "unet").eval()
    errors |= compare_networks(ours, unet, None, None, SD21)
    del unet
    gc.collect()
    vae = AutoencoderKL.from_pretrained(src / "vae").eval()  # diffusers renames the old attention names itself
    text = CLIPTextModel.from_pretrained(src / "text_encoder").eval()
    errors |= compare_networks(ours, None, vae, text, SD21)
    print("SD 2.1 diffusers folder, relative errors:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert all(e <= RTOL for e in errors.values()), errors


# ---- full size: names only (meta device) ---------------------------------------------------------------------------


def meta_layout(name: str, optional: bool = True) -> dict[str, Tensor]:
    spec = layout(name)
    shapes = spec["tensors"] | (spec.get("optional_tensors", {}) if optional else {})
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_every_layout_maps_onto_our_model(name: str) -> None:
    """Both formats of both models: every tensor lands on one of ours, of the right shape; full-size name-level
    round trip diffusers -> ours -> diffusers."""
    config = {"sd15": SD15, "sd21": SD21}[name]
    assert config_from_diffusers(real_configs(name), None, None) == config
    expected = {c: {k: tuple(s) for k, s in shapes.items()} for c, shapes in our_shapes(config).items()}

    single = make_state_dict(read_layout(f"{name}_ldm_single_file"), meta=True)
    got = to_ours(split_ldm(single, detect_single_file(single)), config)
    assert {c: {k: tuple(t.shape) for k, t in s.items()} for c, s in got.items()} == expected

    for optional in (True, False):  # position_ids present or not
        folder = {c: meta_layout(f"{name}_diffusers_{c}", optional) for c in ("unet", "vae", "text_encoder")}
        got = to_ours(folder, config)
        assert {c: {k: tuple(t.shape) for k, t in s.items()} for c, s in got.items()} == expected
    aliases = layout(f"{name}_diffusers_vae")["aliases"]
    assert unet_to_diffusers(got["unet"]).keys() == folder["unet"].keys()
    assert vae_to_diffusers(got["vae"]).keys() == {aliases.get(k, k) for k in folder["vae"]}
    assert got["text_encoder"].keys() == folder["text_encoder"].keys()


def test_current_vae_names_and_flat_text_names_are_accepted() -> None:
    vae = meta_layout("sd15_diffusers_vae")
    aliases = layout("sd15_diffusers_vae")["aliases"]
    current = {aliases.get(k, k): t for k, t in vae.items()}
    text = {k.removeprefix("text_model."): t for k, t in meta_layout("sd15_diffusers_text_encoder").items()}
    got = to_ours({"unet": meta_layout("sd15_diffusers_unet"), "vae": current, "text_encoder": text}, SD15)
    expected = {k: tuple(s) for k, s in our_shapes(SD15)["vae"].items()}
    assert {k: tuple(t.shape) for k, t in got["vae"].items()} == expected


# ---- refusals ------------------------------------------------------------------------------------------------------


def test_unknown_missing_misshapen_tensors_one_error_nothing_written(tmp_path: Path, tiny_src: Path) -> None:
    src = tmp_path / "bad"
    shutil.copytree(tiny_src, src)
    path = src / "unet/diffusion_pytorch_model.safetensors"
    sd = load_file(str(path))
    del sd["conv_in.bias"]
    sd["conv_in.extra"] = torch.zeros(3)
    sd["conv_out.weight"] = torch.zeros(4, 32, 1, 1)
    save_file(sd, str(path))
    text = src / "text_encoder/model.safetensors"
    save_file({k: v for k, v in load_file(str(text)).items() if "final_layer_norm.bias" not in k}, str(text))
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as error:
        convert(str(src), out, quiet=True)
    message = str(error.value)
    for part in ("missing: conv_in.bias", "unexpected: conv_in.extra", "text_model.final_layer_norm.bias",
                 "conv_out.weight: (4, 32, 1, 1) != (4, 32, 3, 3)"):  # fmt: skip
        assert part in message, message
    assert not out.exists() and leftovers(tmp_path) == []


def test_unsupported_configs_are_refused(tmp_path: Path, tiny_src: Path) -> None:
    configs = real_configs("sd15")
    assert config_from_diffusers(configs, None, None) == SD15
    assert config_from_diffusers(configs, "v_prediction", 768).schedule.prediction_type == "v_prediction"
    for component, change, expected in [
        ("scheduler", {"_class_name": "FlowMatchEulerDiscreteScheduler"}, "not a Stable Diffusion 1.x / 2.x scheduler"),
        ("scheduler", {"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule"),
        ("scheduler", {"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
        ("scheduler", {"prediction_type": "sample"}, "prediction_type 'sample'"),
        ("unet", {"in_channels": 9}, "inpainting"),
        ("unet", {"addition_embed_type": "text_time"}, "addition_embed_type"),
        ("vae", {"shift_factor": 0.1159}, "shift_factor"),
        ("text_encoder", {"hidden_act": "relu"}, "hidden_act"),
    ]:
        bad = copy.deepcopy(configs)
        bad[component] |= change
        with pytest.raises(ConversionError, match=expected):
            config_from_diffusers(bad, None, None)
    # through the CLI: one line, exit code 2, nothing written
    src = tmp_path / "flow"
    shutil.copytree(tiny_src, src)
    sched = src / "scheduler/scheduler_config.json"
    sched.write_text(json.dumps(json.loads(sched.read_text()) | {"_class_name": "FlowMatchEulerDiscreteScheduler"}))
    assert main([str(src), str(tmp_path / "out"), "--quiet"]) == 2
    assert not (tmp_path / "out").exists()


def test_cli_errors_are_one_line_exit_2(tmp_path: Path, tiny_src: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    out.mkdir()
    cases = [
        [str(tiny_src), str(out)],  # exists, no --force
        [str(tmp_path / "nothing.safetensors"), str(tmp_path / "x")],
        [str(tiny_src), str(tmp_path / "x"), "--dtype", "bf16"],
        [str(tiny_src), str(tmp_path / "x"), "--to", "diffusers"],  # not one of our folders
    ]
    for argv in cases:
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own checks (here: --dtype choices)
            code = e.code
        err = capsys.readouterr().err
        assert code == 2, argv
        assert err.count("\n") == 1 and "Traceback" not in err, err
    assert list(out.iterdir()) == [] and not (tmp_path / "x").exists()


def test_malicious_ckpt_is_refused_by_the_cli(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hook": Payload(marker)}, tmp_path / "evil.ckpt")
    argv = [sys.executable, "-m", "weights_convert", str(tmp_path / "evil.ckpt"), str(tmp_path / "out"), "--quiet"]
    run = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and "refused" in run.stderr and run.stderr.count("\n") == 1, run.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


# ---- atomic output, --force ----------------------------------------------------------------------------------------


def test_failure_midway_leaves_nothing(tmp_path: Path, tiny_src: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing_save(tensors, path, *args, **kwargs):  # the second network's file fails to write
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full (injected)")
        return save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(diffedit.weights, "save_file", failing_save)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="injected"):
        convert(str(tiny_src), out, quiet=True)
    assert not out.exists() and leftovers(tmp_path) == [] and len(calls) == 2

    monkeypatch.setattr(diffedit.weights, "save_file", save_file)
    convert(str(tiny_src), out, quiet=True)
    before = {p.name: p.read_bytes() for p in out.glob("*.json")}
    with pytest.raises(ConversionError, match="--force"):
        convert(str(tiny_src), out, quiet=True, dtype="fp16")
    calls.clear()
    monkeypatch.setattr(diffedit.weights, "save_file", failing_save)
    with pytest.raises(OSError, match="injected"):  # a failing --force leaves the old folder as it was
        convert(str(tiny_src), out, quiet=True, dtype="fp16", force=True)
    assert {p.name: p.read_bytes() for p in out.glob("*.json")} == before and leftovers(tmp_path) == []
    monkeypatch.setattr(diffedit.weights, "save_file", save_file)
    convert(str(tiny_src), out, quiet=True, dtype="fp16", force=True)
    assert load(out).provenance["dtype"] == "float16" and leftovers(tmp_path) == []

    import weights_convert.export as export

    monkeypatch.setattr(export, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("injected")))
    with pytest.raises(OSError, match="injected"):
        export_diffusers(out, tmp_path / "exported", quiet=True)
    assert not (tmp_path / "exported").exists() and leftovers(tmp_path) == []


# ---- round trip through our format, export, fp16, provenance --------------------------------------------------------


def test_round_trip_is_bit_identical_and_diffusers_loads_the_export(tmp_path: Path, tiny_src: Path) -> None:
    from diffusers import StableDiffusionPipeline

    ours_dir = convert(str(tiny_src), tmp_path / "ours", quiet=True)
    model = load(ours_dir)
    assert model.config == TINY  # sample_size 32 x the VAE's factor 2: 64 px
    assert model.provenance["files"]["unet/diffusion_pytorch_model.safetensors"] == sha256_file(
        tiny_src / "unet/diffusion_pytorch_model.safetensors"
    )
    back = export_diffusers(ours_dir, tmp_path / "back", quiet=True)
    for rel in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors"):  # fmt: skip
        a = {k.removeprefix("text_model."): v for k, v in load_file(str(tiny_src / rel)).items()}
        b = {k.removeprefix("text_model."): v for k, v in load_file(str(back / rel)).items()}
        assert a.keys() == b.keys(), rel
        assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a), rel

    pipe = StableDiffusionPipeline.from_pretrained(back)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert torch.equal(pipe.scheduler.alphas_cumprod, model.schedule.alphas_cumprod)
    pipe.scheduler.set_timesteps(50)
    from diffedit.ddim import timesteps

    assert pipe.scheduler.timesteps.tolist() == timesteps(model.schedule, 50)
    prompt = "a photo of a bowl of pears"
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ids, tokenize(model.tokenizer, prompt, 77))  # the tokenizer travels unchanged
    with torch.no_grad():
        cond = model.encode_prompt("a photo of a bowl of pears")
        assert relative_error(cond.tokens, pipe.text_encoder(ids).last_hidden_state) <= RTOL
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        assert relative_error(model.unet(x, 301, cond.tokens), pipe.unet(x, 301, cond.tokens).sample) <= RTOL
        assert relative_error(model.vae.decode(x), pipe.vae.decode(x).sample) <= RTOL

    # and back again: ours -> diffusers -> ours gives our tensors bit for bit
    again = load(convert(str(back), tmp_path / "again", quiet=True))
    assert again.config == model.config
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_fp16_variants_and_output_dtype(tmp_path: Path, tiny_src: Path) -> None:
    src = tmp_path / "variants"
    shutil.copytree(tiny_src, src)
    for rel in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model"):
        full = load_file(str(src / f"{rel}.safetensors"))
        half = {k: v.half() if v.is_floating_point() else v for k, v in full.items()}
        save_file(half, str(src / f"{rel}.fp16.safetensors"), metadata={"format": "pt"})

    fp16 = load(convert(str(src), tmp_path / "fp16", dtype="fp16", quiet=True), dtype=torch.float16)
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in fp16.provenance["files"]  # the variant is read
    assert "unet/diffusion_pytorch_model.safetensors" not in fp16.provenance["files"]
    assert fp16.provenance["dtype"] == "float16"
    assert {t.dtype for t in load_file(str(tmp_path / "fp16/unet.safetensors")).values()} == {torch.float16}

    fp32 = load(convert(str(src), tmp_path / "fp32", quiet=True))  # fp32 preferred when both are there
    assert "unet/diffusion_pytorch_model.safetensors" in fp32.provenance["files"]
    for (k, a), b in zip(fp32.state_dict().items(), fp16.state_dict().values()):
        assert torch.equal(a.half(), b), k

    for rel in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model"):
        (src / f"{rel}.safetensors").unlink()  # only the fp16 files left: read, and kept in fp16
    only16 = load(convert(str(src), tmp_path / "only16", quiet=True))
    assert only16.provenance["dtype"] == "float16"


def test_progress_is_silent_with_quiet(tmp_path: Path, tiny_src: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(tiny_src), str(tmp_path / "a"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert main([str(tiny_src), str(tmp_path / "b")]) == 0
    assert "reading" in capsys.readouterr().err


# ---- tokenizers ----------------------------------------------------------------------------------------------------


def test_tokenizer_sources_and_errors(tmp_path: Path, tiny_src: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ConversionError, match="carries no tokenizer.*--tokenizer"):  # default not reachable
        find_tokenizer(None, SD15, quiet=True)
    with pytest.raises(ConversionError, match="could not be fetched"):
        find_tokenizer("org/missing", SD15, quiet=True)
    with pytest.raises(ConversionError, match="no vocab.json"):
        find_tokenizer(str(tmp_path), SD15, quiet=True)
    folder, prov = find_tokenizer(str(tiny_src), SD15, quiet=True)  # a diffusers folder: its tokenizer/
    assert folder == tiny_src / "tokenizer" and prov["files"]["vocab.json"] == sha256_file(folder / "vocab.json")

    # the pad token must be the model family's: an SD 2 ("!") tokenizer for an SD 1 model is refused
    sd2_tokenizer = tmp_path / "sd2-tokenizer"
    write_tokenizer(sd2_tokenizer, WORDS, pad_token="!")
    with pytest.raises(ConversionError, match="pads with '!'"):
        convert(str(tiny_src), tmp_path / "out", tokenizer=str(sd2_tokenizer), quiet=True)
    assert not (tmp_path / "out").exists()


def test_hub_snapshot_through_the_cli(tmp_path: Path, tiny_src: Path) -> None:
    """A hub repo id resolved by huggingface_hub.snapshot_download from a cache laid out as the hub writes it
    (offline); the CLI process converts, exports, and never imports diffusers."""
    cache, commit = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someone--tiny-sd"
    shutil.copytree(tiny_src, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    tok_repo = cache / "models--someone--tok"  # a tokenizer-only repo (files at its root)
    shutil.copytree(tiny_src / "tokenizer", tok_repo / "snapshots" / commit)
    (tok_repo / "refs").mkdir()
    (tok_repo / "refs" / "main").write_text(commit)
    out, exported = tmp_path / "out", tmp_path / "exported"
    code = (
        "import sys\n"
        "from weights_convert.__main__ import main\n"
        f"assert main(['someone/tiny-sd', {str(out)!r}, '--quiet', '--tokenizer', 'someone/tok']) == 0\n"
        f"assert main(['someone/not-cached', {str(tmp_path / 'x')!r}, '--quiet']) == 2\n"
        f"assert main([{str(out)!r}, {str(exported)!r}, '--to', 'diffusers', '--quiet']) == 0\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'diffusers'], 'diffusers imported'\n"
    )
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert run.returncode == 0, run.stderr
    assert "cannot fetch someone/not-cached" in run.stderr and run.stderr.count("\n") == 1, run.stderr
    model = load(out)
    prov = model.provenance
    assert prov["source"] == "someone/tiny-sd" and prov["revision"] == commit and prov["format"] == "diffusers"
    assert prov["tokenizer"]["source"] == "someone/tok"
    assert prov["files"]["unet/diffusion_pytorch_model.safetensors"] == sha256_file(
        tiny_src / "unet/diffusion_pytorch_model.safetensors"
    )
    assert (exported / "model_index.json").is_file() and not (tmp_path / "x").exists()


# ---- the parser's refusals (OUT over a file, OUT and SRC nested, SIGTERM, stale temporaries, corrupt components,
# bad diffusers configs, mistyped sources: tests/test_weights_errors.py) --------------------------------------------
@pytest.mark.parametrize("size", ["-5", "0", "100", "abc"])
def test_bad_image_size_is_refused_by_the_parser(tmp_path: Path, tiny_src: Path, capsys, size: str) -> None:
    with pytest.raises(SystemExit) as info:
        main([str(tiny_src), str(tmp_path / "out"), "--image-size", size, "--quiet"])
    assert info.value.code == 2 and "--image-size" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@torch.no_grad()
def test_sd2_v_prediction_export_loads_in_diffusers_and_agrees(tmp_path: Path) -> None:
    """An SD 2.x-style v-model (linear projections, fp32-upcast attention, gelu text encoder padding with "!",
    v_prediction) exported with --to diffusers: each network loaded with its diffusers / transformers class's
    from_pretrained, and the scheduler from its config, agree with ours on the same inputs (fp32, RTOL), and a
    5-step DDIM sampling loop run with diffusers' networks and scheduler ends where ours does."""
    import dataclasses

    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from diffedit.configs import ScheduleConfig
    from diffedit.ddim import ddim_sample, timesteps
    from diffedit.model import StableDiffusion
    from diffedit.text import load_tokenizer

    config = dataclasses.replace(
        TINY,
        unet=dataclasses.replace(TINY.unet, linear_projection=True, upcast_attention=True),
        text=dataclasses.replace(TINY.text, activation="gelu", pad_token="!"),
        schedule=ScheduleConfig(prediction_type="v_prediction"),
        name="tiny-sd2-v",
    )
    write_tokenizer(tmp_path / "tokenizer", WORDS, pad_token="!")
    model = StableDiffusion(config, load_tokenizer(tmp_path / "tokenizer", config.text))
    randomize_(model, seed=3).eval()
    model.save(tmp_path / "ours")
    assert main([str(tmp_path / "ours"), str(tmp_path / "exported"), "--to", "diffusers", "--quiet"]) == 0
    out = tmp_path / "exported"

    scheduler = DDIMScheduler.from_pretrained(out, subfolder="scheduler")
    assert scheduler.config.prediction_type == "v_prediction"
    unet = UNet2DConditionModel.from_pretrained(out / "unet").eval()
    assert unet.config.upcast_attention and unet.config.use_linear_projection
    vae = AutoencoderKL.from_pretrained(out / "vae").eval()
    text = CLIPTextModel.from_pretrained(out / "text_encoder").eval()
    assert text.config.hidden_act == "gelu"

    ours = load(tmp_path / "ours")
    cond = ours.encode_prompt("a photo of a bowl of pears")
    ids = tokenize(ours.tokenizer, "a photo of a bowl of pears", config.text.max_length)
    assert relative_error(cond.tokens, text(ids).last_hidden_state) <= RTOL
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    pixels = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    for t in (1, 481, 981):
        assert relative_error(ours.unet(x, t, cond.tokens), unet(x, t, cond.tokens).sample) <= RTOL, t
    assert relative_error(ours.vae.decode(x), vae.decode(x).sample) <= RTOL
    assert relative_error(ours.vae.encode(pixels).mode(), vae.encode(pixels).latent_dist.mode()) <= RTOL

    # the schedule, read back by diffusers: same training schedule, same timesteps, same v-prediction DDIM steps
    assert torch.equal(scheduler.alphas_cumprod, ours.schedule.alphas_cumprod)
    scheduler.set_timesteps(5)
    assert scheduler.timesteps.tolist() == timesteps(ours.schedule, 5)
    theirs = x
    for t in scheduler.timesteps:
        theirs = scheduler.step(unet(theirs, t, cond.tokens).sample, t, theirs).prev_sample
    mine = ddim_sample(ours.schedule, lambda z, t: ours.unet(z, t, cond.tokens), x, timesteps(ours.schedule, 5))
    assert relative_error(mine, theirs) <= RTOL
