"""One-command device check of the LLC engine: throughput, precision, memory, sharding.

On an accelerator (one H200: under 5 minutes), from the repository root:

  pip install --no-deps wheels/*.whl; PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/device_check.py --out=$OUT --commit=<git sha>

(The script itself needs neither ml_collections nor tensorflow-datasets; the carried
ml_collections wheel is for the config files, `configs/*.py`. `--commit` is needed
where the copy has no `.git`; the env var DEVICE_CHECK_COMMIT works too.)

On this CPU with fake devices (sizes reduced automatically, see `--quick`):

  XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu PYTHONPATH=. python benchmarks/device_check.py --out=/tmp/device_check

Rows, each written to `$OUT/device_check_<backend>.json` and `.md` as soon as it
finishes (a timeout still leaves the finished rows):

* bounds: one jitted forward+backward of the LR transformer at the SGLD batch
  (mean of 3 back-to-back calls, as in `benchmarks/llc_throughput.py`) and one
  step of a `lax.scan`ned forward+backward;
* LR model, one device: vmap vs map chains, f32 vs bf16 compute
  (`compute_dtype`), default vs highest matmul precision: chain-steps/s of the
  compiled block program, the ratio of its time per chain-step to the bounds,
  and the projected wall time of the paper's LR sweep (189 checkpoints, 190
  with `paper_parity`, × 10 chains × 5000 draws);
* the driver's own overhead: one end-to-end `llc.estimate` of the main row;
* memory: `compiled.memory_analysis()` of the block at a few chunk sizes
  (`sweep.chunk_memory`), and the allocator's peak (`device.memory_stats()`)
  where the backend reports one;
* LM: the rLLC paper's all-heads wrLLC sweep of the paper's 2-layer LM
  (16 heads × 107 checkpoints × 4 chains × 200 draws at batch 32), projected
  from the measured head-chain-steps/s of a restricted block;
* with several devices: checkpoint-, checkpoint×chain- and batch-sharded
  sweeps: chain-steps/s, equality with the single-device sweep (max relative
  error of the loss traces) and the all-reduce ops in the compiled HLO.

Finally it writes `device_<backend>.md` under `$OUT` and (with --docs_dir, default
`docs/results` when it exists) under the repository's docs/results/.

Timings are the best of --reps calls of the compiled block (compilation excluded;
MALA every 10th step and chain diagnostics on, as in the estimator's defaults).
Params are fresh initialisations (throughput does not depend on training); LM
tokens are uniform random ids.
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before jax is imported

import argparse
import datetime
import json
import platform
import re
import subprocess
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import scanned_fwd_bwd
from devinterp_jax import atomic
from devinterp_jax.data.regression import RegressionTask, make_dataset
from devinterp_jax.models.attention_lm import AttentionOnlyLM
from devinterp_jax.models.regression_transformer import RegressionTransformer
from devinterp_jax.sampling import mesh as mesh_lib
from devinterp_jax.sampling import program as program_lib
from devinterp_jax.sampling import restrict
from devinterp_jax.sampling import sweep as sweep_lib
from devinterp_jax.sampling.llc import Restrictions, SamplerSettings, SweepOptions, estimate
from devinterp_jax.training.schedules import checkpoint_steps

# The paper's LR sweep (configs/icl_regression.py): 100 log + 100 linear checkpoint steps
# over 500k, 10 chains × 5000 draws, no burn-in, batch 1024.
LR_SWEEP = dict(
  num_chains=10,
  num_draws=5000,
  step_size=3e-4,
  nbeta=66.7,
  localization=6.67,
  batch_size=1024,
  checkpoint_chunk=16,
)
# The rLLC paper's all-heads wrLLC sweep of the 2-layer LM (configs/lm.py `refined`):
# 16 heads × 107 checkpoints × 4 chains × 200 draws at batch 32.
LM_SWEEP = dict(
  num_heads=16,
  num_checkpoints=107,
  num_chains=4,
  num_draws=200,
  step_size=1e-3,
  nbeta=30.0,
  localization=200.0,
  batch_size=32,
  checkpoint_chunk=8,
)
# The paper's 2-layer attention-only LM (configs/lm.py default; 3,355,016 params).
LM_MODEL = dict(vocab_size=5000, context_length=1024, d_model=256, num_heads=8, num_layers=2)
ALL_REDUCE = re.compile(r"all-reduce(?:-start)?\(")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument(
    "--out",
    default=os.environ.get("OUT", "/tmp/device_check"),
    help="output directory (JSON + markdown, written row by row)",
  )
  p.add_argument(
    "--quick",
    default="auto",
    choices=["auto", "yes", "no"],
    help="reduced sizes; auto: on the CPU backend",
  )
  p.add_argument(
    "--commit",
    default=None,
    help="git commit (default: git rev-parse HEAD, else $DEVICE_CHECK_COMMIT)",
  )
  p.add_argument(
    "--docs_dir",
    default=None,
    help="also write device_<backend>.md here (default: ./docs/results when it exists; '' to skip)",
  )
  p.add_argument(
    "--budget_s",
    type=float,
    default=None,
    help="skip rows not yet started after this many seconds (default: 210 "
    "on accelerators, none on CPU)",
  )
  p.add_argument(
    "--reps", type=int, default=None, help="timed calls per row (the best is reported)"
  )
  p.add_argument("--batch_size", type=int, default=None, help="LR SGLD batch")
  p.add_argument("--num_draws", type=int, default=None, help="LR steps per timed block")
  p.add_argument("--checkpoints", type=int, default=None, help="LR pairs per block")
  p.add_argument("--chains", type=int, default=None, help="LR chains per pair")
  p.add_argument("--lm_batch_size", type=int, default=None)
  p.add_argument("--lm_draws", type=int, default=None, help="LM steps per timed block")
  p.add_argument("--lm_heads", type=int, default=None, help="restrictions (heads) timed")
  p.add_argument("--lm_chains", type=int, default=None)
  p.add_argument(
    "--skip", default="", help="comma-separated row groups to skip: lr,estimate,memory,lm,sharding"
  )
  return p.parse_args(argv)


def sizes(args, quick: bool) -> dict:
  """The sizes of this run: the paper's where a GPU allows, reduced on CPU."""
  full = dict(
    batch_size=1024,
    num_draws=100,
    checkpoints=16,
    chains=10,
    reps=3,
    lm_batch_size=32,
    lm_draws=20,
    lm_heads=16,
    lm_chains=4,
    lm_chunk=8,
    shard_checkpoints=None,
    shard_chains=2,
    shard_draws=50,
  )
  small = dict(
    batch_size=256,
    num_draws=10,
    checkpoints=1,
    chains=4,
    reps=3,
    lm_batch_size=2,
    lm_draws=4,
    lm_heads=2,
    lm_chains=2,
    lm_chunk=2,
    shard_checkpoints=None,
    shard_chains=2,
    shard_draws=10,
  )
  s = dict(small if quick else full)
  for k in (
    "batch_size",
    "num_draws",
    "checkpoints",
    "chains",
    "reps",
    "lm_batch_size",
    "lm_draws",
    "lm_heads",
    "lm_chains",
  ):
    if getattr(args, k) is not None:
      s[k] = getattr(args, k)
  s["lm_chunk"] = min(s["lm_chunk"], s["lm_heads"])
  return s


# ---------------------------------------------------------------------------------------
# Environment.


def git_commit(flag: str | None) -> tuple[str, bool | None]:
  """(commit, dirty): the flag, else `git rev-parse HEAD`, else $DEVICE_CHECK_COMMIT."""
  if flag:
    return flag, None
  try:
    sha = subprocess.run(
      ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
    ).stdout.strip()
    dirty = (
      subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        timeout=10,
      ).stdout.strip()
      != ""
    )
    return sha, dirty
  except Exception:
    return os.environ.get("DEVICE_CHECK_COMMIT", "unknown"), None


def environment(commit_flag: str | None) -> dict:
  dev = jax.devices()[0]
  sha, dirty = git_commit(commit_flag)
  try:
    import jaxlib

    jaxlib_version = jaxlib.__version__
  except Exception:
    jaxlib_version = None
  return dict(
    backend=jax.default_backend(),
    device_kind=dev.device_kind,
    device_count=jax.device_count(),
    local_device_count=jax.local_device_count(),
    platform_version=str(getattr(getattr(dev, "client", None), "platform_version", "")).strip(),
    jax=jax.__version__,
    jaxlib=jaxlib_version,
    python=platform.python_version(),
    host=platform.node(),
    cpu_count=os.cpu_count(),
    date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    commit=sha,
    dirty=dirty,
    xla_flags=os.environ.get("XLA_FLAGS", ""),
    preallocate=os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
    default_matmul_precision=str(getattr(jax.config, "jax_default_matmul_precision", None)),
    fake_devices="xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""),
    load_start=load_average(),
  )


def load_average() -> list[float] | None:
  """The host's 1/5/15-minute load averages (other work on a shared machine)."""
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except (OSError, AttributeError):
    return None


def memory_stats(device=None) -> dict | None:
  """The allocator's statistics, or None where the backend reports none (CPU)."""
  device = device or jax.devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:
    return None
  if not stats:
    return None
  keep = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit", "largest_alloc_size")
  return {k: int(stats[k]) for k in keep if k in stats}


def memory_use(compiled) -> dict | None:
  """`compiled.memory_analysis()` as bytes (a list on some JAX versions; None on some
  backends)."""
  try:
    ma = compiled.memory_analysis()
  except Exception:
    return None
  if isinstance(ma, (list, tuple)):
    ma = ma[0] if ma else None
  if ma is None:
    return None
  out = {}
  for k in ("argument", "output", "temp", "alias", "generated_code"):
    v = getattr(ma, f"{k}_size_in_bytes", None)
    if v is not None:
      out[k] = int(v)
  out["total"] = (
    out.get("argument", 0) + out.get("output", 0) + out.get("temp", 0) - out.get("alias", 0)
  )
  return out


def count_all_reduce(compiled) -> int | None:
  try:
    return len(ALL_REDUCE.findall(compiled.as_text()))
  except Exception:
    return None


def make_mesh(shape, names):
  """A mesh over the first prod(shape) devices (Auto axis types where supported)."""
  n = int(np.prod(shape))
  devices = jax.devices()[:n]
  try:
    axis_type = jax.sharding.AxisType
    return jax.make_mesh(shape, names, devices=devices, axis_types=(axis_type.Auto,) * len(names))
  except Exception:
    return jax.sharding.Mesh(np.asarray(devices).reshape(shape), names)


# ---------------------------------------------------------------------------------------
# The compiled block program, timed directly (as `sweep.run` calls it, without the driver).


class Block:
  """`prog.block` over pairs = restrictions × checkpoints, compiled once; `run()` advances
  every chain of every pair by `block_steps` steps from w* (fresh state each call)."""

  def __init__(
    self,
    loss_fn,
    settings: SamplerSettings,
    stacked,
    data,
    *,
    strategy: str = "auto",
    sm: mesh_lib.SweepMesh | None = None,
    restrictions: Restrictions | None = None,
  ):
    comp = None if restrictions is None else restrict.compact(restrictions.check().masks)
    n = jax.tree.leaves(stacked)[0].shape[0]
    r = 1 if restrictions is None else len(restrictions.names)
    pairs = [(ri, ni) for ri in range(r) for ni in range(n)]
    self.num_pairs, self.settings = len(pairs), settings
    self.prog = program_lib.get_program(
      loss_fn,
      settings,
      data=data,
      chain_strategy=strategy,
      mesh=sm,
      leaves=None if comp is None else comp.leaves,
      padded=comp is not None and comp.valid is not None,
    )
    pair_sh = None if sm is None else sm.pairs()
    rows = np.asarray([ni for _, ni in pairs])
    self.params = sweep_lib.put(jax.tree.map(lambda x: np.asarray(x)[rows], stacked), pair_sh)
    self.hypers = sweep_lib.put(
      {
        k: np.full(len(pairs), getattr(settings, k), np.float32)
        for k in ("step_size", "nbeta", "localization")
      },
      pair_sh,
    )
    self.index = self.valid = None
    if comp is not None:
      ridx = [ri for ri, _ in pairs]
      self.index = sweep_lib.put(np.asarray(comp.index[ridx]), pair_sh)
      if comp.valid is not None:
        self.valid = sweep_lib.put(np.asarray(comp.valid[ridx]), pair_sh)
    self.keys = program_lib.chain_keys(
      settings.seed, settings.num_chains, None if sm is None else sm.chains()
    )
    self.data = sweep_lib.put(data, None if sm is None else sm.replicated())
    t0 = time.perf_counter()
    self.compiled = self.prog.block.lower(*self._args(self._carry())).compile()
    self.compile_s = time.perf_counter() - t0
    self.chain_steps = self.num_pairs * settings.num_chains * self.prog.block_steps

  def _carry(self):
    return jax.block_until_ready(self.prog.init(self.params, self.hypers, self.index))

  def _args(self, carry):
    return (
      carry,
      np.int32(0),
      self.params,
      self.hypers,
      self.keys,
      self.data,
      None,
      self.index,
      self.valid,
    )

  def run(self):
    """(seconds, outputs) of one block call; the state's init is not timed."""
    carry = self._carry()
    t0 = time.perf_counter()
    _, out = self.compiled(*self._args(carry))
    jax.block_until_ready(out)
    return time.perf_counter() - t0, out

  def time(self, reps: int) -> dict:
    self.run()  # warm-up: first-call allocations
    ts = [self.run()[0] for _ in range(reps)]
    t = float(np.min(ts))  # best of reps: other work on a shared host only adds time
    return dict(
      seconds_best=t,
      seconds_median=float(np.median(ts)),
      seconds=ts,
      chain_steps=self.chain_steps,
      chain_steps_per_s=self.chain_steps / t,
      ms_per_chain_step=1e3 * t / self.chain_steps,
      compile_s=self.compile_s,
      memory_analysis=memory_use(self.compiled),
    )


def stack(params, n: int):
  return jax.tree.map(lambda x: np.stack([np.asarray(x)] * n), params)


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


# ---------------------------------------------------------------------------------------
# Output.


class Report:
  """Rows written to JSON + markdown after each one finishes."""

  def __init__(self, out_dir: str, env: dict, sz: dict, quick: bool):
    self.out_dir, self.t_start = out_dir, time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    self.data = dict(
      env=env,
      sizes=sz,
      quick=quick,
      bounds={},
      lr=[],
      estimate=None,
      memory=None,
      lm=None,
      sharding=[],
      projections={},
      skipped=[],
      errors=[],
      wall_s=None,
    )

  @property
  def elapsed(self) -> float:
    return time.perf_counter() - self.t_start

  def path(self, ext: str) -> str:
    return os.path.join(self.out_dir, f"device_check_{self.data['env']['backend']}.{ext}")

  def flush(self) -> None:
    self.data["wall_s"] = self.elapsed
    self.data["env"]["load_now"] = load_average()
    _write(self.path("json"), json.dumps(self.data, indent=2, default=str))
    _write(self.path("md"), markdown(self.data))


def _write(path: str, text: str) -> None:
  atomic.write_text(path, text)


def _mib(x) -> str:
  return "—" if x is None else f"{x / 2**20:.1f}"


def _f(x, fmt=".3g") -> str:
  return "—" if x is None else format(x, fmt)


def markdown(d: dict) -> str:
  e, s = d["env"], d["sizes"]
  backend = e["backend"]
  lines = [f"# Device check: {backend} ({e['device_kind']})", ""]
  if backend == "cpu":
    lines += [
      "**This is the CPU backend"
      + (
        f" with {e['device_count']} fake devices (`--xla_force_host_platform_device_count`)"
        if e["fake_devices"]
        else ""
      )
      + ", not a GPU.** The fake devices share the host's "
      f"{e['cpu_count']} cores, so sharded rows check correctness and the compiled "
      "program, not speed; sizes are reduced (`--quick`).",
      "",
    ]
  dirty = {True: " (with uncommitted changes in the working tree)", False: "", None: ""}[e["dirty"]]
  lines += [
    "Generated by `benchmarks/device_check.py` (the command is in its docstring).",
    "",
    f"* device: {e['device_kind']} × {e['device_count']} ({backend}; "
    f"{e['platform_version'] or 'no platform version'})",
    f"* JAX {e['jax']} (jaxlib {e['jaxlib']}), Python {e['python']}",
    f"* date: {e['date']}; commit `{e['commit']}`{dirty}",
    f"* XLA_FLAGS=`{e['xla_flags']}`; XLA_PYTHON_CLIENT_PREALLOCATE={e['preallocate']}; "
    f"default matmul precision: {e['default_matmul_precision']}",
    f"* host load average (1/5/15 min) at the start {e.get('load_start')}, at the end "
    f"{e.get('load_now')} on {e['cpu_count']} cores (other work shares the machine)",
    f"* wall time of the whole check: {_f(d['wall_s'], '.0f')} s"
    + ("" if not d["skipped"] else f"; skipped (time budget or --skip): {', '.join(d['skipped'])}"),
    "",
  ]
  if d["errors"]:
    lines += ["Errors:", ""] + [f"* {x['row']}: `{x['error']}`" for x in d["errors"]] + [""]

  b = d["bounds"]
  lines += [
    "## LR transformer, one device",
    "",
    f"The paper's LR transformer (51,717 params), SGLD batch {s['batch_size']}"
    + ("" if s["batch_size"] == 1024 else " (reduced from 1024)")
    + f", {s['num_draws']} steps per timed block, best of {s['reps']} calls, "
    "MALA every 10th step and diagnostics on.",
    "",
  ]
  if b:
    lines += [
      f"Bounds at the same batch: one jitted forward+backward = "
      f"**{_f(b.get('fwd_bwd_ms'), '.3f')} ms** (mean of 3 calls); per step of a "
      f"scanned forward+backward = **{_f(b.get('scan_fwd_bwd_ms'), '.3f')} ms**.",
      "",
    ]
  if d["lr"]:
    lines += [
      "| row | pairs × chains | chains | compute | matmul precision | chain-steps/s "
      "| ms / chain-step | ÷ fwd+bwd | ÷ scanned | compile s | block memory MiB "
      "| paper LR sweep (189) h |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in d["lr"]:
      ma = r.get("memory_analysis") or {}
      lines.append(
        f"| {r['name']} | {r['pairs']}×{r['chains']} | {r['strategy']} | {r['compute']} | "
        f"{r['precision']} | {_f(r['chain_steps_per_s'], '.1f')} | "
        f"{_f(r['ms_per_chain_step'], '.4g')} | {_f(r.get('ratio'), '.3f')} | "
        f"{_f(r.get('ratio_scan'), '.3f')} | {_f(r['compile_s'], '.1f')} | "
        f"{_mib(ma.get('total'))} | {_f(r.get('lr_sweep_h'), '.3g')} |"
      )
    lines.append("")
    rows = {r["name"]: r for r in d["lr"]}
    auto = d.get("auto_strategy")
    ref = rows.get(f"{auto} f32")
    notes = []
    if "vmap f32" in rows and "map f32" in rows:
      notes.append(
        f"map vs vmap chains: {rows['map f32']['ms_per_chain_step'] / rows['vmap f32']['ms_per_chain_step']:.2f}× the time per chain-step"
      )
    for name, what in (
      ("bf16 compute", "bf16 vs f32 compute"),
      ("precision highest", "highest vs default matmul precision"),
    ):
      if ref and name in rows:
        notes.append(
          f"{what} ({auto} chains): "
          f"{rows[name]['ms_per_chain_step'] / ref['ms_per_chain_step']:.2f}× the "
          "time per chain-step"
        )
    for r in d["lr"]:
      if r.get("loss_rel_vs_f32") is not None:
        notes.append(
          f"{r['name']}: each chain's mean recorded loss vs the vmap f32 row "
          f"(same keys): max rel. diff {r['loss_rel_vs_f32']:.2e}"
        )
    lines += [f"* {x}" for x in notes] + ([""] if notes else [])
  if d["estimate"]:
    r = d["estimate"]
    lines += [
      f"End to end, `llc.estimate` (best of 2 calls) of the {r['of']} row ({r['pairs']} "
      f"checkpoint(s) × {r['chains']} chains × {r['draws']} draws, driver and "
      f"diagnostics included, compiled beforehand): {r['seconds']:.3f} s = "
      f"{r['chain_steps_per_s']:.1f} chain-steps/s, {r['vs_block']:.2f}× the "
      "block's time.",
      "",
    ]
  if d["memory"]:
    m = d["memory"]
    lines += [
      "## Memory",
      "",
      f"`sweep.chunk_memory` (from `compiled.memory_analysis()`) of the "
      f"{m['of']} block, bytes per device:",
      "",
      "| pairs per chunk | argument MiB | output MiB | temp MiB | alias MiB | total MiB |",
      "|---|---|---|---|---|---|",
    ]
    for c in m["chunks"]:
      u = c["use"] or {}
      lines.append(
        f"| {c['chunk']} | {_mib(u.get('argument'))} | {_mib(u.get('output'))} | "
        f"{_mib(u.get('temp'))} | {_mib(u.get('alias'))} | {_mib(u.get('total'))} |"
      )
    lines.append("")
    if m.get("per_pair_mib") is not None:
      lines += [
        f"Per extra pair: {m['per_pair_mib']:.2f} MiB; device memory "
        f'{_mib(m.get("device_bytes"))} MiB; `checkpoint_chunk="auto"` '
        f"(memory_fraction 0.6) would run {m.get('auto_chunk')} pairs per chunk.",
        "",
      ]
    stats = m.get("memory_stats")
    lines += [
      (
        "Allocator (`device.memory_stats()`; the peak is the process's so far: "
        "after the LR and LM rows): " + ", ".join(f"{k} {_mib(v)} MiB" for k, v in stats.items())
      )
      if stats
      else "`device.memory_stats()`: not reported by this backend.",
      "",
    ]
  if d["lm"]:
    r = d["lm"]
    lines += [
      "## LM: all-heads wrLLC of the paper's 2-layer LM",
      "",
      f"Attention-only LM (V={LM_MODEL['vocab_size']}, T={LM_MODEL['context_length']},"
      f" D={LM_MODEL['d_model']}, {LM_MODEL['num_layers']}×{LM_MODEL['num_heads']} "
      f"heads; 3,355,016 params), SGLD batch {r['batch_size']}"
      + (
        ""
        if r["batch_size"] == LM_SWEEP["batch_size"]
        else f" (reduced from {LM_SWEEP['batch_size']})"
      )
      + f", {r['heads']} of 16 heads × 1 checkpoint × {r['chains']} chains, "
      f"{r['chunk']} pairs per block, {r['draws']} steps per block.",
      "",
    ]
    if "error" not in r:
      ma = r.get("memory_analysis") or {}
      lines += [
        f"* bound: jitted forward+backward at batch {r['batch_size']}: "
        f"{_f(r.get('fwd_bwd_ms'), '.4g')} ms",
        f"* restricted block: **{r['chain_steps_per_s']:.2f} head·chain-steps/s** "
        f"({r['ms_per_chain_step']:.4g} ms each, {_f(r.get('ratio'), '.3f')}× the "
        f"full fwd+bwd), compile {r['compile_s']:.1f} s, block memory "
        f"{_mib(ma.get('total'))} MiB"
        + (
          f", allocator peak so far {_mib(r['memory_stats']['peak_bytes_in_use'])} MiB"
          if (r.get("memory_stats") or {}).get("peak_bytes_in_use")
          else ""
        ),
        "* pairs per block tried (compiled memory, MiB): "
        + ", ".join(
          f"{t['chunk']}: {_mib((t['memory'] or {}).get('total'))}"
          for t in r.get("chunks_tried", [])
        ),
        f"* projected all-heads sweep (16 × 107 × 4 × 200 = "
        f"{r['sweep_chain_steps']:,} head·chain-steps): **{r['sweep_h']:.3g} h**"
        + (
          ""
          if r["batch_size"] == LM_SWEEP["batch_size"]
          else f" at batch {r['batch_size']}, not the paper's 32"
        ),
        "",
      ]
  if d["sharding"]:
    lines += [
      "## Sharded sweeps",
      "",
      f"{s.get('shard_checkpoints')} checkpoints × {s['shard_chains']} chains × "
      f"{s['shard_draws']} steps, vmapped chains; equality: `llc.estimate` on the "
      "mesh vs `mesh=None`, max relative error of the loss traces.",
      "",
    ]
    if "single" in d["bounds"]:
      lines += [f"Single device, same sizes: {d['bounds']['single']:.1f} chain-steps/s.", ""]
    lines += [
      "| mesh | chain-steps/s | max rel err (loss trace) | max rel err (LLC per chain) "
      "| all-reduce ops in HLO |",
      "|---|---|---|---|---|",
    ]
    for r in d["sharding"]:
      lines.append(
        f"| {r['mesh']} | {_f(r.get('chain_steps_per_s'), '.1f')} | "
        f"{_f(r.get('loss_rel_err'), '.2e')} | {_f(r.get('llc_rel_err'), '.2e')} | "
        f"{_f(r.get('all_reduce'), 'd')} |"
      )
    lines.append("")
  p = d["projections"]
  if p:
    lines += ["## Projections", ""]
    for k, v in p.items():
      lines.append(f"* {k}: {v}")
    lines.append("")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# The rows.


def lr_settings(sz, **kw) -> SamplerSettings:
  base = dict(
    num_chains=sz["chains"],
    num_draws=sz["num_draws"],
    step_size=LR_SWEEP["step_size"],
    localization=LR_SWEEP["localization"],
    nbeta=LR_SWEEP["nbeta"],
    batch_size=sz["batch_size"],
    num_burnin_steps=0,
    block_draws=sz["num_draws"],
  )
  base.update(kw)
  return SamplerSettings(**base)


def lr_sweep_chain_steps(paper_parity: bool) -> int:
  n = len(checkpoint_steps(500_000, 100, 100, paper_parity=paper_parity))
  return n * LR_SWEEP["num_chains"] * LR_SWEEP["num_draws"]


def run_bounds(rep: Report, model, params, batch, draws: int):
  fwd_bwd = jax.jit(jax.value_and_grad(model.loss))
  jax.block_until_ready(fwd_bwd(params, batch))
  t0 = time.perf_counter()
  for _ in range(3):
    jax.block_until_ready(fwd_bwd(params, batch))
  t_base = (time.perf_counter() - t0) / 3
  scan = scanned_fwd_bwd(model.loss, draws)
  jax.block_until_ready(scan(params, batch))
  ts = []
  for _ in range(2):
    t0 = time.perf_counter()
    jax.block_until_ready(scan(params, batch))
    ts.append((time.perf_counter() - t0) / draws)
  rep.data["bounds"].update(fwd_bwd_ms=1e3 * t_base, scan_fwd_bwd_ms=1e3 * min(ts))


def main(argv=None):
  args = parse_args(argv)
  backend = jax.default_backend()
  quick = args.quick == "yes" or (args.quick == "auto" and backend == "cpu")
  sz = sizes(args, quick)
  budget = args.budget_s if args.budget_s is not None else (0 if backend == "cpu" else 210)
  skip = {x for x in args.skip.split(",") if x}
  env = environment(args.commit)
  rep = Report(args.out, env, sz, quick)
  print(
    f"device check: {env['device_kind']} × {env['device_count']} ({backend}), "
    f"JAX {env['jax']}, quick={quick}, out={args.out}",
    flush=True,
  )
  rep.flush()

  def row(name: str, group: str):
    """Decorator-free guard: False (and recorded) when the row is skipped."""
    if group in skip:
      rep.data["skipped"].append(name)
      return False
    if budget and rep.elapsed > budget:
      rep.data["skipped"].append(f"{name} (budget {budget:.0f} s)")
      rep.flush()
      return False
    print(f"[{rep.elapsed:6.1f} s] {name}", flush=True)
    return True

  def failed(name: str, err: Exception):
    traceback.print_exc()
    rep.data["errors"].append(dict(row=name, error=f"{type(err).__name__}: {err}"[:500]))
    rep.flush()

  # --- LR model, one device -------------------------------------------------------------
  model = RegressionTransformer()
  params = model.init_params(jax.random.key(0))
  B = sz["batch_size"]
  data = make_dataset(jax.random.key(1), RegressionTask(), 16 * B)
  batch = jax.tree.map(lambda x: x[:B], data)
  try:
    run_bounds(rep, model, params, batch, sz["num_draws"])
  except Exception as e:
    failed("bounds", e)
  rep.flush()
  bounds = rep.data["bounds"]
  auto_strategy = program_lib.resolve_chain_strategy("auto")
  rep.data["auto_strategy"] = auto_strategy
  N, C = sz["checkpoints"], sz["chains"]
  variants = [  # (name, pairs, chains, strategy, compute_dtype, matmul_precision)
    ("vmap f32", N, C, "vmap", None, None),
    ("map f32", N, C, "map", None, None),
    ("bf16 compute", N, C, auto_strategy, "bfloat16", None),
    ("precision highest", N, C, auto_strategy, None, "highest"),
    ("1×1 vmap f32", 1, 1, "vmap", None, None),
  ]
  if N == 1 and C == 1:
    variants = variants[:-1]
  outputs = {}
  lr_sweep = {pp: lr_sweep_chain_steps(pp) for pp in (False, True)}

  def lr_row(name, n, c, strategy, dtype, precision):
    if not row(f"LR {name}", "lr"):
      return
    try:
      st = lr_settings(sz, num_chains=c, compute_dtype=dtype, matmul_precision=precision)
      blk = Block(model.loss, st, stack(params, n), data, strategy=strategy)
      r = blk.time(sz["reps"])
      _, out = blk.run()
      outputs[name] = np.asarray(out["loss"], np.float64)
      per = r["ms_per_chain_step"] / 1e3
      r.update(
        name=name,
        pairs=n,
        chains=c,
        strategy=strategy,
        compute=dtype or "float32",
        precision=precision or "default",
        ratio=per / (bounds["fwd_bwd_ms"] / 1e3) if "fwd_bwd_ms" in bounds else None,
        ratio_scan=(
          per / (bounds["scan_fwd_bwd_ms"] / 1e3) if "scan_fwd_bwd_ms" in bounds else None
        ),
        lr_sweep_h=lr_sweep[False] / r["chain_steps_per_s"] / 3600,
        lr_sweep_parity_h=lr_sweep[True] / r["chain_steps_per_s"] / 3600,
      )
      ref = outputs.get("vmap f32")
      if ref is not None and name != "vmap f32" and ref.shape == outputs[name].shape:
        r["loss_rel_vs_f32"] = rel_err(outputs[name].mean(-1), ref.mean(-1))
      r["memory_stats"] = memory_stats()  # the process's peak so far
      rep.data["lr"].append(r)
      print(
        f"  {r['chain_steps_per_s']:.1f} chain-steps/s, {r['ms_per_chain_step']:.4g} "
        f"ms/chain-step, compile {r['compile_s']:.1f} s",
        flush=True,
      )
    except Exception as e:
      failed(f"LR {name}", e)
    lr_projection(rep, lr_sweep)
    rep.flush()

  # The main row and the LM projection first: what a short device slot must not miss.
  lr_row(*variants[0])
  if row("LM all-heads wrLLC", "lm"):
    try:
      rep.data["lm"] = lm_row(sz, rep)
    except Exception as e:
      failed("LM all-heads wrLLC", e)
    lr_projection(rep, lr_sweep)
    rep.flush()
  for v in variants[1:]:
    lr_row(*v)

  # --- The driver: one end-to-end estimate of the main row --------------------------------
  main_row = next((r for r in rep.data["lr"] if r["name"] == "vmap f32"), None)
  if main_row and row("LR estimate end to end", "estimate"):
    try:
      st = lr_settings(sz)
      opts = SweepOptions(mesh=None, chain_strategy="vmap", progress=False)
      stacked = stack(params, N)
      estimate(model.loss, stacked, data, st, opts)  # compile
      ts = []
      for _ in range(2):
        t0 = time.perf_counter()
        estimate(model.loss, stacked, data, st, opts)
        ts.append(time.perf_counter() - t0)
      t = min(ts)
      steps = N * C * st.num_steps
      rep.data["estimate"] = dict(
        of="vmap f32",
        pairs=N,
        chains=C,
        draws=st.num_draws,
        seconds=t,
        chain_steps_per_s=steps / t,
        vs_block=t / main_row["seconds_best"],
      )
    except Exception as e:
      failed("LR estimate end to end", e)
    rep.flush()

  # --- Memory ----------------------------------------------------------------------------
  if row("memory", "memory"):
    try:
      st = lr_settings(sz, num_chains=C)
      strategy = auto_strategy
      prog = program_lib.get_program(model.loss, st, data=data, chain_strategy=strategy)
      first = stack(params, 1)
      keys = program_lib.chain_keys(st.seed, C, None)
      data_arg = sweep_lib.put(data, None)
      chunks = sorted({1, 2, max(N, 4)} if quick else {1, 2, 16})
      rows = []
      for k in chunks:
        use = sweep_lib.chunk_memory(prog, k, first, None, keys, data_arg, None, None)
        rows.append(
          dict(
            chunk=k,
            use=None
            if use is None
            else dict(
              argument=use.argument,
              output=use.output,
              temp=use.temp,
              alias=use.alias,
              total=use.total,
            ),
          )
        )
      m = dict(
        of=f"{strategy} f32 ({C} chains)",
        chunks=rows,
        memory_stats=memory_stats(),
        device_bytes=program_lib.device_memory_bytes(),
      )
      if rows[0]["use"] and rows[1]["use"]:
        per = (rows[1]["use"]["total"] - rows[0]["use"]["total"]) / (
          rows[1]["chunk"] - rows[0]["chunk"]
        )
        m["per_pair_mib"] = per / 2**20
        m["auto_chunk"] = sweep_lib.auto_chunk(
          prog, first, None, keys, data_arg, None, None, num_pairs=10**6, fraction=0.6
        )
      rep.data["memory"] = m
    except Exception as e:
      failed("memory", e)
    rep.flush()

  # --- Sharding ----------------------------------------------------------------------------
  D = jax.device_count()
  if D == 1:
    rep.data["skipped"].append("sharding (one device)")
  elif "sharding" in skip:
    rep.data["skipped"].append("sharding")
  else:
    sharding_rows(rep, sz, model, params, data, row, failed)

  mem = memory_stats()
  if mem and rep.data["memory"] is not None:
    rep.data["memory"]["memory_stats_end"] = mem
  rep.flush()
  final = markdown(rep.data)
  paths = [os.path.join(args.out, f"device_{backend}.md")]
  docs = (
    args.docs_dir
    if args.docs_dir is not None
    else ("docs/results" if os.path.isdir("docs/results") else "")
  )
  if docs:
    paths.append(os.path.join(docs, f"device_{backend}.md"))
  for p in paths:
    _write(p, final)
  print(final)
  print(f"wrote {rep.path('json')}, {rep.path('md')}, " + ", ".join(paths), flush=True)


def lr_projection(rep: Report, lr_sweep: dict) -> None:
  rows = {r["name"]: r for r in rep.data["lr"]}
  if not rows:
    return
  best = max(rows.values(), key=lambda r: r["chain_steps_per_s"])
  p = rep.data["projections"]
  batch = rep.data["sizes"]["batch_size"]
  lr_note = "" if batch == LR_SWEEP["batch_size"] else ", not the paper's 1024"
  for label, r in (("main (vmap f32)", rows.get("vmap f32")), ("fastest row", best)):
    if r is None:
      continue
    p[f"paper LR sweep, {label}"] = (
      f"{lr_sweep[False]:,} chain-steps (189 checkpoints × 10 × 5000) at "
      f"{r['chain_steps_per_s']:.1f} chain-steps/s ({r['name']}, {r['pairs']}×{r['chains']}"
      f", batch {batch}{lr_note}"
      f") = **{r['lr_sweep_h']:.3g} h** (190 with paper_parity: "
      f"{r['lr_sweep_parity_h']:.3g} h)"
    )
  lm = rep.data.get("lm")
  if lm and "sweep_h" in lm:
    lm_note = "" if lm["batch_size"] == LM_SWEEP["batch_size"] else ", not the paper's 32"
    p["rLLC paper all-heads wrLLC of the 2-layer LM"] = (
      f"{lm['sweep_chain_steps']:,} head·chain-steps at {lm['chain_steps_per_s']:.2f}/s "
      f"(batch {lm['batch_size']}"
      f"{lm_note}) = "
      f"**{lm['sweep_h']:.3g} h**"
    )


def lm_row(sz: dict, rep: Report) -> dict:
  model = AttentionOnlyLM(**LM_MODEL)
  params = model.init_params(jax.random.key(0))
  B, T = sz["lm_batch_size"], LM_MODEL["context_length"]
  tokens = jax.random.randint(
    jax.random.key(1), (16 * B, T), 0, LM_MODEL["vocab_size"], dtype=jnp.int32
  )
  data = {"tokens": np.asarray(tokens)}
  batch = {"tokens": tokens[:B]}
  fwd_bwd = jax.jit(jax.value_and_grad(model.loss))
  jax.block_until_ready(fwd_bwd(params, batch))
  t0 = time.perf_counter()
  jax.block_until_ready(fwd_bwd(params, batch))
  t_base = time.perf_counter() - t0
  names, masks = restrict.all_heads(params)
  assert len(names) == LM_SWEEP["num_heads"], names
  st = SamplerSettings(
    num_chains=sz["lm_chains"],
    num_draws=sz["lm_draws"],
    step_size=LM_SWEEP["step_size"],
    nbeta=LM_SWEEP["nbeta"],
    localization=LM_SWEEP["localization"],
    batch_size=B,
    num_burnin_steps=0,
    block_draws=sz["lm_draws"],
    mala_target="loss",
  )
  device_bytes = program_lib.device_memory_bytes()
  budget = 0.6 * device_bytes  # SweepOptions.memory_fraction's default

  def block_of(k):
    sel = Restrictions(names[:k], jax.tree.map(lambda m: np.asarray(m)[:k], masks))
    return Block(model.loss, st, stack(params, 1), data, strategy="auto", restrictions=sel)

  # The paper config's chunk (8 pairs), or as many as fit in the budget by the compiled
  # memory of one pair (memory ~ pairs; halved until the block fits).
  blk = block_of(1)
  one = memory_use(blk.compiled)
  tried = [dict(chunk=1, memory=one)]
  chunk = sz["lm_chunk"]
  if one is not None and one["total"] > 0:
    chunk = max(1, min(chunk, int(budget // one["total"])))
  while chunk > 1:
    blk = block_of(chunk)
    ma = memory_use(blk.compiled)
    tried.append(dict(chunk=chunk, memory=ma))
    if ma is None or ma["total"] <= budget:
      break
    chunk //= 2
  if chunk == 1 and len(tried) > 1:
    blk = block_of(1)
  r = blk.time(max(1, sz["reps"] - 1))
  # one block of `chunk` heads; the sweep runs ceil(16·107 / chunk) such blocks per
  # 200/lm_draws steps: the head·chain-step rate is what carries over.
  per = r["ms_per_chain_step"] / 1e3
  total = (
    LM_SWEEP["num_heads"]
    * LM_SWEEP["num_checkpoints"]
    * LM_SWEEP["num_chains"]
    * LM_SWEEP["num_draws"]
  )
  r.update(
    batch_size=B,
    heads=chunk,
    chunk=chunk,
    chains=st.num_chains,
    draws=st.num_draws,
    fwd_bwd_ms=1e3 * t_base,
    ratio=per / t_base,
    sweep_chain_steps=total,
    sweep_h=total / r["chain_steps_per_s"] / 3600,
    chunks_tried=tried,
    strategy=program_lib.resolve_chain_strategy("auto"),
    memory_stats=memory_stats(),
  )
  print(
    f"  LM: {r['chain_steps_per_s']:.2f} head-chain-steps/s, fwd+bwd {t_base * 1e3:.1f} "
    f"ms, projected {r['sweep_h']:.3g} h",
    flush=True,
  )
  return r


def sharding_rows(rep: Report, sz: dict, model, params, data, row, failed) -> None:
  D = jax.device_count()
  N = sz["shard_checkpoints"] or D
  C = sz["shard_chains"]
  rep.data["sizes"]["shard_checkpoints"] = N
  st = lr_settings(sz, num_chains=C, num_draws=sz["shard_draws"], block_draws=sz["shard_draws"])
  # Distinct checkpoints, so that a mis-sharded pair would show.
  keys = jax.random.split(jax.random.key(7), N)
  ckpts = jax.tree.map(
    lambda *xs: np.stack([np.asarray(x) for x in xs]), *[model.init_params(k) for k in keys]
  )
  opts = lambda m: SweepOptions(mesh=m, chain_strategy="vmap", progress=False)
  if not row("sharding: single-device reference", "sharding"):
    return
  try:
    base = estimate(model.loss, ckpts, data, st, opts(None))
    rep.data["bounds"]["single"] = Block(model.loss, st, ckpts, data, strategy="vmap").time(
      max(1, sz["reps"] - 1)
    )["chain_steps_per_s"]
  except Exception as e:
    failed("sharding: single-device reference", e)
    return
  rep.flush()
  cases = [("checkpoint", (D,), ("checkpoint",))]
  if D % 2 == 0 and C % 2 == 0:
    cases.append(("checkpoint×chain", (D // 2, 2), ("checkpoint", "chain")))
  if sz["batch_size"] % D == 0:
    cases.append(("batch", (D,), ("batch",)))
  for label, shape, names in cases:
    name = f"sharding: {label} {shape}"
    if not row(name, "sharding"):
      continue
    try:
      m = make_mesh(shape, names)
      res = estimate(model.loss, ckpts, data, st, opts(m))
      sm = mesh_lib.from_mesh(m)
      blk = Block(model.loss, st, ckpts, data, strategy="vmap", sm=sm)
      t = blk.time(max(1, sz["reps"] - 1))
      rep.data["sharding"].append(
        dict(
          mesh=" × ".join(f"{a}={n}" for a, n in zip(names, shape)),
          chain_steps_per_s=t["chain_steps_per_s"],
          compile_s=t["compile_s"],
          loss_rel_err=rel_err(res.loss_trace, base.loss_trace),
          llc_rel_err=rel_err(res.llc_per_chain, base.llc_per_chain),
          all_reduce=count_all_reduce(blk.compiled),
          memory_analysis=t["memory_analysis"],
        )
      )
      print(f"  {rep.data['sharding'][-1]}", flush=True)
    except Exception as e:
      failed(name, e)
    rep.flush()


if __name__ == "__main__":
  main(sys.argv[1:])
