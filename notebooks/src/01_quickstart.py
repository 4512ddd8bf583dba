# %% [markdown]
# # DiffEdit quickstart: mask, inversion, masked denoising
#
# DiffEdit (Couairon et al. 2022, [arXiv 2210.11427](https://arxiv.org/abs/2210.11427)) edits an image from
# two prompts in three steps: (1) a **mask** from the disagreement of the noise estimates under the source
# and the target prompt (§3.2), (2) **DDIM encoding** of the input to a ratio r (§3.1), (3) **DDIM decoding**
# with the target prompt where, outside the mask, the latent is replaced at every step by the input's own
# encoding at the same noise level (§3.3).
#
# By default this notebook runs on the project's toy model (a small latent diffusion model trained on a
# procedural "shapes world", shipped with the package). To run it on real Stable Diffusion weights (SD 1.x, 2.x
# or XL), convert them with `python -m weights_convert SRC models/sd15` (or `stabilityai/stable-diffusion-xl-base-1.0
# models/sdxl`) and set `MODEL_DIR` (or the DIFFEDIT_NOTEBOOK_MODEL variable), `IMAGE_PATH` and the prompts. On SDXL
# the cells are the same: the stages add its pooled and size conditioning themselves (the image's own size).

# %%
import os
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's widget hint, from a dependency
MODEL_DIR = os.environ.get("DIFFEDIT_NOTEBOOK_MODEL")  # None: the shipped toy model
IMAGE_PATH = None  # None: a held-out shapes-world scene; else a picture file (512x512 for SD, 1024x1024 for XL)
SOURCE, TARGET = None, None  # None: the scene's caption and the edited caption
SEED = 0
STEPS = 50

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

from diffedit import edit, generate_mask, invert, load
from diffedit.image import to_tensor
from diffedit.toy import load_toy_model, world

model = load(MODEL_DIR) if MODEL_DIR else load_toy_model()
if IMAGE_PATH is None:
    pair = world.heldout_edit_pairs(8, max_objects=2)[0]  # a colour edit
    image = world.to_tensor(world.render(pair.source)[0])[None]
    SOURCE, TARGET = SOURCE or pair.source.caption, TARGET or pair.target.caption
else:
    image = to_tensor(Image.open(IMAGE_PATH))
print(f"model: {model.config.name}, image {tuple(image.shape)}; '{SOURCE}' -> '{TARGET}'")


def show(images, titles, scale=2.5):
    fig, axes = plt.subplots(1, len(images), figsize=(scale * len(images), scale))
    for ax, im, title in zip(np.atleast_1d(axes), images, titles):
        im = im.detach().cpu().float()
        ax.imshow(im.permute(1, 2, 0).numpy() if im.ndim == 3 and im.shape[0] == 3 else im.squeeze().numpy(),
                  cmap=None if im.ndim == 3 and im.shape[0] == 3 else "magma", interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    plt.tight_layout()
    plt.show()


# %% [markdown]
# ## 1. The mask (§3.2)
# Noise the input's latent to t = 481 (strength 0.5) ten times, predict the noise under both prompts and
# average |eps_target - eps_source| over the samples and channels; the mask keeps what exceeds
# rho/2 x mean (rho = 3). **Paper:** the map highlights the object the two prompts disagree on
# (Fig. 2). **Toy model:** the map is bright on the object whose colour or shape changes, dark elsewhere.

# %%
generator = torch.Generator().manual_seed(SEED)
mask = generate_mask(model, image, SOURCE, TARGET, steps=STEPS, generator=generator, progress=False)
show([image[0], mask.difference[0], mask.latent_mask[0]], ["input", "difference map D", "mask (latent resolution)"])

# %% [markdown]
# ## 2. DDIM encoding to r = 0.8 (§3.1)
# The latent is encoded with the deterministic DDIM ODE, unconditionally, up to t = 781 (40 of 50 steps);
# every intermediate latent is kept because decoding blends with them. The VAE ran once: the mask's z0 is
# reused. **Paper (§3.1):** DDIM encoding keeps the layout of the input in the noise, which is what lets the
# decoding stay faithful. **Toy model:** decoded, the latents show the scene dissolving into structured noise,
# the objects' positions visible until late.

# %%
inversion = invert(model, latents=mask.latents, strength=0.8, steps=STEPS, progress=False)
levels = [0, 10, 20, 30, 39]
show([model.decode_latents(inversion.latents[:, i])[0] for i in levels],
     [f"t = {inversion.timesteps[i]}" for i in levels])

# %% [markdown]
# ## 3. Masked DDIM decoding (§3.3)
# From x_r, DDIM steps with the target prompt (guidance 7.5, negative prompt = the source caption); after each
# step, outside the mask, the latent is replaced by the inversion's latent at the same level, and the last
# step restores z0 itself. **Paper:** the object changes while the background is kept (Fig. 1).
# **Toy model:** the object takes the target colour / shape; the background equals the VAE reconstruction.

# %%
result = edit(model, inversion, mask, TARGET, negative_prompt=SOURCE, generator=torch.Generator().manual_seed(SEED),
              output_type="pt", progress=False)
reconstruction = model.decode_latents(inversion.z0)
show([image[0], reconstruction[0], result.images[0]], ["input", "VAE reconstruction", f"edit: {TARGET}"])
outside = mask.latent_mask == 0
same = torch.equal(result.latents[outside.expand_as(result.latents)], inversion.z0[outside.expand_as(inversion.z0)])
print(f"final latent outside the mask is exactly the input's z0: {same}")

# %% [markdown]
# ## The three steps in one call
# `edit_image` runs exactly these three calls (z0 encoded once, the source as the edit's negative prompt, a
# generator seeded with `seed` for each stage). **Paper:** the method is these three steps and nothing else.
# **Toy model:** the one call gives the same latents, bit for bit, as the three cells above.

# %%
from diffedit import edit_image

chained = edit_image(model, image, SOURCE, TARGET, seed=SEED, steps=STEPS, output_type="pt", progress=False)
print("edit_image == the three calls, bit for bit:", torch.equal(chained.edit.latents, result.latents))
show([image[0], chained.mask.latent_mask[0], chained.edit.images[0]], ["input", "mask", "edit_image"])
