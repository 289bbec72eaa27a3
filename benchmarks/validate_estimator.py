"""Validates the LLC estimator against exact learning coefficients.

Every case (regular models, reduced-rank regressions, deep linear networks of
depth 3–5, at their most singular true parameter) goes through the same
protocol (`devinterp_jax.experiments.validation.Protocol`): nβ = n/ln n, γ fixed,
ε chosen by `calibrate` (largest healthy, converged ε with MALA acceptance in
the band), then a fresh estimate. Writes the table to docs/results/validation.md and
the rows to a JSON file after each case, so a killed run resumes.

  PYTHONPATH=. python benchmarks/validate_estimator.py                 # all cases, SGLD
  PYTHONPATH=. python benchmarks/validate_estimator.py --cases=0,4,14  # a subset
  PYTHONPATH=. python benchmarks/validate_estimator.py --sampler=sghmc # its own JSON

Each sampler's rows go to their own JSON (`Protocol.for_sampler`):
docs/results/validation.json for SGLD, docs/results/validation_<sampler>.json for the
others. docs/results/validation.md is rewritten from every sampler's JSON found, with
per-sampler columns.
"""

import dataclasses
import json
import os
import platform
import subprocess

from absl import app, flags, logging
import jax

from devinterp_jax import atomic
from devinterp_jax.experiments import validation

_CASES = flags.DEFINE_string("cases", "", "comma-separated indices into validation.CASES")
_SAMPLER = flags.DEFINE_string("sampler", "sgld", "sampler of the protocol")
_JSON = flags.DEFINE_string(
  "json_out",
  "",
  "rows (resumable); default "
  "docs/results/validation.json (sgld) or "
  "docs/results/validation_<sampler>.json",
)
_MD = flags.DEFINE_string("md_out", "docs/results/validation.md", "markdown table")
_DRAWS = flags.DEFINE_integer("num_draws", None, "override Protocol.num_draws")


def _header(protocol: validation.Protocol) -> str:
  p = dataclasses.asdict(protocol)
  return (
    "# Estimator validation against exact learning coefficients\n\n"
    "Produced by `benchmarks/validate_estimator.py` on "
    f"{platform.machine()} / {jax.default_backend()} (JAX {jax.__version__}).\n\n"
    "Every case uses one protocol, not tuned per case: noiseless teacher at the most "
    "singular true parameter (every layer of rank exactly r), n = "
    f"{protocol.dataset_size} samples, nβ = n/ln n = {protocol.nbeta:.1f}, γ = "
    f"{protocol.localization}, SGLD batch {protocol.batch_size}; ε chosen by "
    f"`calibrate` from ε·nβ ∈ {list(protocol.scaled_step_sizes)} "
    f"({protocol.calibration_chains} chains × {protocol.calibration_draws} draws after "
    f"{protocol.calibration_draws // 4} burn-in steps) as the largest ε with no diverged "
    f"or non-converged chain and mean MALA acceptance in {list(protocol.mala_band)}; then "
    f"{protocol.num_chains} fresh chains with a fixed Langevin time ε·nβ·draws = "
    f"{protocol.langevin_time:g} ({protocol.num_draws}–{protocol.max_draws} draws, plus "
    "a quarter as many burn-in steps). The final chains must pass the same health and MALA "
    "check; if not, the next smaller passing ε is tried (the ε column lists the failed "
    "attempts; ✗ marks a case whose last attempt still fails). "
    "Estimates are mean ± std over chains. "
    "With multiplicity m > 1 the finite-nβ estimate sits near λ − (m−1)/ln nβ "
    "(column 'target'); the 10 % criterion applies to m = 1.\n\n"
    f"Protocol: `{json.dumps(p)}`\n\n"
  )


def main(argv):
  del argv
  protocol = validation.Protocol.for_sampler(_SAMPLER.value)
  json_out = _JSON.value or json_path(_SAMPLER.value)
  if _DRAWS.value:
    protocol = dataclasses.replace(protocol, num_draws=_DRAWS.value)
  indices = (
    [int(i) for i in _CASES.value.split(",")] if _CASES.value else range(len(validation.CASES))
  )
  rows = {}
  if os.path.exists(json_out):
    with open(json_out) as f:
      saved = json.load(f)
    if same_protocol(saved.get("protocol"), protocol):
      by_name = {c.name: c for c in validation.CASES}
      rows = {
        r["case"]: validation.with_theory(by_name[r["case"]], r)
        for r in saved["rows"]
        if r["case"] in by_name
      }
  for i in indices:
    case = validation.CASES[i]
    if case.name in rows:
      logging.info("%s: done already", case.name)
      continue
    row = validation.run_case(case, protocol)
    rows[case.name] = row
    logging.info(
      "%s: λ=%.3f estimate %.3f ± %.3f (%+.1f %%) ε·nβ=%s in %ss",
      case.name,
      row["lambda"],
      row["llc_mean"],
      row["llc_std"],
      100 * row["rel_error"],
      row.get("scaled_step_size"),
      row["seconds"],
    )
    atomic.write_text(
      json_out,
      json.dumps({"protocol": dataclasses.asdict(protocol), "rows": list(rows.values())}, indent=1),
    )
  tables = load_all()
  provenance = []
  for name, (proto, rows) in tables.items():
    # --follow and A/M only: the last commit that changed the rows, not a move of the file.
    commit = subprocess.run(
      [
        "git",
        "log",
        "-1",
        "--follow",
        "--diff-filter=AM",
        "--format=%h %ad",
        "--date=short",
        "--",
        json_path(name),
      ],
      capture_output=True,
      text=True,
    ).stdout.strip()
    provenance.append(
      f"- `{name}`: {len(rows)} cases from `{json_path(name)}` ("
      + (f"last committed at {commit}" if commit else "this run, uncommitted")
      + f"); protocol `{json.dumps(dataclasses.asdict(proto))}`"
    )
  text = (
    _header(protocol)
    + "Rows per sampler:\n"
    + "\n".join(provenance)
    + "\n\n"
    + validation.comparison_table(tables)
  )
  atomic.write_text(_MD.value, text)
  print(text)


def json_path(sampler: str) -> str:
  return (
    "docs/results/validation.json"
    if sampler == "sgld"
    else f"docs/results/validation_{sampler}.json"
  )


def same_protocol(saved: dict | None, protocol: validation.Protocol) -> bool:
  """Equal through JSON (tuples come back as lists); fields added since a file was
  written count as equal when they hold their defaults."""
  if saved is None:
    return False
  current = json.loads(json.dumps(dataclasses.asdict(protocol)))
  defaults = json.loads(json.dumps(dataclasses.asdict(validation.Protocol())))
  for key in set(current) - set(saved):
    if current[key] == defaults[key]:
      del current[key]
  return saved == current


def load_all() -> dict[str, tuple[validation.Protocol, list[dict]]]:
  """Every sampler's protocol and rows found in docs/results/, in case order."""
  by_name = {c.name: c for c in validation.CASES}
  out = {}
  for name in validation.samplers.SAMPLERS:
    path = json_path(name)
    if not os.path.exists(path):
      continue
    with open(path) as f:
      saved = json.load(f)
    protocol = validation.Protocol(
      **{k: tuple(v) if isinstance(v, list) else v for k, v in saved["protocol"].items()}
    )
    rows = {
      r["case"]: validation.with_theory(by_name[r["case"]], r, protocol)
      for r in saved["rows"]
      if r["case"] in by_name
    }
    out[name] = (protocol, [rows[c.name] for c in validation.CASES if c.name in rows])
  return out


if __name__ == "__main__":
  app.run(main)
