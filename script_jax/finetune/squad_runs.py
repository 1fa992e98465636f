"""SQuAD 1.1 and 2.0 fine-tuning: the span loss, every seed's run scored by the official rules,
the results table. The library behind `python -m script_jax.finetune.squad`, whose docstring
describes what OUT holds."""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from script_jax import config_lib
from script_jax import fs
from script_jax.finetune import model as task_models
from script_jax.finetune import seed_runs
from script_jax.finetune import squad_answers
from script_jax.finetune import squad_data
from script_jax.finetune import squad_official
from script_jax.finetune import trainer
from script_jax.finetune.seed_runs import FinetuneError

def span_loss(outputs, batch, no_answer_weight: float, version: str,
              answerable_on_v1: bool = False):
  """Start and end cross-entropy over the allowed positions (context and [CLS]), averaged, plus
  the no-answer classifier's binary cross-entropy for SQuAD 2.0 (and, with answerable_on_v1, on
  1.1 too, every label "answerable", as ELECTRA's code trains its answerable classifier)."""
  start_BxT, end_BxT, no_answer_B = outputs
  allowed = batch["context_mask"] > 0
  start_BxT = jnp.where(allowed, start_BxT, -1e9)
  end_BxT = jnp.where(allowed, end_BxT, -1e9)
  losses = 0.5 * (
      optax.softmax_cross_entropy_with_integer_labels(start_BxT, batch["start_positions"]) +
      optax.softmax_cross_entropy_with_integer_labels(end_BxT, batch["end_positions"]))
  metrics = {"start_accuracy":
             (start_BxT.argmax(-1) == batch["start_positions"]).astype(jnp.float32)}
  if version == "2.0" or answerable_on_v1:
    impossible = batch["is_impossible"].astype(jnp.float32)
    losses = losses + no_answer_weight * optax.sigmoid_binary_cross_entropy(no_answer_B,
                                                                            impossible)
  return losses, metrics


def _datasets(train_file: Optional[str], dev_file: Optional[str], dev_split: Optional[float],
              seed: int, tfds_name: Optional[str] = None):
  """(train dataset dict, evaluation dataset dict, note on where they came from)."""
  if tfds_name:
    if train_file or dev_file or dev_split is not None:
      raise FinetuneError("--tfds reads both splits from TFDS: leave out --train_file, "
                          "--dev_file and --dev_split.")
    if tfds_name not in squad_data.TFDS_NAMES:
      raise FinetuneError(f"--tfds={tfds_name}: use one of {', '.join(squad_data.TFDS_NAMES)}.")
    # TFDS's folder is $TFDS_DATA_DIR (local or gs://), else ~/tensorflow_datasets.
    return (squad_data.load_tfds_squad(tfds_name, "train"),
            squad_data.load_tfds_squad(tfds_name, "dev"),
            f"TFDS {tfds_name} train/validation")
  if not dev_file:
    raise FinetuneError("Pass --dev_file (with --train_file, or --dev_split for a development "
                        "run), or --tfds=squad/v1.1 or squad/v2.0.")
  dev = squad_official.load_json(dev_file, "dev file")
  if train_file:
    if dev_split is not None:
      raise FinetuneError("--dev_split is for runs without --train_file.")
    return squad_official.load_json(train_file, "train file"), dev, "official train/dev"
  if dev_split is None:
    raise FinetuneError("No --train_file: pass --dev_split=0.8 to train on part of the dev "
                        "articles and evaluate on the others (a development run).")
  try:
    train, held_out = squad_data.split_by_articles(dev, dev_split, seed=seed)
  except ValueError as e:
    raise FinetuneError(f"{dev_file}: {e}") from None
  return train, held_out, (f"development split: {dev_split:.0%} of the articles of {dev_file} "
                           "trained on, the others evaluated")


def run_squad(ft, init_from: str, dev_file: Optional[str], output_dir: str, *,
              train_file: Optional[str] = None, dev_split: Optional[float] = None,
              tfds_name: Optional[str] = None, random_init: bool = False, step: Optional[int] = None) -> dict[str, Any]:
  """Fine-tunes and evaluates every seed not yet in OUT/results.json; returns the results."""

  sq = ft.squad
  config_lib.validate_finetune_config(ft, squad=True)
  train_json, eval_json, note = _datasets(train_file, dev_file, dev_split, seed=0,
                                          tfds_name=tfds_name)
  start = seed_runs.load_start(init_from, step, ft, random_init)
  cfg = start.encoder_cfg
  if sq.max_length > cfg.max_position_embeddings:
    raise FinetuneError(f"squad.max_length={sq.max_length} exceeds the model's "
                        f"{cfg.max_position_embeddings} positions; use 128 or 256.")
  fs.makedirs(output_dir)
  results = seed_runs.read_results(output_dir)
  seed_runs.check_same_start(results, output_dir, init_from, random_init)
  results.update(init_from=init_from, random_init=random_init)
  version = squad_official.dataset_version(eval_json)
  results["data"] = note
  windows = dict(max_seq_length=sq.max_length, doc_stride=sq.doc_stride,
                 max_query_length=sq.max_query_length)
  train_examples = squad_data.examples_from_dataset(train_json)
  eval_examples = squad_data.examples_from_dataset(eval_json)
  train_features = squad_data.make_features(train_examples, start.tokenizer, is_training=True,
                                            **windows)
  eval_features = squad_data.make_features(eval_examples, start.tokenizer, is_training=False,
                                           **windows)
  print(f"SQuAD {version} ({note}): {len(train_examples)} questions in "
        f"{len(train_features)} windows to train on, {len(eval_examples)} questions in "
        f"{len(eval_features)} windows to evaluate.", file=sys.stderr)
  joint = sq.head == "electra"
  na_prob_thresh = squad_answers.na_prob_thresh_for(sq.head, sq.na_prob_thresh)
  if version == "2.0":
    results["na_prob_thresh"] = na_prob_thresh

  def loss_fn(outputs, batch):
    return span_loss(outputs, batch, sq.no_answer_weight, version, answerable_on_v1=joint)

  task = seed_runs.Task(model=(task_models.JointSpanExtractor(cfg, beam_size=sq.n_best) if joint
                               else task_models.SpanExtractor(cfg)),
                        loss_fn=loss_fn, train_arrays=train_features.model_inputs(),
                        epochs=ft.epochs or sq.epochs)
  by_seed = results.setdefault("runs", {}).setdefault("squad", {})

  def evaluate(run: seed_runs.SeedRun) -> None:
    outputs = trainer.predict(task.model, run.params, eval_features.model_inputs(),
                              sq.eval_batch_size)
    answer_rules = dict(n_best=sq.n_best, max_answer_length=sq.max_answer_length,
                        version=version)
    if joint:
      predictions, na_probs = squad_answers.postprocess_joint(eval_examples, eval_features,
                                                              *outputs, **answer_rules)
    else:
      start_logits, end_logits, no_answer = outputs
      predictions, na_probs = squad_answers.postprocess(
          eval_examples, eval_features, start_logits, end_logits,
          no_answer if version == "2.0" else None, **answer_rules)
    span_predictions = predictions
    if version == "2.0":
      scores, predictions = score_v2(eval_json, span_predictions, na_probs, na_prob_thresh)
    else:
      scores = squad_official.evaluate_v1(eval_json, predictions)
    scores = {**scores, "train_loss": run.train_loss,
              "seconds": round(time.time() - run.began, 1)}
    if jax.process_index() == 0:
      squad_official.write_json(fs.join(run.run_dir, "predictions.json"), predictions)
      if na_probs is not None:
        squad_official.write_json(fs.join(run.run_dir, "na_probs.json"), na_probs)
        squad_official.write_json(fs.join(run.run_dir, "span_predictions.json"), span_predictions)
      if dev_split is not None or tfds_name:
        squad_official.write_json(fs.join(output_dir, "eval_dataset.json"), eval_json)
    by_seed[str(run.seed)] = scores
    print(f"SQuAD {version} seed {run.seed}: " + json.dumps(scores), file=sys.stderr)

  todo = [s for s in range(ft.first_seed, ft.first_seed + ft.num_seeds) if str(s) not in by_seed]
  seed_runs.run_seeds(todo, start, task, ft, random_init=random_init, init_from=init_from,
                      run_dir=lambda seed: fs.join(output_dir, f"seed_{seed}"),
                      label=lambda seed: f"SQuAD {version} seed {seed}", evaluate=evaluate,
                      results=results, output_dir=output_dir, table=table)
  return results


def score_v2(eval_json, span_predictions, na_probs, na_prob_thresh: float):
  """(official SQuAD 2.0 scores, the predictions to write) at `na_prob_thresh`.

  The written predictions answer "" where P(no answer) > na_prob_thresh, so the official script
  scores them as they stand (no na-prob file needed); exact and f1 are those scores. best_exact
  and best_f1 (the official best-threshold sweep) are computed from the spans behind the blanks,
  which span_predictions.json keeps, with na_probs.json, for re-scoring.
  """
  scores = squad_official.evaluate_v2(eval_json, span_predictions, na_probs,
                                      na_prob_thresh=na_prob_thresh)
  return scores, squad_answers.with_no_answers(span_predictions, na_probs, na_prob_thresh)


def table(results: dict[str, Any]) -> str:
  """EM and F1 over seeds (mean ± sd, median, every run) as a Markdown table."""
  by_seed = results["runs"].get("squad", {})
  threshold = (f" No answer where P(no answer) > {results['na_prob_thresh']:.4g} (exact, f1); "
               "best_*: at the best threshold." if "na_prob_thresh" in results else "")
  lines = [f"Data: {results.get('data', '?')}.{threshold}", "",
           "| metric | mean | sd | median | runs |", "|---|---|---|---|---|"]
  for key in ("exact_match", "exact", "f1", "best_exact", "best_f1"):
    values = [r[key] for _, r in sorted(by_seed.items(), key=lambda kv: int(kv[0])) if key in r]
    if values:
      sd = statistics.stdev(values) if len(values) > 1 else 0.0
      lines.append(f"| {key} | {statistics.fmean(values):.2f} | {sd:.2f} | "
                   f"{statistics.median(values):.2f} | "
                   f"{', '.join(f'{v:.2f}' for v in values)} |")
  return "\n".join(lines) + "\n"
