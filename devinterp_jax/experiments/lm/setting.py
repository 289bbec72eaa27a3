"""The attention-only language-model setting as the analysis sees it (`SETTING`).

No training code is imported here: `analysis` reads LM runs through this module.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections

from devinterp_jax.analysis.run_data import Run, Setting
from devinterp_jax.data import lm_dataset
from devinterp_jax.experiments.lm import sections
from devinterp_jax.models.attention_lm import AttentionOnlyLM
from devinterp_jax.typing import Batch, Params


def eval_batch(run: Run, key: jax.Array, size: int, purpose: str) -> Batch:
  """The first `size` validation contexts (the same for every purpose and key)."""
  del key, purpose
  return {"tokens": sections.tokens(run, "validation")[:size]}


@functools.lru_cache(maxsize=8)
def _observed_logprobs(model: AttentionOnlyLM):
  def outputs(params: Params, tokens_BxT: jax.Array) -> jax.Array:
    # log p(observed next token) [B, T − 1]: log-softmax outputs are defined (logits only
    # up to a per-position constant), and one per position keeps F = B·(T − 1).
    return -model.per_token_loss(params, tokens_BxT)

  return outputs


def ed_probe(config: ml_collections.ConfigDict, workdir: str):
  """Essential dynamics' points: the observed next token's log-probability at every
  position of the first `config.train.ed_batch_size` validation contexts."""
  tokens = lm_dataset.load_run_tokens(config, workdir, "validation")
  size = config.train.get("ed_batch_size", 32)
  model = AttentionOnlyLM.from_config(config)
  fn = _observed_logprobs(model)  # pyright: ignore[reportArgumentType]  (flax Modules hash)
  return fn, jnp.asarray(tokens[:size])


SETTING = Setting(
  name="lm",
  make_model=AttentionOnlyLM.from_config,
  eval_batch=eval_batch,
  sections={"lm": sections.LM},
  default_sections=("lm", "hessian", "overlap", "heads", "ed"),
  description="attention-only language model",
  loss_label="validation loss (nats)",
  ed_probe=ed_probe,
)
