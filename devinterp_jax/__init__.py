"""devinterp_jax: developmental interpretability in JAX.

Estimate local learning coefficients (LLCs) with SGLD for many checkpoints ×
chains in one compiled program, for any pure `loss_fn(params, batch)`.
"""

from devinterp_jax.sampling.llc import (SamplerSettings, estimate_llc, estimate_llcs,
                                        make_llc_program)
from devinterp_jax.sampling.results import LLCResult
from devinterp_jax.sampling.sgld import SGLDState, sgld

__all__ = ["LLCResult", "SGLDState", "SamplerSettings", "estimate_llc", "estimate_llcs", "make_llc_program",
           "sgld"]
__version__ = "0.1.0"
