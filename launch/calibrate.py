"""Calibrates ε, nβ, γ on the earliest and latest checkpoints of --workdir (App. A.5.3).

The grid is config.calibration; writes <workdir>/calibration/ (JSON, markdown
table, plots) and logs the recommendation.

  python launch/calibrate.py --config=configs/icl_regression.py:runlocal --workdir=/tmp/icl
"""

import json

from absl import app, flags, logging
from ml_collections import config_flags

from devinterp_jax.experiments import launcher, registry

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory with checkpoints.", required=True)


def main(argv):
  del argv
  result = launcher.run(
    registry.job(_CONFIG.value.experiment, "calibrate"), _CONFIG.value, _WORKDIR.value
  )
  logging.info("Recommended: %s", json.dumps(result.recommended))


if __name__ == "__main__":
  flags.FLAGS.set_default("alsologtostderr", True)
  flags.mark_flags_as_required(["config"])
  app.run(main)
