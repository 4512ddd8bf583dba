"""Benchmarks (not tests): our DiffEdit against diffusers' StableDiffusionDiffEditPipeline. See bench/README.md."""
