"""The LM setting's report section "lm" (paper App. C): `metrics.lm_metrics` on
validation contexts, lm_metrics.png, the milestones where the metrics first
cross their thresholds (`metrics.milestones`) and the head labels at the last
checkpoint (`metrics.classify_lm_heads`)."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import ml_collections
import numpy as np

from devinterp_jax import config_checks
from devinterp_jax.analysis.run_data import Run
from devinterp_jax.analysis.sections import Context, Output, Section, timed
from devinterp_jax.data import lm_dataset, synthetic_text
from devinterp_jax.experiments.lm import metrics as lm_metrics
from devinterp_jax.viz import lm as lm_viz

LM_STREAM = 0

_NAMES = {
  "bigram_gap": "Bigram statistics",
  "previous_token": "Previous-token heads",
  "induction": "Induction heads",
}


def tokens(run: Run, split: str) -> np.ndarray:
  """An LM run's token split ('train', 'sgld', 'validation'), int32 [N, T]."""
  return lm_dataset.load_run_tokens(run.config, run.workdir, split)


def mark_lines(marks: Mapping[str, Any], stage_of: Callable[[int], str]) -> list[str]:
  """report.md bullets of `metrics.milestones`: when each metric first crossed its
  threshold, in which stage, and (for head milestones) which head."""
  lines = []
  for key, mark in marks.items():
    name = _NAMES.get(
      key, f"{key.replace('_', '-')} statistics" if key.startswith("ngram_") else key
    )
    thr = mark.get("threshold")
    thr_text = "" if thr is None else f" (threshold {thr:.3g})"
    if mark.get("step") is None:
      lines.append(f"* **{name}**: not reached{thr_text}.")
      continue
    head = f", first by {mark['head']}" if mark.get("head") else ""
    value = mark.get("value")
    value_text = "" if value is None else f": value {value:.3g}"
    lines.append(
      f"* **{name}** ({stage_of(int(mark['step']))}): crossed at step "
      f"{mark['step']}{head}{value_text}{thr_text}."
    )
  return lines


def _lm(ctx: Context) -> Output:
  run, o = ctx.run, ctx.options.lm
  validation = tokens(run, "validation")
  common = None
  if run.config.data.source == "synthetic":
    corpus = synthetic_text.corpus_from_config(run.config)
    common = getattr(corpus, "planted_ngrams", None)
  with timed("LM metrics"):
    metrics = dict(
      lm_metrics.lm_metrics(
        run.model,
        ctx.checkpoints(),
        validation[: o.batch_size],
        train_tokens=tokens(run, "train"),
        common_ngrams=common,
        num_common_ngrams=o.num_common_ngrams,
        key=ctx.key(LM_STREAM),
        icl_positions=tuple(o.icl_positions),
        prev_token_batch=o.prev_token_batch,
        prefix_batch=o.prefix_batch,
        checkpoint_chunk=ctx.options.checkpoint_chunk,
        bos_id=lm_dataset.run_bos_id(run.config, run.workdir),
      )
    )
  fig = lm_viz.plot_lm_metrics(
    run.steps,
    metrics,
    ctx.path("lm_metrics.png"),
    boundaries=ctx.edges,
    title="Language-model development (App. C)",
  )
  marks = lm_metrics.milestones(run.steps, metrics)
  return Output(
    metrics=metrics,
    figures=[("lm_metrics", fig)],
    milestones=marks,
    milestone_lines=mark_lines(marks, ctx.stage_of),
    head_labels={k: str(v) for k, v in lm_metrics.classify_lm_heads(metrics).items()},
  )


def _validate(o: ml_collections.ConfigDict, prefix: str) -> None:
  config_checks.check_fields(
    o,
    prefix,
    {
      "batch_size": "int>=1",
      "num_common_ngrams": "int>=0",
      "prev_token_batch": "int>=1",
      "prefix_batch": "int>=1",
      "icl_positions": "nums>=0",
    },
  )


LM = Section(
  "lm",
  _lm,
  defaults=dict(
    batch_size=64,  # validation contexts for the loss-based metrics
    icl_positions=(50, 500),  # ICL score: loss at token 500 minus loss at token 50
    num_common_ngrams=1000,  # real data: the most frequent n-grams of the training split
    prev_token_batch=512,  # synthetic sequences for head scores (paper: 10k)
    prefix_batch=512,
  ),
  validate=_validate,
)
