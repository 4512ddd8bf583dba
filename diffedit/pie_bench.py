"""PIE-Bench (Ju et al. 2023, "Direct Inversion", cure-lab/PnPInversion) as its files are distributed.

A PIE-Bench folder holds `mapping_file.json` (one record per edit, keyed by an id such as "000000000000") and
`annotation_images/` (the pictures, at the record's `image_path`). What is read here reproduces PnPInversion's
`evaluation/evaluate.py` and `run_editing_*.py`:

- the prompts are `original_prompt` and `editing_prompt` with every "[" and "]" removed (the brackets mark the
  edited words; `str.replace`, so the spaces around them stay as they are);
- the ground-truth mask is `mask`, a run-length code decoded by `utils/utils.py`'s `mask_decode`: pairs (start,
  length) over the row-major flattened 512 x 512 picture, a run clipped at the end of the picture, and then its
  border quirk: the first and last rows and columns are set to 1 ("to avoid annotation errors in boundary"), so
  the border always counts as edited and never as background;
- the edit type is `editing_type_id` ("0" .. "9", kept as the string it is), named in EDIT_TYPES.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAPPING_FILE = "mapping_file.json"
IMAGES = "annotation_images"
PIE_SIZE = (512, 512)  # mask_decode's default image_shape: every PIE-Bench picture is 512 x 512
EDIT_TYPES = {  # editing_type_id -> PIE-Bench's name of the category (paper, Table 1)
    "0": "random", "1": "change object", "2": "add object", "3": "delete object", "4": "change attribute (content)",
    "5": "change attribute (pose)", "6": "change attribute (color)", "7": "change attribute (material)",
    "8": "change background", "9": "change style",
}


@dataclass(frozen=True)
class PieRecord:
    """One edit of mapping_file.json, prompts already stripped of their brackets."""

    id: str
    image: Path  # annotation_images/<image_path>
    source: str  # original_prompt without [ ]
    target: str  # editing_prompt without [ ]
    edit_type: str  # editing_type_id
    rle: tuple[int, ...]  # the mask's run-length code, as stored


def strip_brackets(prompt: str) -> str:
    """PIE-Bench's prompt: its bracket markup removed, `prompt.replace("[", "").replace("]", "")`."""
    return prompt.replace("[", "").replace("]", "")


def mask_decode(rle: list[int] | tuple[int, ...], shape: tuple[int, int] = PIE_SIZE) -> np.ndarray:
    """PnPInversion's `mask_decode`: (start, length) runs over the flattened (h, w) picture -> float {0, 1} (h, w).

    A run is clipped at the picture's end (min(length, h * w - start)); a start past the end sets nothing. Then
    the border quirk: rows 0 and h - 1 and columns 0 and w - 1 are set to 1 whatever the code says.
    """
    h, w = shape
    flat = np.zeros(h * w)
    for start, length in zip(rle[0::2], rle[1::2]):
        count = min(length, h * w - start)
        if count > 0:
            flat[start:start + count] = 1
    mask = flat.reshape(h, w)
    mask[0, :] = mask[-1, :] = 1
    mask[:, 0] = mask[:, -1] = 1
    return mask


def check_rle(rle: object) -> str | None:
    """Why `rle` is not a code that mask_decode reads (None: it is): a flat list of non-negative integer pairs."""
    if not isinstance(rle, list) or len(rle) % 2:
        return "mask must be a list of (start, length) integer pairs"
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in rle):
        return "mask must hold non-negative integers only"
    return None


def read_mapping(folder: Path) -> list[tuple[str, object]]:
    """The (key, record) pairs of `folder`/mapping_file.json in file order; one line naming the file if unreadable."""
    path = folder / MAPPING_FILE
    if not folder.is_dir():
        raise ValueError(f"--pie-bench {folder}: " + ("not a folder" if folder.exists() else "does not exist"))
    if not (folder / IMAGES).is_dir() or not path.is_file():
        raise ValueError(f"--pie-bench {folder}: a PIE-Bench folder holds {MAPPING_FILE} and {IMAGES}/")
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable JSON: {' '.join(str(e).split())}") from None
    if not isinstance(mapping, dict):
        raise ValueError(f"{path}: must be a JSON object of records keyed by id, got {type(mapping).__name__}")
    return list(mapping.items())


def parse_record(folder: Path, key: str, record: object) -> PieRecord:
    """One mapping_file.json record as a PieRecord, or a ValueError saying which field is wrong (no prefix)."""
    if not isinstance(record, dict):
        raise ValueError(f"the record must be a JSON object, got {type(record).__name__}")
    for field in ("image_path", "original_prompt", "editing_prompt", "editing_type_id"):
        value = record.get(field)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"missing {field} (a non-empty string)")
    problem = check_rle(record.get("mask"))
    if problem is not None:
        raise ValueError(problem)
    source, target = strip_brackets(record["original_prompt"]), strip_brackets(record["editing_prompt"])
    for field, prompt in (("original_prompt", source), ("editing_prompt", target)):
        if not prompt.strip():
            raise ValueError(f"missing {field}: nothing is left once its brackets are removed")
    return PieRecord(key, folder / IMAGES / record["image_path"], source, target, record["editing_type_id"],
                     tuple(record["mask"]))
