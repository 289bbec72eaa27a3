"""Throughput of the all-heads weight-refined LLC sweep against the full-model LLC.

For the LR transformer (runlocal size: 51,717 params, 2 layers × 4 heads), one
compiled program estimates the wrLLC of every head × checkpoint × chain. This
prints, from one run:

* the lower bound: per step of a `lax.scan`ned jitted forward+backward pass on
  the same batch (as in `llc_throughput.py`);
* the full-model estimator: chain-steps/s for N checkpoints × C chains;
* the all-heads estimator: head·chain-steps/s for R heads × N × C, and the
  cost of one head·chain-step relative to one full-model chain-step and to the
  lower bound.

Each figure is the median of --reps interleaved repetitions, compilation
excluded; chain diagnostics and MALA (every 10th step) are on, as in the
estimator's defaults.

  PYTHONPATH=. python benchmarks/wrllc_throughput.py \
      --json_out=docs/results/benchmark_wrllc_cpu.json
"""

import json

import jax
import numpy as np
from absl import app, flags

from benchmarks.timing import scanned_fwd_bwd, time_call
from devinterp_jax import atomic
from devinterp_jax.data.regression import RegressionTask, make_dataset
from devinterp_jax.models.regression_transformer import RegressionTransformer
from devinterp_jax.sampling import restrict
from devinterp_jax.sampling.llc import Restrictions, SamplerSettings, SweepOptions, estimate

_BATCH = flags.DEFINE_integer("batch_size", 32, "SGLD minibatch size (runlocal: 32).")
_DRAWS = flags.DEFINE_integer("num_draws", 40, "SGLD steps per chain per timed call.")
_CKPTS = flags.DEFINE_integer("num_checkpoints", 4, "Checkpoints per program call.")
_CHAINS = flags.DEFINE_integer("num_chains", 4, "Chains per checkpoint.")
_REPS = flags.DEFINE_integer("reps", 5, "Interleaved repetitions (median reported).")
_STRATEGY = flags.DEFINE_string("chain_strategy", "auto", "'auto', 'vmap' or 'map'.")
_JSON = flags.DEFINE_string("json_out", None, "Also write the figures as JSON here.")


def main(argv):
  del argv
  model = RegressionTransformer()
  params = model.init_params(jax.random.key(0))
  data = make_dataset(jax.random.key(1), RegressionTask(), 2**14)
  batch = jax.tree.map(lambda x: x[: _BATCH.value], data)

  scan_fwd_bwd = scanned_fwd_bwd(model.loss, _DRAWS.value)
  jax.block_until_ready(scan_fwd_bwd(params, batch))

  n, c = _CKPTS.value, _CHAINS.value
  settings = SamplerSettings(
    num_chains=c,
    num_draws=_DRAWS.value,
    step_size=2e-4,
    localization=6.67,
    nbeta=15.4,
    batch_size=_BATCH.value,
    num_burnin_steps=0,
  )
  stacked = jax.tree.map(lambda x: np.stack([np.asarray(x)] * n), params)
  names, masks = restrict.all_heads(params)
  r = len(names)
  hypers = {
    "step_size": np.float32(2e-4),
    "nbeta": np.float32(15.4),
    "localization": np.float32(6.67),
  }
  options = SweepOptions(chain_strategy=_STRATEGY.value, progress=False)
  full = lambda stacked, hypers: estimate(model.loss, stacked, data, settings, options)
  heads = lambda stacked, hypers, masks: estimate(
    model.loss, stacked, data, settings, options, restrictions=Restrictions(names, masks)
  )
  full(stacked, hypers)  # compile (cached for the timed calls)
  heads(stacked, hypers, masks)

  t_scan, t_full, t_heads = [], [], []
  for _ in range(_REPS.value):
    t_scan.append(time_call(scan_fwd_bwd, params, batch) / _DRAWS.value)
    t_full.append(time_call(full, stacked, hypers))
    t_heads.append(time_call(heads, stacked, hypers, masks))
  t_scan, t_full, t_heads = map(lambda t: float(np.median(t)), (t_scan, t_full, t_heads))
  full_steps = n * c * settings.num_steps
  head_steps = r * full_steps
  per_full, per_head = t_full / full_steps, t_heads / head_steps
  out = dict(
    backend=jax.default_backend(),
    batch_size=_BATCH.value,
    num_heads=r,
    num_checkpoints=n,
    num_chains=c,
    num_draws=_DRAWS.value,
    chain_strategy=_STRATEGY.value,
    num_params=restrict.num_selected(jax.tree.map(np.ones_like, params)),
    head_params=int(restrict.num_selected(masks, leading_axes=1)[0]),
    scan_fwd_bwd_ms=t_scan * 1e3,
    full_chain_steps_per_s=full_steps / t_full,
    full_ms_per_chain_step=per_full * 1e3,
    head_chain_steps_per_s=head_steps / t_heads,
    head_ms_per_chain_step=per_head * 1e3,
    head_vs_full=per_head / per_full,
    head_vs_lower_bound=per_head / t_scan,
    full_vs_lower_bound=per_full / t_scan,
  )
  print(
    f"backend={out['backend']} batch={_BATCH.value} draws={_DRAWS.value} "
    f"heads={r} checkpoints={n} chains={c} reps={_REPS.value}"
  )
  print(f"lower bound: per step of a scanned forward+backward = {t_scan * 1e3:.2f} ms")
  print(
    f"full model : {out['full_chain_steps_per_s']:.1f} chain-steps/s "
    f"({per_full * 1e3:.2f} ms; {out['full_vs_lower_bound']:.2f}x the bound)"
  )
  print(
    f"all heads  : {out['head_chain_steps_per_s']:.1f} head-chain-steps/s "
    f"({per_head * 1e3:.2f} ms; {out['head_vs_lower_bound']:.2f}x the bound; "
    f"{out['head_vs_full']:.2f}x a full-model chain-step)"
  )
  if _JSON.value:
    atomic.write_text(_JSON.value, json.dumps(out, indent=2))


if __name__ == "__main__":
  app.run(main)
