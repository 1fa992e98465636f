"""Iteration rate of SCRIPT, ELECTRA and BERT-MLM train steps under identical settings.

  python -m script_jax.bench.step_speed --config=configs/small.py --batch_size=8 --output=bench.json
  python -m script_jax.bench.step_speed --config=configs/small.py --objectives=script,electra \
      --config.model.dtype=bfloat16 --steps=50
  python -m script_jax.bench.step_speed --config=configs/small.py --objectives=script --memory_only \
      --config.script.logsumexp_chunk=2048           # batch 128: compile and report memory only

In one process, for each objective: build the sharded state, compile the real train step
(`train.make_train_step`), warm up, then time `--steps` steps on one fixed random batch that
stays on the device; the loop never waits on the host, only the end of the window does. The
table reports steps/s, tokens/s, model FLOPs per step (`flops.py`), achieved FLOP/s and the
utilisation against the matmul peak measured in the same run, and XLA's memory analysis of the
compiled step. Paper, Section 3.3 (TPU v3-8, small models): ELECTRA 31.3 it/s, SCRIPT 22.7 it/s,
a SCRIPT/ELECTRA ratio of 0.725. Benchmarks are run on purpose; they are not tests.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from script_jax import config_lib
from script_jax import fs
from script_jax.bench import step_timing

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so importing stays free)."""
  config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                  lock_config=True)
  flags.DEFINE_list("objectives", list(config_lib.OBJECTIVES), "Objectives to time, in order.")
  flags.DEFINE_integer("batch_size", None, "Global batch size (default: the config's).")
  flags.DEFINE_integer("steps", 20, "Timed train steps per window.")
  flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
  flags.DEFINE_integer("repeats", 1, "Timed windows of --steps steps; the fastest is reported.")
  flags.DEFINE_integer("steps_per_call", 1, "Train steps compiled into one call (a lax.scan); "
                       "--steps must be a multiple.")
  flags.DEFINE_bool("memory_only", False, "Only compile and report XLA's memory analysis.")
  flags.DEFINE_integer("peak_size", None, "n of the n x n x n matmul that measures the peak "
                       "(default: 2048 on CPU, 8192 on accelerators, where 2048 is too small "
                       "to reach their peak).")
  flags.DEFINE_integer("peak_iters", None, "Chained matmuls per peak measurement window "
                       "(default: 10 on CPU, 20 on accelerators).")
  flags.DEFINE_string("output", None, "Write the results as JSON to this path.")
  flags.DEFINE_string("profile_dir", None, "Also trace --profile_steps steps of each objective "
                      "(after the timed windows) with jax.profiler into DIR/OBJECTIVE, and print "
                      "the device ops that took the most time.")
  flags.DEFINE_integer("profile_steps", 5, "Steps traced per objective with --profile_dir.")
  flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  report = step_timing.run_benchmark(
      FLAGS.config, FLAGS.objectives, batch_size=FLAGS.batch_size, steps=FLAGS.steps,
      warmup=FLAGS.warmup, repeats=FLAGS.repeats, memory_only=FLAGS.memory_only,
      peak_size=FLAGS.peak_size, peak_iters=FLAGS.peak_iters, profile_dir=FLAGS.profile_dir,
      profile_steps=FLAGS.profile_steps, steps_per_call=FLAGS.steps_per_call)
  report["command"] = " ".join([os.path.basename(sys.executable), "-m", "script_jax.bench.step_speed",
                                *sys.argv[1:]])
  report["config_file"] = config_flags.get_config_filename(FLAGS["config"])
  print(step_timing.format_table(report), flush=True)
  if FLAGS.output:
    fs.makedirs(fs.dirname(fs.abspath(FLAGS.output)))
    with fs.open(FLAGS.output, "w") as f:
      json.dump(report, f, indent=2, default=str)
    print(f"Wrote {FLAGS.output}", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
