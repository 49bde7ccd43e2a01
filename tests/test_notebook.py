"""examples/quickstart.ipynb runs headless, top to bottom, from examples/ (as a user opens it), without an
error in any cell; it is stored without outputs, and writes nothing into the repo."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
NOTEBOOK = EXAMPLES / "quickstart.ipynb"


def read_notebook():
    import nbformat

    return nbformat.read(NOTEBOOK, as_version=4)


def test_notebook_is_stored_without_outputs():
    import nbformat

    nb = read_notebook()
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "clear the notebook's outputs before committing"


def kernel_manager(tmp_path: Path):
    """A python3 kernel of this interpreter (not whatever `python` is first on PATH)."""
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    spec = tmp_path / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3", "language": "python",
    }))
    return KernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec.parent)]))


def outputs_text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", ""))
        parts.extend(str(v) for k, v in out.get("data", {}).items() if k.startswith("text/"))
    return "\n".join(parts)


def test_quickstart_notebook_runs_headless(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = read_notebook()
    before = sorted(p.relative_to(EXAMPLES) for p in EXAMPLES.rglob("*"))
    ray_tmp = tempfile.mkdtemp(prefix="rwn", dir="/tmp")  # short: Ray's unix socket paths
    work_tmp = tmp_path / "tmp"
    work_tmp.mkdir()
    # the kernel gets its own Ray (RAY_TMPDIR: no other `ray start` on the machine is joined) and writes its
    # temporary output directory under pytest's tmp_path
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": ray_tmp, "TMPDIR": str(work_tmp)}
    client = NotebookClient(
        nb, km=kernel_manager(tmp_path), timeout=600, allow_errors=False,
        resources={"metadata": {"path": str(EXAMPLES)}},
    )
    started = time.perf_counter()
    try:
        client.execute(env=env)  # raises CellExecutionError on the first cell that fails
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
        nbformat.write(nb, tmp_path / "executed.ipynb")  # to look at (kept by pytest's tmp_path)
    print(f"\nnotebook executed in {time.perf_counter() - started:.1f} s")

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    text = "\n".join(outputs_text(c) for c in code)
    assert "files ok: 3" in text and "failed: 0" in text, text[-3000:]
    assert "And so my fellow Americans" in text  # the table shows the transcript
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1, "the plot cell shows one figure inline"
    assert "Dataset" in outputs_text(next(c for c in code if "print(ds)" in c.source))

    # the results went to a temp dir, not into the repo
    (out,) = work_tmp.glob("ray_whisper_quickstart_*/transcripts")
    assert pq.read_table(out).num_rows == 3
    after = sorted(p.relative_to(EXAMPLES) for p in EXAMPLES.rglob("*"))
    assert after == before, set(after) ^ set(before)
