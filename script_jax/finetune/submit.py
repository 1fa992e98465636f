"""Assemble a GLUE benchmark submission from the test predictions of `finetune.glue` runs.

  python -m script_jax.finetune.submit --output_dir=OUT [--seed=N] [--submission_dir=DIR]

OUT is a `finetune.glue` output folder. For every test set (CoLA.tsv ... AX.tsv, see
glue_submission.py) it takes one run of the task that predicts it: by default the seed whose dev
score is the median over the task's seeds (`statistics.median_low` of the headline metric, the
lowest such seed on a tie), or the seed given by --seed. Its file
OUT/<task>/seed_<s>/test_predictions/<NAME>.tsv is checked (header, labels, one row per index)
and copied to DIR (default OUT/submission), which also gets submission.zip (the files to upload
at gluebenchmark.com) and results.json (which run each file came from, and what is missing).
The server scores only a complete submission of all eleven files; the summary lists the
missing ones.
"""

from __future__ import annotations

import io
import statistics
from typing import Any, Optional
import zipfile

from absl import app
from absl import flags

from script_jax import cli_errors
from script_jax import fs
from script_jax.finetune import glue_data
from script_jax.finetune import glue_submission
from script_jax.finetune import seed_runs
from script_jax.finetune.seed_runs import FinetuneError

FLAGS = flags.FLAGS
ZIP_NAME = "submission.zip"


def define_flags() -> None:
  flags.DEFINE_string("output_dir", None, "A finetune.glue output folder (local or gs://).")
  flags.DEFINE_integer("seed", None, "Take every task's run of this seed (default: the run "
                       "with the median dev score of each task).")
  flags.DEFINE_string("submission_dir", None, "Where the files go (default: "
                      "OUTPUT_DIR/submission).")
  flags.mark_flags_as_required(["output_dir"])


def median_seed(scores_by_seed: dict[str, float]) -> str:
  """The seed whose score is statistics.median_low of the scores (the lowest seed on a tie)."""
  median = statistics.median_low(scores_by_seed.values())
  return min((s for s, v in scores_by_seed.items() if v == median), key=int)


def choose_run(task_runs: dict[str, dict[str, Any]], task: str,
               seed: Optional[int]) -> tuple[Optional[str], str]:
  """(seed, why) of the run to submit for `task`; seed None when there is none."""
  if not task_runs:
    return None, "no fine-tuned run of this task"
  if seed is not None:
    if str(seed) not in task_runs:
      return None, f"no run of seed {seed} (seeds run: {', '.join(sorted(task_runs, key=int))})"
    return str(seed), f"seed {seed}, as asked"
  headline = glue_data.get_task(task).headline_metric
  chosen = median_seed({s: r[headline] for s, r in task_runs.items()})
  return chosen, f"median {headline} of {len(task_runs)} seed(s)"


def assemble(output_dir: str, submission_dir: str, seed: Optional[int] = None) -> dict[str, Any]:
  """Writes the submission files, the zip and results.json; returns that record."""
  results_path = fs.join(output_dir, seed_runs.RESULTS_FILE)
  if not fs.exists(results_path):
    raise FinetuneError(f"No {seed_runs.RESULTS_FILE} in {output_dir}: give --output_dir the "
                        "folder a `python -m script_jax.finetune.glue` run wrote.")
  glue_runs = seed_runs.read_results(output_dir)["runs"]
  fs.makedirs(submission_dir)
  record: dict[str, Any] = {"glue_results": results_path,
                            "selection": "median_low" if seed is None else f"seed {seed}",
                            "files": {}, "missing": {}}
  archive = io.BytesIO()
  with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
    for test_set in glue_submission.TEST_SETS:
      task = test_set.task
      task_runs = glue_runs.get(task, {})
      chosen, why = choose_run(task_runs, task, seed)
      if chosen is None:
        record["missing"][test_set.submission_file] = why
        continue
      source = glue_submission.predictions_path(fs.join(output_dir, task, f"seed_{chosen}"),
                                                test_set)
      if not fs.exists(source):
        record["missing"][test_set.submission_file] = (
            f"seed {chosen} has no {test_set.submission_file} (was {test_set.folder}/"
            f"{test_set.file} in the run's --data_dir?)")
        continue
      try:
        rows = glue_submission.read_submission(source, test_set)
      except glue_data.GlueDataError as e:
        raise FinetuneError(str(e)) from None
      data = fs.read_bytes(source)
      fs.write_atomically(fs.join(submission_dir, test_set.submission_file), data)
      zipped.writestr(test_set.submission_file, data)
      headline = glue_data.get_task(task).headline_metric
      record["files"][test_set.submission_file] = {
          "task": task, "seed": int(chosen), "why": why, "rows": len(rows), "source": source,
          f"dev_{headline}": task_runs[chosen][headline]}
  if record["files"]:
    fs.write_atomically(fs.join(submission_dir, ZIP_NAME), archive.getvalue())
  fs.write_json_atomically(fs.join(submission_dir, seed_runs.RESULTS_FILE), record)
  return record


def summary(record: dict[str, Any], submission_dir: str) -> str:
  """A Markdown table of the files written, then what is missing."""
  lines = ["| file | task | seed | dev score | rows |", "|---|---|---|---|---|"]
  for name, f in record["files"].items():
    score = next(v for k, v in f.items() if k.startswith("dev_"))
    lines.append(f"| {name} | {f['task']} | {f['seed']} ({f['why']}) | {score:.2f} | "
                 f"{f['rows']:,} |")
  total = len(glue_submission.TEST_SETS)
  text = "\n".join(lines) + "\n"
  if record["files"]:
    text += f"\n{len(record['files'])} of {total} files in {fs.join(submission_dir, ZIP_NAME)}.\n"
  if record["missing"]:
    text += (f"\nMissing ({len(record['missing'])} of {total}; the GLUE server scores only a "
             "submission of all of them):\n" +
             "".join(f"- {name}: {why}\n" for name, why in record["missing"].items()))
  return text


def main(argv):
  def body():
    submission_dir = FLAGS.submission_dir or fs.join(FLAGS.output_dir, "submission")
    record = assemble(FLAGS.output_dir, submission_dir, FLAGS.seed)
    if not record["files"]:
      raise FinetuneError(
          f"No test predictions to submit in {FLAGS.output_dir}: " +
          "; ".join(f"{name}: {why}" for name, why in record["missing"].items()))
    print(summary(record, submission_dir))
  cli_errors.run_cli(argv, body)


if __name__ == "__main__":
  define_flags()
  app.run(main)
