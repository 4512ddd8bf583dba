"""The paper-reproduction notebooks execute to the end on the shipped toy model (what `make notebooks` runs),
and every figure is introduced by what the paper shows and what the model used shows."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("notebook_build", ROOT / "notebooks" / "build.py")
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)  # type: ignore[union-attr]

pytestmark = pytest.mark.skipif(
    not (ROOT / "diffedit" / "toy" / "weights" / "model.json").is_file(), reason="the toy model is not built"
)


@pytest.mark.parametrize("source", build.SOURCES, ids=lambda p: p.stem)
def test_notebook_executes_and_explains_its_figures(source: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("DIFFEDIT_NOTEBOOK_MODEL", raising=False)  # the toy model, as CI and readers get it
    notebook = nbformat.read(str(build.execute(source, tmp_path)), as_version=4)
    markdown = ""
    figures = 0
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            markdown = cell.source
        outputs = cell.get("outputs", [])
        assert not [o for o in outputs if o.output_type == "error"], f"{source.stem}: a cell failed"
        if any("image/png" in o.get("data", {}) for o in outputs):
            figures += 1
            assert "Paper" in markdown and "Toy model" in markdown, f"{source.stem}: a figure without its statement"
    assert figures >= 1, f"{source.stem} shows no figure"
