"""Attention-only language models (paper §6, App. C, E, F.1).

Usage:
  --config=configs/lm.py                    # the paper's 2-layer model (Pile subset via tfds)
  --config=configs/lm.py:one_layer          # the paper's 1-layer model
  --config=configs/lm.py:runlocal           # CPU-sized 2-layer run on the synthetic prose corpus
  --config=configs/lm.py:runlocal_one_layer
  --config=configs/lm.py:runlocal_mixture   # runlocal on prose + code (drLLC prose vs code)

Override any field from the command line, e.g. `--config.train.num_steps=1000`.
Unknown keys are refused (the ConfigDict is locked).
"""

import ml_collections

from devinterp_jax.experiments import registry

VARIANTS = ("", "one_layer", "runlocal", "runlocal_one_layer", "runlocal_mixture")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or ""
  if arg not in VARIANTS:
    raise ValueError(f"unknown config variant {arg!r}; use one of {VARIANTS}")
  config = ml_collections.ConfigDict()
  config.experiment = "lm"
  config.seed = 0

  config.model = ml_collections.ConfigDict(
    dict(
      vocab_size=5000,
      context_length=1024,
      d_model=256,
      num_heads=8,
      num_layers=2,
    )
  )

  # source 'tfds': an array_record dataset built by data/lm_dataset.py (train / sgld /
  # validation splits) under data_dir/name. source 'synthetic': the embedded corpus
  # ('prose' or 'code') written to <workdir>/data in the same format and read back.
  config.data = ml_collections.ConfigDict(
    dict(
      source="tfds",
      data_dir="",
      name="",
      corpus="prose",
      corpus_seed=0,
      copy_prob=0.02,  # prose: chance per position to start a repeated span
      code_fraction=0.5,  # mixture: share of code contexts
      num_train=20_000,
      num_sgld=4_000,
      num_validation=1_000,
    )
  )

  config.train = ml_collections.ConfigDict(
    dict(
      num_steps=50_000,
      batch_size=100,
      lr=1e-3,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.05,
      grad_clip=1.0,
      n_log=100,
      linear_every=100,  # log-spaced plus every 100 steps
      paper_parity=False,  # True: truncate log-spaced steps as the authors did
      log_every=100,
      resume_every=1000,
      eval_batch_size=256,
      # Essential dynamics: the observed next token's log-probability at every position
      # of the first ed_batch_size validation contexts, every ed_every steps (and step 0).
      ed_every=500,
      ed_batch_size=64,
    )
  )

  # App. F.1: ε = 3e-3, γ = 100 (2 layers; 300 for 1 layer), nβ = B / ln B = 21.7 for
  # B = 100, 20 chains × 200 draws, no burn-in.
  config.llc = ml_collections.ConfigDict(
    dict(
      num_chains=20,
      num_draws=200,
      num_burnin_steps="0",
      thinning=1,
      block_draws=100,
      max_draws=0,  # see configs/icl_regression.py
      step_size=3e-3,
      nbeta=21.7,
      localization=100.0,
      batch_size=100,
      seed=0,
      init_loss_stride=10,
      mala_stride=10,
      sampler="sgld",
      friction=0.0,
      checkpoint_chunk=8,
      chain_strategy="auto",
      mesh="auto",
      compute_dtype="",
      matmul_precision="",  # see configs/icl_regression.py
      # MALA acceptance of the tempered loss alone: in 10⁵-10⁶ dimensions the
      # localisation Gaussian dominates the full-potential acceptance of a chain
      # spreading from w* (docs/reference/lm.md); its bias is εγ/4 in closed form.
      mala_target="loss",
    )
  )
  # launch/calibrate.py: the App. A.5.3 grid on the earliest and latest checkpoints;
  # the main job also checks its own ε, nβ, γ against the same criteria.
  config.calibration = ml_collections.ConfigDict(
    dict(
      step_sizes=(3e-4, 1e-3, 3e-3),
      nbetas=(21.7,),
      localizations=(100.0, 300.0, 1000.0),
      num_chains=4,
      num_draws=200,
      mala_band=(0.95, 1.0),
      margin_se=2.0,
      disqualify=("diverged", "not_converged"),
    )
  )
  # Refined LLCs (launch/estimate_llc.py --restrict=heads): the rLLC paper's sampler.
  config.refined = ml_collections.ConfigDict(
    dict(
      num_chains=4,
      num_draws=200,
      step_size=1e-3,
      nbeta=30.0,
      localization=200.0,
      batch_size=32,
      checkpoint_chunk=8,
    )
  )

  config.analysis = registry.analysis_options("lm")
  config.analysis.stages.tolerance = 0.05
  config.analysis.hessian.enabled = False
  # Ablations 8 at a time: all 38 at once hold [chunk, 38, B, T, V] logits (2.5 GB at
  # runlocal size) and took twice as long (42 s vs 20 s for 8 checkpoints).
  config.analysis.overlap.mask_batch = 8

  if arg in ("one_layer", "runlocal_one_layer"):
    config.model.num_layers = 1
    config.llc.localization = 300.0
  if arg.startswith("runlocal"):
    config.model.update(vocab_size=512, context_length=64, d_model=64, num_heads=4)
    # copy_prob 0.1: repeated spans strong enough that a previous-token head and
    # layer-1 induction heads form within 6000 steps (docs/reference/lm.md; 0.02 and 0.06 did not
    # within 3000).
    config.data.update(
      source="synthetic", num_train=20_000, num_sgld=4_000, num_validation=1_000, copy_prob=0.1
    )
    # 19 checkpoints: log-spaced plus every 750 steps (3000, 3750, 4500 span the
    # induction bump), so the converged LLC sweep fits the 25-minute job.
    config.train.update(
      num_steps=6000,
      batch_size=32,
      n_log=12,
      linear_every=750,
      log_every=100,
      resume_every=500,
      eval_batch_size=256,
      ed_every=50,  # 121 points over 6000 steps
      ed_batch_size=32,
    )
    # launch/calibrate.py with the grid below recommends ε = 2e-4, nβ = 10 (≈ B/ln B for
    # B = 32), γ = 300 on steps 1 and 6000 (docs/reference/lm.md): healthy chains, loss-MALA
    # acceptance ≥ 0.96; γ = 100 chains do not equilibrate within 200 draws.
    # 4 chains (the convergence checks need 4), at least 400 draws after a burn-in read
    # from the trace, continued in blocks of 100 up to 1000 until converged. SGNHT with
    # friction 10: SGLD left all 19 checkpoints unconverged at 800 draws
    # (docs/results/lm_runlocal.md), and the default friction 2√γ = 35 left step 1
    # unconverged at 800
    # (benchmarks/sampler_probe.py, docs/results/sampler_probe_lm.md).
    config.llc.update(
      num_chains=4,
      num_draws=400,
      batch_size=32,
      nbeta=10.0,
      step_size=2e-4,
      localization=300.0,
      checkpoint_chunk=10,
      num_burnin_steps="auto",
      max_draws=1000,
      sampler="sgnht",
      friction=10.0,
    )
    config.calibration.update(
      step_sizes=(5e-5, 1e-4, 2e-4),
      nbetas=(10.0,),
      localizations=(300.0, 1000.0),
      num_chains=4,
      num_draws=200,
    )
    # wrLLC of 8 heads × 19 checkpoints in one program: the full model's sampler.
    config.refined.update(
      num_chains=2,
      num_draws=100,
      step_size=2e-4,
      nbeta=10.0,
      localization=300.0,
      batch_size=32,
      checkpoint_chunk=10,
      sampler="sgld",
    )
    # ICL positions as fractions of the context: tokens 3 and 32 of 64.
    config.analysis.lm.update(
      batch_size=64, prev_token_batch=256, prefix_batch=256, icl_positions=(0.05, 0.5)
    )
    config.analysis.overlap.batch_size = 128
  if arg == "runlocal_mixture":
    # Half prose, half code contexts: the model is trained on both, so the drLLC on
    # `--data=corpus=prose` vs `--data=corpus=code` compares two near-minima (docs/reference/lm.md).
    config.data.corpus = "mixture"
  config.lock()
  return config
