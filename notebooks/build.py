"""Build the notebooks from their plain-Python sources and execute them headless.

    python notebooks/build.py            # notebooks/src/NN_name.py -> notebooks/NN_name.ipynb, executed, outputs saved
    python notebooks/build.py --check    # execute into a temporary folder only (what the test suite does)

Sources use the "percent" format: `# %%` starts a code cell, `# %% [markdown]` a markdown cell whose lines
are comments. Keeping the source as .py makes reviews diff cleanly; the .ipynb files carry the outputs so
they read well on a code host.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
SOURCES = sorted((HERE / "src").glob("[0-9][0-9]_*.py"))


def parse(source: str) -> nbformat.NotebookNode:
    """Percent-format Python -> a notebook (markdown cells lose their leading '# ')."""
    cells, kind, lines = [], None, []

    def flush() -> None:
        text = "\n".join(lines).strip("\n")
        if kind == "markdown":
            body = (l[2:] if l.startswith("# ") else l.lstrip("#") for l in text.splitlines())
            cells.append(nbformat.v4.new_markdown_cell("\n".join(body)))
        elif kind == "code" and text:
            cells.append(nbformat.v4.new_code_cell(text))

    for line in source.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind is not None:
            lines.append(line)
    flush()
    notebook = nbformat.v4.new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return notebook


def execute(source: Path, out_dir: Path, timeout: int = 900) -> Path:
    """Execute one notebook with the repository root as working directory; raise on the first failing cell."""
    notebook = parse(source.read_text(encoding="utf-8"))
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(HERE.parent)}})
    client.execute()
    out = out_dir / (source.stem + ".ipynb")
    nbformat.write(notebook, str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="execute into a temporary folder, write nothing here")
    parser.add_argument("names", nargs="*", help="only these notebooks (e.g. 01_quickstart)")
    args = parser.parse_args(argv)
    sources = [s for s in SOURCES if not args.names or s.stem in args.names]
    if not sources:
        print(f"no notebook matches {args.names}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp) if args.check else HERE
        for source in sources:
            start = time.perf_counter()
            out = execute(source, out_dir)
            where = out if not args.check else "ok"
            print(f"{source.stem}: executed in {time.perf_counter() - start:.0f} s -> {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
