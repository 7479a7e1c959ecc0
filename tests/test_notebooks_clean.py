"""Every committed notebook is clean: no outputs, counts or widget state, except the reference
output of cells marked `# NBVAL_CHECK_OUTPUT` (nbval compares the fresh run against it, and
needs it stored), which must be plain text."""
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
TEXT_ONLY = {"text/plain"}


def _checked(cell) -> bool:
    return cell.source.lstrip().startswith("# NBVAL_CHECK_OUTPUT")


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found in notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_committed_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert "widgets" not in nb.metadata, f"{path.name}: saved widget state in the notebook metadata"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", f"{path.name}: kernel is not python3"
    assert nb.cells and nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), \
        f"{path.name}: should open with a markdown title"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        where = f"{path.name} cell {i}"
        if not _checked(cell):
            assert not cell.outputs, f"{where}: has outputs (commit notebooks without outputs)"
            assert cell.execution_count is None, f"{where}: has an execution count"
            continue
        assert "NBVAL_IGNORE_OUTPUT" not in cell.source, f"{where}: both checked and ignored"
        assert cell.outputs and cell.execution_count is not None, \
            f"{where}: marked NBVAL_CHECK_OUTPUT but stores no reference output and count (nbval would check nothing)"
        for out in cell.outputs:
            assert out.output_type in ("stream", "execute_result"), f"{where}: reference output is {out.output_type}"
            if out.output_type == "stream":
                assert out.name == "stdout", f"{where}: reference output on {out.name}"
            else:
                assert set(out.data) <= TEXT_ONLY, f"{where}: reference output has {set(out.data) - TEXT_ONLY}"
