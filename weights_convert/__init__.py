"""Stable Diffusion checkpoints (diffusers folders, original single files, hub repos) <-> diffedit model folders.

    python -m weights_convert SRC OUT [--dtype fp16|fp32] [--force] [--tokenizer DIR|REPO_ID] [--to diffusers] ...

convert.py orchestrates; diffusers.py and ldm.py hold the tensor-name tables, diffusers_config.py the
diffusers config files' translation (both ways); detect.py tells SD 1.x, 2.x and XL apart;
export.py writes our folders back in diffusers format. Nothing here imports diffusers.
"""

__version__ = "1.0"
