"""A run's workdir files besides checkpoints: config.json and metrics.jsonl."""

from __future__ import annotations

import json
import os

import ml_collections

from devinterp_jax import atomic


def read_metrics(workdir: str) -> list[dict]:
  """The JSONL training log of a workdir (one dict per logged step)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(workdir: str, last_step: int) -> None:
  """Drops log lines written after `last_step` (the checkpoint a run resumes from)."""
  rows = [r for r in read_metrics(workdir) if r["step"] <= last_step]
  atomic.write_text(os.path.join(workdir, "metrics.jsonl"),
                    "".join(json.dumps(r) + "\n" for r in rows))


def check_or_write_config(workdir: str, config_json: str) -> None:
  """Writes config.json, or refuses a workdir that holds a different config."""
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    new = json.loads(config_json)
    if old != new:
      diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
      raise ValueError(f"workdir {workdir!r} holds a run with a different config "
                       f"(differs in {diff}); use a new --workdir or the same config")
  else:
    atomic.write_text(path, config_json)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with (its config.json), as a locked ConfigDict."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing: {workdir!r} is not a run directory")
  with open(path) as f:
    try:
      config = ml_collections.ConfigDict(json.load(f))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON: {e}") from e
  config.lock()
  return config
