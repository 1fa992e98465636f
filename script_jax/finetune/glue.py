"""Fine-tune a pretrained encoder on GLUE tasks, several seeds each, and print the paper's Table 2.

  python -m script_jax.finetune.glue --config=configs/finetune.py --init_from=WORKDIR \
      --data_dir=GLUE_DIR --output_dir=OUT [--tasks=cola,rte] [--config.num_seeds=3]
  python -m script_jax.finetune.glue ... --random_init     # same architecture, no pretraining

WORKDIR is a pretraining workdir of any objective (the SCRIPT/MLM encoder or the ELECTRA
discriminator; its tokenizer comes along). GLUE_DIR holds the standard layout
(`CoLA/train.tsv`, `CoLA/dev.tsv`, ...); without --tasks every task found there is run.
`--data_dir=tfds` reads TFDS `glue/*` instead (downloads on first use).

Every (task, seed) run is evaluated once, on the final weights, on the whole dev set, and its
metrics are written to OUT/results.json as soon as it ends: a rerun skips the runs already
there, so an interrupted multi-task run keeps what it finished. OUT also gets results.md (the
Table-2-shaped table and the per-task detail), and per run OUT/<task>/seed_<s>/ with its
metrics records (metrics/, read by metrics_log.py) and TensorBoard events (and the final
parameters with --config.save_model).
Where the data folder holds a task's unlabelled test file (`CoLA/test.tsv`, MNLI's
`test_matched.tsv` and `test_mismatched.tsv`, `diagnostic/diagnostic.tsv` for the MNLI model),
each run also predicts it into OUT/<task>/seed_<s>/test_predictions/<NAME>.tsv in the GLUE
server's format; `python -m script_jax.finetune.submit --output_dir=OUT` assembles a submission.
"""

from absl import app
from absl import flags

from script_jax import cli_errors
from script_jax.finetune import glue_runs
from script_jax.finetune import seed_runs

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags (defined only when run as a program)."""
  seed_runs.define_start_flags()
  flags.DEFINE_string("data_dir", None, "GLUE folder in the standard layout, or 'tfds'.")
  flags.DEFINE_list("tasks", [], "Tasks (default: every GLUE task found in --data_dir; with "
                    "'tfds', the eight of Table 2).")
  flags.DEFINE_string("output_dir", None, "Results, tables, logs (local or gs://).")
  flags.DEFINE_string("label", None, "The row's name in the table (default: the workdir's "
                      "name, '+random' appended for --random_init).")
  flags.DEFINE_bool("check_counts", True, "Refuse GLUE files whose row count differs from the "
                    "standard release (turn off for subsets).")
  flags.mark_flags_as_required(["init_from", "data_dir", "output_dir"])


def main(argv):
  def body():
    results = glue_runs.run_glue(FLAGS.config, FLAGS.init_from, FLAGS.data_dir,
                                 FLAGS.output_dir, tasks=FLAGS.tasks,
                                 random_init=FLAGS.random_init, step=FLAGS.step,
                                 label=FLAGS.label, check_counts=FLAGS.check_counts)
    print(glue_runs.tables({results["label"]: results}))
  cli_errors.run_cli(argv, body)


if __name__ == "__main__":
  define_flags()
  app.run(main)
