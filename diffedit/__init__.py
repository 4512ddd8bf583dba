"""diffedit: DiffEdit (Couairon et al. 2022, arXiv 2210.11427) on Stable Diffusion, in plain PyTorch.

    from diffedit import load, edit_image                      # the whole method in one call
    from diffedit import generate_mask, invert, edit           # or its three stages (§3.2, §3.1, §3.3)
"""

from .chain import EditImageResult, edit_image
from .edit import EditResult, Inversion, MaskResult, binarize, edit, generate_mask, invert, noise_inversion
from .model import StableDiffusion, load
from .regulariser import InversionRegulariser
from .text import PromptEmbeddings

__all__ = [
    "load", "StableDiffusion", "edit_image", "generate_mask", "invert", "edit", "noise_inversion", "binarize",
    "MaskResult", "Inversion", "EditResult", "EditImageResult", "InversionRegulariser", "PromptEmbeddings",
]
