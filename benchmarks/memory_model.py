"""A guide formula for the SGLD block's memory per device, checked against XLA.

    bytes ≈ fixed + P · C_v · A(B) + P · C · k · |θ| · 4

  fixed   the block's arguments that do not grow with pairs or chains: the SGLD
          dataset (an argument of the compiled block) and the chain keys
  P       pairs (checkpoints × restrictions × grid points) per chunk
  C       chains per pair; C_v the chains whose activations are live at once:
          C with `chain_strategy="vmap"`, 1 with "map" (a sequential lax.map)
  A(B)    the temp bytes of one forward + backward at the SGLD batch B:
          `jax.jit(jax.value_and_grad(loss)).lower(params, batch).compile()
          .memory_analysis().temp_size_in_bytes`
  k       float32 copies of the params per chain: the chain state (in, and out
          aliased to it), the gradient, the injected noise and the update (k = 4)
  |θ|     the parameter count

The measured value is `sweep.chunk_memory(...)`: `compiled.memory_analysis()` of
the block program (argument + output + temp − alias bytes), the number
`checkpoint_chunk="auto"` sizes chunks by. Rows: the LR transformer (the paper
config's model and SGLD settings) at SGLD batch 1024 and a smaller one, for
P ∈ {1, 2, 4}, C ∈ {2, 4}, vmap and map, on CPU. Also a least-squares fit of the
same form (fixed, multiplier of P·C_v·A, multiplier of P·C·|θ|·4) to the rows, the
marginal bytes per chain, the paper chunk (16 checkpoints × 10 chains at batch
1024, vmap) by the formula and as compiled, and a check of the earlier
"about 190 MiB per chain at SGLD batch 1024" estimate.

  PYTHONPATH=. python benchmarks/memory_model.py              # docs/results/memory.{json,md}
  PYTHONPATH=. python benchmarks/memory_model.py --md_only    # markdown from the JSON
"""

from __future__ import annotations

import dataclasses
import json
import time

from absl import app, flags, logging
import jax
import numpy as np
from ml_collections import config_flags

from benchmarks import report_files
from devinterp_jax.experiments import registry
from devinterp_jax.sampling import program, samplers, sweep
from devinterp_jax.sampling import settings as settings_lib

_CONFIG = config_flags.DEFINE_config_file(
  "config", "configs/icl_regression.py", "Experiment config (model and llc section)."
)
_BATCHES = flags.DEFINE_string("batches", "1024,32", "SGLD batch sizes")
_PAIRS = flags.DEFINE_string("pairs", "1,2,4", "pairs per chunk P")
_CHAINS = flags.DEFINE_string("chains", "2,4", "chains C")
_K = flags.DEFINE_float("k", 4.0, "float32 param copies per chain in the formula")
_DATASET = flags.DEFINE_integer("dataset_size", 0, "SGLD dataset size (0: config.llc's)")
_PAPER = flags.DEFINE_string("paper_chunk", "16,10,1024", "P,C,B of the paper chunk (vmap)")
_PREVIOUS = flags.DEFINE_float(
  "previous_mib_per_chain", 190.0, "the earlier estimate to check (MiB per chain at batch 1024)"
)
_OUT = flags.DEFINE_string("out", "docs/results/memory", "output path without extension")
_MD_ONLY = flags.DEFINE_bool("md_only", False, "only regenerate <out>.md from <out>.json")

MiB = 2**20
STRATEGIES = ("vmap", "map")


def tree_bytes(tree) -> int:
  def nbytes(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize

  return int(sum(nbytes(x) for x in jax.tree.leaves(tree)))


def fwd_bwd_temp(loss_fn, params, batch) -> dict:
  """memory_analysis of one jitted value_and_grad at this batch."""
  ma = jax.jit(jax.value_and_grad(loss_fn)).lower(params, batch).compile().memory_analysis()
  return {
    "temp": int(ma.temp_size_in_bytes),
    "argument": int(ma.argument_size_in_bytes),
    "output": int(ma.output_size_in_bytes),
  }


def predict(fixed: int, P: int, C: int, strategy: str, A: int, num_params: int, k: float) -> float:
  C_v = C if strategy == "vmap" else 1
  return fixed + P * C_v * A + P * C * k * num_params * 4


class Setup:
  """The block program of one (batch, C, strategy) and its chunk_memory(P)."""

  def __init__(self, model, data, base: settings_lib.SamplerSettings, sampler, first):
    self.model, self.data, self.base, self.sampler, self.first = (model, data, base, sampler, first)
    self.data_arg = jax.device_put(data)

  def measure(self, batch: int, C: int, strategy: str, P: int) -> dict:
    s = dataclasses.replace(self.base, batch_size=batch, num_chains=C)
    prog = program.get_program(
      self.model.loss, s, data=self.data, sampler=self.sampler, chain_strategy=strategy, mesh=None
    )
    keys = program.chain_keys(s.seed, C)
    t0 = time.time()
    m = sweep.chunk_memory(prog, P, self.first, None, keys, self.data_arg, None, None)
    return {
      **m._asdict(),
      "total": m.total,
      "compile_seconds": round(time.time() - t0, 1),
      "keys_bytes": tree_bytes(keys),
    }


def fit(rows: list[dict]) -> dict:
  """Least squares: total ≈ f + a · P C_v A + b · P C |θ| 4 over the rows."""
  X = np.array(
    [[1.0, r["P"] * r["C_v"] * r["A"], r["P"] * r["C"] * r["num_params"] * 4] for r in rows]
  )
  y = np.array([r["measured"] for r in rows], np.float64)
  coef, *_ = np.linalg.lstsq(X, y, rcond=None)
  pred = X @ coef
  return {
    "fixed": float(coef[0]),
    "activation_multiplier": float(coef[1]),
    "param_copies": float(coef[2]),
    "max_abs_relative_error": float(np.max(np.abs(pred / y - 1))),
  }


def run(config) -> dict:
  t_start = time.time()
  experiment = registry.get(config.experiment)
  model = experiment.make_model(config)
  base = settings_lib.SamplerSettings.from_config(config.llc)
  sampler = samplers.from_config(config.llc)
  n = _DATASET.value or int(config.llc.dataset_size)
  cfg = config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.llc.dataset_size = n
  data = experiment.sgld_dataset(cfg)
  params = jax.jit(model.init_params)(jax.random.key(0))
  num_params = int(sum(np.size(x) for x in jax.tree.leaves(params)))
  first = jax.tree.map(lambda x: np.asarray(x)[None], params)
  setup = Setup(model, data, base, sampler, first)
  data_bytes = tree_bytes(data)
  batches = [int(b) for b in _BATCHES.value.split(",")]
  pairs = [int(p) for p in _PAIRS.value.split(",")]
  chains = [int(c) for c in _CHAINS.value.split(",")]
  k = _K.value
  fb = {}
  for B in batches:
    batch = jax.tree.map(lambda x: x[:B], data)
    fb[B] = fwd_bwd_temp(model.loss, params, batch)
    logging.info("one fwd+bwd at batch %d: temp %.1f MiB", B, fb[B]["temp"] / MiB)
  rows = []
  for B in batches:
    for strategy in STRATEGIES:
      for C in chains:
        for P in pairs:
          m = setup.measure(B, C, strategy, P)
          fixed = data_bytes + m["keys_bytes"]
          A = fb[B]["temp"]
          pred = predict(fixed, P, C, strategy, A, num_params, k)
          rows.append(
            {
              "batch": B,
              "strategy": strategy,
              "C": C,
              "P": P,
              "C_v": C if strategy == "vmap" else 1,
              "A": A,
              "num_params": num_params,
              "fixed": fixed,
              "predicted": pred,
              "measured": m["total"],
              "ratio": pred / m["total"],
              "argument": m["argument"],
              "output": m["output"],
              "temp": m["temp"],
              "alias": m["alias"],
              "compile_seconds": m["compile_seconds"],
            }
          )
          logging.info(
            "B=%d %s C=%d P=%d: measured %.1f MiB, predicted %.1f MiB (%.2f)",
            B,
            strategy,
            C,
            P,
            m["total"] / MiB,
            pred / MiB,
            pred / m["total"],
          )
  # Marginal bytes per chain: (m(P, C2) − m(P, C1)) / (P (C2 − C1)), per batch and strategy.
  marginal = []
  for B in batches:
    for strategy in STRATEGIES:
      for P in pairs:
        sel = {
          r["C"]: r["measured"]
          for r in rows
          if r["batch"] == B and r["strategy"] == strategy and r["P"] == P
        }
        c1, c2 = min(chains), max(chains)
        per_chain = (sel[c2] - sel[c1]) / (P * (c2 - c1))
        live = (c2 - c1) if strategy == "vmap" else 0  # C_v(c2) − C_v(c1)
        per_chain_formula = live / (c2 - c1) * fb[B]["temp"] + k * num_params * 4
        marginal.append(
          {
            "batch": B,
            "strategy": strategy,
            "P": P,
            "measured_bytes_per_chain": per_chain,
            "formula_bytes_per_chain": per_chain_formula,
          }
        )
  fits = {"all": fit(rows)}
  for strategy in STRATEGIES:
    fits[strategy] = fit([r for r in rows if r["strategy"] == strategy])
  # The paper chunk.
  P, C, B = (int(x) for x in _PAPER.value.split(","))
  if B not in fb:
    fb[B] = fwd_bwd_temp(model.loss, params, jax.tree.map(lambda x: x[:B], data))
  keys_bytes = tree_bytes(program.chain_keys(0, C))
  paper_pred = predict(data_bytes + keys_bytes, P, C, "vmap", fb[B]["temp"], num_params, k)
  paper_meas = setup.measure(B, C, "vmap", P)
  fa = fits["vmap"]
  paper = {
    "P": P,
    "C": C,
    "batch": B,
    "strategy": "vmap",
    "predicted": paper_pred,
    "predicted_fitted_vmap": fa["fixed"]
    + fa["activation_multiplier"] * P * C * fb[B]["temp"]
    + fa["param_copies"] * P * C * num_params * 4,
    "measured": paper_meas["total"],
    "ratio": paper_pred / paper_meas["total"],
    "measured_detail": {k_: paper_meas[k_] for k_ in ("argument", "output", "temp", "alias")},
    "compile_seconds": paper_meas["compile_seconds"],
    "device_memory_bytes": program.device_memory_bytes(),
  }
  prev = _PREVIOUS.value * MiB
  vm = [m for m in marginal if m["batch"] == 1024 and m["strategy"] == "vmap"]
  previous = None
  if vm:
    measured_pc = float(np.mean([m["measured_bytes_per_chain"] for m in vm]))
    previous = {
      "previous_mib_per_chain": _PREVIOUS.value,
      "formula_mib_per_chain": vm[0]["formula_bytes_per_chain"] / MiB,
      "measured_mib_per_chain_vmap": measured_pc / MiB,
      "measured_mib_per_chain_vmap_by_P": [m["measured_bytes_per_chain"] / MiB for m in vm],
      "measured_mib_per_chain_map_by_P": [
        m["measured_bytes_per_chain"] / MiB
        for m in marginal
        if m["batch"] == 1024 and m["strategy"] == "map"
      ],
      "ratio_previous_to_measured": prev / measured_pc,
    }
  return {
    "config": "configs/icl_regression.py",
    "model": config.model.to_dict(),
    "num_params": num_params,
    "dataset_size": n,
    "data_bytes": data_bytes,
    "sampler": config.llc.sampler,
    "settings": {**base.identity(), "batch_size": None, "num_chains": None},
    "block_steps": base.block_steps,
    "k": k,
    "fwd_bwd": {str(b): v for b, v in fb.items()},
    "rows": rows,
    "marginal": marginal,
    "fits": fits,
    "paper_chunk": paper,
    "previous_estimate": previous,
    "seconds": round(time.time() - t_start, 1),
  }


def _mib(x):
  return f"{x / MiB:.1f}"


def markdown(doc: dict) -> str:
  lines = [
    "# Memory of the SGLD block: a guide formula vs `memory_analysis`",
    "",
    "Generated by `PYTHONPATH=. python benchmarks/memory_model.py` from "
    "`docs/results/memory.json` on "
    f"{doc['date']} at commit `{doc['commit']}`; machine: {doc['machine']} (JAX {doc['jax']}, "
    f"backend {doc['backend']}). Runtime {doc['seconds']:.0f} s (compilations only; "
    "nothing is run).",
    "",
    "    bytes ≈ fixed + P · C_v · A(B) + P · C · k · |θ| · 4",
    "",
    f"- fixed: the SGLD dataset (an argument of the block: {doc['dataset_size']} sequences, "
    f"{_mib(doc['data_bytes'])} MiB) + the chain keys;",
    "- P pairs per chunk, C chains; C_v = C with vmap chains, 1 with map chains;",
    "- A(B): `temp_size_in_bytes` of `jax.jit(jax.value_and_grad(loss))` compiled at the "
    "SGLD batch B;",
    f"- k = {doc['k']:g} float32 copies of the params per chain (state, gradient, noise, "
    f"update), |θ| = {doc['num_params']} ({_mib(doc['num_params'] * 4)} MiB in float32).",
    "",
    f"Model: the LR transformer of `{doc['config']}` ({json.dumps(doc['model'])}); sampler "
    f"{doc['sampler']} with the paper's settings ({doc['block_steps']} steps per block, "
    f"MALA every {doc['settings']['mala_stride']} steps, diagnostics on). Measured: "
    "`sweep.chunk_memory` (argument + output + temp − alias of the compiled block, the "
    'number `checkpoint_chunk="auto"` uses), per device.',
    "",
    "One forward + backward:",
    "",
    "| batch B | A(B) temp MiB | argument MiB | output MiB |",
    "|---:|---:|---:|---:|",
  ]
  for b, v in doc["fwd_bwd"].items():
    lines.append(f"| {b} | {_mib(v['temp'])} | {_mib(v['argument'])} | {_mib(v['output'])} |")
  lines += [
    "",
    "| B | chains | C | P | predicted MiB | measured MiB | predicted / measured | "
    "temp MiB | argument MiB | compile s |",
    "|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in doc["rows"]:
    lines.append(
      f"| {r['batch']} | {r['strategy']} | {r['C']} | {r['P']} | "
      f"{_mib(r['predicted'])} | {_mib(r['measured'])} | {r['ratio']:.2f} | "
      f"{_mib(r['temp'])} | {_mib(r['argument'])} | {r['compile_seconds']:.1f} |"
    )
  ratios = {s: [r["ratio"] for r in doc["rows"] if r["strategy"] == s] for s in ("vmap", "map")}
  lines += [
    "",
    "Ratio predicted / measured: "
    + "; ".join(f"{s} {min(v):.2f}–{max(v):.2f}" for s, v in ratios.items() if v)
    + ".",
    "",
    "Marginal bytes per chain, (m(P, C_max) − m(P, C_min)) / (P · ΔC):",
    "",
    "| B | chains | P | measured MiB / chain | formula MiB / chain |",
    "|---:|:---|---:|---:|---:|",
  ]
  for m in doc["marginal"]:
    lines.append(
      f"| {m['batch']} | {m['strategy']} | {m['P']} | "
      f"{_mib(m['measured_bytes_per_chain'])} | {_mib(m['formula_bytes_per_chain'])} |"
    )
  lines += [
    "",
    "Least-squares fit of the same form, total ≈ f + a · P C_v A + b · P C |θ| 4:",
    "",
    "| rows | f MiB | a (fwd+bwd per chain) | b (param copies per chain) | max relative error |",
    "|:---|---:|---:|---:|---:|",
  ]
  for name, f in doc["fits"].items():
    lines.append(
      f"| {name} | {_mib(f['fixed'])} | {f['activation_multiplier']:.2f} | "
      f"{f['param_copies']:.1f} | {100 * f['max_abs_relative_error']:.1f} % |"
    )
  p = doc["paper_chunk"]
  lines += [
    "",
    "## The paper chunk",
    "",
    f"{p['P']} checkpoints × {p['C']} chains at batch {p['batch']}, {p['strategy']}: "
    f"the formula gives **{_mib(p['predicted'])} MiB** "
    f"({p['predicted'] / 2**30:.2f} GiB) per device; the vmap fit gives "
    f"{_mib(p['predicted_fitted_vmap'])} MiB; compiled on this CPU: "
    f"{_mib(p['measured'])} MiB (predicted / measured {p['ratio']:.2f}; temp "
    f"{_mib(p['measured_detail']['temp'])} MiB, argument "
    f"{_mib(p['measured_detail']['argument'])} MiB).",
    "",
  ]
  A = doc["fwd_bwd"][str(p["batch"])]["temp"]
  params_term = p["P"] * p["C"] * doc["k"] * doc["num_params"] * 4
  fixed = p["predicted"] - p["P"] * p["C"] * A - params_term
  as_map = fixed + p["P"] * A + params_term
  lines += [
    f'The same chunk with map chains (`chain_strategy="auto"` on CPU) by the formula: '
    f"{_mib(as_map)} MiB ({as_map / 2**30:.2f} GiB); with vmap chains the "
    f"activations ({p['P']} × {p['C']} × {_mib(A)} MiB) are "
    f"{100 * p['P'] * p['C'] * A / p['predicted']:.0f} % of the total.",
    "",
  ]
  pe = doc.get("previous_estimate")
  if pe:
    lines += [
      "## The earlier estimate: about "
      f"{pe['previous_mib_per_chain']:g} MiB per chain at batch 1024",
      "",
      f"Measured marginal per chain at batch 1024 with vmap chains: "
      f"{pe['measured_mib_per_chain_vmap']:.1f} MiB (by P: "
      + ", ".join(f"{x:.1f}" for x in pe["measured_mib_per_chain_vmap_by_P"])
      + f"); the formula: {pe['formula_mib_per_chain']:.1f} MiB. With map chains the "
      "marginal per chain is "
      + ", ".join(f"{x:.2f}" for x in pe["measured_mib_per_chain_map_by_P"])
      + f" MiB (by P). The earlier figure is {pe['ratio_previous_to_measured']:.2f}× "
      "the measured vmap value: it holds for vmap chains, where it is one forward + "
      "backward at batch 1024 per chain; with map chains that memory is per pair, "
      "not per chain.",
      "",
    ]
  lines += ["## Caveats", ""] + [f"- {c}" for c in doc["caveats"]] + [""]
  return "\n".join(lines)


CAVEATS = [
  "CPU only: `memory_analysis()` reports XLA's buffer assignment for the CPU backend. "
  "Accelerator backends fuse and schedule differently (and GPU/TPU keep the dataset in "
  "device memory too), so the multipliers can differ there; recompile on the target "
  'device (or use `checkpoint_chunk="auto"`, which does) before trusting a chunk size.',
  "The measured value is a compile-time figure (argument + output + temp − alias), not "
  "the process's resident memory; allocator fragmentation and the host copies of results "
  "are not in it.",
  "A(B) is measured at random init params; activation sizes do not depend on the values.",
  "The param term (k · |θ| · 4 = 0.8 MiB per chain for this model) is under 1 % of every "
  "row, so the fitted b is not identified (it absorbs small layout differences); the "
  "fit's a (forward + backward copies per live chain) is the informative number. Map "
  "chains add about 0.4 MiB per chain, i.e. about 2 param copies, fewer than k = 4.",
  "At the small batch the formula underpredicts vmap rows by up to 7 %: the block's own "
  "observers (MALA proposal, L(w*), diagnostics) and the per-step outputs weigh more "
  "against a 5 MiB forward + backward.",
  "The fixed term is dominated by the SGLD dataset, which the block takes as an argument: "
  "a smaller `dataset_size` (or a callable batch source) removes most of it.",
]


def main(argv):
  del argv
  out_json, out_md = _OUT.value + ".json", _OUT.value + ".md"
  if _MD_ONLY.value:  # the measurements as stored; the caveats' text as in this file
    report_files.rewrite_markdown(out_json, out_md, CAVEATS, markdown)
    return
  doc = {**report_files.provenance(), **run(_CONFIG.value), "caveats": CAVEATS}
  report_files.write(out_json, out_md, doc, markdown)
  logging.info("wrote %s and %s", out_json, out_md)


if __name__ == "__main__":
  flags.FLAGS.set_default("alsologtostderr", True)
  app.run(main)
