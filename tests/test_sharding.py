"""Sharded (8 host devices) and single-device LLC sweeps agree."""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.multiprocess  # 8 fake CPU devices in a subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    import devinterp_jax as dj
    assert jax.device_count() == 8, jax.devices()
    def loss(p, b):
      return jnp.mean(jnp.square(jnp.tanh(b["x"] @ p["w1"]) @ p["w2"] - b["y"]))
    kx, ky = jax.random.split(jax.random.key(0))
    data = {"x": jax.random.normal(kx, (1024, 4)), "y": jax.random.normal(ky, (1024, 1))}
    ckpts = [{"w1": jax.random.normal(jax.random.key(i), (4, 16)) * 0.5,
              "w2": jax.random.normal(jax.random.key(9 + i), (16, 1)) * 0.5} for i in range(2)]
    kw = dict(num_chains=3, num_draws=60, step_size=1e-3, localization=10.0, nbeta=50.0,
              batch_size=64, progress=False)
    mesh = jax.make_mesh((8,), ("data",))
    sharded = dj.estimate_llcs(loss, ckpts, data, mesh=mesh, **kw)
    single = dj.estimate_llcs(loss, ckpts, data, **kw)
    np.testing.assert_allclose(sharded.loss_trace, single.loss_trace, rtol=1e-5)
    np.testing.assert_allclose(sharded.llc_per_chain, single.llc_per_chain, rtol=1e-5)
    try:
      dj.estimate_llcs(loss, ckpts, data, mesh=mesh, **{**kw, "batch_size": 60})
      raise SystemExit("indivisible batch was accepted")
    except ValueError as e:
      assert "divisible" in str(e)
    print("SHARDED_OK", float(np.max(np.abs(sharded.loss_trace - single.loss_trace))))
""")


def test_sharded_matches_single_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "SHARDED_OK" in proc.stdout
