"""What every launcher does around its one library call (`launch/*.py`).

`run(fn, ...)` quiets Orbax's per-save log lines and calls `fn`. When `fn`
raises, the error propagates as usual (absl prints it and exits with code 1),
and a daemon watchdog ends the process with exit code 1 if the interpreter has
not exited `grace_s` seconds later: a background thread of a library (e.g. one
waiting for a signal of a failed asynchronous checkpoint save) can otherwise
keep a failed job alive forever, and a cluster job would hang instead of
failing.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Callable

from absl import logging

from devinterp_jax.storage.checkpoints import quiet_orbax_logs

EXIT_GRACE_S = 60.0


def _exit_later(grace_s: float, code: int) -> None:
  def watchdog():
    time.sleep(grace_s)
    alive = [t.name for t in threading.enumerate()
             if t is not threading.current_thread() and not t.daemon]
    logging.error("The job failed and background threads %s still keep the process alive "
                  "after %.0fs; exiting with code %d.", alive, grace_s, code)
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

  threading.Thread(target=watchdog, name="exit_watchdog", daemon=True).start()


def run(fn: Callable[..., Any], *args, grace_s: float = EXIT_GRACE_S, **kwargs) -> Any:
  """Calls `fn(*args, **kwargs)`; on an exception, re-raises it and makes sure the
  process exits (code 1) within `grace_s` seconds."""
  quiet_orbax_logs()
  try:
    return fn(*args, **kwargs)
  except BaseException as e:
    code = e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 1
    if code:
      _exit_later(grace_s, code)
    raise
