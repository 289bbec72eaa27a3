"""The LM main job on a tiny config: synthetic corpus → train → LLC → report."""

import json
import os

import numpy as np
import pytest

from configs import lm as lm_config
from devinterp_jax.experiments import lm, refined
from devinterp_jax.sampling.results import LLCResult


def tiny_lm_config(num_steps: int = 30):
  config = lm_config.get_config("runlocal")
  config.model.update(vocab_size=64, context_length=16, d_model=16, num_heads=2, num_layers=2)
  config.data.update(num_train=512, num_sgld=128, num_validation=64)
  config.train.update(
    num_steps=num_steps,
    batch_size=8,
    n_log=5,
    linear_every=10,
    log_every=10,
    resume_every=10,
    eval_batch_size=32,
    ed_every=3,  # 11 points over 30 steps
    ed_batch_size=8,
  )
  # Adaptive as runlocal, but at most 3 blocks of 8 draws (runlocal's max_draws=1000
  # would continue these unconverged tiny chains for up to 124 blocks).
  config.llc.update(
    num_chains=2,
    num_draws=8,
    batch_size=8,
    checkpoint_chunk=4,
    init_loss_stride=4,
    step_size=1e-4,
    max_draws=24,
  )
  config.refined.update(num_chains=2, num_draws=8, batch_size=8, checkpoint_chunk=4)
  config.analysis.update(checkpoint_chunk=4)
  config.analysis.stages.n_restarts = 2
  config.analysis.lm.update(batch_size=16, prev_token_batch=16, prefix_batch=16)
  config.analysis.overlap.batch_size = 16
  return config


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
  config = tiny_lm_config()
  workdir = str(tmp_path_factory.mktemp("lm"))
  return config, workdir, lm.run(config, workdir)


def test_lm_main_job(lm_run):
  config, workdir, summary = lm_run
  steps = lm.schedule_steps(config)
  assert steps[0] == 1 and steps[-1] == 30 and {10, 20, 30} <= set(steps.tolist())  # log + every 10
  assert len(steps) == 7
  res = LLCResult.load(os.path.join(workdir, "llc", "llc.npz"))
  assert res.llc_mean.shape == (len(steps),) and np.all(np.isfinite(res.llc_mean))
  report = json.load(open(os.path.join(workdir, "report", "report.json")))
  assert report["stages"][0]["start_step"] == 1 and report["stages"][-1]["end_step"] == 30
  assert report["stages"][0]["label"] == "S1"
  metrics = np.load(os.path.join(workdir, "report", "metrics.npz"))
  assert metrics["steps"].tolist() == steps.tolist()
  for name in ("lm_metrics.png", "stages.png", "overlap.png", "ed.png"):
    assert os.path.getsize(os.path.join(workdir, "report", name)) > 10_000, name
  assert set(report["head_labels_last_checkpoint"]) == {"L0H0", "L0H1", "L1H0", "L1H1"}
  # Training loss falls from ln V on the synthetic prose corpus.
  log = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  evals = [r["eval_loss"] for r in log if "eval_loss" in r]
  assert evals[0] == pytest.approx(np.log(64), abs=0.3) and evals[-1] < evals[0] - 0.1
  assert summary["stage_boundaries"] == report["boundary_steps"]
  # Essential dynamics on the observed tokens' log-probabilities, recorded every 3 steps.
  ed = report["essential_dynamics"]
  points = sorted({0, *range(3, 31, 3), *steps.tolist()})
  assert ed["source"] == "recorded during training" and ed["num_points"] == len(points)
  from devinterp_jax.storage import outputs_log

  assert outputs_log.read(workdir)[1].shape == (len(points), 8 * 15)  # 8 contexts × (T − 1)


def test_lm_refined_heads_and_code_data(lm_run):
  """wrLLC of every head, and the drLLC on the code-like corpus, share the pipeline."""
  config, workdir, _ = lm_run
  summary = refined.run_refined(config, workdir, restrict="heads")
  assert summary["restrictions"] == ["L0H0", "L0H1", "L1H0", "L1H1"]
  assert summary["num_params"] == [4 * 16 * 8 + 3 * 8] * 4  # W_QKV/O slices + b_QKV
  code = refined.run_refined(config, workdir, loss_data="corpus=code")
  assert code["name"] == "drllc_corpuscode" and np.isfinite(code["final"]["drllc_corpuscode"])


def test_lm_data_is_checked(lm_run, tmp_path):
  config, workdir, _ = lm_run
  other = tiny_lm_config()
  other.data.copy_prob = config.data.copy_prob + 0.05
  with pytest.raises(ValueError, match="other settings"):
    lm.prepare_data(other, workdir)
  bad = tiny_lm_config()
  bad.data.source = "tfds"
  with pytest.raises(ValueError, match="data_dir"):
    lm.prepare_data(bad, str(tmp_path))


def test_lm_calibration_grid(lm_run):
  """launch/calibrate.py's grid runs on the LM through the shared sweep code, with
  the LM's loss-only MALA target, and writes its table."""
  config, workdir, _ = lm_run
  config = tiny_lm_config()
  config.calibration.update(step_sizes=(1e-5, 1e-2), localizations=(300.0,), num_draws=20)
  result = lm.calibrate(config, workdir)
  assert result.settings["mala_target"] == "loss"
  acc = result.mala_acceptance[:, 0, 0]  # [ε, checkpoint]
  assert len(result.checkpoint_ids) == 3  # earliest, middle, latest
  assert acc.shape == (2, 3) and (acc[0] > 0.99).all() and acc[1].mean() < acc[0].mean()
  for name in ("calibration.md", "calibration_llc_vs_step_size.png", "calibration_traces.png"):
    assert os.path.exists(os.path.join(workdir, "calibration", name)), name  # the caller plots


@pytest.mark.slow
def test_lm_runlocal_main_job(tmp_path):
  """The README's LM job: under 25 minutes on 2 CPU cores with every checkpoint converged
  and every boundary stable; n-grams and bigrams are learned before a previous-token head
  and layer-1 induction heads form; the LLC rises."""
  summary = lm.run(lm_config.get_config("runlocal"), str(tmp_path))
  assert summary["total_seconds"] < 1500, summary
  assert summary["convergence"]["counts"]["converged"] == summary["num_checkpoints"], summary
  stages = json.load(open(os.path.join(str(tmp_path), "report", "stages.json")))
  assert stages["stability_passes"], stages["stability"]
  assert summary["rises"] and summary["diverged_chains"] == 0, summary
  report = json.load(open(os.path.join(str(tmp_path), "report", "report.json")))
  marks = report["milestones"]
  assert marks["ngram_2"]["step"] < marks["previous_token"]["step"]
  assert marks["bigram_gap"]["step"] < marks["induction"]["step"]
  labels = report["head_labels_last_checkpoint"]
  assert any(v == "previous_token" for k, v in labels.items() if k.startswith("L0"))
  assert any(v == "induction" for k, v in labels.items() if k.startswith("L1"))
  metrics = np.load(os.path.join(str(tmp_path), "report", "metrics.npz"))
  assert metrics["prefix_score_max"][-1] > 10 * metrics["prefix_chance"][-1]
  assert len(report["boundary_steps"]) >= 2


def test_mixture_corpus_run_data(tmp_path):
  """`runlocal_mixture` trains on prose + code; its data marker records code_fraction."""
  assert lm_config.get_config("runlocal_mixture").data.corpus == "mixture"
  config = tiny_lm_config()
  config.data.corpus = "mixture"
  lm.prepare_data(config, str(tmp_path))
  train = lm.load_tokens(config, str(tmp_path), "train")
  assert train.shape == (config.data.num_train, config.model.context_length)
  other = tiny_lm_config()
  other.data.update(corpus="mixture", code_fraction=0.2)
  with pytest.raises(ValueError, match="other settings"):
    lm.prepare_data(other, str(tmp_path))
  for name in ("prose", "code", "mixture"):
    tokens = lm.dataset_from_spec(config, f"corpus={name}")["tokens"]
    assert tokens.shape == (config.data.num_sgld, config.model.context_length)
  with pytest.raises(ValueError, match="unknown synthetic corpus"):
    lm.dataset_from_spec(config, "corpus=poetry")
