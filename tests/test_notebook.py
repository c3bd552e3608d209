"""notebooks/eesd_tour.ipynb runs top to bottom in a Jupyter kernel (nbclient + ipykernel, on the
tiny config) and is committed without outputs.

The kernel is this interpreter's (ipykernel's native `python3`), with this checkout first on its
path, so the install cell finds eesd_jax and does nothing. A cell that raises, including the
notebook's own asserts that every EESD run gives AR's tokens, fails the test with the cell's error.
"""

import os
import pathlib
import re

import nbclient
import nbformat
import pytest
from nbclient.exceptions import CellExecutionError

ROOT = pathlib.Path(__file__).parent.parent
NOTEBOOK = ROOT / "notebooks" / "eesd_tour.ipynb"
# The tiny run takes ~35 s of CPU (each EESD setting compiles for ~12 s); the bound stops a hang,
# with room for a machine shared with other jobs.
TIMEOUT_S = 600


def load(config="tiny") -> nbformat.NotebookNode:
    """The notebook with its parameter cell set to `config`."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert re.fullmatch(r'CONFIG = "\w+"\s*', cell.source), f"unexpected parameter cell: {cell.source!r}"
    cell.source = f"CONFIG = {config!r}\n"
    return nb


def execute(nb: nbformat.NotebookNode, cwd: pathlib.Path) -> nbformat.NotebookNode:
    # cwd: the notebook writes joint.py next to itself and imports it. PYTHONPATH: this checkout's
    # eesd_jax, not whichever one the venv has installed.
    env = {
        **os.environ,
        "MPLBACKEND": "Agg",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    client = nbclient.NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3")
    return client.execute(cwd=str(cwd), env=env)


def stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("name") == "stdout")


@pytest.mark.slow
def test_notebook_runs_on_the_tiny_config(tmp_path):
    nb = load()
    nb.cells.append(nbformat.v4.new_code_cell("import eesd_jax\nprint(eesd_jax.__file__)"))
    out = execute(nb, tmp_path)
    code = [c for c in out.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)  # Every cell ran.
    assert "Greedy EESD with the new policy gives AR's tokens" in stdout(code[-2])
    assert pathlib.Path(stdout(code[-1]).strip()).is_relative_to(ROOT)  # This checkout's eesd_jax.


def test_a_failing_cell_or_assert_fails_the_run(tmp_path):
    """The kernel run sees failures: a cell that raises, a failed assert like the notebook's own."""
    nb = load()
    head = nb.cells[: next(i for i, c in enumerate(nb.cells) if c.get("id") == "parameters") + 1]
    for source, error in [
        ("raise RuntimeError('broken cell')", ("RuntimeError", "broken cell")),
        (
            'assert [[1, 2]] == [[1, 3]], "greedy EESD must give AR\'s tokens"',
            ("AssertionError", "greedy EESD must give AR's tokens"),
        ),
    ]:
        with pytest.raises(CellExecutionError) as failed:
            execute(nbformat.v4.new_notebook(cells=[*head, nbformat.v4.new_code_cell(source)]), tmp_path)
        assert (failed.value.ename, failed.value.evalue) == error


def test_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"cell {cell.id} has outputs"
    assert "widgets" not in nb.metadata
