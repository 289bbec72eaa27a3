"""Precision and memory settings of the estimator: a float32 chain state for bf16
checkpoints, bf16 compute inside the loss, the matmul precision, and
`checkpoint_chunk="auto"` from the compiled program's memory."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from devinterp_jax.sampling import llc, program, sweep
from devinterp_jax.sampling.settings import SamplerSettings, SweepOptions

D, NBETA, GAMMA = 16, 100.0, 1.0
EXACT = 0.5 * D * NBETA / (NBETA + GAMMA)  # E[nβ (L − L*)] for L = ½‖w − w*‖²


def quadratic(params, batch):
  del batch
  return 0.5 * jnp.sum(jnp.square(params["w"] - 4.0))


def settings(**kw):
  base = dict(
    num_chains=4,
    num_draws=4000,
    step_size=1e-4,
    localization=GAMMA,
    nbeta=NBETA,
    batch_size=1,
    num_burnin_steps=500,
    mala_stride=0,
    diagnostics=False,
  )
  return SamplerSettings(**{**base, **kw})


def run(w_star, st, **options):
  return llc.estimate(
    quadratic,
    [{"w": w_star}],
    {"x": np.zeros((8, 1), np.float32)},
    st,
    SweepOptions(progress=False, **options),
  )


def test_bf16_checkpoint_is_sampled_with_a_float32_state():
  # |w*| = 4, ε = 1e-4: √ε noise is below bf16's spacing (2^-5 at 4), so a bf16 chain
  # state rounds the noise away (+35 % measured before the state was promoted).
  st = settings(num_chains=8, num_draws=6000)
  bf16 = run(jnp.full((D,), 4.0, jnp.bfloat16), st)
  f32 = run(jnp.full((D,), 4.0, jnp.float32), st)
  np.testing.assert_allclose(bf16.llc_per_chain, f32.llc_per_chain, rtol=1e-6)
  mean = float(bf16.llc_mean[0])  # ± ~2 % (8 chains × ~30 effective draws, d = 16)
  assert abs(mean / EXACT - 1) < 0.08, (mean, EXACT)
  prog = program.get_program(quadratic, settings(), data={"x": np.zeros((8, 1))})
  carry = prog.init(
    {"w": jnp.full((1, D), 4.0, jnp.bfloat16)},
    {k: jnp.ones((1,)) for k in ("step_size", "nbeta", "localization")},
    None,
  )
  assert {x.dtype for x in jax.tree.leaves(carry[0])} == {jnp.dtype(jnp.float32)}


def test_bf16_compute_changes_the_loss_but_not_the_estimate_beyond_noise():
  st = settings(num_draws=1500, step_size=1e-3)
  w = jnp.full((D,), 4.0, jnp.float32)
  f32, bf16 = run(w, st), run(w, settings(num_draws=1500, step_size=1e-3, compute_dtype="bfloat16"))
  assert not np.allclose(f32.loss_trace, bf16.loss_trace, rtol=1e-5)  # bf16 was applied
  diff = float(bf16.llc_mean[0] - f32.llc_mean[0])
  se = float(np.hypot(f32.convergence["mcse"][0], bf16.convergence["mcse"][0]))
  assert abs(diff) < 4 * se + 0.02 * EXACT, (diff, se)


def test_precision_settings_are_checked_and_keyed():
  with pytest.raises(ValueError, match="compute_dtype must be a floating dtype"):
    settings(compute_dtype="int8")
  with pytest.raises(ValueError, match="matmul_precision must be one of"):
    settings(matmul_precision="fastest")
  assert settings(compute_dtype=jnp.bfloat16).compute_dtype == "bfloat16"
  # New fields at their defaults stay out of a sweep's identity (old fingerprints hold).
  assert "compute_dtype" not in settings().identity()
  assert settings(matmul_precision="highest").identity()["matmul_precision"] == "highest"
  assert settings().program_key() != settings(matmul_precision="highest").program_key()
  res = run(jnp.full((D,), 4.0), settings(num_draws=200, matmul_precision="highest"))
  assert res.settings["matmul_precision"] == "highest"


def test_auto_chunk_follows_the_memory_budget(caplog):
  ckpts = [{"w": jnp.full((D,), 4.0 + 0.01 * i)} for i in range(3)]
  st = settings(num_draws=100)
  data = {"x": np.zeros((8, 1), np.float32)}
  base = llc.estimate(quadratic, ckpts, data, st, SweepOptions(progress=False))
  with caplog.at_level(logging.INFO):
    tiny = llc.estimate(
      quadratic,
      ckpts,
      data,
      st,
      SweepOptions(progress=False, checkpoint_chunk="auto", memory_fraction=1e-9),
    )
  assert "checkpoint_chunk='auto': 1 pairs per chunk" in caplog.text
  np.testing.assert_allclose(tiny.loss_trace, base.loss_trace, rtol=1e-5)
  prog = program.get_program(quadratic, st, data=data)
  first = jax.tree.map(lambda x: x[None], ckpts[0])
  args = (first, None, program.chain_keys(0, st.num_chains), jax.device_put(data), None, None)
  m1, m4 = sweep.chunk_memory(prog, 1, *args), sweep.chunk_memory(prog, 4, *args)
  assert m1 is not None and m4.total > m1.total  # memory grows with the chunk
  assert sweep.auto_chunk(prog, *args, num_pairs=3, fraction=0.5) == 3  # all fit
  with pytest.raises(ValueError, match="checkpoint_chunk must be None, 'auto'"):
    SweepOptions(checkpoint_chunk="most")
