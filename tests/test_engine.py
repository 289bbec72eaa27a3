"""The estimator engine: cached programs with explicit inputs, blocks, adaptive length."""

import collections.abc
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import devinterp_jax as dj
from devinterp_jax.sampling import convergence, diagnostics, program, sweep
from devinterp_jax.sampling.settings import SamplerSettings, SweepOptions


def lin_loss(params, batch):
  return jnp.mean(jnp.square(batch["x"] @ params["w"] - batch["y"]))


def make_data(seed, n=256, noise=0.5):
  kx, ke = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (n, 3))
  return {"x": x, "y": x @ jnp.ones(3) + noise * jax.random.normal(ke, (n,))}


def least_squares(data):
  x, y = np.asarray(data["x"], np.float64), np.asarray(data["y"], np.float64)
  return {"w": jnp.asarray(np.linalg.lstsq(x, y, rcond=None)[0], jnp.float32)}


SETTINGS = SamplerSettings(
  num_chains=4,
  num_draws=200,
  step_size=1e-3,
  localization=1.0,
  nbeta=200.0,
  batch_size=32,
  num_burnin_steps=0,
)


def test_repeat_and_new_seed_calls_compile_nothing():
  data = make_data(0)
  ckpts = [least_squares(data)] * 2
  opts = SweepOptions(progress=False)
  dj.estimate(lin_loss, ckpts, data, SETTINGS, opts)
  before = program.cache_stats()
  again = dj.estimate(lin_loss, ckpts, data, SETTINGS, opts)
  reseeded = dj.estimate(
    lin_loss, ckpts, data, SamplerSettings(**{**SETTINGS.__dict__, "seed": 7}), opts
  )
  other_hypers = dj.estimate(
    lin_loss, ckpts, data, SamplerSettings(**{**SETTINGS.__dict__, "nbeta": 150.0}), opts
  )
  after = program.cache_stats()
  assert after.traces == before.traces  # nothing traced, so nothing compiled
  assert after.hits == before.hits + 3 and after.misses == before.misses
  assert not np.allclose(reseeded.loss_trace, again.loss_trace)
  assert not np.allclose(other_hypers.llc_mean, again.llc_mean)
  # A fresh lambda is another loss object: it misses (documented in program.py).
  dj.estimate(lambda p, b: lin_loss(p, b), ckpts, data, SETTINGS, opts)
  assert program.cache_stats().misses == after.misses + 1


def test_same_shaped_data_is_an_input_not_a_constant():
  """Two datasets of one shape through one compiled program give each its own, correct
  numbers: those of a program compiled for that dataset alone."""
  a, b = make_data(1, noise=0.5), make_data(2, noise=2.0)
  w = least_squares(a)
  opts = SweepOptions(progress=False)
  res_a = dj.estimate(lin_loss, [w], a, SETTINGS, opts)
  traces = program.cache_stats().traces
  res_b = dj.estimate(lin_loss, [w], b, SETTINGS, opts)
  assert program.cache_stats().traces == traces  # reused the program
  program.clear_cache()
  fresh_b = dj.estimate(lin_loss, [w], b, SETTINGS, opts)
  np.testing.assert_array_equal(res_b.loss_trace, fresh_b.loss_trace)
  assert not np.allclose(res_a.init_loss, res_b.init_loss, rtol=0.1)


def test_chain_in_blocks_repacked_and_padded_equals_one_call(tmp_path):
  """An adaptive sweep (blocks of 50 draws, unconverged pairs re-packed into padded chunks)
  gives bit-identical traces to each chain run in a single call of the same length.

  Both use chunks of 2 pairs: on CPU, XLA compiles a chunk of 1 pair (a size-1 batch
  axis) differently, which changes the last bit (rtol 1e-6, checked below)."""
  data = make_data(3)
  w = least_squares(data)
  ckpts = [w, {"w": w["w"] + 0.3}, {"w": w["w"] * 0.5}]
  adaptive = SamplerSettings(
    num_chains=4,
    num_draws=100,
    step_size=1e-4,
    localization=1.0,
    nbeta=200.0,
    batch_size=32,
    num_burnin_steps=0,
    block_draws=50,
    max_draws=400,
  )
  crit = diagnostics.HealthCriteria(min_draws=100)
  res = dj.estimate(
    lin_loss, ckpts, data, adaptive, SweepOptions(checkpoint_chunk=2, progress=False), criteria=crit
  )
  lengths = res.convergence["num_recorded"]
  assert len(set(lengths.tolist())) > 1 or lengths.max() > 100  # some pairs continued
  out = sweep.run(
    lin_loss, ckpts, data, adaptive, SweepOptions(checkpoint_chunk=2, progress=False), criteria=crit
  )
  for p in out.pairs:
    n = len(sweep.draw_index(adaptive, p.steps))
    single = SamplerSettings(
      **{**adaptive.__dict__, "num_draws": n, "block_draws": n, "max_draws": None}
    )
    one = sweep.run(
      lin_loss,
      [ckpts[p.checkpoint]] * 2,
      data,
      single,
      SweepOptions(checkpoint_chunk=2, progress=False),
      criteria=crit,
    )
    for name in ("loss", "init_loss", "mala", "distance"):
      np.testing.assert_array_equal(one.pairs[0].outputs[name], p.outputs[name][:, :n])
    alone = sweep.run(
      lin_loss, [ckpts[p.checkpoint]], data, single, SweepOptions(progress=False), criteria=crit
    )
    np.testing.assert_allclose(alone.pairs[0].outputs["loss"], p.outputs["loss"][:, :n], rtol=1e-6)


class CountingSequence(collections.abc.Sequence):
  """A checkpoint sequence that counts its reads (as `ParamsSequence` reads disk)."""

  def __init__(self, trees):
    self.trees, self.reads = trees, 0

  def __len__(self):
    return len(self.trees)

  def __getitem__(self, i):
    self.reads += 1
    return self.trees[i]


def test_adaptive_sweep_reads_each_checkpoint_once_and_the_cache_changes_no_number():
  """The rounds of an adaptive sweep reuse checkpoints read in earlier rounds (within
  `checkpoint_cache_bytes`); with no cache every round reads again. Same numbers."""
  data = make_data(5)
  w = least_squares(data)
  trees = [w, {"w": w["w"] + 0.3}, {"w": w["w"] * 0.5}]
  s = SamplerSettings(
    num_chains=2,
    num_draws=100,
    step_size=1e-4,
    localization=1.0,
    nbeta=200.0,
    batch_size=32,
    num_burnin_steps=0,
    block_draws=50,
    max_draws=300,
  )
  crit = diagnostics.HealthCriteria(min_draws=250)  # kept draws: rounds past num_draws
  runs = {}
  for cache in (2**20, 0):
    seq = CountingSequence(trees)
    out = sweep.run(
      lin_loss,
      seq,
      data,
      s,
      SweepOptions(checkpoint_chunk=2, progress=False, checkpoint_cache_bytes=cache),
      criteria=crit,
    )
    runs[cache] = (seq.reads, [p.outputs["loss"] for p in out.pairs], [p.steps for p in out.pairs])
  (cached_reads, cached_loss, steps), (uncached_reads, uncached_loss, _) = runs[2**20], runs[0]
  assert max(steps) > s.steps_for(s.num_draws)  # several rounds ran
  assert cached_reads == len(trees) and uncached_reads > 2 * len(trees)
  for a, b in zip(cached_loss, uncached_loss):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="checkpoint_cache_bytes"):
    SweepOptions(checkpoint_cache_bytes=-1)


def test_adaptive_sweep_resumes_from_its_last_block(tmp_path, monkeypatch):
  data = make_data(4)
  w = least_squares(data)
  ckpts = [w, {"w": w["w"] + 0.3}]
  s = SamplerSettings(
    num_chains=4,
    num_draws=100,
    step_size=1e-4,
    localization=1.0,
    nbeta=200.0,
    batch_size=32,
    block_draws=50,
    max_draws=300,
  )
  crit = diagnostics.HealthCriteria(min_draws=100)
  opts = SweepOptions(progress=False, output_dir=str(tmp_path / "sweep"))
  ref = dj.estimate(lin_loss, ckpts, data, s, SweepOptions(progress=False), criteria=crit)
  real, calls = sweep._run_chunk, []

  def dying(*args, **kw):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt("killed")
    return real(*args, **kw)

  monkeypatch.setattr(sweep, "_run_chunk", dying)
  with pytest.raises(KeyboardInterrupt):
    dj.estimate(lin_loss, ckpts, data, s, opts, criteria=crit)
  monkeypatch.setattr(sweep, "_run_chunk", real)
  (fp,) = os.listdir(opts.output_dir)
  files = [f for f in os.listdir(os.path.join(opts.output_dir, fp)) if f.startswith("llc_pair")]
  assert files  # finished blocks were saved, with their chain state
  res = dj.estimate(lin_loss, ckpts, data, s, opts, criteria=crit)
  np.testing.assert_array_equal(res.loss_trace, ref.loss_trace)
  np.testing.assert_array_equal(res.llc_per_chain, ref.llc_per_chain)
  # finished: the chain states are dropped from the files
  with np.load(os.path.join(opts.output_dir, fp, sorted(files)[0])) as z:
    assert not [k for k in z.files if k.startswith("state_")]


def test_auto_burnin_is_recorded_and_a_transient_is_flagged():
  """Chains start at w* = 0 of L = ½ nβ⁻¹‖w‖²-like quadratic and relax: with burn-in 0
  the transient is flagged; with 'auto' it is cut, recorded and the estimate is close
  to the exact d/2."""
  d = 10
  loss = lambda p, b: 0.5 * jnp.sum(jnp.square(p["w"]))
  base = dict(
    num_chains=4,
    num_draws=800,
    step_size=2e-4,
    localization=0.0,
    nbeta=100.0,
    batch_size=1,
    block_draws=200,
  )
  opts = SweepOptions(progress=False, chain_strategy="vmap")
  zero = dj.estimate(
    loss, [{"w": jnp.zeros(d)}], lambda k: None, SamplerSettings(**base, num_burnin_steps=0), opts
  ).select(0)
  assert zero.convergence["status"] == convergence.NOT_CONVERGED
  auto = dj.estimate(
    loss, [{"w": jnp.zeros(d)}], lambda k: None, SamplerSettings(**base), opts
  ).select(0)
  assert 0 < int(auto.burnin) <= 400 and auto.convergence["burnin"] == auto.burnin
  assert abs(auto.llc_mean - d / 2) < abs(zero.llc_mean - d / 2)
  assert abs(auto.llc_mean - d / 2) < 3 * auto.llc_sem


def test_progress_lines_come_from_inside_a_block():
  lines = []
  data = make_data(5)
  s = SamplerSettings(**{**SETTINGS.__dict__, "num_draws": 400, "block_draws": 400})
  from devinterp_jax import progress as progress_lib

  real = progress_lib.Progress

  class Recording(real):
    def __init__(self, *a, **kw):
      kw["log"], kw["every_s"] = lines.append, 0.0
      super().__init__(*a, **kw)

  try:
    progress_lib.Progress = Recording
    dj.estimate(lin_loss, [least_squares(data)], data, s, SweepOptions(progress=True))
  finally:
    progress_lib.Progress = real
  # one block only, yet the callback reported every 400/20 steps
  assert len(lines) >= 10, lines
  assert any(" ETA " in line for line in lines[1:-1]) and "done in" in lines[-1]


def test_settings_from_config_and_bad_inputs():
  import ml_collections

  section = ml_collections.ConfigDict(
    dict(
      num_chains=4,
      num_draws=400,
      step_size=1e-3,
      nbeta=10.0,
      localization=1.0,
      batch_size=32,
      num_burnin_steps="auto",
      max_draws=0,
      checkpoint_chunk=4,
      dataset_size=100,
    )
  )
  s = SamplerSettings.from_config(section, overrides={"num_chains": 2, "max_draws": 800})
  assert s.num_chains == 2 and s.max_draws == 800 and s.num_burnin_steps == "auto"
  assert SamplerSettings.from_config(section).max_draws is None
  assert (
    SamplerSettings.from_config({**section.to_dict(), "num_burnin_steps": "100"}).num_burnin_steps
    == 100
  )
  with pytest.raises(ValueError, match="num_burnin_steps"):
    SamplerSettings.from_config({**section.to_dict(), "num_burnin_steps": "soon"})
  with pytest.raises(ValueError, match="max_draws"):
    SamplerSettings.from_config(section, overrides={"max_draws": 100})
  with pytest.raises(ValueError, match="chain_strategy"):
    SweepOptions(chain_strategy="pmap")
  with pytest.raises(ValueError, match="restriction names"):
    dj.Restrictions(["a", "b"], {"w": np.ones((1, 3))}).check()


def test_adaptive_rule_on_planted_transients_is_unbiased():
  """The stopping rule (auto burn-in, run until converged) on transients matched to the
  real runlocal traces: λ̂ within 3 MCSE of the truth in ≥ 95 % of seeds, bias ≤ 1 MCSE;
  with burn-in 0 the 400-draw traces are flagged."""
  from benchmarks import engine

  r = engine.adaptive(150, seed=1)
  assert r["adaptive_within_3_mcse"] >= 0.95, r
  assert abs(r["adaptive_bias_mcse"]) <= 1.0, r
  assert r["burnin0_400_flagged_fraction"] >= 0.95, r
  assert 400 < r["draws_used"]["mean"] < 2000


def test_real_runlocal_traces_burnin_and_flags():
  """The saved traces of a runlocal sweep (22 checkpoints × 4 chains × 400 draws, chains
  starting at w*): with burn-in 0 every checkpoint past the first steps is flagged; the
  auto burn-in cuts the transient."""
  z = np.load(os.path.join(os.path.dirname(__file__), "data", "runlocal_lr_traces.npz"))
  nbeta = float(z["nbeta"])
  init = np.repeat(z["init_loss"][..., None], 10, -1)
  late = np.flatnonzero(z["steps"] >= 500)
  for i in late:
    zero = diagnostics.assess(z["loss_trace"][i], init[i], nbeta, 100, burnin=0)
    auto = diagnostics.assess(z["loss_trace"][i], init[i], nbeta, 100, burnin="auto")
    assert zero["status"] == convergence.NOT_CONVERGED
    assert auto["burnin"] >= 100
    assert auto["llc"] > zero["llc"]  # the transient from w* reads low
