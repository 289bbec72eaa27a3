"""The attention-only language-model pipeline (paper §6): data → train → LLC → report.

Every step is a function of (config, workdir), as for in-context regression:

  prepare_data(config, workdir)   # the embedded synthetic corpus → <workdir>/data (array_record)
  train(config, workdir)          # resumable, streams Orbax checkpoints
  estimate(config, workdir)       # LLC of every scheduled checkpoint (resumable)
  run(config, workdir)            # the main job: all of it, llc.csv, plots, analysis report

Data: splits 'train', 'sgld' and 'validation' of an array_record dataset read with
`tfds.data_source` (`data/lm_dataset.py`): with `config.data.source='synthetic'` the
embedded corpus (`data/synthetic_text.py`) is written to <workdir>/data first;
with 'tfds', `config.data.data_dir` / `config.data.name` name a dataset a user built
from text shards (`lm_dataset.build_text_dataset`). The splits are read into memory
(the CPU-sized corpora are a few MB); training minibatches are
`tokens[randint(fold_in(data_key, step))]`, so resuming gives the same batches.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from devinterp_jax import atomic, config_checks, multihost, paths
from devinterp_jax.data import lm_dataset, synthetic_text
from devinterp_jax.analysis import essential_dynamics
from devinterp_jax.experiments import llc_sweep
from devinterp_jax.experiments.lm.setting import SETTING
from devinterp_jax.models.attention_lm import AttentionOnlyLM
from devinterp_jax.storage import lock
from devinterp_jax.training import loop, schedules

# Key streams derived from config.seed.
_INIT, _DATA = range(2)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks every section before any work starts (`config_checks.ConfigError`)."""
  check = config_checks.check_fields
  check(config, "config", {"seed": "int>=0"})
  check(
    config.model,
    "config.model",
    {
      "vocab_size": "int>=2",
      "context_length": "int>=2",
      "d_model": "int>=1",
      "num_heads": "int>=1",
      "num_layers": "int>=1",
    },
  )
  if config.model.d_model % config.model.num_heads:
    config_checks.fail(
      "config.model.num_heads",
      config.model.num_heads,
      f"a divisor of config.model.d_model = {config.model.d_model}",
    )
  check(
    config.data,
    "config.data",
    {
      "source": ("tfds", "synthetic"),
      "corpus": tuple(synthetic_text.CORPORA),
      "corpus_seed": "int>=0",
      "copy_prob": "unit",
      "code_fraction": "unit",
      "num_train": "int>=1",
      "num_sgld": "int>=1",
      "num_validation": "int>=1",
    },
  )
  check(
    config.train,
    "config.train",
    {
      "num_steps": "int>=1",
      "batch_size": "int>=1",
      "lr": "num>0",
      "b1": "unit_right_open",
      "b2": "unit_right_open",
      "eps": "num>0",
      "weight_decay": "num>=0",
      "grad_clip": "num>0",
      "n_log": "int>=0",
      "linear_every": "int>=0",
      "log_every": "int>=0",
      "resume_every": "int>=0",
      "eval_batch_size": "int>=1",
      "ed_every": "int>=0",
      "ed_batch_size": "int>=1",
      "paper_parity": (True, False),
    },
  )
  llc_sweep.validate_sampling_sections(config)


def make_model(config: ml_collections.ConfigDict) -> AttentionOnlyLM:
  return AttentionOnlyLM.from_config(config)


make_corpus = synthetic_text.corpus_from_config


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW with gradient clipping and a constant learning rate (App. F.1)."""
  c = config.train
  return optax.chain(
    optax.clip_by_global_norm(c.grad_clip),
    optax.adamw(c.lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay),
  )


def schedule_steps(config: ml_collections.ConfigDict) -> np.ndarray:
  return schedules.checkpoint_steps(
    config.train.num_steps,
    config.train.n_log,
    linear_every=config.train.linear_every,
    paper_parity=config.train.paper_parity,
  )


def _key(config, stream: int) -> jax.Array:
  return jax.random.fold_in(jax.random.key(config.seed), stream)


data_location = lm_dataset.run_location


def prepare_data(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes the synthetic corpus's splits to <workdir>/data once; returns the data dir.

  In a multi-process run the leader writes them and the others wait for it.
  """
  data_dir = (
    _prepare_data(config, workdir) if multihost.is_leader() else data_location(config, workdir)[0]
  )
  multihost.barrier("lm_data")  # a no-op in a single process
  return data_dir


def _prepare_data(config: ml_collections.ConfigDict, workdir: str) -> str:
  data_dir, name = data_location(config, workdir)
  if config.data.source != "synthetic":
    return data_dir
  marker = os.path.join(data_dir, f"{name}.json")
  spec = {
    **config.data.to_dict(),
    "vocab_size": config.model.vocab_size,
    "context_length": config.model.context_length,
  }
  if paths.exists(marker):
    if json.loads(paths.read_text(marker)) != spec:
      raise ValueError(
        f"{data_dir} holds a corpus built with other settings than {spec}; use another workdir"
      )
    return data_dir
  t0 = time.time()
  lm_dataset.build_synthetic_dataset(
    make_corpus(config),
    data_dir,
    name,
    dict(
      zip(
        lm_dataset.SPLITS, [config.data.num_train, config.data.num_sgld, config.data.num_validation]
      )
    ),
    seed=config.data.corpus_seed,
  )
  atomic.write_text(marker, json.dumps(spec))
  logging.info("Wrote the %s corpus to %s in %.1fs", config.data.corpus, data_dir, time.time() - t0)
  return data_dir


def load_tokens(config: ml_collections.ConfigDict, workdir: str, split: str) -> np.ndarray:
  """A whole split, int32 [N, T] (checked against the model's vocabulary and context)."""
  return lm_dataset.load_run_tokens(config, workdir, split)


def sgld_dataset(config: ml_collections.ConfigDict, workdir: str) -> dict[str, np.ndarray]:
  """The SGLD split as the estimator's data: {'tokens': [N, T]}."""
  return {"tokens": load_tokens(config, workdir, "sgld")}


def train(config: ml_collections.ConfigDict, workdir: str) -> loop.TrainState:
  """Trains (or resumes) the attention-only LM, saving scheduled checkpoints."""
  validate_config(config)
  with lock.hold(workdir, create=True):
    prepare_data(config, workdir)
    model = make_model(config)
    tokens = jnp.asarray(load_tokens(config, workdir, "train"))
    eval_batch = {
      "tokens": jnp.asarray(
        load_tokens(config, workdir, "validation")[: config.train.eval_batch_size]
      )
    }
    eval_loss = jax.jit(model.loss)
    batch_size = config.train.batch_size

    def batch_fn(key):
      return {
        "tokens": jnp.take(
          tokens, jax.random.randint(key, (batch_size,), 0, tokens.shape[0]), axis=0
        )
      }

    return loop.train(
      workdir=workdir,
      init_params=jax.jit(model.init_params)(_key(config, _INIT)),
      loss_fn=model.loss,
      batch_fn=batch_fn,
      optimizer=make_optimizer(config),
      num_steps=config.train.num_steps,
      schedule_steps=schedule_steps(config),
      data_key=_key(config, _DATA),
      log_every=config.train.log_every,
      resume_every=config.train.resume_every,
      eval_fn=lambda params: {"eval_loss": eval_loss(params, eval_batch)},
      lr_fn=lambda step: config.train.lr,
      config_json=config.to_json(sort_keys=True),
      record_every=config.train.ed_every,
      record_fn=essential_dynamics.recorder(SETTING.ed_probe, config, workdir),
    )


def dataset_from_spec(
  config: ml_collections.ConfigDict, spec: str = "", workdir: str | None = None
):
  """SGLD data for refined LLCs: '' (the run's SGLD split) or 'corpus=code' /
  'corpus=prose' / 'corpus=mixture' (the embedded synthetic corpus of that kind, same
  size; prose and mixture use the run's copy_prob)."""
  if not spec:
    if workdir is None:
      raise ValueError("the LM's SGLD data lives in the workdir; pass workdir")
    return sgld_dataset(config, workdir)
  field, sep, value = spec.partition("=")
  if field != "corpus" or not sep:
    raise ValueError(
      f"bad LM data spec {spec!r}: use 'corpus=prose', 'corpus=code' or 'corpus=mixture'"
    )
  tokens = make_corpus(config, value).sample((config.data.corpus_seed, 1), config.data.num_sgld)
  return {"tokens": tokens}


def estimate(config: ml_collections.ConfigDict, workdir: str):
  """LLCs of every scheduled checkpoint in `workdir` (resumes finished chunks)."""
  validate_config(config)
  return llc_sweep.estimate_workdir(
    config, workdir, make_model(config), sgld_dataset(config, workdir)
  )


def calibrate(config: ml_collections.ConfigDict, workdir: str):
  """The A.5.3 grid (config.calibration) on the earliest and latest checkpoints;
  writes <workdir>/calibration/."""
  validate_config(config)
  return llc_sweep.calibrate_workdir(
    config, workdir, make_model(config), sgld_dataset(config, workdir)
  )


write_results = functools.partial(
  llc_sweep.write_results,
  loss_label="validation loss (nats)",
  title="Attention-only language model: LLC over training",
)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The main job: train, estimate LLCs over all checkpoints, write results, and
  write the analysis report (stages, metrics, heads) to <workdir>/report."""
  return llc_sweep.run_main_job(config, workdir, sys.modules[__name__])
