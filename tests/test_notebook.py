"""notebooks/quickstart.ipynb: its code cells run on CPU in a fresh process.

Its speed is not asserted here (timed tests are fragile on a shared machine); the
README quotes the measured time."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


def _code_cells() -> list[str]:
  with open(NOTEBOOK) as f:
    nb = json.load(f)
  cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
  # Shell and magic lines (`!pip …`, `%…`) are Colab set-up, not Python.
  return [
    "\n".join(l for l in c.splitlines() if not l.lstrip().startswith(("!", "%"))) for c in cells
  ]


def test_quickstart_notebook_runs(tmp_path):
  cells = _code_cells()
  assert len(cells) >= 4
  script = tmp_path / "quickstart.py"
  script.write_text("\n\n".join(cells) + "\nprint('NOTEBOOK-OK', result['boundary_steps'])\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  out = subprocess.run(
    [sys.executable, str(script)],
    cwd=os.path.join(ROOT, "notebooks"),
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "NOTEBOOK-OK" in out.stdout
  assert "LLC" in out.stdout and "stages:" in out.stdout
  assert "ED milestones:" in out.stdout and "matched random-walk null:" in out.stdout
