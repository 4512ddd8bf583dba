"""diffedit: DiffEdit (Couairon et al. 2022, arXiv 2210.11427) on Stable Diffusion, in plain PyTorch."""
