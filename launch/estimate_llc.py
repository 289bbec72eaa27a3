"""Estimates the LLC of every scheduled checkpoint of --workdir and writes results.

Resumable: finished checkpoint chunks in <workdir>/llc/chunks are reused.

  python launch/estimate_llc.py --config=configs/icl_regression.py --workdir=/tmp/icl
"""

from absl import app, flags
from ml_collections import config_flags

from devinterp_jax.experiments import registry
from devinterp_jax.storage.checkpoints import quiet_orbax_logs

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory with checkpoints.",
                               required=True)


def main(argv):
  del argv
  quiet_orbax_logs()
  experiment = registry.get(_CONFIG.value.experiment)
  steps, result = experiment.estimate(_CONFIG.value, _WORKDIR.value)
  experiment.write_results(_WORKDIR.value, steps, result, config=_CONFIG.value)


if __name__ == "__main__":
  flags.FLAGS.set_default("alsologtostderr", True)
  flags.mark_flags_as_required(["config"])
  app.run(main)
