"""Timing helpers shared by the benchmarks: one call, and the scanned fwd+bwd lower bound."""

import time

import jax


def time_call(fn, *args) -> float:
  """Seconds for one call, waiting for the result (compile beforehand)."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0


def scanned_fwd_bwd(loss_fn, length: int):
  """A jitted `(params, batch) -> losses`: `length` forward+backward passes in a
  `lax.scan`, with params carried through a tiny gradient step so that XLA cannot
  hoist the pass out of the loop. Time per step = the SGLD step's lower bound."""

  def run(p, b):
    def body(p, _):
      loss, grads = jax.value_and_grad(loss_fn)(p, b)
      return jax.tree.map(lambda w, g: w - 1e-12 * g, p, grads), loss

    return jax.lax.scan(body, p, None, length=length)[1]

  return jax.jit(run)
