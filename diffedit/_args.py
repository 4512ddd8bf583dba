"""argparse value types shared by the `diffedit` commands: a bad value is refused by the parser, naming its flag,
before any model is loaded."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be an integer {bounds}, got {text}")
        return value
    return parse


def number(low: float, high: float | None = None, open_low: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        too_low = value <= low if open_low else value < low
        if not np.isfinite(value) or too_low or (high is not None and value > high):
            opening = "(" if open_low else "["
            bounds = f"{'>' if open_low else '>='} {low}" if high is None else f"in {opening}{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be a number {bounds}, got {text}")
        return value
    return parse


def nonempty_path(text: str) -> Path:
    """A path that is not empty: Path("") is ".", which would turn a forgotten value into the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: give a path")
    return Path(text)
