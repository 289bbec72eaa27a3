"""The path layer (`devinterp_jax.paths`): local paths keep rename-and-fsync writes and
the kernel lock; `gs://` paths go through etils.epath's fsspec backend, here pointed at
fsspec's in-memory filesystem standing in for a bucket (no real bucket is reachable)."""

import json
import os
import threading
import time

import fsspec
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils.epath import backend as epath_backend
from etils.epath import gpath

import devinterp_jax as dj
from devinterp_jax import atomic, paths
from devinterp_jax.storage import lock, run_log


@pytest.fixture
def bucket(monkeypatch):
  """`gs://bucket` on an in-memory filesystem (a fresh one per test)."""
  mem = fsspec.filesystem("memory", skip_instance_cache=True)
  mem.store.clear()
  mem.pseudo_dirs.clear()
  mem.pseudo_dirs.append("")
  monkeypatch.setattr(epath_backend.fsspec_backend, "fs", lambda path: mem)
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  return mem


def test_local_and_remote_paths_are_told_apart():
  assert paths.scheme("gs://b/run") == "gs" and paths.scheme("S3://b/x") == "s3"
  assert paths.is_local("/tmp/run") and paths.is_local("run") and paths.is_local("file:///tmp/x")
  assert paths.absolute("gs://b/run/") == "gs://b/run"  # abspath would give '<cwd>/gs:/b/run'
  assert paths.absolute("run") == os.path.join(os.getcwd(), "run")
  assert paths.join("gs://b/run", "llc", "llc.npz") == "gs://b/run/llc/llc.npz"
  assert paths.dirname("gs://b/run/llc.npz") == "gs://b/run"
  assert paths.canonical("file:///tmp/../tmp") == os.path.realpath("/tmp")


def test_atomic_writes_on_a_bucket(bucket):
  atomic.write_text("gs://bucket/run/a.json", '{"x": 1}')
  assert paths.read_text("gs://bucket/run/a.json") == '{"x": 1}'
  atomic.write_text("gs://bucket/run/a.json", '{"x": 2}')  # overwrite: one object, replaced
  assert json.loads(paths.read_text("gs://bucket/run/a.json")) == {"x": 2}
  atomic.save_npz("gs://bucket/run/z.npz", w=np.arange(3))
  np.testing.assert_array_equal(paths.load_npz("gs://bucket/run/z.npz")["w"], np.arange(3))
  assert paths.listdir("gs://bucket/run") == ["a.json", "z.npz"]  # no temporary names left
  with atomic.replace_dir("gs://bucket/run/report") as tmp:
    assert paths.is_local(tmp)
    for name in ("keep.md", "stale.png"):
      with open(os.path.join(tmp, name), "w") as f:
        f.write(name)
  with atomic.replace_dir("gs://bucket/run/report") as tmp:
    os.makedirs(os.path.join(tmp, "sub"))
    for name in ("keep.md", os.path.join("sub", "new.json")):
      with open(os.path.join(tmp, name), "w") as f:
        f.write("v2")
  assert paths.listdir("gs://bucket/run/report") == ["keep.md", "sub"]  # stale.png removed
  assert paths.read_text("gs://bucket/run/report/sub/new.json") == "v2"
  with pytest.raises(RuntimeError):  # a failed build uploads nothing
    with atomic.replace_dir("gs://bucket/run/report") as tmp:
      with open(os.path.join(tmp, "keep.md"), "w") as f:
        f.write("v3")
      raise RuntimeError("boom")
  assert paths.read_text("gs://bucket/run/report/keep.md") == "v2"


def test_metrics_log_and_config_on_a_bucket(bucket):
  workdir = "gs://bucket/run"
  log = run_log.MetricsLog(workdir)
  for step in (1, 2, 3):
    log.write({"step": step, "loss": 1.0 / step})
  log.close()
  assert [r["step"] for r in run_log.read_metrics(workdir)] == [1, 2, 3]
  run_log.truncate_metrics(workdir, 2)
  log = run_log.MetricsLog(workdir)  # a resumed run appends after the kept rows
  log.write({"step": 3, "loss": 0.5})
  assert [(r["step"], r["loss"]) for r in run_log.read_metrics(workdir)] == [
    (1, 1.0),
    (2, 0.5),
    (3, 0.5),
  ]
  run_log.check_config(workdir, json.dumps({"model": {"d": 4}}))
  assert run_log.read_config(workdir).model.d == 4
  with pytest.raises(run_log.RunFileError, match="model.d"):
    run_log.check_config(workdir, json.dumps({"model": {"d": 8}}))


def test_lease_lock_on_a_bucket(bucket, monkeypatch):
  monkeypatch.setattr(lock, "SETTLE_S", 0.0)
  monkeypatch.setattr(lock, "LEASE_S", 0.4)
  workdir = "gs://bucket/run"
  with lock.hold(workdir, create=True):
    assert lock.is_held(workdir)
    holder = json.loads(paths.read_text("gs://bucket/run/.lock"))
    assert holder["pid"] == os.getpid() and holder["lease_s"] == 0.4
    first = holder["time"]
    time.sleep(0.35)  # the lease is renewed every LEASE_S / 4
    assert json.loads(paths.read_text("gs://bucket/run/.lock"))["time"] > first
    # Another launcher (another thread here, so not re-entrant) is refused.
    errors = []
    t = threading.Thread(target=lambda: errors.append(_try_lease(workdir)))
    t.start()
    t.join()
    assert errors and "in use by pid" in errors[0]
  assert not paths.exists("gs://bucket/run/.lock")  # a clean exit removes the lease
  # A holder that died leaves a lease that is no longer renewed: taken over.
  paths.write_object(
    "gs://bucket/run/.lock",
    json.dumps(
      {"pid": 1, "host": "elsewhere", "time": time.time() - 10, "lease_s": 0.4, "token": "dead"}
    ).encode(),
  )
  with lock.hold(workdir):
    assert json.loads(paths.read_text("gs://bucket/run/.lock"))["pid"] == os.getpid()


def _try_lease(workdir):
  try:
    lock._lease(paths.join(workdir, lock.LOCK_NAME), workdir)
  except lock.WorkdirLockedError as e:
    return str(e)
  return None


def _loss(params, batch):
  return jnp.mean(jnp.square(batch["x"] @ params["w"] - batch["y"]))


def test_sweep_resumes_from_a_bucket(bucket, tmp_path, monkeypatch):
  kx, ky = jax.random.split(jax.random.key(0))
  data = {"x": jax.random.normal(kx, (256, 3)), "y": jax.random.normal(ky, (256, 1))}
  ckpts = [{"w": jax.random.normal(jax.random.key(i), (3, 1))} for i in range(3)]
  kw = dict(
    num_chains=2,
    num_draws=20,
    step_size=1e-3,
    localization=10.0,
    nbeta=50.0,
    batch_size=32,
    seed=1,
    progress=False,
    num_burnin_steps=0,
    checkpoint_chunk=1,
  )
  local = dj.estimate_llcs(_loss, ckpts, data, output_dir=str(tmp_path), **kw)
  ref = dj.estimate_llcs(_loss, ckpts, data, output_dir="gs://bucket/sweeps", **kw)
  np.testing.assert_array_equal(ref.llc_per_chain, local.llc_per_chain)
  (fp,) = paths.listdir("gs://bucket/sweeps")
  sweep = paths.join("gs://bucket/sweeps", fp)
  assert paths.listdir(sweep) == sorted(os.listdir(os.path.join(tmp_path, fp)))
  paths.remove(paths.join(sweep, "llc_pair_00001.npz"))  # as if killed before it finished
  written = []
  upload = paths.write_object
  monkeypatch.setattr(paths, "write_object", lambda p, d: (written.append(p), upload(p, d)))
  res = dj.estimate_llcs(_loss, ckpts, data, output_dir="gs://bucket/sweeps", **kw)
  np.testing.assert_array_equal(res.llc_per_chain, ref.llc_per_chain)
  assert written == [paths.join(sweep, "llc_pair_00001.npz")]  # only the lost pair redone
  res.save("gs://bucket/sweeps/llc.npz")
  np.testing.assert_array_equal(
    dj.LLCResult.load("gs://bucket/sweeps/llc.npz").llc_per_chain, res.llc_per_chain
  )
