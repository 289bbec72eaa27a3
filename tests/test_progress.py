"""Progress: warm-up is excluded from the rate, the ETA is honest, lines come often enough."""

import logging

import pytest

from devinterp_jax.progress import Progress, format_eta


class Clock:
  def __init__(self, t=1000.0):
    self.t = t

  def __call__(self):
    return self.t

  def advance(self, dt):
    self.t += dt


def make(total=10_000, every_s=15.0, **kw):
  clock, lines = Clock(), []
  progress = Progress(total, "train", every_s=every_s, log=lines.append, clock=clock, **kw)
  return progress, clock, lines


def test_format_eta():
  assert format_eta(42) == "42s"
  assert format_eta(42.4) == "42s"
  assert format_eta(185) == "3m05s"
  assert format_eta(3720) == "1h02m"
  assert format_eta(26 * 3600 + 5 * 60) == "26h05m"
  assert format_eta(0) == "0s" and format_eta(-3) == "0s"
  assert format_eta(None) == "?"


def test_eta_is_none_during_warmup():
  progress, clock, lines = make()
  progress.start()
  assert progress.rate is None and progress.eta_s is None
  clock.advance(600.0)  # a 10-minute compile for 100 steps
  line = progress.update(100)
  assert progress.rate is None and progress.eta_s is None
  assert line is not None and "ETA after warm-up" in line and "steps/s" not in line
  assert lines == [line]


def test_compile_time_does_not_inflate_eta():
  progress, clock, lines = make(total=10_000)
  progress.start()
  clock.advance(600.0)  # first interval: compilation + 100 steps
  progress.update(100)
  clock.advance(1.0)  # then 100 steps/s
  progress.update(200)
  assert progress.rate == pytest.approx(100.0)
  assert progress.eta_s == pytest.approx(98.0)  # 9800 left at 100/s, not hours
  line = progress.update(200, force=True)
  assert "100 steps/s" in line and "ETA 1m38s" in line


def test_eta_is_remaining_over_rate_since_warmup():
  progress, clock, _ = make(total=5_000)
  progress.start()
  clock.advance(30.0)
  progress.update(50)
  for done in range(100, 2_001, 50):  # 50 steps per 0.25 s, i.e. 200 steps/s
    clock.advance(0.25)
    progress.update(done)
    assert progress.rate == pytest.approx(200.0)
    assert progress.eta_s == pytest.approx((5_000 - done) / progress.rate)


def test_explicit_warmup_done_starts_the_rate():
  progress, clock, _ = make(total=1_000)
  progress.start()
  clock.advance(50.0)
  progress.warmup_done()  # compiled, nothing done yet
  clock.advance(2.0)
  progress.update(100)
  assert progress.rate == pytest.approx(50.0)
  assert progress.eta_s == pytest.approx(18.0)


def test_resumed_start_counts_from_the_resume_point():
  progress, clock, _ = make(total=1_000)
  progress.start(600)
  clock.advance(20.0)
  progress.update(700)
  clock.advance(1.0)
  progress.update(800)
  assert progress.rate == pytest.approx(100.0)
  assert progress.eta_s == pytest.approx(2.0)


def test_a_line_at_least_every_every_s():
  progress, clock, lines = make(total=100_000, every_s=15.0)
  progress.start()
  clock.advance(5.0)
  progress.update(10)  # first update: always a line
  times = [clock.t]
  for done in range(20, 20_001, 10):  # updates every 0.7 s
    clock.advance(0.7)
    if progress.update(done) is not None:
      times.append(clock.t)
  assert len(lines) == len(times) > 10
  gaps = [b - a for a, b in zip(times, times[1:])]
  assert max(gaps) <= 15.0 + 0.7 + 1e-9  # due at 15 s, seen at the next update
  assert min(gaps) >= 15.0 - 1e-9  # and not more often than that


def test_completion_and_force_always_log():
  progress, clock, lines = make(total=300)
  progress.start()
  clock.advance(1.0)
  progress.update(100)
  clock.advance(0.1)
  assert progress.update(150) is None
  assert progress.update(150, force=True) is not None
  clock.advance(0.1)
  line = progress.update(300)
  assert line is not None and "done in" in line and len(lines) == 3


def test_extra_and_unit_in_line():
  clock, lines = Clock(), []
  progress = Progress(50, "LLC sweep", unit="chain-steps", log=lines.append, clock=clock)
  progress.start()
  clock.advance(3.0)
  progress.update(10, extra="chunk 1/5")
  clock.advance(20.0)
  progress.update(20, extra="chunk 2/5")
  assert lines[0].startswith("LLC sweep: 10/50 chain-steps  chunk 1/5")
  assert "0.5 chain-steps/s" in lines[1] and "ETA 1m00s" in lines[1]


def test_training_loop_quotes_no_eta_before_warmup(tmp_path, caplog):
  """The loop's first line (compilation included) carries no ETA; later log steps do."""
  import jax
  import jax.numpy as jnp
  import optax
  from devinterp_jax.training import loop

  caplog.set_level(logging.INFO)
  loop.train(
    workdir=str(tmp_path / "run"),
    init_params={"w": jnp.ones(3)},
    loss_fn=lambda p, b: jnp.sum(jnp.square(p["w"] - b)),
    batch_fn=lambda k: jax.random.normal(k, (3,)),
    optimizer=optax.sgd(0.01),
    num_steps=40,
    schedule_steps=[10, 40],
    data_key=jax.random.key(0),
    log_every=10,
    resume_every=0,
  )
  train_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train: ")]
  assert train_lines[0].startswith("train: 10/40 steps  loss ")
  assert "ETA after warm-up" in train_lines[0]
  assert "steps/s" in train_lines[1] and "ETA " in train_lines[1]
  assert "done in" in train_lines[-1]
