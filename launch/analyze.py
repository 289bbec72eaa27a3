"""Writes the developmental analysis report of a finished run.

Reads <workdir> (checkpoints, llc/llc.npz, metrics.jsonl) and writes
<workdir>/report/: stage boundaries, behavioural and structural metrics,
Hessian statistics (every figure as PNG, every metric as CSV/JSON) and report.md.
The options are the run's own (its config.json's `analysis`); --config.<field>
overrides any of them.

  python launch/analyze.py --workdir=/tmp/icl
  python launch/analyze.py --workdir=/tmp/icl --config.hessian.num_hutchinson=64
"""

from absl import app, flags
from ml_collections import config_flags

from devinterp_jax.analysis import report
from devinterp_jax.experiments import launcher

_CONFIG = config_flags.DEFINE_config_dict(
    "config", report.default_options(),
    "Analysis options: the run's own, with any field overridden here.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.", required=True)
_OUT = flags.DEFINE_string("out", None, "Report directory (default <workdir>/report).")


def main(argv):
  del argv
  launcher.run(report.analyze_run, _WORKDIR.value, _CONFIG.value, out_dir=_OUT.value)


if __name__ == "__main__":
  flags.FLAGS.set_default("alsologtostderr", True)
  app.run(main)
