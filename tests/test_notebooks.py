"""The notebooks under notebooks/: each runs top to bottom in a fresh kernel with its quick settings
(SDEFLOW_NOTEBOOK_QUICK=1), its matplotlib figures have titles and axis labels, and every notebook is
stored without outputs, so that its diffs stay readable."""
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
CELL_TIMEOUT = 60  # seconds; with the quick settings the slowest cell takes under 10 on 2 cores
# Each notebook and the fewest matplotlib figures it draws (inline, and each checked for labels).
FIGURES = {"swissroll.ipynb": 5, "image_run.ipynb": 2}

# Run first in the kernel: make sure it is this interpreter, then check every figure open at the end of each
# cell, before the inline backend shows and closes it (callbacks run in the order they were registered, and
# the backend registers its own when the notebook enables it).
CHECK_FIGURES = """
import sys as _sys

assert _sys.prefix == {prefix!r}, f"the kernel runs {{_sys.executable}}, not the test's interpreter"
_figure_problems, _figures_checked = [], set()


def _check_figures():
    plt = _sys.modules.get("matplotlib.pyplot")
    for fig in [] if plt is None else [plt.figure(n) for n in plt.get_fignums()]:
        if id(fig) in _figures_checked:
            continue
        _figures_checked.add(id(fig))
        axes = [ax for ax in fig.axes if ax.axison and not hasattr(ax, "_colorbar")]
        titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
        name = fig.get_suptitle() or (titles or ["an untitled figure"])[0]
        if not (fig.get_suptitle() or (axes and all(ax.get_title() for ax in axes))):
            _figure_problems.append(f"{{name!r}}: no title")
        if any(not ax.get_xlabel() for ax in axes):
            _figure_problems.append(f"{{name!r}}: a panel without an x label")
        if axes and not any(ax.get_ylabel() for ax in axes):
            _figure_problems.append(f"{{name!r}}: no y label")


get_ipython().events.register("post_execute", _check_figures)
"""

FIGURES_CHECKED = """
assert not _figure_problems, "\\n".join(_figure_problems)
assert len(_figures_checked) >= {count}, f"{{len(_figures_checked)}} figures checked, expected {count} or more"
"""


def test_every_notebook_is_executed_here():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(FIGURES)


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_runs_top_to_bottom(name, monkeypatch, tmp_path):
    monkeypatch.setenv("SDEFLOW_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the runs the notebooks make land here
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(CHECK_FIGURES.format(prefix=sys.prefix)))
    nb.cells.append(nbformat.v4.new_code_cell(FIGURES_CHECKED.format(count=FIGURES[name])))
    # ipykernel's own kernel spec for this interpreter, whatever other 'python3' specs the machine has.
    kernel = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))
    client = NotebookClient(nb, km=kernel, timeout=CELL_TIMEOUT, resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # CellExecutionError, with the cell's traceback, when a cell fails

    shown = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
             if "image/png" in out.get("data", {})]
    assert len(shown) >= FIGURES[name], f"{len(shown)} figures shown inline"


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, (f"{path.name}: code cells {dirty} hold outputs or an execution count; clear them with "
                       f"`jupyter nbconvert --clear-output --inplace notebooks/{path.name}`")
