"""The sample-efficiency curve (the paper's Figure 2): GLUE against pretraining steps.

  python -m script_jax.experiments.curve --workdirs=RUN_A,RUN_B --data_dir=GLUE_DIR \
      --output_dir=OUT [--tasks=sst2,rte] [--steps=1000,2000] [--config.num_seeds=2] ...

Every kept checkpoint of every pretraining workdir (keep_checkpoint_every_steps keeps them; or
the --steps given) is fine-tuned on the tasks with the GLUE command's code and recipe
(configs/finetune.py, overridable as for finetune.glue), into OUT/<label>/step_<N>/, a
finetune.glue output folder each. A rerun fine-tunes only the (checkpoint, task, seed) runs not
yet there. OUT then gets:

  curve.json  every point: per task the headline metric's mean, min and max over seeds, the GLUE
              mean of the tasks (its band: the min and max over seeds of the per-seed means),
              and the workdir's held-out pretraining metrics (its eval_ records)
  curve.csv   the same points, one row per (label, step, metric)
  curve.md    a table per workdir: steps by tasks, GLUE mean, held-out MLM loss and critic AUC
  curve.png   GLUE mean and each task against steps, one line per workdir with its min-max band
              over seeds; below, the held-out MLM loss and critic AUC against steps

matplotlib draws the PNG (in the `experiments` and `test` extras).
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from script_jax import cli_errors
from script_jax import fs
from script_jax.experiments import curve_runs

FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", "configs/finetune.py",
                                  "The fine-tuning recipe (configs/finetune.py).",
                                  lock_config=True)
  flags.DEFINE_list("workdirs", None, "Pretraining workdirs (any objective; local or gs://).")
  flags.DEFINE_list("labels", [], "A name per workdir (default: each workdir's folder name).")
  flags.DEFINE_string("data_dir", None, "GLUE folder in the standard layout, or 'tfds'.")
  flags.DEFINE_list("tasks", [], "GLUE tasks (default: every task found in --data_dir).")
  flags.DEFINE_list("steps", [], "Only these checkpoint steps (default: every kept one).")
  flags.DEFINE_string("output_dir", None, "Fine-tuning runs, the curve's files.")
  flags.DEFINE_bool("check_counts", True, "Refuse GLUE files whose row count differs from the "
                    "standard release (turn off for subsets).")
  flags.mark_flags_as_required(["workdirs", "data_dir", "output_dir"])


def main(argv):
  def body():
    labels = FLAGS.labels or curve_runs.default_labels(FLAGS.workdirs)
    curve = curve_runs.run_curve(FLAGS.config, FLAGS.workdirs, labels, FLAGS.data_dir,
                                 FLAGS.output_dir, FLAGS.tasks,
                                 curve_runs.parse_steps(FLAGS.steps), FLAGS.check_counts)
    curve_runs.write_outputs(curve, FLAGS.output_dir)
    print(curve_runs.markdown(curve))
    print(f"Curve: {fs.join(FLAGS.output_dir, 'curve.png')} (and curve.json, .csv, .md).",
          file=sys.stderr)
  cli_errors.run_cli(argv, body)


if __name__ == "__main__":
  define_flags()
  app.run(main)
