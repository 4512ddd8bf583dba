"""diffedit: DiffEdit (Couairon et al. 2022, arXiv 2210.11427) on Stable Diffusion, in plain PyTorch.

    from diffedit import load, generate_mask, invert, edit
"""

from .edit import EditResult, Inversion, MaskResult, edit, generate_mask, invert, noise_inversion
from .model import StableDiffusion, load

__all__ = ["load", "StableDiffusion", "generate_mask", "invert", "edit", "noise_inversion", "MaskResult", "Inversion", "EditResult"]
