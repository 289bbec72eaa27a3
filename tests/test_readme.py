"""The README's estimator example runs as written."""

import os
import re

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_estimator_snippet_runs(tmp_path, monkeypatch):
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  section = text[text.index("## The LLC estimator API") :]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  code = code.replace("/tmp/llc_chunks", str(tmp_path / "llc_chunks"))
  env: dict = {}
  exec(compile(code, "README.md", "exec"), env)
  res = env["res"]
  assert np.isfinite(res.llc_mean).all()
  assert os.listdir(tmp_path / "llc_chunks")
