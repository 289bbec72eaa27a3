"""In-context linear regression (paper §3, App. A.4.2, F.2).

Usage:
  --config=configs/icl_regression.py            # the paper's full settings
  --config=configs/icl_regression.py:runlocal   # CPU-sized, minutes on 2 cores
  --config=configs/icl_regression.py:runlocal_seeds   # launch/seeds.py: 5 seeds, CPU-sized

Override any field from the command line, e.g. `--config.train.num_steps=1000`.
Unknown keys are refused (the ConfigDict is locked).
"""

import ml_collections

from devinterp_jax.experiments import registry


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "", "runlocal", "runlocal_seeds", "runlocal_constlr"):
    raise ValueError(
      f"unknown config variant {arg!r}; use '', 'runlocal', 'runlocal_seeds' or 'runlocal_constlr'"
    )
  config = ml_collections.ConfigDict()
  config.experiment = "icl_regression"
  config.seed = 0  # training seed (init and data); the paper uses 0-4
  config.seeds = (0, 1, 2, 3, 4)  # launch/seeds.py trains these in one vmapped program

  config.task = ml_collections.ConfigDict(
    dict(
      task_size=4,  # D
      max_examples=8,  # K (2K = 16 tokens)
      noise_variance=0.125,
      num_tasks=0,  # 0 = infinite task distribution; M > 0 = M pre-drawn tasks
    )
  )

  # The authors' code: output projection on, residual added twice per block.
  config.model = ml_collections.ConfigDict(
    dict(
      d_model=64,
      d_mlp=64,
      num_heads=4,
      num_layers=2,
      attn_out_proj=True,
      double_residual=True,
    )
  )

  config.train = ml_collections.ConfigDict(
    dict(
      num_steps=500_000,
      batch_size=256,
      max_lr=0.003,
      pct_start=0.5,
      div_factor=249_999.0,
      final_div_factor=249_999.0,
      b1=0.9,
      b2=0.999,
      weight_decay=0.0,
      n_log=100,
      n_linear=100,  # 189 unique checkpoint steps over [1, 500k]
      paper_parity=False,  # True: the authors' truncated steps (190, 499,999 and 500k)
      log_every=1000,
      resume_every=10_000,  # resume-only checkpoints (latest kept)
      eval_batch_size=2048,
      # Essential dynamics: predictions on ed_batch_size fixed sequences every ed_every
      # steps (and at step 0), in <workdir>/ed_outputs/; 0 records nothing.
      ed_every=1000,
      ed_batch_size=256,
    )
  )

  config.llc = ml_collections.ConfigDict(
    dict(
      num_chains=10,
      num_draws=5000,
      # Paper parity: the text says 1000 burn-in steps, the authors' config likely 0
      # (../shared/REFERENCE.md); "auto" reads it from the trace (sampling/diagnostics.py).
      num_burnin_steps="0",
      block_draws=100,  # draws per compiled block (progress, adaptive length)
      max_draws=0,  # 0: fixed length; else run until converged, at most this
      thinning=1,
      step_size=3e-4,  # ε
      nbeta=66.7,  # nβ
      localization=6.67,  # γ
      batch_size=1024,
      dataset_size=2**20,  # n sequences, fixed and seeded
      seed=0,  # SGLD seed (same noise/batches at every checkpoint)
      init_loss_stride=10,
      mala_stride=10,  # MALA acceptance every 10th step (0 = off)
      mala_target="posterior",  # or "loss": nβ L alone (sampling/llc.py MALA_TARGETS)
      sampler="sgld",  # or "rmsprop_sgld", "sghmc", "sgnht" (docs/reference/samplers.md)
      friction=0.0,  # sghmc / sgnht friction α per unit time; 0: 2√γ
      checkpoint_chunk=16,  # pairs per compiled call, or "auto" (fits device memory)
      chain_strategy="auto",
      mesh="auto",  # or "none", or e.g. "checkpoint:4,chain:2" (README)
      compute_dtype="",  # "" (the params' dtype) or e.g. "bfloat16" in the loss
      matmul_precision="",  # "" (backend default), "default", "high", "highest"
    )
  )

  # launch/calibrate.py: the App. A.5.3 grid on the earliest and latest
  # checkpoints; the main job also checks its own ε, nβ, γ against the same
  # criteria (no extra cost).
  config.calibration = ml_collections.ConfigDict(
    dict(
      step_sizes=(1e-4, 3e-4, 1e-3, 3e-3),
      nbetas=(66.7, 147.7),  # the paper's value and B/ln B for B = 1024
      localizations=(6.67,),
      num_chains=4,
      num_draws=1000,
      mala_band=(0.95, 1.0),
      margin_se=2.0,  # the step check must clear the band by 2 of its SEs
      disqualify=("diverged", "not_converged"),
    )
  )

  # Refined LLCs (launch/estimate_llc.py --restrict=heads / --loss_data=...): these
  # fields override config.llc. Defaults: the refined-LLC paper's (language-model)
  # sampler, ε = 1e-3, nβ = 30, γ = 200, 4 chains × 200 draws, batch 32. On the LR
  # runlocal checkpoints ε = 1e-3 gives MALA acceptance 0.54-0.63 (docs/reference/refined.md):
  # calibrate before a full-scale LR run.
  config.refined = ml_collections.ConfigDict(
    dict(
      num_chains=4,
      num_draws=200,
      step_size=1e-3,
      nbeta=30.0,
      localization=200.0,
      batch_size=32,
      checkpoint_chunk=16,
    )
  )

  # launch/analyze.py and the end of the main job: stages, metrics, Hessian, report.
  config.analysis = registry.analysis_options("icl_regression")

  if arg in ("runlocal", "runlocal_seeds", "runlocal_constlr"):
    config.train.update(
      num_steps=6000,
      batch_size=64,
      n_log=16,
      n_linear=8,
      log_every=250,
      resume_every=1000,
      eval_batch_size=1024,
      ed_every=50,  # 121 points over 6000 steps
      ed_batch_size=128,
    )
    # SGNHT (docs/reference/samplers.md): SGLD at ε = 2e-4 had not converged after 800 draws
    # (docs/results/convergence_runlocal.md; its flattest directions relax in ~1,500 steps). ε as
    # recommended by launch/calibrate.py with the grid below (docs/results/calibration_runlocal.md):
    # the largest ε with healthy, converged chains whose leapfrog acceptance clears
    # [0.95, 1] by 2 SE at the earliest, a middle and the latest checkpoint.
    # Burn-in read from the trace; chains continue past 400 draws until the R̂ / ESS /
    # drift checks pass on the kept draws and every checkpoint shares a 400-draw window.
    config.llc.update(
      num_chains=4,
      num_draws=400,
      batch_size=32,
      step_size=3e-5,
      nbeta=15.4,
      dataset_size=2**14,
      checkpoint_chunk=8,
      num_burnin_steps="auto",
      max_draws=1200,
      sampler="sgnht",
    )
    config.calibration.update(step_sizes=(2e-5, 3e-5, 5e-5, 1e-4), nbetas=(15.4,), num_draws=600)
    # wrLLC of all 8 heads × 21 checkpoints in one program, under 15 minutes on 2 cores:
    # the full model's ε and nβ, γ = 100 (MALA acceptance 0.93-0.96; docs/reference/refined.md).
    config.refined.update(
      num_chains=3,
      num_draws=200,
      step_size=2e-4,
      nbeta=15.4,
      localization=100.0,
      checkpoint_chunk=7,
      sampler="sgld",
    )
    # Sized so the whole report takes about a minute on 2 CPU cores.
    config.analysis.behaviour.batch_size = 512
    config.analysis.hessian.update(batch_size=128, num_hutchinson=8, num_lanczos_iters=16, top_k=2)
  if arg == "runlocal_seeds":
    # launch/seeds.py: 5 seeds in one vmapped program, LLCs of 5 × 18 checkpoints in
    # one sweep, under 15 minutes on 2 CPU cores. Shorter runs and chains than
    # `runlocal`; ε, nβ, γ and the SGLD batch are the calibrated runlocal values.
    config.train.update(num_steps=4000, n_log=14, n_linear=6)
    # The SGLD settings its figures were measured with (docs/reference/stages_runlocal.md).
    config.llc.update(
      num_chains=3,
      num_draws=160,
      checkpoint_chunk=10,
      sampler="sgld",
      step_size=2e-4,
      max_draws=800,
    )
  if arg == "runlocal_constlr":
    # Control: the runlocal job at a constant learning rate (the one-cycle peak, no
    # warm-up or annealing), to tell which LLC boundaries track the schedule.
    config.train.update(div_factor=1.0, final_div_factor=1.0)
  config.lock()
  return config
