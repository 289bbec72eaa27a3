"""A run's workdir files besides checkpoints: config.json and metrics.jsonl.

`config.json` records the run's config. Only the sections that determine the
trained weights lock the workdir (everything but `ANALYSIS_SECTIONS`): a later
launch with other LLC, calibration, refined or analysis settings is accepted and
updates the record, and its LLC results are kept apart from the earlier ones by
their fingerprint (`sampling/llc.py`).

`metrics.jsonl` is appended one fsynced line at a time (`MetricsLog`). A line
torn by a crash mid-write can only be the last one; readers drop it with a
warning, and a resumed run truncates the log to its checkpoint anyway. On an
object store (a `gs://` workdir, `paths`), which cannot append, every write
rewrites the whole object, so a row is either in the log or not.

In a multi-process run the leader alone writes both files (`atomic` and
`MetricsLog` skip the write on the other processes), so each row is written
once; every process still checks the config, and they reach the same verdict.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import ml_collections
from absl import logging

from devinterp_jax import atomic, multihost, paths

METRICS = "metrics.jsonl"
CONFIG = "config.json"

# Config sections that do not determine the trained weights.
ANALYSIS_SECTIONS = ("llc", "calibration", "refined", "analysis", "seeds")

# Fields added to the locked sections after runs were recorded without them, with the
# value a config without the field stands for: before `train.paper_parity`, checkpoint
# steps were truncated (the authors' schedule, `paper_parity=True`); before
# `train.ed_every`, no outputs were recorded for essential dynamics.
LEGACY_FIELDS = {"train.paper_parity": True, "train.ed_every": 0}


class RunFileError(ValueError):
  """A run file (config.json, metrics.jsonl) is unreadable or does not fit."""


def metrics_path(workdir: str) -> str:
  return paths.join(workdir, METRICS)


def read_metrics(workdir: str) -> list[dict]:
  """The JSONL training log of a workdir (one dict per logged step).

  A torn last line (a crash mid-append) is dropped with a warning; a damaged
  line elsewhere raises `RunFileError` naming the file and line.
  """
  path = metrics_path(workdir)
  if not paths.exists(path):
    return []
  lines = paths.read_bytes(path).split(b"\n")
  rows = []
  last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      if not isinstance(row, dict) or not isinstance(row.get("step"), int):
        raise ValueError(f"not a row with an integer 'step': {line[:80]!r}")
    except ValueError as e:
      if i == last:
        logging.warning(
          "%s: dropping the torn last line %d (%r): a crash interrupted its "
          "write; the rerun rewrites it",
          path,
          i + 1,
          line[:80],
        )
        continue
      raise RunFileError(
        f"{path}, line {i + 1}, is not a training-log row ({e}). The log is damaged in "
        f"the middle, which a crash cannot do: repair or delete that line (every "
        f"checkpoint's meta also holds its losses)."
      ) from None
    rows.append(row)
  return rows


def truncate_metrics(workdir: str, last_step: int) -> None:
  """Keeps the log lines up to `last_step` (the checkpoint a run resumes from;
  0 for a fresh start), dropping a torn last line; rewritten atomically."""
  path = metrics_path(workdir)
  if not multihost.is_leader() or not paths.exists(path):
    return
  rows = [r for r in read_metrics(workdir) if r["step"] <= last_step]
  atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


class MetricsLog:
  """Appends rows to metrics.jsonl, each line flushed and fsynced (a no-op on the
  non-leader processes of a multi-process run)."""

  def __init__(self, workdir: str):
    self.path = metrics_path(workdir)
    self._file = None
    self._remote: bytes | None = None  # the whole log, rewritten per row (object stores)
    if not multihost.is_leader():
      return
    if paths.is_local(self.path):
      self._file = open(self.path, "a")  # pylint: disable=consider-using-with
    else:
      self._remote = paths.read_bytes(self.path) if paths.exists(self.path) else b""

  def write(self, row: dict) -> None:
    if self._remote is not None:
      self._remote += (json.dumps(row) + "\n").encode()
      atomic.write_bytes(self.path, self._remote)
      return
    if self._file is None:
      return
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    os.fsync(self._file.fileno())

  def close(self) -> None:
    if self._file is not None:
      self._file.close()


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
  """A nested config dict as {'section.field': value}."""
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _load_json(path: str) -> dict:
  try:
    value = json.loads(paths.read_text(path))
  except (ValueError, UnicodeDecodeError) as e:
    raise RunFileError(
      f"{path} is not valid JSON ({e}): the record of the run's config is damaged. "
      f"Restore it from a copy of the config the run was trained with, or use a new "
      f"--workdir."
    ) from None
  if not isinstance(value, dict):
    raise RunFileError(
      f"{path} holds a JSON {type(value).__name__}, not a config object: "
      f"the record of the run's config is damaged. Restore it from a copy, "
      f"or use a new --workdir."
    )
  return value


def config_differences(
  old: dict, new: dict, ignore: Sequence[str] = ANALYSIS_SECTIONS
) -> list[str]:
  """'key (run: a, given: b)' for every field of the weight-determining sections that
  differs between two configs (dicts); `ignore` names the top-level sections skipped.
  A field of `LEGACY_FIELDS` absent from a config counts as its legacy value."""
  drop = lambda d: {k: v for k, v in d.items() if k not in ignore}
  legacy = {k: v for k, v in LEGACY_FIELDS.items() if k.split(".")[0] not in ignore}
  a, b = ({**legacy, **flatten(drop(d))} for d in (old, new))
  missing = object()
  out = []
  for key in sorted(set(a) | set(b)):
    va, vb = a.get(key, missing), b.get(key, missing)
    if va != vb:
      show = lambda v: "absent" if v is missing else json.dumps(v)
      out.append(f"{key} (run: {show(va)}, given: {show(vb)})")
  return out


def check_config(
  workdir: str, config_json: str, *, write: bool = True, ignore: Sequence[str] = ANALYSIS_SECTIONS
) -> None:
  """Refuses a config whose weight-determining sections differ from the run's.

  With `write`, config.json is written if missing, or updated when only the
  `ignore` sections differ (training and the main job record their config;
  the LLC launchers only check).
  """
  path = paths.join(workdir, CONFIG)
  new = json.loads(config_json)
  if paths.exists(path):
    old = _load_json(path)
    diff = config_differences(old, new, ignore)
    if diff:
      raise RunFileError(
        f"workdir {workdir!r} holds a run trained with a different config: "
        f"{'; '.join(diff)}. These settings determine the trained weights; use the "
        f"run's values or a new --workdir."
      )
    if not write or old == new:
      return
  elif not write:
    raise RunFileError(
      f"{path} is missing: {workdir!r} is not a run directory "
      "(train it first, e.g. launch/train.py)"
    )
  atomic.write_text(path, config_json)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with (its config.json), as a locked ConfigDict."""
  path = paths.join(workdir, CONFIG)
  if not paths.exists(path):
    raise FileNotFoundError(f"{path} is missing: {workdir!r} is not a run directory")
  config = ml_collections.ConfigDict(_load_json(path))
  config.lock()
  return config
