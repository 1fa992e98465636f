"""Fine-tune a pretrained encoder on SQuAD 1.1 or 2.0 and score it by the official rules.

  python -m script_jax.finetune.squad --config=configs/finetune.py --init_from=WORKDIR \
      --train_file=train-v1.1.json --dev_file=dev-v1.1.json --output_dir=OUT
  python -m script_jax.finetune.squad ... --dev_file=dev-v2.0.json --dev_split=0.8
      # no train file: train on 80% of the dev articles, evaluate on the other 20% (say so!)
  python -m script_jax.finetune.squad ... --tfds=squad/v2.0 --output_dir=OUT
      # TFDS's train and validation splits (downloaded on first use)

Windows of --config.squad.max_length tokens (512 as ELECTRA; 128 or 256 for models pretrained
on short sequences, whose later position embeddings never trained), a document stride of 128,
questions of at most 64 tokens. Per seed, OUT/seed_<s>/ gets predictions.json (the official
format; for 2.0 "" where P(no answer) > squad.na_prob_thresh, by default ELECTRA's cut of
0.060 for its head and BERT's 0.5 for "bert"), for 2.0 also na_probs.json and
span_predictions.json (the best span behind every blank, for the best-threshold sweep), and the
training logs; OUT/eval_dataset.json is the evaluated
set in the official format when it is not a file of the user's (--dev_split, --tfds); OUT/results.json has every seed's scores (the official keys), OUT/results.md a
table. `python -m script_jax.finetune.squad_eval DATA predictions.json [--na-prob-file ...]`
re-scores any of them, as the official script would.
"""

from absl import app
from absl import flags

from script_jax import cli_errors
from script_jax.finetune import seed_runs
from script_jax.finetune import squad_runs

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags (defined only when run as a program)."""
  seed_runs.define_start_flags()
  flags.DEFINE_string("train_file", None, "SQuAD training JSON (official format).")
  flags.DEFINE_string("dev_file", None, "SQuAD dev JSON (official format).")
  flags.DEFINE_float("dev_split", None, "Without --train_file: the share of the dev file's "
                     "articles to train on; the others are evaluated.")
  flags.DEFINE_string("tfds", None, "Instead of the files: TFDS squad/v1.1 or squad/v2.0 "
                      "(its train and validation splits; downloads on first use).")
  flags.DEFINE_string("output_dir", None, "Predictions, scores, logs (local or gs://).")
  flags.mark_flags_as_required(["init_from", "output_dir"])


def main(argv):
  def body():
    results = squad_runs.run_squad(FLAGS.config, FLAGS.init_from, FLAGS.dev_file,
                                   FLAGS.output_dir, train_file=FLAGS.train_file,
                                   dev_split=FLAGS.dev_split, tfds_name=FLAGS.tfds,
                                   random_init=FLAGS.random_init, step=FLAGS.step)
    print(squad_runs.table(results))
  cli_errors.run_cli(argv, body)


if __name__ == "__main__":
  define_flags()
  app.run(main)
