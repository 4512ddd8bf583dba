"""SDXL against diffusers' own SDXL components, on identical random weights and inputs.

- The UNet with its added conditioning (pooled text + six sizes), on a tiny SDXL-shaped config and on the full
  SDXL base architecture at 8x8 latents (slow: 2.6 B parameters, one copy shared by both sides).
- Both text encoders and the pooled embedding against `StableDiffusionXLPipeline.encode_prompt`, the zeroed
  empty negative (`force_zeros_for_empty_prompt`) included; the size conditioning against its `_get_add_time_ids`.
- The VAE (SD's architecture, SDXL's scale) and its fp32 policy under a bf16 model.
- DiffEdit on a tiny random SDXL model against a loop written here with diffusers' UNet2DConditionModel,
  AutoencoderKL, DDIMScheduler / DDIMInverseScheduler and the pipeline's encode_prompt: there is no diffusers
  DiffEdit for SDXL, so this test is the reference. Mask identical, latents within RTOL.

Tolerance: max |ours - diffusers| / max |diffusers| <= 1e-5 (fp32, CPU), as every parity test here.
"""

from __future__ import annotations

import copy
import gc
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from diffedit import edit, edit_image, generate_mask, invert, load
from diffedit.configs import SDXL, TINY_XL
from diffedit.model import StableDiffusion
from diffedit.text import PromptEmbeddings, load_tokenizer, write_tokenizer

from ._reference import diffusers_unet_kwargs, diffusers_vae_kwargs, our_unet_from, reference_unet, relative_error
from .conftest import WORDS, seeded

RTOL = 1e-5
SOURCE, TARGET = "a bowl of fruits", "a bowl of pears"
STEPS = 20  # the mask at t = 451, the inversion and the edit over 16 levels (751 ... 1)
RHO = 2.0  # the mask's threshold ratio: M = 1[D > mean(D)]; the paper's 3 leaves a random network's map empty


def make_tiny_xl(folder: Path, seed: int = 0) -> StableDiffusion:
    """TINY_XL with every parameter random (norms near one), its two tokenizers padding as SDXL's do."""
    write_tokenizer(folder / "t1", WORDS)  # pads with the end token, as CLIP ViT-L's
    write_tokenizer(folder / "t2", WORDS, pad_token="!")  # OpenCLIP bigG's pads with "!"
    model = StableDiffusion(TINY_XL, load_tokenizer(folder / "t1", TINY_XL.text),
                            tokenizer_2=load_tokenizer(folder / "t2", TINY_XL.text_2))
    norms = {id(m.weight) for m in model.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))}
    g = seeded(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.ndim > 1 else 0.05) + (id(p) in norms))
    return model.eval()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> StableDiffusion:
    return make_tiny_xl(tmp_path_factory.mktemp("tiny-xl"), seed=3)


def sdxl_pipeline(model: StableDiffusion) -> Any:
    """diffusers' StableDiffusionXLPipeline holding our model's tensors (renamed, not copied) and text encoders."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel

    from weights_convert.diffusers import unet_to_diffusers, vae_to_diffusers

    with torch.device("meta"):
        unet = UNet2DConditionModel(**diffusers_unet_kwargs(model.config.unet))
        vae = AutoencoderKL(**diffusers_vae_kwargs(model.config.vae))
    unet.load_state_dict(unet_to_diffusers(model.unet.state_dict()), strict=True, assign=True)
    vae.load_state_dict(vae_to_diffusers(model.vae.state_dict()), strict=True, assign=True)
    tokenizers = [copy.deepcopy(t) for t in (model.tokenizer, model.tokenizer_2)]
    for t in tokenizers:
        t.model_max_length = 77  # diffusers pads to the tokenizer's length
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(), text_encoder=model.text_encoder, text_encoder_2=model.text_encoder_2,
        tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet.eval(), scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _scheduler(inverse: bool = False) -> Any:
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    return (DDIMInverseScheduler if inverse else DDIMScheduler)(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, set_alpha_to_one=False, clip_sample=False, prediction_type="epsilon",
        timestep_spacing="leading",
    )


@pytest.fixture(scope="module")
def pipe(model: StableDiffusion) -> Any:
    return sdxl_pipeline(model)


# --- UNet --------------------------------------------------------------------------------------------------------

def _unet_inputs(cfg: Any, batch: int, size: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = seeded(seed)
    x = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    context = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g)
    pooled = torch.randn(batch, cfg.pooled_text_dim, generator=g)
    sizes = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [768.0, 1344.0, 32.0, 64.0, 1024.0, 960.0]])
    return x, context, pooled, sizes[:batch]


@torch.no_grad()
def test_tiny_xl_unet_with_added_conditioning_matches_diffusers() -> None:
    cfg = TINY_XL.unet
    reference = reference_unet(cfg, seed=0)
    ours = our_unet_from(reference, cfg)
    x, context, pooled, sizes = _unet_inputs(cfg, batch=2, size=8, seed=1)
    for t in (1, torch.tensor([981, 21])):
        expected = reference(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": sizes}).sample
        assert relative_error(ours(x, t, context, pooled=pooled, sizes=sizes), expected) <= RTOL
    # The added conditioning matters: other sizes, another output (so the comparison above can fail).
    other = ours(x, 1, context, pooled=pooled, sizes=sizes.flip(0))
    assert relative_error(other, ours(x, 1, context, pooled=pooled, sizes=sizes)) > 1e-3
    with pytest.raises(ValueError, match=r"this UNet needs size conditioning \(2, 6\), got None"):
        ours(x, 1, context, pooled=pooled)


@pytest.mark.slow
@torch.no_grad()
def test_full_sdxl_unet_matches_diffusers_at_8x8_latents() -> None:
    """The SDXL base architecture (2.6 B parameters, ~10 GB in fp32): ours adopts the reference's tensors."""
    cfg = SDXL.unet
    reference = reference_unet(cfg, seed=1)
    ours = our_unet_from(reference, cfg, share=True)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters()) > 2.5e9
    x, context, pooled, sizes = _unet_inputs(cfg, batch=1, size=8, seed=2)
    expected = reference(x, 500, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": sizes}).sample
    assert relative_error(ours(x, 500, context, pooled=pooled, sizes=sizes), expected) <= RTOL
    assert expected.std() > 0.1
    del reference, ours
    gc.collect()


# --- text and size conditioning -----------------------------------------------------------------------------------

@pytest.mark.parametrize("clip_skip", [0, 1])
def test_prompts_match_the_sdxl_pipeline(model: StableDiffusion, pipe: Any, clip_skip: int) -> None:
    prompts = [SOURCE, "a photo of a red circle and a blue square"]
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompts, device="cpu", do_classifier_free_guidance=True, negative_prompt=None, clip_skip=clip_skip or None)
    ours = model.encode_prompt(prompts, clip_skip)
    assert ours.tokens.shape == (2, 77, 64) and ours.pooled.shape == (2, 16)
    assert relative_error(ours.tokens, embeds) <= RTOL and relative_error(ours.pooled, pooled) <= RTOL
    # the absent negative: all zeros there, and "" here (SDXL's dropped-caption conditioning)
    assert negative.abs().max() == 0 and negative_pooled.abs().max() == 0
    empty = model.encode_prompt(["", ""], clip_skip)
    assert torch.equal(empty.tokens, negative) and torch.equal(empty.pooled, negative_pooled)
    # a given negative is encoded as a prompt; diffusers' SDXL ignores clip_skip for it (hidden_states[-2] always)
    _, given, _, given_pooled = pipe.encode_prompt(prompts, device="cpu", negative_prompt=[TARGET, TARGET],
                                                   clip_skip=clip_skip or None)
    target = model.encode_prompt([TARGET, TARGET], 0)
    assert relative_error(target.tokens, given) <= RTOL and relative_error(target.pooled, given_pooled) <= RTOL


def test_size_conditioning_is_the_pipelines_default(model: StableDiffusion, pipe: Any) -> None:
    """The image's own size and crop (0, 0): what the SDXL pipeline passes for a 24 x 40 picture by default."""
    latents = torch.zeros(3, 4, 12, 20)  # TINY_XL's VAE halves: 24 x 40 pixels
    expected = pipe._get_add_time_ids((24, 40), (0, 0), (24, 40), torch.float32, text_encoder_projection_dim=16)
    assert torch.equal(model.size_conditioning(latents), expected.expand(3, -1))


# --- VAE -----------------------------------------------------------------------------------------------------------

@torch.no_grad()
def test_vae_matches_diffusers_and_stays_fp32(model: StableDiffusion, pipe: Any, tmp_path: Path) -> None:
    images = torch.rand(2, 3, 16, 24, generator=seeded(4))
    posterior = pipe.vae.encode(images * 2 - 1).latent_dist
    z0 = model.encode_image(images)
    assert relative_error(z0, posterior.mean * 0.13025) <= RTOL
    decoded = (pipe.vae.decode(z0 / 0.13025).sample / 2 + 0.5).clamp(0, 1)
    assert relative_error(model.decode_latents(z0), decoded) <= RTOL
    # bf16 model: the UNet and text encoders in bf16, the VAE in fp32 (SDXL's overflows in fp16), same VAE bits
    model.save(tmp_path / "m")
    low = load(tmp_path / "m", dtype=torch.bfloat16)
    assert (low.dtype, low.vae_dtype, low.text_encoder_2.dtype) == (torch.bfloat16, torch.float32, torch.bfloat16)
    assert low.encode_image(images).dtype == torch.bfloat16
    assert torch.equal(low.decode_latents(z0), model.decode_latents(z0))
    assert low.to(torch.float16).vae_dtype == torch.float32


# --- DiffEdit on SDXL ------------------------------------------------------------------------------------------------

def _reference_chain(pipe: Any, images: Tensor, steps: int, ours_inverted: Tensor) -> dict[str, Tensor]:
    """DiffEdit (§3.1-3.3) written with diffusers' SDXL components: zero unconditional embeddings (the pipeline's
    absent negative) for the mask's guidance and the inversion, R as the edit's negative, the image's size."""
    h, w = images.shape[-2:]
    time_ids = pipe._get_add_time_ids((h, w), (0, 0), (h, w), torch.float32, text_encoder_projection_dim=16)
    def cond(tokens: Tensor, pooled: Tensor) -> dict[str, Any]:
        sizes = time_ids.expand(len(tokens), -1)
        return dict(encoder_hidden_states=tokens, added_cond_kwargs={"text_embeds": pooled, "time_ids": sizes})

    src, zeros, src_pooled, zeros_pooled = pipe.encode_prompt(SOURCE, device="cpu", negative_prompt=None)
    tgt, negative, tgt_pooled, negative_pooled = pipe.encode_prompt(TARGET, device="cpu", negative_prompt=SOURCE)
    unet = lambda x, t, tokens, pooled: pipe.unet(x, t, **cond(tokens, pooled)).sample  # noqa: E731

    def guided(x: Tensor, t: int, c: tuple[Tensor, Tensor], u: tuple[Tensor, Tensor], g: float) -> Tensor:
        out_u, out_c = unet(torch.cat([x, x]), t, torch.cat([u[0], c[0]]), torch.cat([u[1], c[1]])).chunk(2)
        return out_u + g * (out_c - out_u)

    z0 = pipe.vae.encode(images * 2 - 1).latent_dist.mean * pipe.vae.config.scaling_factor
    sched, inverse = _scheduler(), _scheduler(inverse=True)
    sched.set_timesteps(steps)
    inverse.set_timesteps(steps)
    # §3.2 mask: 10 noises at strength 0.5, |eps~_Q - eps~_R| averaged over maps and channels, each guided by 0
    t_mask, generator, d = int(sched.timesteps[steps - int(steps * 0.5)]), seeded(0), 0
    for _ in range(10):
        x = sched.add_noise(z0, torch.randn(z0.shape, generator=generator), torch.tensor([t_mask]))
        eps_q = guided(x, t_mask, (tgt, tgt_pooled), (zeros, zeros_pooled), 7.5)
        eps_r = guided(x, t_mask, (src, src_pooled), (zeros, zeros_pooled), 7.5)
        d = d + (eps_q - eps_r).abs().mean(1, keepdim=True) / 10
    mask = (d > RHO / 2 * d.mean()).float()  # clip at rho mean(D), rescale to [0, 1], threshold at 0.5
    # §3.1 inversion: unconditional (zeros) DDIM inverse steps up to 0.8 of the schedule
    x, inverted = z0, []
    for t in inverse.timesteps[: int(steps * 0.8)]:
        x = inverse.step(unet(x, t, zeros, zeros_pooled), t, x).prev_sample
        inverted.append(x)
    # §3.3 edit from OUR inversion (a guided random network amplifies rounding; see test_edit_compat)
    levels = ours_inverted.flip(1)  # ascending noise: levels[:, i] is at inverse.timesteps[i]
    ts = sched.timesteps[steps - int(steps * 0.8):]
    x = levels[:, -1]
    for i, t in enumerate(ts):
        x = sched.step(guided(x, t, (tgt, tgt_pooled), (negative, negative_pooled), 7.5), t, x).prev_sample
        x_inv = levels[:, len(ts) - 2 - i] if i < len(ts) - 1 else z0
        x = x * mask + x_inv * (1 - mask)
    return dict(mask=mask, difference=d, inverted=torch.stack(inverted[::-1], 1), latents=x)


def test_diffedit_chain_matches_a_loop_of_diffusers_sdxl_components(model: StableDiffusion, pipe: Any) -> None:
    images = torch.rand(1, 3, 16, 16, generator=seeded(7))
    ours = edit_image(model, images, SOURCE, TARGET, seed=0, steps=STEPS, threshold_ratio=RHO, output_type="pt",
                      progress=False)
    theirs = _reference_chain(pipe, images, STEPS, ours.inversion.latents)
    assert 0 < ours.mask.latent_mask.sum() < ours.mask.latent_mask.numel()  # a real contrast, not all / nothing
    assert torch.equal(ours.mask.latent_mask, theirs["mask"])
    assert relative_error(ours.mask.difference, theirs["difference"]) <= RTOL
    assert relative_error(ours.inversion.latents, theirs["inverted"]) <= RTOL
    assert relative_error(ours.edit.latents, theirs["latents"]) <= RTOL
    # the background is z0 exactly (§3.3's last blend), and the stages alone give the same bits as the chain
    outside = ours.mask.latent_mask == 0
    assert torch.equal(ours.edit.latents[outside.expand_as(ours.edit.latents)],
                       ours.inversion.z0[outside.expand_as(ours.inversion.z0)])
    mask = generate_mask(model, images, SOURCE, TARGET, steps=STEPS, threshold_ratio=RHO, generator=seeded(0),
                         progress=False)
    inversion = invert(model, latents=mask.latents, steps=STEPS, generator=seeded(0), progress=False)
    out = edit(model, inversion, mask, mask.target_embeddings, negative_prompt=mask.source_embeddings,
               generator=seeded(0), output_type="latent", progress=False)
    assert torch.equal(out.latents, ours.edit.latents)


def test_given_sizes_reach_the_unet(model: StableDiffusion) -> None:
    """PromptEmbeddings.sizes overrides the default (the image's own size), row by row."""
    x = torch.randn(1, 4, 8, 8, generator=seeded(1))
    cond = model.encode_prompt(TARGET)
    default = model.noise_estimate(x, 501, cond)
    same = PromptEmbeddings(cond.tokens, cond.pooled, torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]))
    other = PromptEmbeddings(cond.tokens, cond.pooled, torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]))
    assert torch.equal(model.noise_estimate(x, 501, same), default)
    assert relative_error(model.noise_estimate(x, 501, other), default) > 1e-3


def test_sdxl_refuses_what_it_cannot_do(model: StableDiffusion) -> None:
    images = torch.rand(1, 3, 16, 16, generator=seeded(7))
    refusal = (r"^diffusers_compat=True \(--compat\) reproduces diffusers' StableDiffusionDiffEditPipeline, which "
               r"has no SDXL version: leave it off \(the default\) on an SDXL model$")
    with pytest.raises(ValueError, match=refusal):
        generate_mask(model, images, SOURCE, TARGET, diffusers_compat=True, progress=False)
    no_pooled = PromptEmbeddings(model.encode_prompt(TARGET).tokens)
    with pytest.raises(ValueError, match=r"need pooled of shape \(1, 16\), got None"):
        generate_mask(model, images, SOURCE, no_pooled, progress=False)


def test_sdxl_model_folder_round_trip(model: StableDiffusion, tmp_path: Path) -> None:
    model.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "model.json", "text_encoder.safetensors", "text_encoder_2.safetensors", "tokenizer", "tokenizer_2",
        "unet.safetensors", "vae.safetensors"]
    again = load(tmp_path / "m")
    assert again.config == TINY_XL
    a, b = again.encode_prompt([SOURCE, ""]), model.encode_prompt([SOURCE, ""])
    assert a.equal(b)
    x = torch.randn(2, 4, 8, 8, generator=seeded(2))
    assert torch.equal(again.noise_estimate(x, 301, a, a, 7.5), model.noise_estimate(x, 301, b, b, 7.5))


def test_model_json_written_before_sdxl_support_still_loads() -> None:
    """A folder converted by an earlier version (one depth for every level, one text encoder): the same model."""
    from diffedit.configs import SD21, ModelConfig

    for preset in (SD21, TINY_XL):
        d = json.loads(json.dumps(preset.to_dict()))  # as read from model.json: lists, not tuples
        if preset.text_2 is None:  # the old format: what SD 1.x / 2.x configs looked like
            old = {k: v for k, v in d.items() if k not in ("text_2", "empty_prompt")}
            old["unet"] = {k: v for k, v in d["unet"].items() if k not in ("size_embed_dim", "pooled_text_dim")}
            old["unet"]["transformer_depth"] = 1
            old["vae"] = {k: v for k, v in d["vae"].items() if k != "force_upcast"}
            old["text"] = {k: v for k, v in d["text"].items() if k not in ("output", "projection_dim")}
            assert ModelConfig.from_dict(old) == preset
        assert ModelConfig.from_dict(d) == preset
    missing = {k: v for k, v in json.loads(json.dumps(TINY_XL.to_dict())).items() if k != "empty_prompt"}
    with pytest.raises(ValueError, match=r"^config\.empty_prompt is missing$"):
        ModelConfig.from_dict(missing)


def test_quickstart_notebook_runs_an_sdxl_folder(model: StableDiffusion, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The quickstart's MODEL_DIR set to an SDXL folder (here the tiny one): every cell runs, on that model."""
    import importlib.util

    import nbformat

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("notebook_build", root / "notebooks" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)  # type: ignore[union-attr]
    model.save(tmp_path / "sdxl")
    monkeypatch.setenv("DIFFEDIT_NOTEBOOK_MODEL", str(tmp_path / "sdxl"))
    source = next(s for s in build.SOURCES if s.stem.startswith("01_"))
    notebook = nbformat.read(str(build.execute(source, tmp_path)), as_version=4)
    outputs = [o for cell in notebook.cells for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("model: tiny-xl" in o.get("text", "") for o in outputs)


def test_cli_runs_an_sdxl_folder_unchanged(model: StableDiffusion, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    """`diffedit edit --model SDXL_FOLDER` is `edit_image` on that model with the CLI's seed, bit for bit; the
    mask, invert and edit-from-file commands run too; --compat is refused in one line, nothing written."""
    import numpy as np
    from PIL import Image

    from diffedit.cli import main

    model.save(tmp_path / "sdxl")
    picture = Image.fromarray((np.random.default_rng(0).random((24, 40, 3)) * 255).astype(np.uint8))
    picture.save(tmp_path / "in.png")
    common = ["--model", str(tmp_path / "sdxl"), "--image", str(tmp_path / "in.png"), "--steps", "6", "--quiet"]
    prompts = ["--source", SOURCE, "--target", TARGET]
    assert main(["edit", *common, *prompts, "--out", str(tmp_path / "out.png")]) == 0
    expected = edit_image(load(tmp_path / "sdxl"), picture, SOURCE, TARGET, seed=0, steps=6, progress=False)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), np.asarray(expected.edit.images[0]))
    inversion = tmp_path / "in.inversion.safetensors"
    assert main(["invert", *common, "--out", str(inversion)]) == 0
    assert main(["edit", *common, *prompts, "--inversion", str(inversion), "--out", str(tmp_path / "again.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), np.asarray(Image.open(tmp_path / "out.png")))
    assert main(["mask", *common, *prompts, "--out", str(tmp_path / "mask.png")]) == 0
    capsys.readouterr()
    assert main(["edit", *common, *prompts, "--compat", "--out", str(tmp_path / "compat.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no SDXL version" in err[0] and not (tmp_path / "compat.png").exists()
