"""Predict with a saved GLUE model: one label (or STS-B score) per input line.

  python -m script_jax.finetune.glue ... --config.save_model=True      # saves OUT/<task>/seed_<s>/params
  python -m script_jax.finetune.predict --run_dir=OUT/rte/seed_0 --input=pairs.tsv [--output=F]

Each input line is a sentence, or two separated by a tab for pair tasks (MRPC, STS-B, RTE, ...).
Each output line is `label<TAB>line` (the task's label as in its files, or the STS-B score). The
task is the run folder's parent name; OUT/results.json says which pretraining workdir (its
architecture and tokenizer) and which fine-tuning config (its max_length) the run used.
Paths may be local or gs://.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
import jax
import ml_collections

from script_jax import cli_errors
from script_jax import fs
from script_jax.finetune import glue_runs
from script_jax.finetune import glue_data
from script_jax.finetune import model as task_models
from script_jax.finetune import seed_runs
from script_jax.finetune import trainer
from script_jax.finetune.seed_runs import FinetuneError

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("run_dir", None, "OUT/<task>/seed_<s> of a glue run with save_model.")
  flags.DEFINE_string("input", None, "Text file: a sentence, or sentence<TAB>sentence, per line.")
  flags.DEFINE_string("output", "-", "Where the predictions go ('-': standard output).")
  flags.mark_flags_as_required(["run_dir", "input"])


def load_run(run_dir: str):
  """(task spec, Classifier, params, tokenizer, special ids, max_length) of a saved run."""
  run_dir = run_dir.rstrip("/")
  params_dir = fs.join(run_dir, "params")
  if not fs.exists(params_dir):
    raise FinetuneError(f"No saved model in {run_dir} ({params_dir} does not exist): fine-tune "
                        "with --config.save_model=True.")
  task_dir = fs.dirname(run_dir)
  out_dir = fs.dirname(task_dir)
  try:
    spec = glue_data.get_task(task_dir.rsplit("/", 1)[-1])
  except ValueError as e:
    raise FinetuneError(f"{run_dir} is not OUT/<task>/seed_<s> of a glue run: {e}") from None
  results = seed_runs.read_results(out_dir)
  if "init_from" not in results or "finetune_config" not in results:
    raise FinetuneError(f"{out_dir}/results.json does not say which model the run started "
                        "from; is this a glue output folder?")
  ft = ml_collections.ConfigDict(results["finetune_config"])
  start = seed_runs.load_start(results["init_from"], None, ft, random_init=True)
  model = task_models.Classifier(start.encoder_cfg, spec.num_outputs)
  max_length = int(ft.max_length)
  ids = jax.numpy.zeros((1, max_length), jax.numpy.int32)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, ids, ids)["params"])
  params = trainer.load_params(trainer.resolved(params_dir), abstract)
  return spec, model, params, start.tokenizer, start.special_ids, max_length


def predict_lines(run_dir: str, lines: list[str]) -> list[str]:
  """The label (or score) of each line, as text."""
  spec, model, params, tokenizer, special, max_length = load_run(run_dir)
  examples = []
  for number, line in enumerate(lines, 1):
    parts = line.split("\t")
    if len(parts) != (2 if spec.is_pair else 1):
      raise FinetuneError(f"line {number}: {spec.display_name} takes "
                          f"{'two tab-separated sentences' if spec.is_pair else 'one sentence'}"
                          f" per line, got {len(parts)} field(s).")
    examples.append(glue_data.Example(str(number), parts[0], parts[1] if spec.is_pair else None,
                                      0.0 if spec.is_regression else 0))
  arrays = glue_data.featurize(examples, None, special["cls"], special["sep"], special["pad"],
                               max_length, encode_batch=tokenizer.encode_batch)
  outputs = trainer.predict(model, params, arrays, batch_size=64)
  predictions = glue_runs.predictions_from(spec, outputs)
  if spec.is_regression:
    return [f"{score:.4f}" for score in predictions]
  return [spec.labels[i] for i in predictions]


def run(run_dir: str, input_path: str, output_path: str = "-") -> int:
  """Predicts every line of input_path; returns the number of lines."""
  if not fs.exists(input_path):
    raise FinetuneError(f"The input file {input_path} does not exist.")
  with fs.open(input_path, "r") as f:
    lines = [l.rstrip("\r\n") for l in f.read().split("\n")]
  if lines and lines[-1] == "":
    lines.pop()
  labels = predict_lines(run_dir, lines)
  text = "".join(f"{label}\t{line}\n" for label, line in zip(labels, lines))
  if output_path == "-":
    sys.stdout.write(text)
  else:
    fs.write_atomically(output_path, text)
  return len(lines)


def main(argv):
  cli_errors.run_cli(argv, lambda: run(FLAGS.run_dir, FLAGS.input, FLAGS.output))


if __name__ == "__main__":
  define_flags()
  app.run(main)
