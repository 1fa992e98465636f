"""Variants of the train step, timed one after another in one process on the same device.

  python -m script_jax.bench.variants --config=configs/small.py --batch_size=128 \
      --config.model.dtype=bfloat16 --output=/tmp/variants.json --budget_s=480

Each variant is (objective, config overrides, XLA compiler options, steps per call); see
VARIANTS. Every objective's train state is initialised once and reused by its variants (none
of them changes the parameters' shapes), so a variant costs its compile and its timing only.
Variants run in the listed order while --budget_s allows (one that would start with less than
--reserve_s left is skipped and listed as such); one that fails is recorded with its error and
the rest go on. The JSON is rewritten after every variant, so a run cut short keeps what it
measured. Made for a GPU lent for minutes (script_jax/bench/gpu_check.sh); it runs anywhere.
"""

import json
import math
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

from script_jax import fs
from script_jax import sharding as sharding_lib
from script_jax.bench import step_timing

# (name, objective, config overrides, compiler options, steps per call), most telling first.
# Measured slower on an H200 and dropped (docs/benchmarks_log.md section (i)): SCRIPT's two
# passes stacked into one [2, B, T] forward and backward (commit deaffcc) and XLA's block-level
# fusion rewriter.
VARIANTS = [
    ("script", "script", {}, {}, 1),
    ("electra", "electra", {}, {}, 1),
    ("script fused_qkv", "script", {"model.fused_qkv": True}, {}, 1),
    ("electra fused_qkv", "electra", {"model.fused_qkv": True}, {}, 1),
    ("script cudnn layer norm", "script", {}, {"xla_gpu_enable_cudnn_layer_norm": True}, 1),
    ("electra cudnn layer norm", "electra", {}, {"xla_gpu_enable_cudnn_layer_norm": True}, 1),
    ("script 10/call", "script", {}, {}, 10),
    ("electra 10/call", "electra", {}, {}, 10),
]

FLAGS = flags.FLAGS


def _print(message: str) -> None:
  print(message, flush=True)


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                  lock_config=False)
  flags.DEFINE_integer("batch_size", None, "Global batch size (default: the config's).")
  flags.DEFINE_integer("steps", 50, "Timed train steps per window.")
  flags.DEFINE_integer("warmup", 10, "Untimed steps after compilation.")
  flags.DEFINE_integer("repeats", 2, "Timed windows; the fastest is reported.")
  flags.DEFINE_integer("peak_size", None,
                       "n of the n^3 matmul peak (default: 2048 on CPU, 8192 on accelerators).")
  flags.DEFINE_list("only", None, "Run only these variant names (default: all, in order).")
  flags.DEFINE_float("budget_s", 480.0, "Start no variant after this many seconds in all.")
  flags.DEFINE_float("reserve_s", 60.0, "Skip a variant that would start with less left.")
  flags.DEFINE_string("output", None, "Write the results as JSON to this path.")
  flags.mark_flags_as_required(["config"])


def with_overrides(config, overrides: dict):
  """A copy of `config` with dotted-name overrides ({"model.fused_qkv": True})."""
  config = config.copy_and_resolve_references()
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = config
    for name in parents:
      node = node[name]
    if leaf not in node:
      raise KeyError(f"{dotted} is not a config field")
    node[leaf] = value
  return config


def format_rows(rows, peak_flops_per_sec: float) -> str:
  """The variants as a table: steps/s, utilisation of the measured matmul peak, compile, memory."""
  lines = [f"{'variant':<40} {'steps/s':>9} {'util %':>7} {'compile s':>9} {'temp MiB':>9}  note"]
  for row in rows:
    if "steps_per_sec" in row:
      lines.append(f"{row['name']:<40} {row['steps_per_sec']:>9.2f} "
                   f"{100 * row['model_flops_per_sec'] / peak_flops_per_sec:>7.1f} "
                   f"{row['compile_s']:>9.1f} "
                   f"{row['memory'].get('temp_size_in_bytes', 0) / step_timing.MIB:>9.0f}")
    else:
      lines.append(f"{row['name']:<40} {'-':>9} {'-':>7} {'-':>9} {'-':>9}  {row['note']}")
  rates = {row["name"]: row.get("steps_per_sec") for row in rows}
  if rates.get("script") and rates.get("electra"):
    lines.append(f"SCRIPT/ELECTRA as configured: {rates['script'] / rates['electra']:.3f} "
                 "(paper, TPU v3-8: 22.7/31.3 = 0.725)")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  start = time.perf_counter()
  names = [v[0] for v in VARIANTS]
  unknown = sorted(set(FLAGS.only or []) - set(names))
  if unknown:
    raise app.UsageError(f"Unknown variants {unknown}; choose from {names}")
  config = FLAGS.config
  report = step_timing.environment()
  mesh = sharding_lib.create_mesh(config)
  report["settings"] = {"batch_size": FLAGS.batch_size or config.batch_size,
                        "seq_len": config.seq_len, "dtype": config.model.dtype,
                        "steps": FLAGS.steps, "warmup": FLAGS.warmup, "repeats": FLAGS.repeats}
  report["command"] = " ".join(["python", *sys.argv])
  report["matmul_peak"] = step_timing.measure_matmul_peak(
      mesh, *step_timing.peak_settings(mesh, FLAGS.peak_size), config.model.dtype)
  _print(f"Matmul peak: {report['matmul_peak']['flops_per_sec'] / 1e12:.1f} TFLOP/s")
  rows, states = [], {}
  report["variants"] = rows

  def save():
    if FLAGS.output:
      fs.makedirs(fs.dirname(fs.abspath(FLAGS.output)))
      with fs.open(FLAGS.output, "w") as f:
        json.dump(report, f, indent=2, default=str)

  for name, objective, overrides, options, per_call in VARIANTS:
    if FLAGS.only and name not in FLAGS.only:
      continue
    elapsed = time.perf_counter() - start
    row = {"name": name, "objective": objective, "overrides": overrides,
           "compiler_options": options, "steps_per_call": per_call}
    if elapsed > FLAGS.budget_s - FLAGS.reserve_s:
      row["note"] = f"skipped: {elapsed:.0f} s of the {FLAGS.budget_s:.0f} s budget used"
    else:
      _print(f"=== {name} ({elapsed:.0f} s in)")
      try:
        row.update(step_timing.benchmark_objective(
            with_overrides(config, overrides), objective, batch_size=FLAGS.batch_size,
            steps=math.ceil(FLAGS.steps / per_call) * per_call, warmup=FLAGS.warmup,
            repeats=FLAGS.repeats, mesh=mesh, compiler_options=options or None,
            steps_per_call=per_call, states=states))
      except Exception as error:  # pylint: disable=broad-except
        row["note"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
        _print(f"[{name}] {row['note']}")
    rows.append(row)
    save()
  _print(format_rows(rows, report["matmul_peak"]["flops_per_sec"]))
  save()


if __name__ == "__main__":
  define_flags()
  app.run(main)
