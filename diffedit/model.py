"""StableDiffusion: the UNet, the VAE, the text encoder and the noise schedule, and `load(folder)`.

This module wires the networks together and nothing more: classifier-free guidance (Ho & Salimans 2022,
arXiv 2207.12598) is one batched UNet call, latents are the VAE posterior scaled by the config's factor
(Rombach et al. 2022, §4.3.2 / appendix), and every algorithm lives in ddim.py and edit.py.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode
from transformers import CLIPTokenizer

from .configs import ModelConfig
from .ddim import NoiseSchedule, eps_from_v
from .text import PromptEmbeddings, Prompts, as_prompt_list, build_text_model, encode_text_pooled
from .text import load_text_state_dict, load_tokenizer, text_state_dict, tokenize
from .unet import SIZES, UNet
from .vae import AutoencoderKL, DiagonalGaussian
from .weights import TOKENIZER_2_DIR, TOKENIZER_DIR, check_state_dict, read_component, read_config
from .weights import write_model_folder

AttentionHook = Callable[[Tensor, bool, str], Tensor | None]
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that replay CUDA graphs


class StableDiffusion(nn.Module):
    """SD 1.x / 2.x, or SDXL with its second text encoder (`text_encoder_2`, `tokenizer_2`).

    dtype policy: a VAE whose config says `force_upcast` (SDXL's overflows in fp16) stays in fp32 whatever
    `.to(dtype)` asks; images and latents are cast at its boundary."""

    def __init__(
        self, config: ModelConfig, tokenizer: CLIPTokenizer | None = None, *, empty: bool = False,
        tokenizer_2: CLIPTokenizer | None = None,
    ) -> None:
        """empty=True leaves the UNet and VAE parameters unallocated (meta device), for `load` to fill:
        initialising 860M random numbers only to overwrite them costs more than reading the file."""
        super().__init__()
        self.config = config
        with torch.device("meta" if empty else "cpu"):
            self.unet = UNet(config.unet)
            self.vae = AutoencoderKL(config.vae)
        self.text_encoder = build_text_model(config.text)
        self.text_encoder_2 = build_text_model(config.text_2) if config.text_2 is not None else None
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.schedule = NoiseSchedule.from_config(config.schedule)
        self.provenance: dict[str, Any] = {}
        self.compile_mode: str | None = None  # set by compile_unet
        self.eval()

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    # ---- text -------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: Prompts, clip_skip: int = 0) -> PromptEmbeddings:
        """Prompts -> their embeddings ((B, 77, D) tokens; SDXL: both encoders' tokens side by side and bigG's
        pooled embedding) in the UNet's dtype, for the UNet or any stage.

        With `config.empty_prompt == "zeros"` (SDXL) the empty prompt "" is all-zero tokens and pooled embedding:
        SDXL was trained with zeroed conditioning for dropped captions, and its pipeline zeroes an absent negative.
        """
        prompts = as_prompt_list(prompts)
        encoders = [(self.text_encoder, self.tokenizer, self.config.text)]
        if self.config.text_2 is not None:
            encoders.append((self.text_encoder_2, self.tokenizer_2, self.config.text_2))
        tokens, pooled = [], None
        for encoder, tokenizer, config in encoders:
            if tokenizer is None:
                raise ValueError("this model has no tokenizer: pass PromptEmbeddings instead of prompts")
            hidden, pooled = encode_text_pooled(encoder, tokenize(tokenizer, prompts, config.max_length), clip_skip,
                                                config.output)
            tokens.append(hidden)
        # SD 1.x / 2.x: one encoder. SDXL (Podell et al. §2.1): ViT-L's then bigG's features per token; pooled: bigG's.
        pooled = pooled if self.config.unet.added_conditioning else None
        embeddings = PromptEmbeddings(torch.cat(tokens, dim=-1), pooled)
        if self.config.empty_prompt == "zeros":
            empty = torch.tensor([p == "" for p in prompts], device=embeddings.tokens.device)
            embeddings = embeddings.map(lambda v: v.masked_fill(empty.view(-1, *[1] * (v.ndim - 1)), 0.0))
        return embeddings.map(lambda v: v.to(self.dtype))

    def check_embeddings(self, embeddings: PromptEmbeddings, what: str = "prompt embeddings") -> PromptEmbeddings:
        """Validate user-given embeddings (tokens (B, tokens, cross_attention_dim), finite; SDXL: pooled
        (B, pooled_text_dim), sizes (B, 6) or None) and move them here."""
        if not isinstance(embeddings, PromptEmbeddings):
            raise TypeError(f"{what} must be PromptEmbeddings (model.encode_prompt), got {type(embeddings).__name__}")
        u, tokens = self.config.unet, embeddings.tokens
        if not isinstance(tokens, Tensor) or tokens.ndim != 3 or tokens.shape[-1] != u.cross_attention_dim:
            raise ValueError(f"{what} must have tokens of shape (B, tokens, {u.cross_attention_dim}), got "
                             f"{tuple(getattr(tokens, 'shape', ()))}")
        rows, pooled, sizes = len(tokens), embeddings.pooled, embeddings.sizes
        if u.added_conditioning:
            if not isinstance(pooled, Tensor) or tuple(pooled.shape) != (rows, u.pooled_text_dim):
                raise ValueError(f"{what} of an SDXL model need pooled of shape ({rows}, {u.pooled_text_dim}), got "
                                 f"{None if pooled is None else tuple(getattr(pooled, 'shape', ()))}")
            if sizes is not None and (not isinstance(sizes, Tensor) or tuple(sizes.shape) != (rows, SIZES)):
                raise ValueError(f"{what}: sizes must be None or of shape ({rows}, {SIZES}), got "
                                 f"{tuple(getattr(sizes, 'shape', ()))}")
        elif pooled is not None or sizes is not None:
            raise ValueError(f"{what} carry pooled or sizes conditioning, which an SD 1.x / 2.x model does not take")
        for v in (tokens, pooled, sizes):
            if v is not None and (not v.is_floating_point() or not torch.isfinite(v).all()):
                raise ValueError(f"{what} hold NaN, Inf or non-float values")
        return embeddings.map(lambda v: v.to(self.device, self.dtype))

    def size_conditioning(self, latents: Tensor) -> Tensor:
        """SDXL's default size conditioning for `latents` (B, C, h, w): original and target size the image's own
        (h, w) in pixels, crop (0, 0), what SDXL's pipeline passes for an uncropped image of that size. (B, 6)."""
        h, w = (s * self.config.vae.downsample_factor for s in latents.shape[-2:])
        sizes = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32)  # built on the host, copied without a sync
        return sizes.to(latents.device, non_blocking=True).expand(len(latents), -1)

    # ---- images <-> latents -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_posterior(self, images: Tensor) -> DiagonalGaussian:
        """Images (B, 3, H, W) in [0, 1] -> the VAE's posterior q(z | x) (unscaled latents): one encoder pass."""
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a (B, 3, H, W) tensor, got {getattr(images, 'shape', type(images))}")
        factor = self.config.vae.downsample_factor
        if images.shape[-1] % factor or images.shape[-2] % factor:
            raise ValueError(f"image height and width must be multiples of {factor}, got {tuple(images.shape[-2:])}")
        return self.vae.encode(images.to(self.device, self.vae_dtype) * 2 - 1)

    def posterior_latents(
        self, posterior: DiagonalGaussian, generator: torch.Generator | None = None, sample: bool = False,
        repeat: int = 1,
    ) -> Tensor:
        """A posterior -> scaled latents z0 (B * repeat, 4, h, w): its mean, or with `sample=True` a draw with
        `generator`, as diffusers' pipelines do. `repeat` gives each image `repeat` consecutive rows; the draws
        are those of sampling the posterior of the repeated batch."""
        if repeat > 1:
            posterior = DiagonalGaussian(*(m.repeat_interleave(repeat, 0) for m in (posterior.mean, posterior.logvar)))
        latents = posterior.sample(generator) if sample else posterior.mode()
        return (latents * self.config.vae.scaling_factor).to(self.dtype)

    def encode_image(
        self, images: Tensor, generator: torch.Generator | None = None, sample: bool = False, repeat: int = 1
    ) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] -> scaled latents z0 (B * repeat, 4, H/8, W/8).

        By default the posterior mean (deterministic); `sample=True` draws from the posterior with
        `generator`, as diffusers' pipelines do. `repeat` gives each image `repeat` consecutive rows: the
        encoder runs once and the posterior is repeated, so the draws are those of encoding the repeated batch.
        """
        return self.posterior_latents(self.encode_posterior(images), generator, sample, repeat)

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images (B, 3, H, W) in [0, 1]."""
        images = self.vae.decode(latents.to(self.device, self.vae_dtype) / self.config.vae.scaling_factor)
        return ((images + 1) / 2).clamp(0, 1)

    # ---- the denoiser -------------------------------------------------------------------------------
    @torch.no_grad()
    def unet_output(
        self,
        x: Tensor,
        t: int | Tensor,
        cond: PromptEmbeddings,
        uncond: PromptEmbeddings | None = None,
        guidance: float = 1.0,
        attention_hook: AttentionHook | None = None,
    ) -> Tensor:
        """The UNet's raw output (noise for epsilon models, v for v-models) with classifier-free guidance.

        guidance g: out = out(uncond) + g (out(cond) - out(uncond)), one batched UNet call on
        [uncond; cond]. g == 1 or uncond None: the conditional output alone (half the work).
        """
        if uncond is None or guidance == 1.0:
            return self._unet(x, t, cond, attention_hook)
        if uncond.tokens.shape != cond.tokens.shape:
            raise ValueError(f"uncond {tuple(uncond.tokens.shape)} and cond {tuple(cond.tokens.shape)} must have "
                             "the same shape")
        t2 = torch.cat([t, t]) if isinstance(t, Tensor) and t.ndim == 1 else t
        both = PromptEmbeddings.cat([uncond, cond])
        out_uncond, out_cond = self._unet(torch.cat([x, x]), t2, both, attention_hook).chunk(2)
        return out_uncond + guidance * (out_cond - out_uncond)

    def _unet(self, x: Tensor, t: int | Tensor, cond: PromptEmbeddings, attention_hook: AttentionHook | None) -> Tensor:
        """One UNet call conditioned on everything `cond` holds (SDXL: pooled and sizes, the image's by default)."""
        if not isinstance(t, Tensor):
            # A device scalar written by a fill kernel: a Python int would be a constant of the compiled graph (one
            # recompilation per timestep) and, as torch.as_tensor(t, device="cuda"), a host-to-device copy that
            # waits for the GPU at every step. Same values: the UNet makes an int64 tensor of t either way.
            t = torch.full((), t, dtype=torch.long, device=x.device)
        # An attention hook is Python that sees every map: it runs eagerly (compiled, each step's hook would be a
        # new graph). forward() alone is what nn.Module.compile() leaves uncompiled. So does a call under a torch
        # dispatch mode (FlopCounterMode, debug modes): Dynamo would not trace it, and it would mark the UNet's code
        # as skipped for good, so every later call would run eagerly too (seen with torch 2.13).
        eager = self.compile_mode is not None and (attention_hook is not None or is_in_torch_dispatch_mode())
        unet = self.unet.forward if eager else self.unet
        graphs = self.compile_mode in CUDA_GRAPH_MODES and not eager
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()  # each call is a new step: the last replay's outputs are done
        if not self.config.unet.added_conditioning:
            out = unet(x, t, cond.tokens, attention_hook)
        else:
            sizes = cond.sizes if cond.sizes is not None else self.size_conditioning(x)
            out = unet(x, t, cond.tokens, attention_hook, pooled=cond.pooled, sizes=sizes)
        # A CUDA graph's output lives in its pool and is overwritten by the next replay: a copy (one latent) is safe
        # for callers that keep it, as the mask's callbacks and users of unet_output may.
        return out.clone() if graphs else out

    def compile_unet(
        self, mode: str | None = None, *, backend: str = "inductor", options: Mapping[str, Any] | None = None,
    ) -> "StableDiffusion":
        """torch.compile the UNet in place (nn.Module.compile: the same module and state-dict names, so `save`,
        `.to()` and the weights converters keep working); the VAE and text encoder run once a stage and stay eager.

        mode None: "reduce-overhead" on CUDA (Inductor kernels replayed as CUDA graphs: a 512 x 512 UNet call is a
        few milliseconds of GPU work in ~1000 kernels, so launching them one by one would cost as much again),
        "default" elsewhere. "max-autotune" / "max-autotune-no-cudagraphs" also benchmark kernel choices: minutes
        more warm-up per shape. CUDA graphs are refused off CUDA. dynamic=False: each batch shape (the mask's
        2n rows, the inversion's 1, the edit's 2) is compiled once, with static shapes, and reused for every step,
        image and prompt of that shape; the first call of a shape pays the warm-up (seconds to minutes). Call it
        after `.to(device)`; an attention hook bypasses the compiled code (it runs eagerly). `backend` other than
        "inductor" (e.g. "aot_eager": the captured graph without code generation, for tests) takes no mode.
        `options`: Inductor settings for this model's graphs alone (torch.compile's `options=`, added to the mode's;
        e.g. {"conv_1x1_as_mm": True}), never the process-wide torch._inductor.config. CUDA graphs stay the mode's.
        """
        if backend != "inductor":
            if mode is not None or options:
                raise ValueError(f"compile modes and options are Inductor's: backend {backend!r} takes neither")
            self.unet.compile(backend=backend, dynamic=False)
            self.compile_mode = "default"
            return self
        cuda = self.device.type == "cuda"
        mode = mode or ("reduce-overhead" if cuda else "default")
        modes = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
        if mode not in modes:
            raise ValueError(f"compile mode must be one of {modes}, got {mode!r}")
        if mode in CUDA_GRAPH_MODES and not cuda:
            raise ValueError(f"compile mode {mode!r} uses CUDA graphs, which need a CUDA model (this one is on "
                             f"{self.device}): use 'default' or 'max-autotune-no-cudagraphs'")
        if options and "triton.cudagraphs" in options:
            raise ValueError("CUDA graphs follow the compile mode (reduce-overhead / max-autotune), not `options`")
        # torch.compile takes a mode or options, not both: the mode's own options, then the caller's
        from torch._inductor import list_mode_options

        settings = {**list_mode_options(mode), **(options or {})}
        self.unet.compile(options=settings, dynamic=False)
        self.compile_mode = mode
        return self

    @torch.no_grad()
    def noise_estimate(
        self,
        x: Tensor,
        t: int,
        cond: PromptEmbeddings,
        uncond: PromptEmbeddings | None = None,
        guidance: float = 1.0,
        attention_hook: AttentionHook | None = None,
    ) -> Tensor:
        """The guided noise estimate eps(x, t) whatever the model predicts: `unet_output`, converted from v for
        v-models.

        The conversion is affine with the same coefficients for both CFG branches, so guiding in v and
        converting equals converting and guiding.
        """
        out = self.unet_output(x, t, cond, uncond, guidance, attention_hook)
        if self.config.schedule.prediction_type == "v_prediction":
            return eps_from_v(out, x, self.schedule.abar(int(t)))
        return out

    # ---- files --------------------------------------------------------------------------------------
    def state_dicts(self) -> dict[str, dict[str, Tensor]]:
        tensors = {
            "unet": self.unet.state_dict(),
            "vae": self.vae.state_dict(),
            "text_encoder": text_state_dict(self.text_encoder),
        }
        if self.text_encoder_2 is not None:
            tensors["text_encoder_2"] = text_state_dict(self.text_encoder_2)
        return tensors

    def save(self, folder: str | os.PathLike[str], *, force: bool = False, dtype: torch.dtype | None = None) -> Path:
        if self.tokenizer is None or (self.text_encoder_2 is not None and self.tokenizer_2 is None):
            raise ValueError("cannot save a model without its tokenizers")
        with tempfile.TemporaryDirectory(prefix="diffedit-") as tmp:
            self.tokenizer.save_pretrained(Path(tmp) / "1")
            second = None
            if self.tokenizer_2 is not None:
                self.tokenizer_2.save_pretrained(second := Path(tmp) / "2")
            return write_model_folder(folder, self.config, self.state_dicts(), Path(tmp) / "1", self.provenance,
                                      dtype=dtype, force=force, tokenizer_2_dir=second)


def load(
    folder: str | os.PathLike[str], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    compile: bool = False,
) -> StableDiffusion:
    """Load a model folder (DESIGN.md layout) strictly: every tensor consumed, every shape checked.

    compile=True: `StableDiffusion.compile_unet()` with its default mode (CUDA graphs on CUDA), opt-in because the
    first call of each batch shape pays a warm-up. On CUDA in fp16 / bf16 the UNet and VAE weights are channels_last
    (`use_fast_layout`)."""
    folder = Path(folder)
    if folder.is_file():
        raise ValueError(f"model {folder} is a file, not a model folder (convert it: python -m weights_convert)")
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    config, provenance = read_config(folder)
    tokenizer = load_tokenizer(folder / TOKENIZER_DIR, config.text)
    tokenizer_2 = load_tokenizer(folder / TOKENIZER_2_DIR, config.text_2) if config.text_2 is not None else None
    model = StableDiffusion(config, tokenizer, empty=True, tokenizer_2=tokenizer_2)
    for name, module in (("unet", model.unet), ("vae", model.vae)):
        tensors = read_component(folder, name)
        check_state_dict(tensors, {k: v.shape for k, v in module.state_dict().items()}, name)
        # assign: the tensors become the parameters (the modules were built without storage). Cloned into
        # fresh allocations first: views into the file's buffer can be unaligned, and CPU conv kernels then
        # take another path whose results differ in the last bits from the same weights saved in memory.
        module.load_state_dict({k: v.clone() for k, v in tensors.items()}, strict=True, assign=True)
    load_text_state_dict(model.text_encoder, read_component(folder, "text_encoder"))
    if model.text_encoder_2 is not None:
        load_text_state_dict(model.text_encoder_2, read_component(folder, "text_encoder_2"), "text encoder 2")
    model.provenance = provenance
    model = model.to(device=device, dtype=dtype).eval()
    use_fast_layout(model)
    return model.compile_unet() if compile else model


def use_fast_layout(model: StableDiffusion) -> StableDiffusion:
    """On CUDA, the UNet's and VAE's half-precision convolution weights in channels_last (NHWC), cuDNN's layout for
    tensor cores; anything else (CPU, fp32) is left as it is, so CPU numbers stay bit for bit. Measured on an H200
    in bf16 (bench/README.md, "GPU"): our eager UNet at the edit's 2 rows took 25.1 ms in NHWC against 37.0 ms in
    NCHW, 51.1 against 52.8 ms at 16 rows. Only the weights' layout changes: the activations follow the weights
    inside each convolution and every result has the same shape."""
    for network in (model.unet, model.vae):
        weight = next(network.parameters())
        if weight.device.type == "cuda" and weight.dtype in (torch.float16, torch.bfloat16):
            network.to(memory_format=torch.channels_last)
    return model
