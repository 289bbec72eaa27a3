"""Several seeds at once (App. B.4): train `config.seeds` in one vmapped program,
estimate every seed's LLCs in one batched sweep, and compare stage boundaries.

Writes <workdir>/seed_<s>/ (a full run per seed) and <workdir>/seeds_report/.
Resumable like the main job.

  python launch/seeds.py --config=configs/icl_regression.py:runlocal_seeds --workdir=/tmp/seeds
"""

from absl import app, flags
from ml_collections import config_flags

from devinterp_jax.experiments import launcher, registry

_CONFIG = config_flags.DEFINE_config_file(
  "config", "configs/icl_regression.py:runlocal_seeds", "Experiment config file."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for all seeds.", required=True)


def main(argv):
  del argv
  launcher.run(registry.job(_CONFIG.value.experiment, "run_seeds"), _CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.FLAGS.set_default("alsologtostderr", True)
  app.run(main)
