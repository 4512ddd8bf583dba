"""Batches are rows: the images (or latents), the prompts and the masks of a call each have 1 or N entries, and a
single entry is shared by all N rows."""

from __future__ import annotations

from typing import TypeVar

from torch import Tensor

from .text import PromptEmbeddings

Rows = TypeVar("Rows", Tensor, PromptEmbeddings)


def batch_rows(**counts: int) -> int:
    """The number of rows of a call: every count must be 1 (shared) or the largest one."""
    rows = max(counts.values())
    if any(n not in (1, rows) for n in counts.values()):
        raise ValueError(f"batch sizes must be 1 or equal: {', '.join(f'{k}={v}' for k, v in counts.items())}")
    return rows


def to_rows(v: Rows, rows: int) -> Rows:
    """`v` with `rows` rows: as it is, or its single row repeated."""
    if isinstance(v, PromptEmbeddings):
        return v.map(lambda e: to_rows(e, rows))
    return v if len(v) == rows else v.repeat(rows, *[1] * (v.ndim - 1))


def per_image(v: Rows, rows: int, images_per_row: int) -> Rows:
    """`v` with `rows` rows, each repeated for its `images_per_row` images: row r -> r*k .. r*k + k - 1."""
    if isinstance(v, PromptEmbeddings):
        return v.map(lambda e: per_image(e, rows, images_per_row))
    return to_rows(v, rows).repeat_interleave(images_per_row, 0)


def tile(v: Rows, times: int) -> Rows:
    """All of `v`'s rows, `times` times one after another (several noise draws of one batch in one call)."""
    if isinstance(v, PromptEmbeddings):
        return v.map(lambda e: tile(e, times))
    return v if times == 1 else v.repeat(times, *[1] * (v.ndim - 1))
