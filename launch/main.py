"""The main job: train, estimate LLCs over every checkpoint, write results and plots.

python launch/main.py --config=configs/icl_regression.py:runlocal --workdir=/tmp/icl
"""

from absl import app, flags
from ml_collections import config_flags

from devinterp_jax.experiments import launcher, registry

_CONFIG = config_flags.DEFINE_config_file(
  "config", "configs/icl_regression.py:runlocal", "Experiment config file (file.py[:variant])."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.", required=True)


def main(argv):
  del argv
  launcher.run(registry.job(_CONFIG.value.experiment, "run"), _CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.FLAGS.set_default("alsologtostderr", True)
  app.run(main)
