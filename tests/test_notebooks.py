"""Each notebook runs top to bottom in a fresh kernel, from notebooks/, without an error, and draws
at least one plotly figure."""

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
kernelspec = pytest.importorskip("jupyter_client.kernelspec")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL = "python3"
PLOTLY_MIME = "application/vnd.plotly.v1+json"


def runs_this_interpreter(argv0: str) -> bool:
    """Whether a kernelspec command starts the interpreter running the tests (the virtualenv's,
    which has npusim). jupyter_client itself replaces a plain `python`/`python3`/`python3.X` with
    sys.executable; symlinks are not resolved, since a virtualenv's python is a link to the base
    interpreter, which lacks the virtualenv's packages."""
    major, minor = sys.version_info[:2]
    if argv0 in {"python", f"python{major}", f"python{major}.{minor}"}:
        return True
    found = shutil.which(argv0) or argv0
    return os.path.abspath(found) == os.path.abspath(sys.executable)


def kernel_for_this_interpreter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """`python3` when that kernelspec runs this interpreter; otherwise a throwaway kernelspec in
    tmp_path (found through JUPYTER_PATH for this test only) that does."""
    try:
        spec = kernelspec.KernelSpecManager().get_kernel_spec(KERNEL)
        if spec.argv and runs_this_interpreter(spec.argv[0]):
            return KERNEL
    except kernelspec.NoSuchKernel:
        pass
    pytest.importorskip("ipykernel", reason="no kernel can start: ipykernel is not installed")
    name = "npusim-test-interpreter"
    folder = tmp_path / "jupyter" / "kernels" / name
    folder.mkdir(parents=True)
    (folder / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "npusim tests", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return name


def test_the_notebooks_exist():
    assert {p.name for p in NOTEBOOKS} >= {"page_size_sweep.ipynb", "batch_sweep.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_clean_and_draws_a_figure(path, tmp_path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    kernel = kernel_for_this_interpreter(tmp_path, monkeypatch)
    monkeypatch.setenv("NPUSIM_NO_STATIC_FIGURES", "1")  # (the committed copies carry the PNGs)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name=kernel,
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(client.setup_kernel())
        except Exception as e:  # a kernel that cannot start is an environment problem, not a bug
            pytest.skip(f"the {kernel!r} Jupyter kernel did not start: {e}")
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index)  # raises CellExecutionError on a cell's error
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    errors = [f"{o.ename}: {o.evalue}" for o in outputs if o.output_type == "error"]
    assert not errors
    assert any(PLOTLY_MIME in o.get("data", {}) for o in outputs), "no plotly figure was drawn"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_has_outputs_and_no_errors(path):
    nb = nbformat.read(path, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(cell.execution_count is not None for cell in code), "not executed"
    outputs = [o for cell in code for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any(PLOTLY_MIME in o.get("data", {}) for o in outputs)
    # every figure also as a static image, which GitHub and nbviewer show (plotly's JSON they do not)
    figures = [o for o in outputs if PLOTLY_MIME in o.get("data", {})]
    assert all("image/png" in o["data"] for o in figures), "a figure without its PNG: re-run with kaleido"


def test_the_notebooks_cover_the_studies():
    assert {p.name for p in NOTEBOOKS} >= {"calibration.ipynb", "seed_article.ipynb", "trace_under_pressure.ipynb"}
    for name in ("calibration.ipynb", "seed_article.ipynb", "trace_under_pressure.ipynb"):
        code = "".join(c.source for c in nbformat.read(NOTEBOOK_DIR / name, as_version=4).cells
                       if c.cell_type == "code")
        assert "assert " in code, f"{name} checks none of its numbers"
