"""Throughput of the batched LLC estimator against its lower bound.

For a model at SGLD batch size B (`--model=lr`: the paper's LR transformer;
`--model=lm`: the LM `runlocal` attention-only transformer on its synthetic
prose corpus; `--model=lm_paper`: the paper's 2-layer LM, context 1024), prints chain-steps per
second of the compiled sweep for (checkpoints × chains) configurations, and the
ratio of its time per chain-step to two lower bounds measured in the same run:

* `fwd+bwd`: one jitted forward+backward pass of the same model on the same
  batch (mean of 3 back-to-back calls);
* `scan fwd+bwd`: the same pass inside a `lax.scan` of the same length as the
  chains, with params carried through a tiny gradient step so that XLA cannot
  hoist it out of the loop. This is the stricter bound: it pays no dispatch
  cost per call, exactly like the SGLD scan.

Each figure is the median of --reps interleaved repetitions; compilation is
excluded; the init-loss forward passes (every `init_loss_stride`-th draw) are
included in the sweep's time.

A last row (`--sharded_devices=4`, 0 turns it off) checks correctness, not speed:
in a subprocess with that many fake CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=N`), a sweep of N distinct
checkpoints × 2 chains sharded on a `("checkpoint",)` mesh against the same sweep
on one device (`mesh=None`), both with vmapped chains: the max relative error of
the loss traces and of the per-chain LLCs (expected ~1e-7: the same computation per
pair, only XLA's fusion of a sharded program differs). Its timing is recorded but
means nothing: the fake devices share the host's cores.

  PYTHONPATH=. python benchmarks/llc_throughput.py                      # B = 1024, 1×1, 1×8, 8×8
  PYTHONPATH=. python benchmarks/llc_throughput.py --batch_size=128 --configs=1x4,4x4
  PYTHONPATH=. python benchmarks/llc_throughput.py --model=lm --batch_size=32 --configs=1x1,1x4,8x4
  PYTHONPATH=. python benchmarks/llc_throughput.py --configs=1x1 --reps=1 --sharded_devices=8
"""

import functools
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
from absl import app, flags

from benchmarks.timing import scanned_fwd_bwd, time_call
from configs import lm as lm_configs
from devinterp_jax import atomic
from devinterp_jax.data import synthetic_text
from devinterp_jax.data.regression import RegressionTask, make_dataset
from devinterp_jax.models.attention_lm import AttentionOnlyLM
from devinterp_jax.models.regression_transformer import RegressionTransformer
from devinterp_jax.sampling.llc import SamplerSettings, SweepOptions, estimate

_MODEL = flags.DEFINE_enum("model", "lr", ["lr", "lm", "lm_paper"], "Which model to time.")
_BATCH = flags.DEFINE_integer("batch_size", 1024, "SGLD minibatch size.")
_DRAWS = flags.DEFINE_integer("num_draws", 10, "SGLD steps per chain per timed call.")
_REPS = flags.DEFINE_integer("reps", 5, "Interleaved repetitions (median reported).")
_CONFIGS = flags.DEFINE_list("configs", ["1x1", "1x8", "8x8"], "checkpoints x chains.")
_STRATEGIES = flags.DEFINE_list("strategies", ["vmap", "map"], "Chain strategies to time.")
_JSON = flags.DEFINE_string("json_out", None, "Also write the table as JSON here.")
_MALA = flags.DEFINE_integer(
  "mala_stride",
  0,
  "MALA acceptance every k-th step (0 = off; "
  "the estimator's default is 10: +1 fwd+bwd per 10 steps).",
)
_DIAG = flags.DEFINE_bool("diagnostics", False, "Record ‖w − w*‖, ‖∇L‖, ‖η‖ per step.")
_SHARDED = flags.DEFINE_integer(
  "sharded_devices", 4, "Fake CPU devices of the sharded correctness row (0 = no such row)."
)
_SHARDED_DRAWS = flags.DEFINE_integer("sharded_draws", 20, "Draws of the sharded row.")
_CHILD = flags.DEFINE_bool(
  "sharded_child",
  False,
  "Internal: run the sharded row here and print its JSON (the parent sets XLA_FLAGS).",
)


def _model_and_data(name: str, batch_size: int):
  """(model, params, data of 16 batches) for --model."""
  if name == "lr":
    model = RegressionTransformer()
    data = make_dataset(jax.random.key(1), RegressionTask(), 16 * batch_size)
  else:
    config = lm_configs.get_config("runlocal" if name == "lm" else "")
    model = AttentionOnlyLM.from_config(config)
    data = {"tokens": synthetic_text.corpus_from_config(config, "prose").sample(1, 16 * batch_size)}
  return model, model.init_params(jax.random.key(0)), data


def _sharded_child() -> dict:
  """The sharded correctness row, run in a process with fake CPU devices."""
  from devinterp_jax.sampling import mesh as mesh_lib

  n_dev = jax.device_count()
  model, _, data = _model_and_data(_MODEL.value, _BATCH.value)
  ckpts = [model.init_params(k) for k in jax.random.split(jax.random.key(7), n_dev)]
  stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *ckpts)
  settings = SamplerSettings(
    num_chains=2,
    num_draws=_SHARDED_DRAWS.value,
    step_size=3e-4,
    localization=6.67,
    nbeta=66.7,
    batch_size=_BATCH.value,
    mala_stride=_MALA.value,
    diagnostics=_DIAG.value,
    num_burnin_steps=0,
  )
  mesh = jax.make_mesh((n_dev,), ("checkpoint",))
  out = {}
  for name, m in (("single", None), ("sharded", mesh)):
    options = SweepOptions(mesh=m, chain_strategy="vmap", progress=False)
    estimate(model.loss, stacked, data, settings, options)  # compile
    t0 = time.perf_counter()
    out[name] = estimate(model.loss, stacked, data, settings, options)
    out[f"{name}_s"] = time.perf_counter() - t0
  rel = lambda a, b: float(
    np.max(
      np.abs(np.asarray(a, np.float64) - b) / np.maximum(np.abs(np.asarray(b, np.float64)), 1e-12)
    )
  )
  steps = n_dev * settings.num_chains * settings.num_steps
  return dict(
    config=f"{n_dev}x{settings.num_chains}",
    strategy=f"vmap, mesh {mesh_lib.from_mesh(mesh).describe()}",
    devices=n_dev,
    fake_cpu_devices=True,
    num_draws=settings.num_draws,
    loss_trace_max_rel_err=rel(out["sharded"].loss_trace, out["single"].loss_trace),
    llc_max_rel_err=rel(out["sharded"].llc_per_chain, out["single"].llc_per_chain),
    sharded_chain_steps_per_s=steps / out["sharded_s"],
    single_chain_steps_per_s=steps / out["single_s"],
    note="correctness row: fake CPU devices share the host's cores; not a speed",
  )


def _sharded_row() -> dict:
  """Runs `_sharded_child` in a subprocess with `--sharded_devices` fake CPU devices."""
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=(
      os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_SHARDED.value}"
    ).strip(),
  )
  cmd = [
    sys.executable,
    os.path.abspath(__file__),
    "--sharded_child",
    f"--model={_MODEL.value}",
    f"--batch_size={_BATCH.value}",
    f"--sharded_draws={_SHARDED_DRAWS.value}",
    f"--mala_stride={_MALA.value}",
    f"--diagnostics={_DIAG.value}",
  ]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
  lines = [x for x in proc.stdout.splitlines() if x.startswith("SHARDED_ROW ")]
  if proc.returncode or not lines:
    raise RuntimeError(f"sharded row failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
  return json.loads(lines[-1][len("SHARDED_ROW ") :])


def main(argv):
  del argv
  if _CHILD.value:
    print("SHARDED_ROW " + json.dumps(_sharded_child()), flush=True)
    return
  model, params, data = _model_and_data(_MODEL.value, _BATCH.value)
  batch = jax.tree.map(lambda x: x[: _BATCH.value], data)
  fwd_bwd = jax.jit(jax.value_and_grad(model.loss))
  jax.block_until_ready(fwd_bwd(params, batch))

  scan_fwd_bwd = scanned_fwd_bwd(model.loss, _DRAWS.value)
  jax.block_until_ready(scan_fwd_bwd(params, batch))

  def time_fwd_bwd():
    t0 = time.perf_counter()
    for _ in range(3):
      jax.block_until_ready(fwd_bwd(params, batch))
    return (time.perf_counter() - t0) / 3

  programs = {}
  for cfg in _CONFIGS.value:
    n_ckpt, n_chain = map(int, cfg.split("x"))
    settings = SamplerSettings(
      num_chains=n_chain,
      num_draws=_DRAWS.value,
      step_size=3e-4,
      localization=6.67,
      nbeta=66.7,
      batch_size=_BATCH.value,
      mala_stride=_MALA.value,
      diagnostics=_DIAG.value,
      num_burnin_steps=0,
    )
    stacked = jax.tree.map(lambda x: np.stack([np.asarray(x)] * n_ckpt), params)
    for strategy in _STRATEGIES.value:
      options = SweepOptions(chain_strategy=strategy, progress=False)
      program = functools.partial(estimate, model.loss, settings=settings, options=options)
      program(stacked, data)  # compile (cached for the timed calls)
      programs[(cfg, strategy)] = (program, stacked, n_ckpt * n_chain * settings.num_steps)

  times = {k: [] for k in programs}
  base, scan_base = [], []
  for _ in range(_REPS.value):  # interleaved: each rep times every variant once
    base.append(time_fwd_bwd())
    scan_base.append(time_call(scan_fwd_bwd, params, batch) / _DRAWS.value)
    for k, (program, stacked, _) in programs.items():
      times[k].append(time_call(program, stacked, data))
  t_base, t_scan = float(np.median(base)), float(np.median(scan_base))

  print(
    f"model={_MODEL.value} backend={jax.default_backend()} devices={jax.device_count()} "
    f"batch={_BATCH.value} draws={_DRAWS.value} reps={_REPS.value}"
  )
  print(
    f"lower bounds: jitted forward+backward = {t_base * 1e3:.2f} ms; "
    f"per step of a scanned forward+backward = {t_scan * 1e3:.2f} ms"
  )
  print(
    f"{'ckpt x chains':>13} {'strategy':>8} {'chain-steps/s':>14} {'ms/chain-step':>14} "
    f"{'ratio vs fwd+bwd':>17} {'ratio vs scan':>14}"
  )
  rows = []
  for (cfg, strategy), (_, _, n_chain_steps) in programs.items():
    t = float(np.median(times[(cfg, strategy)]))
    per = t / n_chain_steps
    rows.append(
      dict(
        config=cfg,
        strategy=strategy,
        chain_steps_per_s=n_chain_steps / t,
        ms_per_chain_step=per * 1e3,
        ratio=per / t_base,
        ratio_scan=per / t_scan,
      )
    )
    print(
      f"{cfg:>13} {strategy:>8} {n_chain_steps / t:14.1f} {per * 1e3:14.2f} "
      f"{per / t_base:17.3f} {per / t_scan:14.3f}"
    )
  singles = {r["strategy"]: r for r in rows if r["config"] == "1x1"}
  for r in rows:
    if r["config"] == "1x8" and r["strategy"] in singles:
      print(
        f"8 chains vs 1 chain per chain-step ({r['strategy']}): "
        f"{r['ms_per_chain_step'] / singles[r['strategy']]['ms_per_chain_step']:.3f}x"
      )
  sharded = None
  if _SHARDED.value > 1:
    sharded = _sharded_row()
    print(
      f"sharded ({sharded['config']}, {sharded['strategy']}, fake CPU devices): "
      f"max rel err vs one device: loss traces {sharded['loss_trace_max_rel_err']:.2e}, "
      f"LLC per chain {sharded['llc_max_rel_err']:.2e} (correctness row, not a speed)"
    )
  if _JSON.value:
    out = {
      "model": _MODEL.value,
      "backend": jax.default_backend(),
      "batch_size": _BATCH.value,
      "fwd_bwd_ms": t_base * 1e3,
      "scan_fwd_bwd_ms": t_scan * 1e3,
      "rows": rows,
    }
    if sharded is not None:
      out["sharded"] = sharded
    atomic.write_text(_JSON.value, json.dumps(out, indent=2))


if __name__ == "__main__":
  app.run(main)
