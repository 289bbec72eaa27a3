"""What every launcher does around its one library call (`launch/*.py`).

`run(fn, ...)` starts `jax.distributed` when the multi-process flags ask for
it, quiets Orbax's per-save log lines and calls `fn`. When `fn` raises, the
error propagates as usual (absl prints it and exits with code 1), and a daemon
watchdog ends the process with exit code 1 if the interpreter has not exited
`grace_s` seconds later: a background thread of a library (e.g. one waiting
for a signal of a failed asynchronous checkpoint save) can otherwise keep a
failed job alive forever, and a cluster job would hang instead of failing.

Multi-process runs (flags defined here, so every launcher accepts them):

  # one process per host; localhost tests and GPU clusters name the coordinator
  python launch/train.py ... --coordinator_address=host0:1234 --num_processes=2 --process_id=0
  # TPU VM pod slices (and SLURM): JAX detects the cluster
  python launch/train.py ... --multihost

A process whose `fn` raises logs the traceback, posts the error for its peers
(`multihost.fail`: a peer waiting in `multihost.agree`/`barrier` raises it at
once) and exits with `os._exit` at once: the normal exit would wait in
`jax.distributed`'s shutdown barrier (`--shutdown_timeout_s`) for peers that
may be stuck in a collective. A peer stuck in a collective is ended by the
coordination service once the failed process misses its heartbeats
(`--heartbeat_timeout_s`).
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from typing import Any, Callable

from absl import flags, logging

from devinterp_jax import multihost
from devinterp_jax.storage.checkpoints import quiet_orbax_logs

EXIT_GRACE_S = 60.0

_COORDINATOR = flags.DEFINE_string(
  "coordinator_address",
  None,
  "Multi-process run: host:port of process 0's coordination "
  "service (with --num_processes and --process_id).",
)
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", None, "Multi-process run: the number of processes."
)
_PROCESS_ID = flags.DEFINE_integer(
  "process_id", None, "Multi-process run: this process's index (0 leads)."
)
_MULTIHOST = flags.DEFINE_bool(
  "multihost",
  False,
  "Multi-process run with the cluster detected by JAX "
  "(jax.distributed.initialize() without arguments: TPU VM pod slices, SLURM).",
)
_HEARTBEAT = flags.DEFINE_integer(
  "heartbeat_timeout_s",
  100,
  "Multi-process run: seconds without a heartbeat after "
  "which a process counts as dead and the job is stopped.",
)
_SHUTDOWN = flags.DEFINE_integer(
  "shutdown_timeout_s",
  300,
  "Multi-process run: seconds a finished process waits for the others at exit.",
)


def _flush() -> None:
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()


def _exit_later(grace_s: float, code: int) -> None:
  def watchdog():
    time.sleep(grace_s)
    alive = [
      t.name for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon
    ]
    logging.error(
      "The job failed and background threads %s still keep the process alive "
      "after %.0fs; exiting with code %d.",
      alive,
      grace_s,
      code,
    )
    _flush()
    os._exit(code)

  threading.Thread(target=watchdog, name="exit_watchdog", daemon=True).start()


def initialize_from_flags() -> bool:
  """`multihost.initialize` from the flags (a no-op without them, when the flags are
  not parsed, or when `jax.distributed` is already up); returns whether it started it."""
  if not flags.FLAGS.is_parsed():
    return False
  return multihost.initialize(
    _COORDINATOR.value,
    _NUM_PROCESSES.value,
    _PROCESS_ID.value,
    auto=_MULTIHOST.value,
    heartbeat_timeout_s=_HEARTBEAT.value,
    shutdown_timeout_s=_SHUTDOWN.value,
  )


def run(fn: Callable[..., Any], *args, grace_s: float = EXIT_GRACE_S, **kwargs) -> Any:
  """Calls `fn(*args, **kwargs)` (after starting `jax.distributed` if the flags ask).

  On an exception, a single process re-raises it and makes sure it exits
  (code 1) within `grace_s` seconds; a process of a multi-process run logs it,
  posts it for its peers and exits at once (module docstring).
  """
  quiet_orbax_logs()
  try:
    initialize_from_flags()
    return fn(*args, **kwargs)
  except BaseException as e:
    code = e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 1
    if code and multihost.is_multiprocess():
      logging.error(
        "Process %d of %d failed; exiting with code %d:\n%s",
        multihost.process_index(),
        multihost.process_count(),
        code,
        traceback.format_exc(),
      )
      multihost.fail(e)
      _flush()
      os._exit(code)
    if code:
      _exit_later(grace_s, code)
    raise
