"""devinterp_jax: developmental interpretability in JAX.

Estimate local learning coefficients (LLCs) with SGLD, SGHMC or SGNHT for many checkpoints ×
chains in one compiled program, for any pure `loss_fn(params, batch)`, with
chain-health diagnostics and automatic calibration of ε, nβ and γ.
"""

from devinterp_jax.sampling.calibration import CalibrationResult, calibrate, check_settings
from devinterp_jax.sampling.diagnostics import HealthCriteria
from devinterp_jax.sampling.llc import (
  Restrictions,
  SamplerSettings,
  SweepOptions,
  estimate,
  estimate_llc,
  estimate_llcs,
)
from devinterp_jax.sampling.results import LLCResult
from devinterp_jax.sampling.sgld import (
  RMSPropSGLDState,
  SGLDState,
  mala_log_acceptance,
  rmsprop_sgld,
  sgld,
)
from devinterp_jax.sampling.samplers import get_sampler
from devinterp_jax.sampling.temperature import nbeta_from_batch_size, nbeta_wbic
from devinterp_jax.sampling.underdamped import SGHMCState, SGNHTState, sghmc, sgnht

__all__ = [
  "CalibrationResult",
  "HealthCriteria",
  "LLCResult",
  "RMSPropSGLDState",
  "SGLDState",
  "SamplerSettings",
  "calibrate",
  "check_settings",
  "estimate",
  "estimate_llc",
  "estimate_llcs",
  "Restrictions",
  "SweepOptions",
  "mala_log_acceptance",
  "nbeta_from_batch_size",
  "nbeta_wbic",
  "rmsprop_sgld",
  "sgld",
  "SGHMCState",
  "SGNHTState",
  "get_sampler",
  "sghmc",
  "sgnht",
]
__version__ = "0.1.0"
