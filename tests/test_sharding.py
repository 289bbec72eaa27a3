"""Named sweep axes on 8 fake CPU devices: every axis assignment equals the
single-device sweep, pair/chain/grid-sharded programs have no cross-device
reduction, and outputs span every device."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import xla_flags

pytestmark = pytest.mark.multiprocess  # 8 fake CPU devices in a subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import json, re, sys
    import jax, jax.numpy as jnp, numpy as np
    from devinterp_jax.sampling import calibration, llc, mesh as mesh_lib, program, restrict, sweep
    from devinterp_jax.sampling.settings import Restrictions, SamplerSettings, SweepOptions
    assert jax.device_count() == 8, jax.devices()
    out = {}

    def loss(p, b):
      return jnp.mean(jnp.square(jnp.tanh(b["x"] @ p["w1"]) @ p["w2"] - b["y"]))

    kx, ky = jax.random.split(jax.random.key(0))
    data = {"x": jax.random.normal(kx, (1024, 4)), "y": jax.random.normal(ky, (1024, 1))}
    ckpts = [{"w1": jax.random.normal(jax.random.key(i), (4, 16)) * 0.5,
              "w2": jax.random.normal(jax.random.key(9 + i), (16, 1)) * 0.5} for i in range(4)]
    st = SamplerSettings(num_chains=4, num_draws=40, step_size=1e-3, localization=10.0,
                         nbeta=50.0, batch_size=64, num_burnin_steps=0)
    masks = {"w1": np.stack([np.ones((4, 16)), np.zeros((4, 16))]).astype(np.float32),
             "w2": np.stack([np.zeros((16, 1)), np.ones((16, 1))]).astype(np.float32)}
    rs = Restrictions(["w1", "w2"], masks)
    one = lambda **kw: SweepOptions(progress=False, **kw)

    def relerr(a, b):
      return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))

    def hlo(sm, restrictions=None):
      comp = None if restrictions is None else restrict.compact(restrictions.masks)
      prog = program.get_program(loss, st, data=data, mesh=sm,
                                 leaves=None if comp is None else comp.leaves,
                                 padded=comp is not None and comp.valid is not None)
      first = jax.tree.map(lambda x: x[None], ckpts[0])
      args = sweep.abstract_args(prog, 8, first, comp,
                                 program.chain_keys(0, 4, sm.chains()),
                                 sweep.put(data, sm.replicated()), None, sm)
      compiled = prog.block.lower(*args).compile()
      text = compiled.as_text()
      return {"all-reduce": len(re.findall(r"all-reduce(?:-start)?\\(", text)),
              "all-gather": len(re.findall(r"all-gather(?:-start)?\\(", text)),
              "devices": sorted({len(s.device_set) for s in
                                 jax.tree.leaves(compiled.output_shardings)})}

    base = llc.estimate(loss, ckpts, data, st, one(mesh=None))
    cases = {"checkpoint": ((8,), ("checkpoint",)),
             "checkpoint,chain": ((2, 4), ("checkpoint", "chain")),
             "chain,checkpoint": ((4, 2), ("chain", "checkpoint"))}
    for name, (shape, names) in cases.items():
      m = jax.make_mesh(shape, names)
      r = llc.estimate(loss, ckpts, data, st, one(mesh=m))
      out[name] = {"rel": relerr(r.loss_trace, base.loss_trace),
                   "llc_rel": relerr(r.llc_per_chain, base.llc_per_chain),
                   **hlo(mesh_lib.from_mesh(m))}

    # Restriction axis: 2 restrictions x 4 checkpoints = 8 pairs.
    rbase = llc.estimate(loss, ckpts, data, st, one(mesh=None), restrictions=rs)
    m = jax.make_mesh((2, 4), ("restriction", "checkpoint"))
    r = llc.estimate(loss, ckpts, data, st, one(mesh=m), restrictions=rs)
    out["restriction,checkpoint"] = {"rel": relerr(r.loss_trace, rbase.loss_trace),
                                     **hlo(mesh_lib.from_mesh(m), restrictions=rs)}

    # Grid axis: a calibration grid of 4 step sizes x 2 checkpoints.
    kw = dict(step_sizes=[3e-4, 1e-3, 2e-3, 4e-3], nbetas=[50.0], localizations=[10.0],
              num_chains=4, num_draws=40, batch_size=64)
    cbase = calibration.calibrate(loss, ckpts[:2], data, mesh=None, **kw)
    m = jax.make_mesh((8,), ("grid",))
    c = calibration.calibrate(loss, ckpts[:2], data, mesh=m, **kw)
    out["grid"] = {"rel": relerr(c.llc_mean, cbase.llc_mean),
                   **hlo(mesh_lib.from_mesh(m))}

    # Batch axis (cross-device reductions): a fixed short chain agrees at rtol 1e-5.
    for name, (shape, names) in {"batch": ((8,), ("batch",)), "data": ((8,), ("data",)),
                                 "checkpoint,chain,batch": ((2, 2, 2),
                                                            ("checkpoint", "chain", "batch"))
                                 }.items():
      m = jax.make_mesh(shape, names)
      r = llc.estimate(loss, ckpts, data, st, one(mesh=m))
      out[name] = {"rel": relerr(r.loss_trace, base.loss_trace), **hlo(mesh_lib.from_mesh(m))}

    # Adaptive blocks: continuing pairs re-packed into sharded chunks, state a global array.
    ad = SamplerSettings(num_chains=4, num_draws=20, max_draws=60, block_draws=20,
                         step_size=1e-3, localization=10.0, nbeta=50.0, batch_size=64)
    abase = llc.estimate(loss, ckpts, data, ad, one(mesh=None))
    m = jax.make_mesh((4, 2), ("checkpoint", "chain"))
    a = llc.estimate(loss, ckpts, data, ad, one(mesh=m, checkpoint_chunk=2))
    out["adaptive"] = {"rel": relerr(a.llc_per_chain, abase.llc_per_chain),
                       "draws": [int(x) for x in np.ravel(a.convergence["num_draws"])],
                       "draws_base": [int(x) for x in np.ravel(abase.convergence["num_draws"])]}

    # "auto" on 8 devices (forced; on the CPU backend "auto" means no mesh).
    out["auto_cpu"] = mesh_lib.resolve("auto", num_pairs=4, num_chains=4, batch_size=64) is None
    sm = mesh_lib.auto(16, 4, devices=jax.devices())
    out["auto16"] = dict(sm.mesh.shape)
    sm = mesh_lib.auto(2, 4, devices=jax.devices())
    out["auto2"] = dict(sm.mesh.shape)
    r = llc.estimate(loss, ckpts[:2], data, st, one(mesh=sm))
    out["auto2"]["rel"] = relerr(r.loss_trace, llc.estimate(loss, ckpts[:2], data, st,
                                                            one(mesh=None)).loss_trace)
    # checkpoint_chunk="auto" on a mesh: a multiple of the pair devices, same numbers.
    r = llc.estimate(loss, ckpts, data, st, one(mesh=jax.make_mesh((8,), ("checkpoint",)),
                                                checkpoint_chunk="auto"))
    out["auto_chunk_rel"] = relerr(r.loss_trace, base.loss_trace)
    for bad in [dict(mesh=jax.make_mesh((8,), ("heads",))),
                dict(mesh=jax.make_mesh((8,), ("chain",)))]:
      try:
        llc.estimate(loss, ckpts, data, st, one(**bad))
        out.setdefault("accepted", []).append(str(bad))
      except ValueError as e:
        out.setdefault("errors", []).append(str(e))
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def results():
  env = dict(
    os.environ,
    XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"),
    JAX_PLATFORMS="cpu",
    PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
  )
  proc = subprocess.run(
    [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
  return json.loads(line[len("RESULT ") :])


@pytest.mark.parametrize(
  "case", ["checkpoint", "checkpoint,chain", "chain,checkpoint", "restriction,checkpoint", "grid"]
)
def test_pair_and_chain_axes_equal_single_device_without_reductions(results, case):
  r = results[case]
  assert r["rel"] < 1e-5, r
  assert r["all-reduce"] == 0, r  # independent pairs and chains: no cross-device sum
  assert r["all-gather"] == 0, r
  assert r["devices"] == [8], r  # every output spans all 8 devices


@pytest.mark.parametrize("case", ["batch", "data", "checkpoint,chain,batch"])
def test_batch_axis_short_chain_equal_single_device(results, case):
  r = results[case]
  assert r["rel"] < 1e-5, r  # 40 draws: the reduction order barely matters
  assert r["all-reduce"] > 0, r  # data parallel: gradients are summed across devices
  assert r["devices"] == [8], r


def test_adaptive_sweep_on_mesh_equals_single_device(results):
  r = results["adaptive"]
  assert r["draws"] == r["draws_base"], r
  assert r["rel"] < 1e-5, r


def test_auto_mesh_and_auto_chunk(results):
  assert results["auto_cpu"] is True  # CPU backend: no mesh
  assert results["auto16"] == {"checkpoint": 8}  # enough pairs: all on checkpoint
  assert results["auto2"]["checkpoint"] * results["auto2"]["chain"] == 8
  assert results["auto2"]["chain"] > 1  # 2 pairs < 8 devices: chains too
  assert results["auto2"]["rel"] < 1e-5
  assert results["auto_chunk_rel"] < 1e-5


def test_bad_meshes_are_refused_by_name(results):
  assert "accepted" not in results, results.get("accepted")
  errors = " ".join(results["errors"])
  assert "'heads'" in errors and "not sweep axes" in errors
  assert "num_chains 4 is not divisible by the 8 devices of mesh axis 'chain'" in errors
