"""Estimates the LLC of every scheduled checkpoint of --workdir and writes results.

Plain: <workdir>/llc/ (llc.npz, llc.csv, summary.json, plots). With a weight
restriction and/or other data, the refined LLC (wrLLC / drLLC) of every
restriction × checkpoint × chain in one program, written to
<workdir>/<wrllc_…|drllc_…>/ (llc.npz, refined.csv, summary.json, trajectories.png).
Resumable: finished checkpoint chunks are reused.

  python launch/estimate_llc.py --config=configs/icl_regression.py:runlocal --workdir=/tmp/icl
  python launch/estimate_llc.py ... --restrict=heads              # wrLLC of every head
  python launch/estimate_llc.py ... --restrict=heads --report     # + head figures in the report
  python launch/estimate_llc.py ... --restrict=layers             # per layer
  python launch/estimate_llc.py ... --restrict='block_0/mlp'      # a path pattern
  python launch/estimate_llc.py ... --loss_data=input_gain=2      # drLLC: OOD inputs
  python launch/estimate_llc.py ... --restrict=heads --loss_data=num_tasks=16
"""

from absl import app, flags
from ml_collections import config_flags

from devinterp_jax.experiments import launcher, llc_sweep, refined

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory with checkpoints.", required=True)
_RESTRICT = flags.DEFINE_string(
  "restrict",
  "",
  "Weight restriction: 'heads', 'layers', 'groups', 'group:<name>', "
  "'layer:<l>', 'head:<l>:<h>' or a parameter-path regex. Empty: the whole model.",
)
_DATA = flags.DEFINE_string(
  "data",
  "",
  "SGLD data: '' (the config's) or field=value "
  "overrides, e.g. 'num_tasks=16' (see dataset_from_spec).",
)
_REPORT = flags.DEFINE_bool(
  "report",
  False,
  "After a refined sweep, rewrite the analysis "
  "report (<workdir>/report) so that it includes the head figures.",
)
_LOSS_DATA = flags.DEFINE_string(
  "loss_data",
  "",
  "Data-refined LLC: measure the loss on this data (same syntax as --data), e.g. 'input_gain=2'.",
)


def main(argv):
  del argv
  if _RESTRICT.value or _DATA.value or _LOSS_DATA.value:
    launcher.run(
      refined.run_refined,
      _CONFIG.value,
      _WORKDIR.value,
      _RESTRICT.value,
      _DATA.value,
      _LOSS_DATA.value,
      update_report=_REPORT.value,
    )
  else:
    launcher.run(llc_sweep.run_sweep, _CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.FLAGS.set_default("alsologtostderr", True)
  flags.mark_flags_as_required(["config"])
  app.run(main)
