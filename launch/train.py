"""Trains a model and streams checkpoints to --workdir (resumes if killed).

python launch/train.py --config=configs/icl_regression.py --workdir=/tmp/icl
"""

from absl import app, flags
from ml_collections import config_flags

from devinterp_jax.experiments import launcher, registry

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.", required=True)


def main(argv):
  del argv
  launcher.run(registry.job(_CONFIG.value.experiment, "train"), _CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.FLAGS.set_default("alsologtostderr", True)
  flags.mark_flags_as_required(["config"])
  app.run(main)
