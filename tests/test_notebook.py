"""Execute notebooks/custom_loop.ipynb with nbclient so it cannot rot."""

import json
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "custom_loop.ipynb"


def kernel_for_this_interpreter(root: Path) -> str:
    """A kernelspec running ``sys.executable``, so the notebook sees the package under test
    (a fresh ``pip install -e .[test]`` venv need not have registered any kernel)."""
    name = "mlx-grpo-test"
    spec = root / "kernels" / name
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": name, "language": "python"})
    )
    return name


def test_custom_loop_notebook_runs_and_learns(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # fresh model cache
    monkeypatch.delenv("MLX_GRPO_CACHE", raising=False)
    kernel = kernel_for_this_interpreter(tmp_path / "jupyter")
    nb = nbformat.read(NOTEBOOK, as_version=4)

    # The notebook imports only grpo (plus mlx / numpy / matplotlib), defines no library code
    # beyond the loop glue, and has no stale outputs committed.
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.get("outputs"), "commit the notebook without outputs"
            for line in cell.source.splitlines():
                m = re.match(r"\s*(?:from|import)\s+([\w.]+)", line)
                if m:
                    assert m.group(1).split(".")[0] in {
                        "grpo", "mlx", "mlx_lm", "numpy", "matplotlib", "time",
                    }, line  # fmt: skip

    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name=kernel, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError on any failing cell

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no reward-curve plot"
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    m = re.search(r"mean reward: first 10% ([\d.]+), last 10% ([\d.]+)", text)
    assert m, text[-2000:]
    first, last = float(m.group(1)), float(m.group(2))
    assert 0.0 <= first <= 1.0 and 0.0 <= last <= 1.0
    assert last > first, (first, last)
