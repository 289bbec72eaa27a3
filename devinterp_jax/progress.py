"""Honest progress lines: a rate and an ETA that exclude compilation.

The first call of a jitted program compiles it, so the first timed interval of
a run (often minutes on an accelerator, for work that then takes seconds) says
nothing about the steady rate. `Progress` therefore

* treats everything up to the end of warm-up as compilation: warm-up ends at
  `warmup_done()`, or, if that is never called, at the first `update()`;
* measures the rate over the units done since warm-up ended (not since the
  start), and quotes no rate or ETA until at least one post-warm-up interval
  has been timed (the line then reads "ETA after warm-up");
* logs a line whenever it is due: at the first update (it reports how long
  warm-up took), when the work is complete, when the caller forces one, and
  otherwise whenever `every_s` seconds have passed since the last line.

It never touches the device: the caller calls `update` at points where the
host already has the results (e.g. after each jitted segment), so that is the
granularity of the lines. Typical use::

    progress = Progress(total=num_steps, what="train")
    progress.start()
    for end in segment_ends:
      state, loss = segment(state, end)   # returns to the host
      progress.update(end, extra=f"loss {float(loss):.4f}")
"""

from __future__ import annotations

import time
from typing import Callable

from absl import logging


def format_eta(seconds: float | None) -> str:
  """A duration for humans: "1h02m", "3m05s", "42s" ("?" for None)."""
  if seconds is None:
    return "?"
  s = max(int(round(seconds)), 0)
  if s >= 3600:
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
  if s >= 60:
    return f"{s // 60}m{s % 60:02d}s"
  return f"{s}s"


def _format_rate(rate: float) -> str:
  if rate >= 100:
    return f"{rate:.0f}"
  if rate >= 10:
    return f"{rate:.1f}"
  return f"{rate:.3g}"


class Progress:
  """Rate and ETA of `total` units of work, logged at most `every_s` apart.

  Args:
    total: units in the whole job (e.g. num_steps; the end of the count).
    what: name of the job, the line's prefix ("train", "LLC sweep").
    unit: what the units are called in the line ("steps", "chain-steps").
    every_s: longest wall time between two lines (when `update` is called
      often enough for that; it never logs on its own).
    log: called with each line (one string argument).
    clock: seconds, monotonic (tests inject a fake one).
  """

  def __init__(
    self,
    total: int,
    what: str,
    unit: str = "steps",
    every_s: float = 15.0,
    log: Callable[[str], None] = logging.info,
    clock: Callable[[], float] = time.monotonic,
  ):
    self.total = int(total)
    self.what = what
    self.unit = unit
    self.every_s = float(every_s)
    self._log = log
    self._clock = clock
    self._t_start: float | None = None
    self._done_start = 0
    self._t_warm: float | None = None  # end of warm-up (compilation)
    self._done_warm = 0
    self._t_last: float | None = None  # last update
    self._done_last = 0
    self._t_line: float | None = None  # last logged line
    # False while more work may be added (an adaptive sweep): reaching `total` then
    # means "this round is done", not "the job is done".
    self.final = True

  # -- recording -------------------------------------------------------------------------

  def start(self, done: int = 0) -> "Progress":
    """Starts the clock; `done` units are already complete (a resumed run)."""
    self._t_start = self._t_line = self._t_last = self._clock()
    self._done_start = self._done_last = int(done)
    self._t_warm = None
    return self

  def warmup_done(self, done: int | None = None) -> None:
    """Marks the end of compilation: the rate counts only work after this call.

    `done` defaults to the count of the last update (or of `start`).
    """
    if self._t_start is None:
      self.start()
    self._t_warm = self._clock()
    self._done_warm = self._done_last if done is None else int(done)

  def update(self, done: int, extra: str = "", force: bool = False) -> str | None:
    """Records that `done` units are complete; logs and returns a line when due.

    Due: at the first update, at completion (`done >= total`), when `force`,
    or when `every_s` has passed since the last line. Returns None otherwise.
    """
    if self._t_start is None:
      self.start()
    now = self._clock()
    first = self._t_warm is None
    self._t_last, self._done_last = now, int(done)
    if first:  # the interval up to here included compilation: the rate starts now
      self._t_warm, self._done_warm = now, int(done)
    assert self._t_line is not None  # set by start
    due = (
      force or first or (done >= self.total and self.final) or now - self._t_line >= self.every_s
    )
    if not due:
      return None
    self._t_line = now
    line = self.line(extra)
    self._log(line)
    return line

  # -- reading -----------------------------------------------------------------------------

  @property
  def elapsed_s(self) -> float:
    """Wall time since `start` (at the last update)."""
    if self._t_start is None or self._t_last is None:  # start sets both
      return 0.0
    return self._t_last - self._t_start

  @property
  def rate(self) -> float | None:
    """Units per second since warm-up ended; None until an interval after it is timed."""
    if self._t_warm is None or self._t_last is None:
      return None
    dt, dn = self._t_last - self._t_warm, self._done_last - self._done_warm
    if dt <= 0 or dn <= 0:
      return None
    return dn / dt

  @property
  def eta_s(self) -> float | None:
    """Seconds left at the post-warm-up rate (from the last update); None before that."""
    rate = self.rate
    if rate is None:
      return None
    return max(self.total - self._done_last, 0) / rate

  def line(self, extra: str = "") -> str:
    """The progress line for the last update."""
    parts = [f"{self.what}: {self._done_last}/{self.total} {self.unit}"]
    if extra:
      parts.append(extra)
    rate = self.rate
    if self._done_last >= self.total and not self.final:
      parts.append(f"elapsed {format_eta(self.elapsed_s)}, checking convergence")
    elif self._done_last >= self.total:
      parts.append(f"done in {format_eta(self.elapsed_s)}")
      if rate is not None:
        parts.append(f"{_format_rate(rate)} {self.unit}/s after warm-up")
    elif rate is None:
      parts.append(f"elapsed {format_eta(self.elapsed_s)}, ETA after warm-up")
    else:
      parts.append(f"{_format_rate(rate)} {self.unit}/s")
      parts.append(f"ETA {format_eta(self.eta_s)}")
    return "  ".join(parts)
