"""One process of a tests/test_multihost.py scenario: a tiny MLP trained by
`loop.train` (or `loop.train_seeds`) under `launcher.run`, with the launcher's
multi-process flags.

  --reference=D first train an uninterrupted run in D (same layout, same program)
  --kill_at=S   SIGKILL this process right after the event at step S
  --fail_at=S   process --fail_process raises right after the event at step S
  --trace=F     record every file beside --workdir that this process opens for
                writing, checkpoints/ aside (one path a line), in F.<process id>
"""

from __future__ import annotations

import builtins
import os
import signal

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

from devinterp_jax.experiments import launcher
from devinterp_jax.training import loop

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.", required=True)
_NUM_STEPS = flags.DEFINE_integer("num_steps", 60, "Training steps.")
_SEEDS = flags.DEFINE_integer("seeds", 0, "0: `train`; S: `train_seeds` with S seeds.")
_KILL_AT = flags.DEFINE_integer("kill_at", 0, "SIGKILL after the event at this step.")
_FAIL_AT = flags.DEFINE_integer("fail_at", 0, "Raise after the event at this step.")
_FAIL_PROCESS = flags.DEFINE_integer("fail_process", 1, "The process that raises (fail_at).")
_TRACE = flags.DEFINE_string("trace", "", "Prefix of the write-trace file.")
_REFERENCE = flags.DEFINE_string("reference", "", "Train an uninterrupted run here first.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Training batch size.")

SCHEDULE = (1, 5, 10, 30)
CONFIG = '{"model": "mlp", "width": 8}'


def loss_fn(params, batch):
  pred = jnp.tanh(batch["x"] @ params["w1"]) @ params["w2"]
  return jnp.mean(jnp.square(pred - batch["y"]))


def batch_fn(key):
  kx, kn = jax.random.split(key)
  x = jax.random.normal(kx, (_BATCH_SIZE.value, 4))
  return {
    "x": x,
    "y": jnp.sin(x.sum(-1, keepdims=True)) + 0.1 * jax.random.normal(kn, (x.shape[0], 1)),
  }


def init_params(key):
  k1, k2 = jax.random.split(key)
  return {"w1": 0.5 * jax.random.normal(k1, (4, 8)), "w2": 0.5 * jax.random.normal(k2, (8, 1))}


def on_event(step: int) -> None:
  if _KILL_AT.value and step == _KILL_AT.value:
    os.kill(os.getpid(), signal.SIGKILL)
  if _FAIL_AT.value and step == _FAIL_AT.value and jax.process_index() == _FAIL_PROCESS.value:
    raise RuntimeError(f"injected failure on process {jax.process_index()} at step {step}")


def trace_writes(prefix: str) -> None:
  """Wraps `open` and `os.open` to log the files opened for writing beside the workdir
  (Orbax's checkpoints/ aside)."""
  log = [None]
  root = os.path.dirname(os.path.abspath(_WORKDIR.value)) + os.sep
  skip = os.sep + "checkpoints" + os.sep

  def record(path, writing):
    path = os.fspath(path) if isinstance(path, (str, os.PathLike)) else ""
    path = os.path.abspath(path) if isinstance(path, str) and path else ""
    if writing and path.startswith(root) and skip not in path and not path.startswith(prefix):
      if log[0] is None:
        log[0] = real_open(f"{prefix}.{flags.FLAGS.process_id or 0}", "a", buffering=1)
      log[0].write(path + "\n")

  real_open, real_os_open = builtins.open, os.open

  def traced_open(file, mode="r", *args, **kwargs):
    record(file, any(c in mode for c in "wax+"))
    return real_open(file, mode, *args, **kwargs)

  def traced_os_open(path, flags_, *args, **kwargs):
    record(path, bool(flags_ & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)))
    return real_os_open(path, flags_, *args, **kwargs)

  builtins.open, os.open = traced_open, traced_os_open


def train(workdir: str, events=on_event) -> None:
  common = dict(
    loss_fn=loss_fn,
    batch_fn=batch_fn,
    optimizer=optax.adam(1e-2),
    num_steps=_NUM_STEPS.value,
    schedule_steps=SCHEDULE,
    log_every=10,
    resume_every=20,
    lr_fn=lambda step: 1e-2,
    on_event=events,
    eval_fn=lambda p: {
      "eval_loss": jax.vmap(loss_fn, (0, None))(p, batch_fn(jax.random.key(7)))
      if _SEEDS.value
      else loss_fn(p, batch_fn(jax.random.key(7)))
    },
  )
  if _SEEDS.value:
    keys = jax.random.split(jax.random.key(0), _SEEDS.value)
    loop.train_seeds(
      workdirs=[os.path.join(workdir, f"seed_{i}") for i in range(_SEEDS.value)],
      init_params=jax.vmap(init_params)(keys),
      data_keys=jax.random.split(jax.random.key(1), _SEEDS.value),
      config_jsons=[CONFIG] * _SEEDS.value,
      **common,
    )
  else:
    loop.train(
      workdir=workdir,
      init_params=init_params(jax.random.key(0)),
      data_key=jax.random.key(1),
      config_json=CONFIG,
      **common,
    )
  print(
    f"TRAINED {workdir} in process {jax.process_index()} of {jax.process_count()} on "
    f"{jax.device_count()} devices",
    flush=True,
  )


def run() -> None:
  if _REFERENCE.value:
    train(_REFERENCE.value, events=None)
  train(_WORKDIR.value)


def main(argv):
  del argv
  if _TRACE.value:
    trace_writes(os.path.abspath(_TRACE.value))
  launcher.run(run)


if __name__ == "__main__":
  app.run(main)
