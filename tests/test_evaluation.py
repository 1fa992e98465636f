"""Held-out evaluation (script_jax/evaluation.py): its metrics against scikit-learn and NumPy on
fresh random inputs, and on a tiny model against the objectives' own device-side metrics."""

import jax
import numpy as np
import pytest
import sklearn.metrics
from helpers import load_config, random_batch

from script_jax import config_lib
from script_jax import evaluation
from script_jax import models
from script_jax import objectives
from script_jax import sharding as sharding_lib
from script_jax import state as state_lib
from script_jax import train


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_auc_equals_scikit_learn_with_ties(seed):
  rng = np.random.default_rng(seed)
  scores = rng.integers(0, 7, 500).astype(np.float32)  # many ties
  labels = rng.random(500) < 0.3 + 0.05 * scores
  assert evaluation.roc_auc(scores, labels) == pytest.approx(
      sklearn.metrics.roc_auc_score(labels, scores), abs=1e-12)
  continuous = rng.normal(size=300)
  labels = rng.random(300) < 0.8
  assert evaluation.roc_auc(continuous, labels) == pytest.approx(
      sklearn.metrics.roc_auc_score(labels, continuous), abs=1e-12)
  assert np.isnan(evaluation.roc_auc(continuous, np.ones(300, bool)))


def _random_outputs(rng, b, t, p):
  """Per-token outputs as the objectives return them, with an empty (NaN) padding row."""
  weights = (rng.random((b, p)) < 0.7).astype(np.float32)
  critic_weights = (rng.random((b, t)) < 0.8).astype(np.float32)
  out = {"mlm_nll": rng.exponential(3.0, (b, p)).astype(np.float32),
         "mlm_correct": rng.random((b, p)) < 0.2, "mlm_weights": weights,
         "sampled_is_original": rng.random((b, p)) < 0.4,
         "critic_logit": rng.normal(1.0, 2.0, (b, t)).astype(np.float32),
         "is_original": rng.random((b, t)) < 0.85, "critic_weights": critic_weights}
  out["mlm_weights"][-1] = 0
  out["critic_weights"][-1] = 0
  out["mlm_nll"][-1] = np.nan
  out["critic_logit"][-1] = np.nan
  return out


@pytest.mark.parametrize("seed", [3, 4])
def test_summary_equals_a_scikit_learn_reference_over_the_whole_set(seed):
  rng = np.random.default_rng(seed)
  batches = [_random_outputs(rng, 4, 16, 5), _random_outputs(rng, 3, 16, 5)]
  got = evaluation.summarize(batches)

  flat = lambda k: np.concatenate([b[k].reshape(-1) for b in batches])
  w = flat("mlm_weights") > 0
  cw = flat("critic_weights") > 0
  logit, original = flat("critic_logit")[cw].astype(np.float64), flat("is_original")[cw]
  p_original = 1 / (1 + np.exp(-logit))
  flagged_replaced = p_original <= 0.5
  want = {
      "eval_mlm_loss": flat("mlm_nll")[w].astype(np.float64).mean(),
      "eval_mlm_accuracy": flat("mlm_correct")[w].mean(),
      "eval_sampled_accuracy": flat("sampled_is_original")[w].mean(),
      "eval_disc_loss": sklearn.metrics.log_loss(original, p_original),
      "eval_disc_accuracy": sklearn.metrics.accuracy_score(~original, flagged_replaced),
      "eval_disc_original_share": original.mean(),
      "eval_disc_auc": sklearn.metrics.roc_auc_score(original, logit),
      "eval_disc_precision": sklearn.metrics.precision_score(~original, flagged_replaced),
      "eval_disc_recall": sklearn.metrics.recall_score(~original, flagged_replaced),
      "eval_num_predictions": w.sum(), "eval_num_critic_tokens": cw.sum(),
  }
  assert set(got) == set(want)
  for k, v in want.items():
    assert got[k] == pytest.approx(v, rel=1e-9), k
  # A ratio of sums, not a mean of per-batch ratios (the batches differ in size).
  per_batch = np.mean([evaluation.summarize([b])["eval_mlm_loss"] for b in batches])
  assert got["eval_mlm_loss"] != pytest.approx(per_batch, rel=1e-9)


def test_mlm_has_only_the_masked_lm_metrics():
  rng = np.random.default_rng(5)
  out = {k: v for k, v in _random_outputs(rng, 2, 8, 4).items()
         if k in ("mlm_nll", "mlm_correct", "mlm_weights")}
  assert set(evaluation.summarize([out])) == {"eval_mlm_loss", "eval_mlm_accuracy",
                                              "eval_num_predictions"}


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["script", "electra", "mlm"])
def test_tiny_model_evaluation_equals_the_objectives_metrics_and_scikit_learn(objective):
  """On 8 devices: the evaluator's numbers are the objective's own (deterministic, the same
  random numbers), its AUC, precision and recall scikit-learn's on the same logits, and a second
  evaluation gives the same numbers."""
  config = load_config("tiny", objective=objective, batch_size=8,
                       **{"model.num_layers": 1, "electra.generator_num_layers": 1})
  mesh = sharding_lib.create_mesh(config)
  model = models.build_model(config)
  state, sharding = state_lib.init_state(config, model, mesh)
  batch = {k: np.asarray(v) for k, v in random_batch(config, 8, seed=11).items()}
  step_fn = evaluation.make_eval_step(config, model, sharding.params, mesh)
  evaluator = evaluation.Evaluator(batches=[batch], step_fn=step_fn, mesh=mesh, num_sequences=8)
  got = evaluator.evaluate(state.params)
  again = evaluator.evaluate(state.params)
  assert got.pop("eval_seconds") > 0 and again.pop("eval_seconds") > 0
  assert again == got  # the same masks, samples and numbers every time

  rng = jax.random.fold_in(
      jax.random.key(config.eval.seed, impl=config_lib.rng_impl_of(config)), 0)
  _, want = objectives.get_objective(objective)(
      jax.device_get(state.params), {k: jax.numpy.asarray(v) for k, v in batch.items()}, rng,
      model=model, config=config, deterministic=True)
  for k in ("mlm_loss", "mlm_accuracy", "disc_loss", "disc_accuracy", "disc_original_share"):
    if k in want:
      assert got["eval_" + k] == pytest.approx(float(want[k]), rel=2e-5, abs=1e-6), k
  if objective == "mlm":
    assert "eval_disc_auc" not in got
    return
  assert got["eval_sampled_accuracy"] == pytest.approx(1 - float(want["replaced_fraction"]),
                                                       abs=1e-6)
  outputs = jax.device_get(step_fn(state.params, train.to_global_batch(batch, mesh),
                                   np.int32(0)))
  real = outputs["critic_weights"] > 0
  logit, original = outputs["critic_logit"][real], outputs["is_original"][real]
  assert 0 < original.mean() < 1  # both classes present
  assert got["eval_disc_auc"] == pytest.approx(
      sklearn.metrics.roc_auc_score(original, logit), abs=1e-12)
  flagged = logit <= 0
  assert got["eval_disc_precision"] == pytest.approx(
      sklearn.metrics.precision_score(~original, flagged, zero_division=0.0), abs=1e-12)
  assert got["eval_disc_recall"] == pytest.approx(
      sklearn.metrics.recall_score(~original, flagged, zero_division=0.0), abs=1e-12)
