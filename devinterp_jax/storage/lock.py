"""One advisory lock per workdir, held for a run's lifetime.

Every step that writes into a workdir (training, the LLC sweeps, calibration,
the report) holds `<workdir>/.lock`, so a second launch on a busy workdir fails
at once with `WorkdirLockedError` naming the holder (pid, host, start time,
command) instead of doing the work twice or interleaving log rows.

The lock is an `fcntl.flock` on the file, which the kernel (or the network
filesystem) releases when the holder dies, plus the holder's identity written
into the file (pid, host, start time, command, and the lock file's own inode).
Once the flock is granted, a holder still named in the file is stale: a
SIGKILLed run, a run preempted on another host, or a workdir copied with its
lock file (another inode). It is taken over with a warning. The one exception
is a live process on this host that holds this very file: then the filesystem
ignores flock, and the launch is refused. Locks are re-entrant within a
process: the main job holds the lock across training, the sweep and the report.

A multi-process run (one job, several hosts sharing the workdir) is one holder:
its leader (process 0) takes the file lock and the other processes take none,
so they are never refused by their own leader, and a second job on the
workdir is refused at its leader (which fails, and with it the whole job:
`multihost`, `experiments/launcher.py`). The non-leaders write no files
outside Orbax's collective saves, so they need no lock of their own.

An object-store workdir (`gs://…`, `paths`) has no flock. There the lock is a
lease: the holder writes `.lock` naming itself and renews its time every
`LEASE_S / 4` seconds from a daemon thread; a launch finding a lease renewed
within `LEASE_S` is refused, an older one (a holder that died) is taken over
with a warning. Without a compare-and-swap two launches in the same second
could both write: each reads the object back after `SETTLE_S` and the one whose
name is gone steps back. This is weaker than the kernel lock and untested
against a real bucket (tests/test_paths.py uses an in-memory stand-in).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import inspect
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Callable, Iterator

from absl import logging

from devinterp_jax import multihost, paths

LOCK_NAME = ".lock"


class WorkdirLockedError(RuntimeError):
  """Another process holds the workdir's lock."""


LEASE_S = 120.0  # an object-store lock not renewed for this long is stale
SETTLE_S = 2.0  # wait before reading an object-store lock back

_held: dict[str, tuple[Callable[[], None] | None, int]] = {}  # key -> (release, depth)
_mutex = threading.Lock()


def _start_time(pid: int) -> int | None:
  """The process's start time in clock ticks since boot (Linux), or None."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return int(f.read().rsplit(")", 1)[1].split()[19])
  except (OSError, ValueError, IndexError):
    return None


def _pid_alive(pid: int, start_time: int | None = None) -> bool:
  """Whether `pid` runs here (and, if known, is the same process, not a reused pid)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    pass
  now = _start_time(pid)
  return start_time is None or now is None or now == start_time


def _read_holder(fd: int) -> dict | None:
  os.lseek(fd, 0, os.SEEK_SET)
  raw = b""
  while chunk := os.read(fd, 65536):
    raw += chunk
  if not raw.strip():
    return None
  try:
    holder = json.loads(raw)
  except ValueError:
    return {"unreadable": raw[:200].decode(errors="replace")}
  return holder if isinstance(holder, dict) else {"unreadable": repr(holder)[:200]}


def describe(holder: dict | None) -> str:
  if not holder:
    return "an unknown process"
  if "unreadable" in holder:
    return f"an unknown process (lock file content {holder['unreadable']!r})"
  started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("time", 0)))
  return (
    f"pid {holder.get('pid')} on host {holder.get('host')!r} since {started} "
    f"({' '.join(holder.get('argv', []))[:300]})"
  )


def _acquire(path: str, workdir: str) -> int:
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise WorkdirLockedError(
      f"cannot create the lock file {path} ({e.strerror}): every step that writes into a "
      f"workdir holds its lock; make {workdir!r} writable, or copy the run elsewhere."
    ) from e
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise
      raise WorkdirLockedError(
        f"workdir {workdir!r} is in use by {describe(_read_holder(fd))}: a second run on "
        f"it would repeat the work and mix its files. Wait for that run, stop it, or use "
        f"another --workdir."
      ) from None
    holder = _read_holder(fd)
    me = socket.gethostname()
    st = os.fstat(fd)
    inode = [st.st_dev, st.st_ino]
    if holder and "unreadable" not in holder and holder.get("pid") != os.getpid():
      same_file = holder.get("inode") == inode
      if (
        same_file
        and holder.get("host") == me
        and _pid_alive(int(holder.get("pid", -1)), holder.get("start_time"))
      ):
        # flock granted although the holder lives: the filesystem ignores flock.
        raise WorkdirLockedError(
          f"workdir {workdir!r} is in use by {describe(holder)} (this filesystem does not "
          f"enforce file locks). Wait for that run, stop it, or use another --workdir."
        )
      why = (
        "the lock file was copied from another workdir"
        if not same_file
        else "that process is gone"
        if holder.get("host") == me
        else "it no longer holds the lock"
      )
      logging.warning(
        "Taking over the stale lock of %s on %s (%s).", describe(holder), workdir, why
      )
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(
      fd,
      json.dumps(
        {
          "pid": os.getpid(),
          "host": me,
          "time": time.time(),
          "start_time": _start_time(os.getpid()),
          "inode": inode,
          "argv": sys.argv,
        }
      ).encode(),
    )
    os.fsync(fd)
    return fd
  except BaseException:
    os.close(fd)
    raise


@contextlib.contextmanager
def hold(workdir: str, create: bool = False) -> Iterator[None]:
  """Holds the lock of `workdir` for the `with` block (`create`: make the workdir
  first, as training does; otherwise it must exist)."""
  if create:
    paths.makedirs(workdir)
  elif not paths.isdir(workdir):
    raise FileNotFoundError(
      f"workdir {workdir!r} does not exist (train first, e.g. launch/train.py, or check the path)"
    )
  key = paths.canonical(workdir)
  with _mutex:
    if key in _held:
      release, depth = _held[key]
      _held[key] = (release, depth + 1)
    else:
      # Only the leader of a multi-process run locks (module docstring).
      release = None
      if multihost.is_leader():
        release = (
          _file_lock(paths.join(key, LOCK_NAME), workdir)
          if paths.is_local(key)
          else _lease(paths.join(key, LOCK_NAME), workdir)
        )
      _held[key] = (release, 1)
  try:
    yield
  finally:
    with _mutex:
      release, depth = _held[key]
      if depth > 1:
        _held[key] = (release, depth - 1)
      else:
        del _held[key]
        if release is not None:
          release()


def _file_lock(path: str, workdir: str) -> Callable[[], None]:
  fd = _acquire(path, workdir)

  def release() -> None:
    with contextlib.suppress(OSError):
      os.ftruncate(fd, 0)  # a clean exit leaves no holder behind
    os.close(fd)  # releases the flock

  return release


def _read_lease(path: str) -> dict | None:
  try:
    holder = json.loads(paths.read_text(path))
  except FileNotFoundError:
    return None
  except (ValueError, UnicodeDecodeError):
    return {"unreadable": "not JSON"}
  return holder if isinstance(holder, dict) else {"unreadable": repr(holder)[:80]}


def _lease(path: str, workdir: str) -> Callable[[], None]:
  """The object-store lock (module docstring): returns its release."""
  if paths.exists(path):
    holder = _read_lease(path)
    if holder and "unreadable" not in holder:
      age = time.time() - float(holder.get("time", 0))
      if age < float(holder.get("lease_s", LEASE_S)):
        raise WorkdirLockedError(
          f"workdir {workdir!r} is in use by {describe(holder)}, whose lease was renewed "
          f"{age:.0f} s ago: a second run on it would repeat the work and mix its files. "
          f"Wait for that run, stop it (its lease then expires within "
          f"{holder.get('lease_s', LEASE_S):.0f} s), or use another --workdir."
        )
      logging.warning(
        "Taking over the stale lease of %s on %s (not renewed for %.0f s).",
        describe(holder),
        workdir,
        age,
      )
  token = uuid.uuid4().hex
  record = {
    "pid": os.getpid(),
    "host": socket.gethostname(),
    "argv": sys.argv,
    "token": token,
    "lease_s": LEASE_S,
  }
  write = lambda: paths.write_object(path, json.dumps({**record, "time": time.time()}).encode())
  write()
  time.sleep(SETTLE_S)
  holder = _read_lease(path)
  if not holder or holder.get("token") != token:
    raise WorkdirLockedError(
      f"workdir {workdir!r} was locked by {describe(holder or {})} at the same moment; "
      f"that run keeps it. Wait for it, or use another --workdir."
    )
  stop = threading.Event()

  def renew() -> None:
    while not stop.wait(LEASE_S / 4):
      with contextlib.suppress(Exception):  # a missed renewal is retried next period
        write()

  thread = threading.Thread(target=renew, name="devinterp-lock-lease", daemon=True)
  thread.start()

  def release() -> None:
    stop.set()
    thread.join()
    holder = _read_lease(path)
    if holder and holder.get("token") == token:
      paths.remove(path)

  return release


def holding(fn: Callable) -> Callable:
  """Decorates a function whose `workdir` argument must exist: it runs holding that
  workdir's lock (`hold`)."""
  signature = inspect.signature(fn)
  if "workdir" not in signature.parameters:
    raise TypeError(f"{fn.__qualname__} has no 'workdir' parameter to lock")

  @functools.wraps(fn)
  def locked(*args, **kwargs):
    with hold(signature.bind(*args, **kwargs).arguments["workdir"]):
      return fn(*args, **kwargs)

  return locked


@contextlib.contextmanager
def hold_all(workdirs, create: bool = False) -> Iterator[None]:
  """Holds the locks of several workdirs (e.g. one per seed)."""
  with contextlib.ExitStack() as stack:
    for w in workdirs:
      stack.enter_context(hold(w, create=create))
    yield


def is_held(workdir: str) -> bool:
  """Whether this process holds the lock of `workdir` (a non-leader of a multi-process
  run: whether it is inside `hold`, its leader holding the file lock)."""
  return paths.canonical(workdir) in _held
