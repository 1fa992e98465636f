"""Held-out evaluation during pretraining: ELECTRA's evaluation metrics on a fixed set.

  evaluator = evaluation.Evaluator.create(config, model, state_sharding, mesh, metadata, data_dir)
  metrics = evaluator.evaluate(state.params)   # {"eval_mlm_loss": ..., "eval_disc_auc": ...}

The set is the first `config.eval.max_sequences` sequences of the prepared data's evaluation
split (whole documents no training shard holds), masked and sampled with `config.eval.seed`:
the same sequences, masks and samples at every evaluation, in every run and for every objective,
so the numbers compare across steps, runs and objectives. Dropout is off. Evaluation draws
nothing from the training stream (data or random numbers), so it never changes training.

Metrics (ELECTRA's run_pretraining.py: masked-LM, sampled-token and discriminator metrics):
  eval_mlm_loss, eval_mlm_accuracy       every objective (ELECTRA: its generator's)
  eval_sampled_accuracy                  share of masked positions whose sample is the original
  eval_disc_loss, eval_disc_accuracy     the critic / discriminator over non-padding tokens
  eval_disc_original_share               the accuracy of always answering "original"
  eval_disc_auc                          exact, rank-based AUC of p(original): original against
                                         replaced tokens, ties averaged (scikit-learn's
                                         roc_auc_score), not TF's bucketed approximation
  eval_disc_precision, eval_disc_recall  of replaced-token detection (p(original) < 0.5)
Ratios are taken over the whole set (sums, then one division), never averaged over batches.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
import scipy.stats

from script_jax import config_lib
from script_jax import objectives
from script_jax import sharding as sharding_lib
from script_jax.data import prepared_folder

P = jax.sharding.PartitionSpec
PREFIX = "eval_"


# ----------------------------------------------------------------------------- the metrics

def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
  """Exact area under the ROC curve of `scores` for positives `labels` (bool), ties counted
  half (Mann-Whitney U over average ranks); NaN when either class is absent."""
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
  num_pos, num_neg = int(labels.sum()), int((~labels).sum())
  if num_pos == 0 or num_neg == 0:
    return float("nan")
  ranks = scipy.stats.rankdata(scores)  # average ranks of ties
  return float((ranks[labels].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))


def _softplus(x: np.ndarray) -> np.ndarray:
  return np.logaddexp(0.0, x)


def _ratio(numerator: float, denominator: float, empty: float = float("nan")) -> float:
  return float(numerator / denominator) if denominator > 0 else empty


def summarize(outputs: list[dict[str, np.ndarray]]) -> dict[str, float]:
  """The evaluation metrics (module docstring) from the objectives' per-token outputs of every
  batch (objectives._outputs), weights applied, in float64."""
  cat = {k: np.concatenate([np.asarray(o[k]).reshape(-1) for o in outputs])
         for k in outputs[0]}
  # Selected, not multiplied by the weights: an empty padding row may hold NaNs.
  predicted = cat["mlm_weights"] > 0
  metrics = {"mlm_loss": _ratio(cat["mlm_nll"][predicted].astype(np.float64).sum(),
                                predicted.sum()),
             "mlm_accuracy": _ratio(cat["mlm_correct"][predicted].sum(), predicted.sum()),
             "num_predictions": float(predicted.sum())}
  if "critic_logit" in cat:
    metrics["sampled_accuracy"] = _ratio(cat["sampled_is_original"][predicted].sum(),
                                         predicted.sum())
    real = cat["critic_weights"] > 0
    logit = cat["critic_logit"][real].astype(np.float64)
    original = cat["is_original"][real].astype(bool)
    replaced, flagged = ~original, logit <= 0  # flagged "replaced": p(original) <= 0.5
    nll = np.where(original, _softplus(-logit), _softplus(logit))
    metrics.update(
        disc_loss=_ratio(nll.sum(), real.sum()),
        disc_accuracy=_ratio((flagged == replaced).sum(), real.sum()),
        disc_original_share=_ratio(original.sum(), real.sum()),
        disc_auc=roc_auc(logit, original),
        # 0 when nothing is flagged or nothing replaced, as TF's metrics and scikit-learn's.
        disc_precision=_ratio((flagged & replaced).sum(), flagged.sum(), 0.0),
        disc_recall=_ratio((flagged & replaced).sum(), replaced.sum(), 0.0),
        num_critic_tokens=float(real.sum()))
  return {PREFIX + k: v for k, v in metrics.items()}


# ----------------------------------------------------------------------------- the step

def make_eval_step(config, model, params_sharding, mesh) -> Callable:
  """The jitted evaluation step: (params, batch, batch number) -> per-token outputs, gathered
  on every device (the set is small; the host needs them all for the exact AUC)."""
  model, params_at_use = sharding_lib.for_the_step(config, model, params_sharding, mesh)
  loss_fn = functools.partial(objectives.get_objective(config.objective), model=model,
                              config=config, deterministic=True, with_outputs=True, mesh=mesh)
  seed, rng_impl = config.eval.seed, config_lib.rng_impl_of(config)

  def eval_step(params, batch, batch_number):
    rng = jax.random.fold_in(jax.random.key(seed, impl=rng_impl), batch_number)
    _, metrics = loss_fn(params_at_use(params), batch, rng)
    return metrics["outputs"]

  batch_sharding = jax.sharding.NamedSharding(mesh, sharding_lib.batch_spec(mesh))
  replicated = jax.sharding.NamedSharding(mesh, P())
  return jax.jit(eval_step, in_shardings=(params_sharding, batch_sharding, replicated),
                 out_shardings=replicated)


@dataclasses.dataclass
class Evaluator:
  """The evaluation set of a run (host batches, read once) and its jitted step."""
  batches: list[dict[str, np.ndarray]]
  step_fn: Callable
  mesh: Any
  num_sequences: int

  @classmethod
  def create(cls, config, model, params_sharding, mesh, metadata: dict,
             data_dir: str) -> Optional["Evaluator"]:
    """None when the prepared data has no evaluation split (older folders) or evaluation is off."""
    from script_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (heavy: tensorflow)
    split = prepared_folder.eval_split(metadata)
    if not config.eval_every_steps or split is None:
      return None
    dataset = pipeline.create_eval_dataset(config, metadata, data_dir,
                                           process_index=jax.process_index(),
                                           process_count=jax.process_count())
    return cls(batches=list(dataset.as_numpy_iterator()),
               step_fn=make_eval_step(config, model, params_sharding, mesh), mesh=mesh,
               num_sequences=min(split["num_examples"], config.eval.max_sequences))

  def evaluate(self, params) -> dict[str, float]:
    """The metrics of `params` on the whole set, and the seconds it took (eval_seconds)."""
    start = time.time()
    sharding = jax.sharding.NamedSharding(self.mesh, sharding_lib.batch_spec(self.mesh))
    outputs = []
    for number, host_batch in enumerate(self.batches):
      batch = {k: jax.make_array_from_process_local_data(sharding, v)
               for k, v in host_batch.items()}
      outputs.append(jax.device_get(self.step_fn(params, batch, np.int32(number))))
    metrics = summarize(outputs)
    metrics[PREFIX + "seconds"] = time.time() - start
    return metrics


def format_metrics(metrics: dict[str, float]) -> str:
  """One console line of the headline metrics."""
  shown = ("mlm_loss", "mlm_accuracy", "disc_loss", "disc_accuracy", "disc_original_share",
           "disc_auc", "disc_precision", "disc_recall", "sampled_accuracy")
  return " ".join(f"{k} {metrics[PREFIX + k]:.4g}" for k in shown if PREFIX + k in metrics)
