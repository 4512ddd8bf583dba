# %% [markdown]
# # The paper's evaluation protocol (§4.1, ImageNet class edits)
#
# **Paper:** on ImageNet, each image of class A is edited into a similar class B ("a photo of a goldfish" ->
# "a photo of a shark"); three numbers summarise an editor: **LPIPS** between input and edit (fidelity; lower
# is better), **CSFID**, a class-conditional FID between the edits and real images of class B (realism of the
# edit; lower is better), and the **accuracy** of a classifier recognising class B in the edit (edit
# strength). DiffEdit improves the trade-off over SDEdit at every encoding ratio (Table 1, Fig. 5).
#
# This notebook implements the protocol once, with the three measures as plain functions you can swap:
#
# | | real SD weights + an image-folder dataset | shapes world (default, runs anywhere) |
# |---|---|---|
# | distance (LPIPS) | `lpips.LPIPS(net="alex")` (needs `pip install lpips torchvision`, downloads its weights) | mean absolute pixel error |
# | classifier | a torchvision ImageNet classifier | the pixel classifier of `diffedit.toy.evaluate` (colour / shape of the edited object) |
# | features for CSFID | the classifier's penultimate features | the model's own VAE latents, pooled |
#
# For real data set `MODEL_DIR` (a converted SD folder), `DATASET_DIR` (one sub-folder of images per class)
# and `CLASS_PAIRS` (source class -> target class, as in the paper's appendix).

# %%
import os
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's widget hint, from a dependency
MODEL_DIR = os.environ.get("DIFFEDIT_NOTEBOOK_MODEL")  # None: the shipped toy model
DATASET_DIR = None  # e.g. "data/imagenet_val_subset" with <class>/<image>.jpg; None: the shapes world
CLASS_PAIRS: dict[str, str] = {}  # e.g. {"goldfish": "great white shark"} for DATASET_DIR
NUM_EDITS = 16  # shapes world: held-out edits
RATIOS = [0.5, 0.7, 0.9]
SEED = 0
STEPS = 50

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

from diffedit import edit, generate_mask, invert, load, noise_inversion
from diffedit.image import to_tensor, to_uint8
from diffedit.toy import evaluate, load_toy_model, world

model = load(MODEL_DIR) if MODEL_DIR else load_toy_model()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), the FID formula (Heusel et al. 2017),
    with the matrix square roots from symmetric eigendecompositions (no scipy needed)."""
    a, b = a.double(), b.double()
    mu = (a.mean(0) - b.mean(0)).square().sum()
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(sa)
    root_a = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root_a @ sb @ root_a).clamp(min=0).sqrt().sum()
    return float(mu + sa.trace() + sb.trace() - 2 * cross)


if DATASET_DIR is None:
    PAIRS = world.heldout_edit_pairs(NUM_EDITS, max_objects=2)
    inputs = world.to_tensor(np.stack([world.render(p.source)[0] for p in PAIRS]))
    sources, targets = [p.source.caption for p in PAIRS], [p.target.caption for p in PAIRS]
    # "real images of class B": renderings of the target scenes, i.e. what a perfect edit would look like
    references = world.to_tensor(np.stack([world.render(p.target)[0] for p in PAIRS]))

    def distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x - y).abs().mean((1, 2, 3))

    def accuracy(edits: torch.Tensor) -> float:
        return float(np.mean([evaluate.edit_success(p, e) for p, e in zip(PAIRS, to_uint8(edits))]))

    def features(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(model.encode_image(x), 4).flatten(1)

    def class_of(i: int) -> str:  # CSFID's classes: the target description of each edit
        return targets[i]
else:  # real data: the paper's protocol (not run in CI; needs `pip install lpips torchvision`)
    import lpips
    import torchvision

    files = [(a, f) for a in CLASS_PAIRS for f in sorted((Path(DATASET_DIR) / a).iterdir())]
    inputs = torch.cat([to_tensor(Image.open(f).convert("RGB").resize((512, 512))) for _, f in files])
    sources = [f"a photo of a {a}" for a, _ in files]
    targets = [f"a photo of a {CLASS_PAIRS[a]}" for a, _ in files]
    references = torch.cat([to_tensor(Image.open(f).convert("RGB").resize((512, 512)))
                            for b in set(CLASS_PAIRS.values()) for f in sorted((Path(DATASET_DIR) / b).iterdir())])
    lpips_net = lpips.LPIPS(net="alex")
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    classifier = torchvision.models.resnet50(weights=weights).eval()
    names = weights.meta["categories"]

    def distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return lpips_net(x * 2 - 1, y * 2 - 1).flatten()

    def accuracy(edits: torch.Tensor) -> float:
        pred = classifier(weights.transforms()(edits)).argmax(1)
        return float(np.mean([names[int(k)] == CLASS_PAIRS[a] for k, (a, _) in zip(pred, files)]))

    def features(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.Sequential(*list(classifier.children())[:-1])(weights.transforms()(x)).flatten(1)

    def class_of(i: int) -> str:
        return targets[i]


def csfid(edits: torch.Tensor) -> float:
    """Class-conditional FID: the Fréchet distance between edits and references, computed per target class
    and averaged. On the shapes world every edit has its own class, so all classes are pooled into one."""
    if DATASET_DIR is None:
        return frechet_distance(features(edits), features(references))
    scores = []
    for b in set(CLASS_PAIRS.values()):
        rows = [i for i in range(len(edits)) if class_of(i) == f"a photo of a {b}"]
        scores.append(frechet_distance(features(edits[rows]), features(references)))
    return float(np.mean(scores))


# %% [markdown]
# ## DiffEdit and SDEdit at several encoding ratios
# SDEdit (Meng et al. 2022): noise the input to the ratio r with *random* noise and denoise with the target
# prompt, no mask. DiffEdit: mask + DDIM encoding + masked decoding. Each point is one ratio.

# %%
with torch.no_grad():
    z0 = model.encode_image(inputs)
    mask = generate_mask(model, None, sources, targets, latents=z0, steps=STEPS,
                         generator=torch.Generator().manual_seed(SEED), progress=False)
    rows = []
    for r in RATIOS:
        inversion = invert(model, latents=z0, strength=r, steps=STEPS, progress=False)
        sdedit_start = noise_inversion(model, z0, strength=r, steps=STEPS, generator=torch.Generator().manual_seed(SEED))
        ones = torch.ones_like(mask.latent_mask)
        for method, inv, m in (("DiffEdit", inversion, mask.latent_mask), ("SDEdit", sdedit_start, ones)):
            out = edit(model, inv, m, targets, negative_prompt=sources, generator=torch.Generator().manual_seed(SEED),
                       output_type="pt", progress=False).images
            rows.append(dict(method=method, r=r, distance=distance(out, inputs).mean().item(),
                             csfid=csfid(out), accuracy=accuracy(out)))
for row in rows:
    print(f"{row['method']:8s} r={row['r']:.1f}  distance {row['distance']:.4f}  CSFID {row['csfid']:8.3f}  accuracy {row['accuracy']:.2f}")

# %% [markdown]
# ## The trade-off plots
# **Paper (Fig. 5):** for the same accuracy DiffEdit stays closer to the input (lower LPIPS) and more realistic
# (lower CSFID) than SDEdit; a larger r increases accuracy and distance for both. **Toy model:** DiffEdit is
# closer to the input at every r (about half SDEdit's distance) and more realistic (lower CSFID); SDEdit's accuracy
# is higher at r = 0.5 but falls at r = 0.9 as it redraws the scene. The points
# below, measured on the held-out shapes-world edits.

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
for method, style in (("DiffEdit", "o-"), ("SDEdit", "s--")):
    pts = [row for row in rows if row["method"] == method]
    for ax, key in zip(axes, ("distance", "csfid")):
        ax.plot([p[key] for p in pts], [p["accuracy"] for p in pts], style, label=method)
        for p in pts:
            ax.annotate(f"r={p['r']}", (p[key], p["accuracy"]), fontsize=7)
axes[0].set_xlabel("distance to input (LPIPS stand-in)"); axes[1].set_xlabel("CSFID")
for ax in axes:
    ax.set_ylabel("accuracy"); ax.grid(alpha=0.3); ax.legend()
plt.tight_layout()
plt.show()
