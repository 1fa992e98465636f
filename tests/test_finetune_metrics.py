"""GLUE metrics against hand-worked cases and NumPy formulas; summaries and Markdown tables."""

from __future__ import annotations

import math

import numpy as np
import pytest

from script_jax.finetune import metrics


def test_binary_metrics_by_hand():
  # labels 1 1 1 1 0 0, predictions 1 1 1 0 0 1: tp=3, fn=1, fp=1, tn=1.
  # accuracy 4/6; F1 = 2tp / (2tp + fp + fn) = 6/8;
  # MCC = (tp·tn − fp·fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (3 − 1) / sqrt(4·4·2·2) = 2/8.
  labels, predictions = [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 1]
  mrpc = metrics.task_metrics("mrpc", predictions, labels)
  assert mrpc == pytest.approx({"accuracy": 100 * 4 / 6, "f1": 75.0})
  assert metrics.task_metrics("cola", predictions, labels) == pytest.approx({"mcc": 25.0})
  assert metrics.task_metrics("rte", predictions, labels) == pytest.approx(
      {"accuracy": 100 * 4 / 6})


def test_correlations_by_hand():
  # predictions 0.1 0.2 0.3 0.4 10, labels 2 1 4 3 5.
  # Pearson: means 2.2 and 3; dx = −2.1 −2.0 −1.9 −1.8 7.8, dy = −1 −2 1 0 2;
  # Σdx·dy = 2.1 + 4.0 − 1.9 + 0 + 15.6 = 19.8, Σdx² = 76.1, Σdy² = 10: r = 19.8 / sqrt(761).
  # Spearman: ranks 1 2 3 4 5 and 2 1 4 3 5; d = −1 1 −1 1 0, Σd² = 4:
  # ρ = 1 − 6·4 / (5·24) = 0.8.
  result = metrics.task_metrics("stsb", [0.1, 0.2, 0.3, 0.4, 10.0], [2, 1, 4, 3, 5])
  assert result == pytest.approx({"pearson": 100 * 19.8 / math.sqrt(761), "spearman": 80.0})


def test_spearman_with_ties_by_hand():
  # labels 1 2 2 3 rank as 1 2.5 2.5 4 (ties share the mean rank); predictions rank 1 2 3 4.
  # Pearson of the ranks: dx = −1.5 −0.5 0.5 1.5, dy = −1.5 0 0 1.5; Σdx·dy = 4.5,
  # Σdx² = 5, Σdy² = 4.5: ρ = 4.5 / sqrt(22.5).
  result = metrics.task_metrics("stsb", [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 2.0, 3.0])
  assert result["spearman"] == pytest.approx(100 * 4.5 / math.sqrt(22.5))


def test_metrics_against_numpy_on_random_inputs():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 2, 500)
  predictions = np.where(rng.random(500) < 0.8, labels, 1 - labels)
  tp = np.sum((predictions == 1) & (labels == 1)).astype(np.float64)
  tn = np.sum((predictions == 0) & (labels == 0)).astype(np.float64)
  fp = np.sum((predictions == 1) & (labels == 0)).astype(np.float64)
  fn = np.sum((predictions == 0) & (labels == 1)).astype(np.float64)
  mcc = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
  assert metrics.task_metrics("qqp", predictions, labels) == pytest.approx(
      {"accuracy": 100 * np.mean(predictions == labels), "f1": 100 * 2 * tp / (2 * tp + fp + fn)})
  assert metrics.task_metrics("cola", predictions, labels)["mcc"] == pytest.approx(100 * mcc)

  scores = rng.uniform(0, 5, 300)  # continuous: no ties, so ranks are a double argsort
  predicted = scores + rng.normal(0, 1, 300) ** 3

  def pearson(x, y):
    dx, dy = x - x.mean(), y - y.mean()
    return np.sum(dx * dy) / np.sqrt(np.sum(dx * dx) * np.sum(dy * dy))

  def ranks(x):
    return np.argsort(np.argsort(x)).astype(np.float64)

  assert metrics.task_metrics("stsb", predicted, scores) == pytest.approx(
      {"pearson": 100 * pearson(predicted, scores),
       "spearman": 100 * pearson(ranks(predicted), ranks(scores))})


def test_task_metrics_rejects_bad_inputs():
  with pytest.raises(ValueError, match="class ids"):
    metrics.task_metrics("rte", [0.2, 0.9], [0, 1])
  with pytest.raises(ValueError, match="non-empty vectors"):
    metrics.task_metrics("rte", [[0.1, 0.9]], [1])
  with pytest.raises(ValueError, match="Unknown GLUE task"):
    metrics.task_metrics("squad", [1], [1])


def test_headline_metric():
  assert {t: metrics.headline_metric(t) for t in ["cola", "stsb", "mrpc", "qqp", "sst2"]} == {
      "cola": "mcc", "stsb": "spearman", "mrpc": "accuracy", "qqp": "accuracy",
      "sst2": "accuracy"}


def test_summarize_runs():
  # mean 2.5, median (2 + 3)/2; squared deviations 2.25 0.25 0.25 2.25 sum to 5; ddof 1: 5/3.
  summary = metrics.summarize_runs([4, 1, 3, 2])
  assert set(summary) == {"mean", "median", "std", "runs"}
  assert {k: summary[k] for k in ("mean", "median", "std")} == pytest.approx(
      {"mean": 2.5, "median": 2.5, "std": math.sqrt(5 / 3)})
  assert summary["runs"] == [4, 1, 3, 2]
  assert metrics.summarize_runs([68.5]) == {"mean": 68.5, "median": 68.5, "std": 0.0,
                                            "runs": [68.5]}
  with pytest.raises(ValueError):
    metrics.summarize_runs([])


def _results():
  return {
      "ELECTRA-small": {"cola": metrics.task_result("cola", [55.0, 57.0, 59.0]),
                        "mrpc": metrics.task_result("mrpc", [87.0, 88.0]),
                        "rte": {"metric": "accuracy", "runs": [68.5]},
                        "mnli_mm": metrics.task_result("mnli_mm", [79.0])},
      "SCRIPT-small": {t: metrics.task_result(t, [v]) for t, v in zip(
          ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"],
          [57.0, 89.0, 88.0, 87.0, 88.0, 79.0, 88.0, 68.0])},
  }


def test_glue_table_markdown():
  # ELECTRA-small: CoLA mean 57, sd 2; MRPC 87.5, sd sqrt(0.5) = 0.71; RTE one run. GLUE mean
  # over those three: (57 + 87.5 + 68.5) / 3 = 71. SCRIPT-small: the eight scores sum to 644.
  assert metrics.glue_table_markdown(_results()).splitlines() == [
      "| model | CoLA | SST-2 | MRPC | STS-B | QQP | MNLI | QNLI | RTE | GLUE mean |",
      "|---|---|---|---|---|---|---|---|---|---|",
      "| ELECTRA-small | 57.00 ± 2.00 | - | 87.50 ± 0.71 | - | - | - | - | 68.50 "
      "| 71.00 (3 of 8 tasks) |",
      "| SCRIPT-small | 57.00 | 89.00 | 88.00 | 87.00 | 88.00 | 79.00 | 88.00 | 68.00 | 80.50 |",
  ]
  median_table = metrics.glue_table_markdown(
      {"m": {"cola": metrics.task_result("cola", [50.0, 51.0, 60.0])}}, digits=1,
      center="median")
  assert median_table.splitlines()[2] == "| m | 51.0 ± 5.5 | - | - | - | - | - | - | - | 51.0 " \
                                         "(1 of 8 tasks) |"


def test_table_refuses_a_non_headline_metric():
  with pytest.raises(ValueError, match="headline metric 'accuracy'"):
    metrics.glue_table_markdown({"m": {"mrpc": {"metric": "f1", "runs": [90.0]}}})


def test_detail_table_markdown():
  assert metrics.detail_table_markdown(_results(), digits=1).splitlines()[:6] == [
      "| model | task | metric | mean | median | sd | n | runs |",
      "|---|---|---|---|---|---|---|---|",
      "| ELECTRA-small | CoLA | mcc | 57.0 | 57.0 | 2.0 | 3 | 55.0, 57.0, 59.0 |",
      "| ELECTRA-small | MRPC | accuracy | 87.5 | 87.5 | 0.7 | 2 | 87.0, 88.0 |",
      "| ELECTRA-small | RTE | accuracy | 68.5 | 68.5 | 0.0 | 1 | 68.5 |",
      "| ELECTRA-small | MNLI-mm | accuracy | 79.0 | 79.0 | 0.0 | 1 | 79.0 |",
  ]
