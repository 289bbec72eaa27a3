"""Writes the developmental analysis report of a finished run.

Reads <workdir> (checkpoints, llc/llc.npz, metrics.jsonl) and writes
<workdir>/report/: stage boundaries, behavioural and structural metrics,
Hessian statistics (every figure as PNG, every metric as CSV/JSON) and report.md.
The options are the run's own (its config.json's `analysis`); --config.<field>
overrides any of them, the setting's own sections included (e.g. --config.lm.*), and
exactly the fields given are applied, whatever their value.

  python launch/analyze.py --workdir=/tmp/icl
  python launch/analyze.py --workdir=/tmp/icl --config.hessian.num_hutchinson=64
  python launch/analyze.py --workdir=/tmp/lm --config.hessian.enabled=True --config.lm.batch_size=32
"""

from absl import app, flags
from ml_collections import config_flags

from devinterp_jax.experiments import analyze, launcher

_CONFIG = config_flags.DEFINE_config_dict(
  "config",
  analyze.flag_options(),
  "Analysis options: the run's own, with the fields given here overridden.",
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.", required=True)
_OUT = flags.DEFINE_string("out", None, "Report directory (default <workdir>/report).")


def main(argv):
  del argv
  overrides = config_flags.get_override_values(flags.FLAGS["config"])
  launcher.run(analyze.analyze_run, _WORKDIR.value, overrides, out_dir=_OUT.value)


if __name__ == "__main__":
  flags.FLAGS.set_default("alsologtostderr", True)
  app.run(main)
