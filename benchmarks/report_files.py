"""A benchmark's output pair: its JSON (the measurements) and the markdown built from it."""

from __future__ import annotations

import json
from typing import Any, Callable

from devinterp_jax import atomic


def write(out_json: str, out_md: str, doc: dict[str, Any],
          markdown: Callable[[dict[str, Any]], str]) -> None:
  """Writes `doc` as JSON and its markdown, both atomically."""
  atomic.write_text(out_json, json.dumps(doc, indent=1))
  atomic.write_text(out_md, markdown(doc))


def rewrite_markdown(out_json: str, out_md: str, caveats: list[str],
                     markdown: Callable[[dict[str, Any]], str]) -> None:
  """Rebuilds the markdown from the stored measurements, with the current caveats."""
  with open(out_json) as fh:
    doc = json.load(fh)
  doc["caveats"] = caveats
  write(out_json, out_md, doc, markdown)
