"""Writes a main job's doc page from its run outputs (nothing copied by hand).

Reads <workdir>/llc/summary.json, llc/llc.csv, report/stages.json and, if given,
the `/usr/bin/time -v` log of the job and a control run's workdir, and writes one
Markdown page: the job's wall time and its own timings, the sampler and the
calibration check with its margin, per-checkpoint convergence (R̂, ESS, drift,
burn-in, draws), the LLC range, and the stage boundaries with their stability.
With --calibration, writes the calibration page from <workdir>/calibration/.

  /usr/bin/time -v python launch/main.py --config=configs/icl_regression.py:runlocal \
      --workdir=workdirs/icl_runlocal 2> workdirs/icl_runlocal/job_time.log
  PYTHONPATH=. python benchmarks/runlocal_docs.py --workdir=workdirs/icl_runlocal \
      --time_log=workdirs/icl_runlocal/job_time.log --control=workdirs/icl_runlocal_constlr \
      --out=docs/results/runlocal.md
  PYTHONPATH=. python benchmarks/runlocal_docs.py --workdir=workdirs/icl_runlocal \
      --calibration --out=docs/results/calibration_runlocal.md
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import re
import subprocess

import numpy as np

from devinterp_jax import atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path: str):
  with open(path) as f:
    return json.load(f)


def _commit() -> str:
  return subprocess.run(
    ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
  ).stdout.strip()


def machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = re.findall(r"model name\s*:\s*(.+)", f.read())
    cpu = names[0].strip() if names else cpu
  except OSError:
    pass
  return f"{os.cpu_count()} CPU cores ({cpu})"


def wall_time(time_log: str | None) -> dict | None:
  """Wall, user and system seconds and peak memory from a `/usr/bin/time -v` log."""
  if not time_log or not os.path.exists(time_log):
    return None
  with open(time_log) as f:
    text = f.read()
  wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
  if not wall:
    return None
  parts = [float(p) for p in wall.group(1).split(":")]
  seconds = sum(p * 60**i for i, p in enumerate(reversed(parts)))
  grab = lambda key: float(re.search(key + r": ([\d.]+)", text).group(1))
  return {
    "wall_seconds": seconds,
    "user_seconds": grab("User time \\(seconds\\)"),
    "system_seconds": grab("System time \\(seconds\\)"),
    "max_rss_gib": grab("Maximum resident set size \\(kbytes\\)") / 2**20,
  }


def read_csv(path: str) -> list[dict]:
  with open(path) as f:
    return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def stage_lines(stages: dict) -> list[str]:
  stab = stages.get("stability") or {}
  lines = []
  bounds = stab.get("boundaries") or [
    {"step": s, "kind": k, "stability": None, "stable": None}
    for s, k in zip(stages.get("boundary_steps", []), stages.get("boundary_kinds", []))
  ]
  if not bounds:
    return ["No stage boundary was found."]
  lines += [
    "| boundary step | kind | stability | stable | "
    + " | ".join(w["name"] for w in stab.get("windows", []))
    + " |",
    "|---|---|---|---|" + "---|" * len(stab.get("windows", [])),
  ]
  for b in bounds:
    by = b.get("by_window") or {}
    lines.append(
      f"| {b['step']} | {b['kind']} | "
      + ("–" if b.get("stability") is None else f"{b['stability']:.2f}")
      + " | "
      + {True: "yes", False: "**no**", None: "–"}[b.get("stable")]
      + " | "
      + " | ".join(f"{by.get(w['name'], float('nan')):.2f}" for w in stab.get("windows", []))
      + " |"
    )
  if stab:
    lines += [
      "",
      f"Criterion (target {stab['target']:.2f}, ±{stab['max_distance']} "
      f"checkpoint): **{'passes' if stab['passes'] else 'FAILS'}**"
      + (f" ({'; '.join(stab['reasons'])})" if stab.get("reasons") else "")
      + f". Resamples: {stab['num_chain_resamples']} chain multisets "
      f"({stab['chain_resampling']}; {stab['num_distinct_chain_resamples']} distinct "
      f"for {stab['num_chains']} chains) × {len(stab['windows'])} draw windows = "
      f"{stab['num_fits']} refits with the reference fit's options. Boundary counts "
      f"over resamples: "
      + ", ".join(f"{k}: {v:.2f}" for k, v in stab["boundary_count_distribution"].items())
      + ".",
    ]
  lines += ["", "| stage | steps | description |", "|---|---|---|"]
  for s in stages["stages"]:
    lines.append(f"| {s['label']} | {s['start_step']}–{s['end_step']} | {s['description']} |")
  feats = stages.get("schedule_features") or []
  lines += [
    "",
    "Learning-rate schedule features: "
    + (
      ", ".join(f"{f['name']} at step {f['step']}" for f in feats)
      if feats
      else "none (constant rate)"
    )
    + ".",
  ]
  return lines


def run_page(args) -> str:
  wd = args.workdir
  summary = _load(os.path.join(wd, "llc", "summary.json"))
  rows = read_csv(os.path.join(wd, "llc", "llc.csv"))
  stages = _load(os.path.join(wd, "report", "stages.json"))
  config = _load(os.path.join(wd, "config.json"))
  llc = config["llc"]
  conv = summary["convergence"]
  timing = wall_time(args.time_log)
  check = summary.get("settings_pass_calibration_check") or {}
  lines = [
    f"# {args.title}",
    "",
    f"Generated by `PYTHONPATH=. python benchmarks/runlocal_docs.py --workdir={wd}` on "
    f"{datetime.date.today().isoformat()} at commit {_commit()} from the run's "
    "`llc/summary.json`, `llc/llc.csv`, `report/stages.json`"
    + (" and the job's `/usr/bin/time -v` log" if timing else "")
    + ".",
    "",
    "## The job",
    "",
  ]
  if timing:
    lines.append(
      f"- Wall time **{timing['wall_seconds']:.0f} s** "
      f"({timing['wall_seconds'] / 60:.1f} min) on {machine()}{args.machine_note} "
      f"(user {timing['user_seconds']:.0f} s, system "
      f"{timing['system_seconds']:.0f} s, peak memory "
      f"{timing['max_rss_gib']:.1f} GiB)."
    )
  lines += [
    f"- The job's own `total_seconds`: **{summary['total_seconds']} s** (training "
    f"{summary['train_seconds']} s, LLC sweep {summary['llc_seconds']} s, analysis "
    f"{summary['analysis_seconds']} s).",
    f"- {summary['num_checkpoints']} checkpoints (steps "
    f"{', '.join(str(int(r['step'])) for r in rows)}).",
    f"- Sampler `{llc['sampler']}`"
    + (
      f" (friction {llc['friction'] or 'default 2√γ'})"
      if llc["sampler"] in ("sghmc", "sgnht")
      else ""
    )
    + f": ε = {llc['step_size']}, nβ = {llc['nbeta']}, γ = {llc['localization']}, "
    f"batch {llc['batch_size']}, {llc['num_chains']} chains, at least "
    f"{llc['num_draws']} draws, then blocks of {llc['block_draws']} up to "
    f"{llc['max_draws']} until converged; burn-in `{llc['num_burnin_steps']}`.",
    "",
  ]
  if check:
    lines += [
      "## Calibration check of the configured settings",
      "",
      f"Checkpoints {', '.join(str(int(rows[i]['step'])) for i in check['indices'])} "
      f"(the earliest, a middle and the latest): step-check acceptance "
      + ", ".join(f"{a:.4f} ± {e:.4f}" for a, e in zip(check["mala_acceptance"], check["mala_se"]))
      + f" (mean ± MCSE); band {check['mala_band']} with a margin of "
      f"{check['margin_se']:g} SE: lower bounds "
      + ", ".join(
        f"{a - check['margin_se'] * e:.4f}"
        for a, e in zip(check["mala_acceptance"], check["mala_se"])
      )
      + f". **{'Passes' if check['passes'] else 'Fails'}**"
      + (f": {'; '.join(check['reasons'])}" if check["reasons"] else "")
      + ".",
      "",
    ]
  llcs = np.array([r["llc_mean"] for r in rows])
  rh = [c["rhat"] for c in conv["checkpoints"]]
  dz = [c["drift_z"] for c in conv["checkpoints"]]
  eb = [c["ess_bulk_per_chain"] for c in conv["checkpoints"]]
  lines += [
    "## LLC and convergence",
    "",
    f"Convergence: {json.dumps(conv['counts'])}; common window draws "
    f"{conv['common_window']}. LLC from {llcs[0]:.2f} (step {int(rows[0]['step'])}) "
    f"to {llcs[-1]:.2f} (step {int(rows[-1]['step'])}); range {llcs.min():.2f}–"
    f"{llcs.max():.2f}. R̂ {min(rh):.4f}–{max(rh):.4f}, bulk ESS/chain "
    f"{min(eb):.0f}–{max(eb):.0f}, drift z {min(dz):+.2f} to {max(dz):+.2f}. The "
    "adaptive chains stop at the first block where every criterion passes, so "
    "values just inside a threshold are expected (docs/reference/convergence.md).",
    "",
    "| step | λ̂ ± SEM | status | R̂ | bulk ESS/chain | tail ESS/chain | drift z | "
    "burn-in | recorded | kept |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r, c in zip(rows, conv["checkpoints"]):
    lines.append(
      f"| {int(r['step'])} | {r['llc_mean']:.2f} ± {r['llc_sem']:.2f} | "
      f"{c['status']} | {c['rhat']:.4f} | {c['ess_bulk_per_chain']:.0f} | "
      f"{c['ess_tail_per_chain']:.0f} | {c['drift_z']:+.2f} | {c['burnin']} | "
      f"{c['draws_recorded']} | {c['draws_kept']} |"
    )
  lines += ["", "## Stages", ""] + stage_lines(stages)
  report_json = os.path.join(wd, "report", "report.json")
  marks = _load(report_json).get("milestones") if os.path.exists(report_json) else None
  if isinstance(marks, dict):
    steps_of = {k: v["step"] for k, v in marks.items() if isinstance(v, dict) and "step" in v}
    if steps_of:
      lines += [
        "",
        "Milestones (`report/report.json`): "
        + ", ".join(f"{k} at step {v}" for k, v in steps_of.items())
        + ".",
      ]
  if args.control:
    cs = _load(os.path.join(args.control, "report", "stages.json"))
    csum = _load(os.path.join(args.control, "llc", "summary.json"))
    crows = read_csv(os.path.join(args.control, "llc", "llc.csv"))
    cconf = _load(os.path.join(args.control, "config.json"))
    mine = set(stages.get("boundary_steps", []))
    theirs = set(cs.get("boundary_steps", []))
    lines += [
      "",
      f"## Control: `{args.control}`",
      "",
      f"The same job with train.div_factor = {cconf['train']['div_factor']} and "
      f"final_div_factor = {cconf['train']['final_div_factor']} (a constant learning "
      f"rate {cconf['train']['max_lr']}). Convergence "
      f"{json.dumps(csum['convergence']['counts'])}; LLC "
      f"{crows[0]['llc_mean']:.2f} → {crows[-1]['llc_mean']:.2f}; total_seconds "
      f"{csum['total_seconds']}. Boundaries in both runs: "
      f"{sorted(mine & theirs) or 'none'}; only in the main job: "
      f"{sorted(mine - theirs) or 'none'}; only in the control: "
      f"{sorted(theirs - mine) or 'none'}.",
      "",
    ] + stage_lines(cs)
  return "\n".join(lines) + "\n"


def calibration_page(args) -> str:
  d = os.path.join(args.workdir, "calibration")
  cal = _load(os.path.join(d, "calibration.json"))
  with open(os.path.join(d, "calibration.md")) as f:
    text = f.read()
    table = text[text.index("\n|") :].lstrip("\n")
  rec = cal["recommended"]
  lines = [
    f"# Calibration: {args.title}",
    "",
    f"Generated by `PYTHONPATH=. python benchmarks/runlocal_docs.py --workdir="
    f"{args.workdir} --calibration` on {datetime.date.today().isoformat()} at commit "
    f"{_commit()} from `calibration/calibration.json`, written by `launch/calibrate.py`.",
    "",
    f"Sampler `{cal['settings']['sampler']}`, step check `{cal['step_check']}`, band "
    f"{cal['mala_band']} with a margin of {cal['margin_se']:g} SE (MCSE of the mean "
    f"acceptance); disqualifying: {cal['disqualify']}; "
    f"{cal['settings']['num_chains']} chains × {cal['settings']['num_draws']} draws "
    f"(burn-in `{cal['settings']['num_burnin_steps']}`) on checkpoints "
    f"{', '.join(cal['checkpoint_ids'])}.",
    "",
    "Recommended: "
    + (", ".join(f"{k} = {v:.4g}" for k, v in rec.items()) if rec else "none of the grid passes")
    + ".",
    "",
  ]
  need = np.asarray(cal["draws_needed"], float)
  eps = np.asarray(cal["step_sizes"])
  lines += [
    "What a smaller ε costs: the column 'draws for ESS target' is the number of kept "
    "draws per chain that reach the criteria's bulk ESS of "
    f"{cal['settings']['health_criteria']['ess_bulk_min_per_chain']:.0f} per chain "
    "at each grid point's measured ESS per draw (at least the criteria's minimum "
    f"of {cal['settings']['health_criteria']['min_draws']}). Worst checkpoint, first "
    "nβ and γ: "
    + ", ".join(f"ε = {e:.3g}: {np.nanmax(need[i, 0, 0]):.0f}" for i, e in enumerate(eps))
    + ".",
    "",
    table,
  ]
  return "\n".join(lines) + "\n"


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--out", required=True)
  ap.add_argument("--title", default="LR runlocal main job")
  ap.add_argument("--time_log", default=None)
  ap.add_argument("--control", default=None)
  ap.add_argument("--calibration", action="store_true")
  ap.add_argument(
    "--machine_note", default="", help="how busy the machine was, e.g. ', otherwise idle'"
  )
  args = ap.parse_args()
  text = calibration_page(args) if args.calibration else run_page(args)
  atomic.write_text(args.out, text)
  print(text)


if __name__ == "__main__":
  main()
