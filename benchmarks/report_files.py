"""A benchmark's output pair: its JSON (the measurements) and the markdown built from it."""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
from typing import Any, Callable

import jax

from devinterp_jax import atomic


def provenance() -> dict[str, str]:
  """Where a run happened: date, commit (flagging uncommitted library changes),
  machine, JAX version and backend."""
  git = lambda *args: subprocess.run(["git", *args], capture_output=True, text=True).stdout.strip()
  commit = git("rev-parse", "--short", "HEAD")
  if git("status", "--porcelain", "devinterp_jax"):
    commit += " (with uncommitted changes under devinterp_jax/)"
  return {
    "date": datetime.date.today().isoformat(),
    "commit": commit,
    "machine": f"2-core CPU ({platform.processor() or platform.machine()}, shared)",
    "jax": jax.__version__,
    "backend": jax.default_backend(),
  }


def write(
  out_json: str, out_md: str, doc: dict[str, Any], markdown: Callable[[dict[str, Any]], str]
) -> None:
  """Writes `doc` as JSON and its markdown, both atomically."""
  atomic.write_text(out_json, json.dumps(doc, indent=1))
  atomic.write_text(out_md, markdown(doc))


def rewrite_markdown(
  out_json: str, out_md: str, caveats: list[str], markdown: Callable[[dict[str, Any]], str]
) -> None:
  """Rebuilds the markdown from the stored measurements, with the current caveats."""
  with open(out_json) as fh:
    doc = json.load(fh)
  doc["caveats"] = caveats
  write(out_json, out_md, doc, markdown)
