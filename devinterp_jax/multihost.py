"""Multi-process runs: initialisation, the leader, agreement and barriers with timeouts.

One process per host (a TPU VM of a pod slice, or localhost processes in
tests) runs the same program. The protocol every multi-process job follows:

  * process 0 (the *leader*) decides anything that branches (which chunks are
    finished, which pairs continue) and `agree` broadcasts it, so every
    process takes the same branches;
  * Orbax saves are collective (every process calls save and wait);
  * every other file (results, logs, figures) is written by the leader alone
    (`atomic` skips the write elsewhere), followed by a `barrier`.

No hangs. XLA collectives cannot time out, so host-side agreement goes
through the distributed client's key-value store and barriers, which take
timeouts (`TIMEOUT_S`). A failing process raises, `fail` posts its error in the
store (peers waiting in `agree`/`barrier` raise it at once) and the launcher
exits nonzero without the exit-time shutdown barrier; peers blocked in a
collective are stopped by the coordination service's heartbeat
(`heartbeat_timeout_s`).

With one process every function here is a cheap no-op, so library code calls
them unconditionally.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax

# Seconds a process waits for its peers in `agree` and `barrier` (a peer still
# compiling or restoring counts as alive). DEVINTERP_MULTIHOST_TIMEOUT_S overrides.
TIMEOUT_S = float(os.environ.get("DEVINTERP_MULTIHOST_TIMEOUT_S", 1800))
_ERROR_KEY = "devinterp/error"
_counter = [0]


class PeerError(RuntimeError):
  """Another process of this multi-process run failed or timed out."""


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  auto: bool = False,
  heartbeat_timeout_s: int = 100,
  shutdown_timeout_s: int = 300,
  initialization_timeout_s: int = 300,
) -> bool:
  """Calls `jax.distributed.initialize` (returns whether it did).

  With a coordinator address, `num_processes` and `process_id` are required
  (localhost tests, GPU clusters). With `auto` and no address, JAX detects
  the cluster (TPU VM pod slices, SLURM). Neither: a single process. Already
  initialised: nothing to do (returns False).
  """
  if jax.distributed.is_initialized():
    return False
  if coordinator_address is None and not auto:
    if num_processes not in (None, 1) or process_id not in (None, 0):
      raise ValueError(
        "--num_processes/--process_id need --coordinator_address "
        "(or --multihost for a TPU pod slice, where JAX detects them)"
      )
    return False
  if coordinator_address is not None:
    if num_processes is None or process_id is None:
      raise ValueError(
        f"coordinator_address {coordinator_address!r} needs num_processes and "
        f"process_id, got {num_processes!r} and {process_id!r}"
      )
    if not 0 <= process_id < num_processes:
      raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
  kw: dict[str, Any] = dict(
    heartbeat_timeout_seconds=int(heartbeat_timeout_s),
    shutdown_timeout_seconds=int(shutdown_timeout_s),
    initialization_timeout=int(initialization_timeout_s),
  )
  if coordinator_address is None:
    jax.distributed.initialize(**kw)
  else:
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **kw)
  return True


def _started() -> bool:
  """Whether asking JAX for the process layout is free: `jax.distributed` is up or the
  backends exist. Otherwise asking would start the backends, after which
  `jax.distributed.initialize` refuses to run, so a write before any JAX work (a
  file-only tool, a launcher before `initialize`) counts as single-process."""
  from jax._src import xla_bridge

  return jax.distributed.is_initialized() or xla_bridge.backends_are_initialized()


def process_index() -> int:
  return jax.process_index() if _started() else 0


def process_count() -> int:
  return jax.process_count() if _started() else 1


def is_multiprocess() -> bool:
  return process_count() > 1


def is_leader() -> bool:
  """Process 0: the one that decides and writes non-Orbax files."""
  return process_index() == 0


def _client():
  from jax._src import distributed  # the store and barriers have no public API yet

  client = distributed.global_state.client
  if client is None:
    raise RuntimeError(
      "a multi-process run without jax.distributed.initialize: call "
      "devinterp_jax.multihost.initialize first"
    )
  return client


def _next(name: str) -> str:
  """A key unique to this call site's n-th use; equal across processes that make the
  same sequence of calls (which the protocol guarantees)."""
  _counter[0] += 1
  return f"devinterp/{_counter[0]:06d}/{name}"


def _peer_error() -> str | None:
  try:
    return _client().key_value_try_get(_ERROR_KEY)
  except Exception:  # not set
    return None


def _raise_peer(what: str, err: Exception) -> None:
  posted = _peer_error()
  if posted:
    raise PeerError(f"{what}: another process failed: {posted}") from None
  raise PeerError(
    f"{what} did not complete within {TIMEOUT_S:.0f}s on process "
    f"{process_index()} of {process_count()} ({type(err).__name__}: {err}); "
    f"a peer is stuck or gone"
  ) from None


def agree(name: str, value: Any = None, timeout_s: float | None = None) -> Any:
  """The leader's `value` (JSON-serialisable), on every process."""
  if not is_multiprocess():
    return value
  key = _next(name)
  client = _client()
  if is_leader():
    client.key_value_set(key, json.dumps(value))
    return value
  timeout_ms = int(1000 * (TIMEOUT_S if timeout_s is None else timeout_s))
  step_ms = 2000
  waited = 0
  while True:  # poll in slices, so a posted error ends the wait early
    try:
      return json.loads(client.blocking_key_value_get(key, min(step_ms, timeout_ms - waited)))
    except Exception as e:
      waited += step_ms
      posted = _peer_error()
      if posted or waited >= timeout_ms:
        _raise_peer(f"agreeing on {name!r}", e)


def gather(name: str, value: Any, timeout_s: float | None = None) -> list[Any]:
  """Every process's `value` (JSON-serialisable), in process order, on every process."""
  if not is_multiprocess():
    return [value]
  key = _next(name)
  client = _client()
  client.key_value_set(f"{key}/{process_index()}", json.dumps(value))
  out = []
  for i in range(process_count()):
    if i == process_index():
      out.append(value)
      continue
    timeout_ms = int(1000 * (TIMEOUT_S if timeout_s is None else timeout_s))
    waited, step_ms = 0, 2000
    while True:
      try:
        out.append(
          json.loads(client.blocking_key_value_get(f"{key}/{i}", min(step_ms, timeout_ms - waited)))
        )
        break
      except Exception as e:
        waited += step_ms
        if _peer_error() or waited >= timeout_ms:
          _raise_peer(f"gathering {name!r}", e)
  return out


def barrier(name: str, timeout_s: float | None = None) -> None:
  """Every process waits here until all arrive (raises after the timeout)."""
  if not is_multiprocess():
    return
  key = _next(name)
  try:
    _client().wait_at_barrier(key, int(1000 * (TIMEOUT_S if timeout_s is None else timeout_s)))
  except Exception as e:
    _raise_peer(f"barrier {name!r}", e)


def fail(error: BaseException) -> None:
  """Posts this process's error for its peers (best effort; never raises)."""
  if not is_multiprocess():
    return
  try:
    _client().key_value_set(
      _ERROR_KEY, f"process {process_index()}: {type(error).__name__}: {error}"[:2000]
    )
  except Exception:
    pass


def allgather(tree: Any) -> Any:
  """Host numpy copies of (possibly multi-process) global arrays."""
  if not is_multiprocess():
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  return jax.tree.map(
    lambda x: (
      multihost_utils.process_allgather(x, tiled=True)
      if isinstance(x, jax.Array) and not x.is_fully_addressable
      else jax.device_get(x)
    ),
    tree,
  )
