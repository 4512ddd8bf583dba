"""Original single-file checkpoints -> diffusers names: tables, diffusers parity, detection, errors, safe loading.

Full-size state dicts are built from the real layouts in shared/weights_layouts (names, shapes, dtypes of
v1-5-pruned-emaonly and v2-1_768-ema-pruned); values are free to make but distinct per tensor and per row,
so a tensor that lands under the wrong name, or a q/k/v split that takes the wrong rows, cannot go unnoticed.
"""

from __future__ import annotations

import json
import pickle
import types
from pathlib import Path

import pytest
import torch
from torch import Tensor

from diffedit.configs import SD15, SD21, SD21_BASE, TINY, ModelConfig
from weights_convert.detect import detect_single_file
from weights_convert.ldm import ignore_reason, ldm_layout, read_checkpoint, split_ldm

from ._reference import LAYOUTS, require_layouts


CASES = {"sd15": (SD15, "clip"), "sd21": (SD21, "openclip")}
DTYPES = {"float32": torch.float32, "int32": torch.int32, "int64": torch.int64}


def ldm_schedule_buffers(t: int = 1000, start: float = 0.00085, end: float = 0.012) -> dict[str, Tensor]:
    """The 12 buffers as CompVis' DDPM.register_schedule computes them (float64, stored as float32)."""
    betas = torch.linspace(start**0.5, end**0.5, t, dtype=torch.float64) ** 2
    alphas = 1 - betas
    ac = torch.cumprod(alphas, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = betas * (1 - ac_prev) / (1 - ac)
    b = {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev, "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt(), "log_one_minus_alphas_cumprod": (1 - ac).log(),
        "sqrt_recip_alphas_cumprod": (1 / ac).sqrt(), "sqrt_recipm1_alphas_cumprod": (1 / ac - 1).sqrt(),
        "posterior_variance": post_var, "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1 - ac),
        "posterior_mean_coef2": (1 - ac_prev) * alphas.sqrt() / (1 - ac),
    }  # fmt: skip
    return {k: v.float() for k, v in b.items()}


def read_layout(name: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    require_layouts()
    layout = json.loads((LAYOUTS / f"{name}.json").read_text())
    exceptions = layout.get("dtype_exceptions", {})
    return {k: (tuple(s), DTYPES[exceptions.get(k, layout["default_dtype"])]) for k, s in layout["tensors"].items()}


def make_state_dict(layout: dict[str, tuple[tuple[int, ...], torch.dtype]], meta: bool = False) -> dict[str, Tensor]:
    """Tensors with the layout's names, shapes and dtypes; the schedule buffers hold SD's true schedule.

    Float tensors are views of one arange pool, broadcast along each row (expand, stride 0): every row of every
    tensor holds a value no other row holds, yet a full-size SD costs a few MB and no time. meta=True: shape-only
    tensors for everything the schedule check does not read.
    """
    schedule = ldm_schedule_buffers()
    pool = torch.arange(sum(shape[0] if shape else 1 for shape, _ in layout.values()), dtype=torch.float32)
    sd, start = {}, 0
    for name, (shape, dtype) in layout.items():
        rows = shape[0] if shape else 1
        if name in schedule:
            sd[name] = schedule[name]
        elif meta:
            sd[name] = torch.empty(shape, dtype=dtype, device="meta")
        elif dtype != torch.float32:  # position_ids, model_ema.num_updates
            sd[name] = torch.arange(torch.Size(shape).numel(), dtype=dtype).reshape(shape)
        else:
            values = pool[start : start + rows]
            sd[name] = values.reshape(-1, *[1] * (len(shape) - 1)).expand(shape) if shape else values[0]
        start += rows
    return sd


def assert_identical(ours: dict[str, Tensor], theirs: dict[str, Tensor]) -> None:
    assert ours.keys() == theirs.keys(), (sorted(ours.keys() - theirs.keys()), sorted(theirs.keys() - ours.keys()))
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k


def diffusers_conversions(sd: dict[str, Tensor], config: ModelConfig, text_format: str) -> dict[str, dict[str, Tensor]]:
    """diffusers 0.42.1's own single-file converters on the same tensors."""
    from diffusers.loaders import single_file_utils as sfu

    levels = len(config.vae.channels)
    vae_config = {"down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels}
    if text_format == "clip":
        text = sfu.convert_ldm_clip_checkpoint(sd)
    else:  # it reads the width from text_projection when present; the model argument is only its fallback
        stub = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=config.text.hidden_size))
        text = sfu.convert_open_clip_checkpoint(stub, sd, prefix="cond_stage_model.model.")
    return {
        "unet": sfu.convert_ldm_unet_checkpoint(sd, {"layers_per_block": config.unet.layers_per_block}),
        "vae": sfu.convert_ldm_vae_checkpoint(sd, vae_config),
        "text_encoder": text,
    }


def check_against_diffusers(sd: dict[str, Tensor], config: ModelConfig, text_format: str) -> None:
    keys_before = set(sd)
    ours = split_ldm(sd, config)
    assert set(sd) == keys_before  # the caller's dict is left alone
    theirs = diffusers_conversions(sd, config, text_format)
    assert_identical(ours["unet"], theirs["unet"])
    assert_identical(ours["vae"], theirs["vae"])  # diffusers reshapes the 1x1-conv attention to Linear too
    key = "text_model.embeddings.position_ids"
    if "cond_stage_model.transformer." + key in sd:
        # Documented difference: diffusers passes the old position_ids buffer through; we drop it.
        assert torch.equal(theirs["text_encoder"].pop(key), sd["cond_stage_model.transformer." + key])
    if text_format == "openclip" and config.text.num_layers != 23:
        # diffusers drops OpenCLIP's layer by its literal name, resblocks.23 (right for ViT-H only): it keeps the
        # extra last layer of other depths, which a CLIPTextModel of num_layers then reports as unexpected.
        extra = f"text_model.encoder.layers.{config.text.num_layers}."
        theirs["text_encoder"] = {k: x for k, x in theirs["text_encoder"].items() if not k.startswith(extra)}
    assert_identical(ours["text_encoder"], theirs["text_encoder"])


# ---- the tables against the real layouts -------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_tables_cover_the_real_files(name: str) -> None:
    config, text_format = CASES[name]
    layout = read_layout(f"{name}_ldm_single_file")
    networks = {k: shape for k, (shape, _) in layout.items() if ignore_reason(k) is None}
    ignored = set(layout) - set(networks)
    assert ldm_layout(config, text_format) == networks
    assert {k for k in ignored if not k.startswith(("model_ema.", "cond_stage_model."))} == set(ldm_schedule_buffers())

    # The output names and shapes are those of the diffusers-format files of the same model.
    out = split_ldm(make_state_dict(layout, meta=True), config)
    for component in ("unet", "vae", "text_encoder"):
        require_layouts()
        ref = json.loads((LAYOUTS / f"{name}_diffusers_{component}.json").read_text())
        aliases = ref.get("aliases", {})  # the hub VAE's old attention names -> the current ones we emit
        expected = {aliases.get(k, k): tuple(s) for k, s in ref["tensors"].items()}
        assert {k: tuple(t.shape) for k, t in out[component].items()} == expected, component


@pytest.mark.parametrize("name", CASES)
def test_full_size_matches_diffusers_converters(name: str) -> None:
    config, text_format = CASES[name]
    check_against_diffusers(make_state_dict(read_layout(f"{name}_ldm_single_file")), config, text_format)


@pytest.mark.parametrize("text_format", ["clip", "openclip"])
def test_tiny_matches_diffusers_models_and_converters(text_format: str) -> None:
    """Other level counts / attention patterns (TINY: 2 levels, attention on the second only, 1 layer per block)
    give exactly the parameter names and shapes of diffusers' / transformers' own modules."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    u, v, t = TINY.unet, TINY.vae, TINY.text
    layout = {k: (shape, torch.float32) for k, shape in ldm_layout(TINY, text_format).items()}
    sd = make_state_dict(layout) | ldm_schedule_buffers()
    check_against_diffusers(sd, TINY, text_format)

    unet = UNet2DConditionModel(
        block_out_channels=u.channels, layers_per_block=u.layers_per_block, cross_attention_dim=u.cross_attention_dim,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in u.attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(u.attention)),
        attention_head_dim=u.heads, norm_num_groups=u.norm_groups, use_linear_projection=u.linear_projection,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=v.channels, layers_per_block=v.layers_per_block, norm_num_groups=v.norm_groups,
        down_block_types=("DownEncoderBlock2D",) * len(v.channels),
        up_block_types=("UpDecoderBlock2D",) * len(v.channels),
    )  # fmt: skip
    text = CLIPTextModel(
        CLIPTextConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                       num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                       max_position_embeddings=t.max_length)
    )  # fmt: skip
    # transformers 5 flattened CLIPTextModel; diffusers-format files (and diffusers' converters) keep "text_model.".
    modules = {"unet": unet.state_dict(), "vae": vae.state_dict()}
    modules["text_encoder"] = {f"text_model.{k}": p for k, p in text.state_dict().items() if "position_ids" not in k}
    out = split_ldm(sd, TINY)
    for component, reference in modules.items():
        assert {k: x.shape for k, x in out[component].items()} == {k: p.shape for k, p in reference.items()}, component


# ---- detection ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def meta_files() -> dict[str, dict[str, Tensor]]:
    return {name: make_state_dict(read_layout(f"{name}_ldm_single_file"), meta=True) for name in CASES}


def test_detection_and_overrides(meta_files: dict[str, dict[str, Tensor]]) -> None:
    sd15, sd21 = meta_files["sd15"], meta_files["sd21"]
    assert detect_single_file(sd15) == SD15
    assert detect_single_file(sd21) == SD21  # SD 2.x defaults to 2.1-v at 768, as diffusers does
    assert detect_single_file(sd21, prediction_type="epsilon") == SD21_BASE
    assert detect_single_file(sd21, image_size=512) == SD21_BASE
    assert detect_single_file(sd21, prediction_type="v_prediction", image_size=768) == SD21

    v15 = detect_single_file(sd15, prediction_type="v_prediction")
    assert (v15.schedule.prediction_type, v15.image_size) == ("v_prediction", 512)
    assert (v15.unet, v15.vae, v15.text) == (SD15.unet, SD15.vae, SD15.text)
    assert v15.name != SD15.name
    eps768 = detect_single_file(sd21, prediction_type="epsilon", image_size=768)
    assert (eps768.schedule.prediction_type, eps768.image_size, eps768.unet) == ("epsilon", 768, SD21_BASE.unet)

    with pytest.raises(ValueError, match="prediction_type"):
        detect_single_file(sd15, prediction_type="v")
    with pytest.raises(ValueError, match="image_size"):
        detect_single_file(sd15, image_size=500)


def test_detection_rejects_other_models(meta_files: dict[str, dict[str, Tensor]]) -> None:
    sd15 = meta_files["sd15"]
    key = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
    with pytest.raises(ValueError, match="1024 with text encoder clip"):  # SD 2 UNet, SD 1 text encoder
        detect_single_file(sd15 | {key: torch.empty(320, 1024, device="meta")})
    with pytest.raises(ValueError, match="9 input channels"):  # inpainting
        conv_in = torch.empty(320, 9, 3, 3, device="meta")
        detect_single_file(sd15 | {"model.diffusion_model.input_blocks.0.0.weight": conv_in})
    with pytest.raises(ValueError, match="SDXL"):
        detect_single_file({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.empty(768)})


# ---- refusing files that do not match ----------------------------------------------------------------------


def test_missing_unknown_and_misshapen_keys_in_one_error(meta_files: dict[str, dict[str, Tensor]]) -> None:
    sd = dict(meta_files["sd15"])
    gone = "first_stage_model.decoder.mid.attn_1.q.weight"
    del sd[gone]
    sd["model.diffusion_model.extra.weight"] = torch.empty(3, device="meta")
    bent = "model.diffusion_model.output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight"
    sd[bent] = torch.empty(640, 1024, device="meta")
    sd["betas"] = torch.linspace(0.00085, 0.012, 1000)  # "linear", not SD's scaled_linear
    with pytest.raises(ValueError) as error:
        split_ldm(sd, SD15)
    message = str(error.value)
    unknown = "1 unknown: model.diffusion_model.extra.weight"
    for expected in (f"1 missing: {gone}", unknown, bent, "(640, 1024)", "betas"):
        assert expected in message
    assert "alphas_cumprod" not in message  # only what is wrong is reported


def test_wrong_config_is_refused(meta_files: dict[str, dict[str, Tensor]]) -> None:
    with pytest.raises(ValueError, match="with a wrong shape"):
        split_ldm(meta_files["sd21"], SD15)  # OpenCLIP keys are recognised, but 1024 wide, not 768


def test_half_precision_schedule_is_accepted(meta_files: dict[str, dict[str, Tensor]]) -> None:
    # fp16 copies of the checkpoints store the schedule in fp16 too: checked at that precision.
    half = {k: t.half() if k in ldm_schedule_buffers() else t for k, t in meta_files["sd15"].items()}
    assert split_ldm(half, SD15).keys() == {"unet", "vae", "text_encoder"}


# ---- reading files -----------------------------------------------------------------------------------------


class Payload:
    """Unpickling this calls Path.touch(marker): what a malicious checkpoint would do, harmlessly."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_read_checkpoint_formats(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {"a.weight": torch.randn(3, 2), "b": torch.arange(4)}
    save_file(tensors, tmp_path / "x.safetensors")
    torch.save(tensors, tmp_path / "plain.ckpt")
    torch.save({"state_dict": tensors, "global_step": 110000}, tmp_path / "lightning.ckpt")
    for name in ("x.safetensors", "plain.ckpt", "lightning.ckpt"):
        loaded = read_checkpoint(tmp_path / name)
        assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors), name

    torch.save({"a": 1}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="not named tensors"):
        read_checkpoint(tmp_path / "odd.pt")
    (tmp_path / "x.onnx").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        read_checkpoint(tmp_path / "x.onnx")


def test_code_carrying_pickles_are_refused_without_running(tmp_path: Path) -> None:
    # The payload is live: plain unpickling runs it.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(Payload(probe)))
    assert probe.exists()

    marker = tmp_path / "marker"
    evil = {"state_dict": {"w": torch.zeros(2)}, "hook": Payload(marker)}
    torch.save(evil, tmp_path / "zip.ckpt")  # torch's zip container
    (tmp_path / "legacy.ckpt").write_bytes(pickle.dumps(evil, protocol=2))  # a bare pickle
    for name in ("zip.ckpt", "legacy.ckpt"):
        with pytest.raises(ValueError, match="refused"):
            read_checkpoint(tmp_path / name)
        assert not marker.exists(), name
