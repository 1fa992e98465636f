"""GLUE fine-tuning: every (task, seed) run, the results file and the paper's Table 2. The
library behind `python -m script_jax.finetune.glue`, whose docstring describes what OUT holds."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from script_jax import config_lib
from script_jax import fs
from script_jax.finetune import glue_data
from script_jax.finetune import glue_submission
from script_jax.finetune import metrics
from script_jax.finetune import model as task_models
from script_jax.finetune import seed_runs
from script_jax.finetune import trainer
from script_jax.finetune.seed_runs import FinetuneError

# ----------------------------------------------------------------------------- results

def summarize(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
  """{task: task_result} of the headline metric over the seeds run so far."""
  summary = {}
  for task, by_seed in results["runs"].items():
    headline = metrics.headline_metric(task)
    scores = [r[headline] for _, r in sorted(by_seed.items(), key=lambda kv: int(kv[0]))]
    if scores:
      summary[task] = metrics.task_result(task, scores)
  return summary


def tables(labelled_results: dict[str, dict[str, Any]]) -> str:
  """Table 2's shape (mean ± sd of the headline metric) and the per-task detail, in Markdown."""
  summaries = {label: summarize(r) for label, r in labelled_results.items()}
  return (metrics.glue_table_markdown(summaries) + "\n\nMedians over seeds (as ELECTRA "
          "reports):\n\n" + metrics.glue_table_markdown(summaries, center="median") +
          "\n\n" + metrics.detail_table_markdown(summaries) + "\n")


# ----------------------------------------------------------------------------- the runs

def tasks_to_run(data_dir: str, requested: list[str]) -> list[str]:
  """The tasks to fine-tune (each task's own name; MNLI-mm comes with MNLI)."""
  if requested:
    names = []
    for name in requested:
      try:
        spec = glue_data.get_task(name)
      except ValueError as e:
        raise FinetuneError(str(e)) from None
      if spec.trained_as not in names:
        names.append(spec.trained_as)
    return names
  if data_dir == "tfds":
    return list(glue_data.GLUE_MEAN_TASKS)
  found = [name for name, spec in glue_data.TASKS.items()
           if spec.model_task is None and
           fs.exists(glue_data.split_path(data_dir, spec, "train"))]
  if not found:
    raise FinetuneError(f"No GLUE task found in {data_dir}: expected the standard layout, "
                        "e.g. CoLA/train.tsv and CoLA/dev.tsv.")
  return found


def _read(data_dir: str, task: str, split: str, check_counts: bool):
  try:
    if data_dir == "tfds":
      return glue_data.load_tfds_split(task, split, check_counts=check_counts)
    return glue_data.read_glue_split(data_dir, task, split, check_counts=check_counts)
  except glue_data.GlueDataError as e:
    raise _data_error(e) from None


def _data_error(error: Exception) -> FinetuneError:
  """A GLUE file problem as the command's one-line error, with the way past a row count."""
  text = str(error)
  return FinetuneError(f"{text} (--nocheck_counts skips the row-count check for subsets)"
                       if "rows" in text else text)


def run_glue(ft, init_from: str, data_dir: str, output_dir: str, *,
             tasks: Optional[list[str]] = None, random_init: bool = False,
             step: Optional[int] = None, label: Optional[str] = None,
             check_counts: bool = True) -> dict[str, Any]:
  """Fine-tunes and evaluates every (task, seed) not yet in OUT/results.json; returns them."""

  config_lib.validate_finetune_config(ft)
  names = tasks_to_run(data_dir, tasks or [])
  start = seed_runs.load_start(init_from, step, ft, random_init)
  cfg, tokenizer, special = start.encoder_cfg, start.tokenizer, start.special_ids
  if ft.max_length > cfg.max_position_embeddings:
    raise FinetuneError(f"max_length={ft.max_length} exceeds the model's "
                        f"{cfg.max_position_embeddings} positions.")
  label = label or os.path.basename(init_from.rstrip("/")) + ("+random" if random_init else "")
  fs.makedirs(output_dir)
  results = seed_runs.read_results(output_dir)
  seed_runs.check_same_start(results, output_dir, init_from, random_init)
  results.update(label=label, init_from=init_from, random_init=random_init,
                 pretraining_step=int(step) if step is not None else None,
                 finetune_config=json.loads(ft.to_json()))

  def featurize(examples):
    return glue_data.featurize(examples, None, special["cls"], special["sep"], special["pad"],
                               ft.max_length, encode_batch=tokenizer.encode_batch)

  seeds = list(range(ft.first_seed, ft.first_seed + ft.num_seeds))
  for name in names:
    spec = glue_data.get_task(name)
    eval_names = glue_data.eval_tasks(name)
    todo = [s for s in seeds if any(str(s) not in results["runs"].get(e, {})
                                    for e in eval_names)]
    if not todo:
      print(f"{spec.display_name}: all {len(seeds)} seeds done.", file=sys.stderr)
      continue
    train_examples = _read(data_dir, name, "train", check_counts)
    if 0 < ft.max_train_examples < len(train_examples):
      keep = np.random.default_rng(0).permutation(len(train_examples))[:ft.max_train_examples]
      train_examples = [train_examples[i] for i in sorted(keep)]
    if ft.swap_pairs:
      train_examples = glue_data.training_examples(name, train_examples)
    train_arrays = featurize(train_examples)
    train_arrays["labels"] = training_targets(spec, train_arrays["labels"])
    eval_arrays = {e: featurize(_read(data_dir, e, "dev", check_counts)) for e in eval_names}
    unlabelled = _unlabelled_sets(data_dir, name, check_counts, featurize)
    task = seed_runs.Task(model=task_models.Classifier(cfg, spec.num_outputs),
                          loss_fn=regression_loss if spec.is_regression else classification_loss,
                          train_arrays=train_arrays, epochs=ft.epochs or spec.default_epochs)

    def evaluate(run: seed_runs.SeedRun) -> None:
      for eval_name in eval_names:
        outputs = trainer.predict(task.model, run.params, eval_arrays[eval_name],
                                  ft.eval_batch_size)
        predictions = predictions_from(spec, outputs)
        scores = metrics.task_metrics(eval_name, predictions, eval_arrays[eval_name]["labels"])
        scores.update(train_loss=run.train_loss, epochs=task.epochs,
                      train_examples=len(train_examples),
                      seconds=round(time.time() - run.began, 1))
        results["runs"].setdefault(eval_name, {})[str(run.seed)] = scores
        print(f"{glue_data.get_task(eval_name).display_name} seed {run.seed}: " +
              ", ".join(f"{k} {v:.2f}" for k, v in scores.items()
                        if k in glue_data.get_task(eval_name).metrics), file=sys.stderr)
      for test_set, (indices, arrays) in unlabelled.items():
        outputs = trainer.predict(task.model, run.params, arrays, ft.eval_batch_size)
        text = glue_submission.submission_text(test_set, indices,
                                               predictions_from(spec, outputs))
        if jax.process_index() == 0:
          path = glue_submission.predictions_path(run.run_dir, test_set)
          fs.makedirs(fs.dirname(path))
          fs.write_atomically(path, text)

    seed_runs.run_seeds(todo, start, task, ft, random_init=random_init, init_from=init_from,
                        run_dir=lambda seed: fs.join(output_dir, name, f"seed_{seed}"),
                        label=lambda seed: f"{spec.display_name} seed {seed}",
                        evaluate=evaluate, results=results, output_dir=output_dir,
                        table=lambda r: tables({label: r}))
  return results


def _unlabelled_sets(data_dir: str, task: str, check_counts: bool, featurize):
  """{test set: (its indices, its features)} for the task's test files found in data_dir."""
  if data_dir == "tfds":  # TFDS's test splits hold no index column to submit by
    return {}
  found = {}
  for test_set in glue_submission.sets_predicted_by(task):
    if fs.exists(glue_submission.unlabelled_path(data_dir, test_set)):
      try:
        indices, examples = glue_submission.read_test_set(data_dir, test_set,
                                                          check_counts=check_counts)
      except glue_data.GlueDataError as e:
        raise _data_error(e) from None
      found[test_set] = (indices, featurize(examples))
  return found


def training_targets(spec, labels_N: np.ndarray) -> np.ndarray:
  """What the head is trained to output: class ids, or (regression) ELECTRA's RegressionTask
  target, the score scaled to [0, 1]."""
  if spec.is_regression:
    return (np.asarray(labels_N, np.float32) / spec.regression_scale).astype(np.float32)
  return labels_N


def predictions_from(spec, outputs_NxC: np.ndarray) -> np.ndarray:
  """Class ids (argmax), or scores on the task's own scale (STS-B: 0-5)."""
  if spec.is_regression:
    return outputs_NxC[:, 0] * spec.regression_scale
  return outputs_NxC.argmax(-1)


def classification_loss(logits_BxC, batch):
  """Cross-entropy and accuracy per example."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, batch["labels"])
  accuracy_B = (logits_BxC.argmax(-1) == batch["labels"]).astype(jnp.float32)
  return losses, {"accuracy": accuracy_B}


def regression_loss(scores_Bx1, batch):
  """Squared error per example (STS-B, against the label scaled to [0, 1]), also as "mse"."""
  losses = (scores_Bx1[:, 0] - batch["labels"]) ** 2
  return losses, {"mse": losses}
