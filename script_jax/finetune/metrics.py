"""GLUE dev-set metrics, summaries over fine-tuning seeds, and Markdown tables of results.

Metrics are computed on the whole dev set at once (MCC, F1 and the correlations do not
decompose over batches) and reported in percent, as GLUE tables are. Which metrics a task has,
and the headline one, live in the task specs of glue_data.py.

Results are a plain JSON-able dict, one entry per model and task:

  {model_label: {task: {"metric": "mcc", "runs": [56.1, 57.9, ...],
                        "mean": ..., "median": ..., "std": ...}}}

`task_result(task, runs)` builds an entry. The tables recompute the statistics from "runs", so
an entry with only "metric" and "runs" renders the same; other keys are ignored.
"""

from __future__ import annotations

import statistics
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np
import scipy.stats
import sklearn.metrics

from script_jax.finetune import glue_data

Results = Mapping[str, Mapping[str, Mapping[str, Any]]]


def _accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
  return sklearn.metrics.accuracy_score(labels, predictions)


def _f1(predictions: np.ndarray, labels: np.ndarray) -> float:
  # MRPC/QQP report F1 of the positive class (equivalent / duplicate = 1).
  return sklearn.metrics.f1_score(labels, predictions, average="binary", pos_label=1,
                                  zero_division=0.0)


def _mcc(predictions: np.ndarray, labels: np.ndarray) -> float:
  return sklearn.metrics.matthews_corrcoef(labels, predictions)


def _pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
  return scipy.stats.pearsonr(predictions, labels)[0]


def _spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
  return scipy.stats.spearmanr(predictions, labels)[0]


METRICS: Mapping[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": _accuracy, "f1": _f1, "mcc": _mcc, "pearson": _pearson, "spearman": _spearman}


def headline_metric(task: Union[str, glue_data.GlueTask]) -> str:
  """The metric ELECTRA's tables report: "mcc" (CoLA), "spearman" (STS-B), else "accuracy"."""
  return glue_data.get_task(task).headline_metric


def task_metrics(task: Union[str, glue_data.GlueTask], predictions: Sequence[Union[int, float]],
                 labels: Sequence[Union[int, float]]) -> dict[str, float]:
  """All metrics of a task on a whole dev set, in percent.

  Args:
    task: a task name or spec; decides the metrics (CoLA {"mcc"}; STS-B {"pearson",
      "spearman"}; MRPC and QQP {"accuracy", "f1"}; the others {"accuracy"}).
    predictions: [N] predicted class ids, or predicted scores for STS-B.
    labels: [N] gold class ids or scores.

  Returns:
    Metric name -> value × 100. Undefined correlations (a constant input) come back as NaN.
  """
  spec = glue_data.get_task(task)
  predictions, labels = np.asarray(predictions), np.asarray(labels)
  if predictions.ndim != 1 or predictions.shape != labels.shape or not len(labels):
    raise ValueError(f"{spec.name}: predictions {predictions.shape} and labels {labels.shape} "
                     "must be non-empty vectors of one length (pass class ids, not logits).")
  if spec.is_regression:
    predictions, labels = predictions.astype(np.float64), labels.astype(np.float64)
  elif not (np.issubdtype(predictions.dtype, np.integer)
            and np.issubdtype(labels.dtype, np.integer)):
    raise ValueError(f"{spec.name}: predictions and labels must be class ids (integers), got "
                     f"{predictions.dtype} and {labels.dtype}.")
  return {name: 100.0 * float(METRICS[name](predictions, labels)) for name in spec.metrics}


def summarize_runs(per_seed_scores: Sequence[float]) -> dict[str, Any]:
  """Mean, median and sample standard deviation (ddof=1; 0 for one run) of per-seed scores.

  ELECTRA reports the median over seeds, the SCRIPT paper the mean; both are kept. "runs" is
  the list of scores itself, so an entry of the results dict is {"metric": ..., **summary}.
  """
  runs = [float(s) for s in per_seed_scores]
  if not runs:
    raise ValueError("summarize_runs needs at least one score.")
  return {"mean": statistics.fmean(runs), "median": statistics.median(runs),
          "std": statistics.stdev(runs) if len(runs) > 1 else 0.0, "runs": runs}


def task_result(task: Union[str, glue_data.GlueTask],
                per_seed_scores: Sequence[float]) -> dict[str, Any]:
  """One entry of the results dict: the task's headline metric over seeds, summarized."""
  return {"metric": headline_metric(task), **summarize_runs(per_seed_scores)}


def _checked_summary(model: str, task: str, entry: Mapping[str, Any]) -> dict[str, Any]:
  spec = glue_data.get_task(task)
  if entry.get("metric") != spec.headline_metric:
    raise ValueError(f"results[{model!r}][{task!r}] holds metric {entry.get('metric')!r}; the "
                     f"tables compare the headline metric {spec.headline_metric!r}.")
  return summarize_runs(entry["runs"])


def _fmt(value: float, digits: int) -> str:
  return f"{value:.{digits}f}"


def glue_table_markdown(results: Results, *, digits: int = 2, center: str = "mean") -> str:
  """A Markdown table shaped like the paper's Table 2: one row per model, one column per task.

  Cells are the headline metric's `center` ("mean" as in the SCRIPT paper, or "median" as in
  ELECTRA) ± the sample standard deviation over seeds; a single run shows its score alone, a
  task not run a "-". The GLUE mean averages the cells of the tasks in the mean (the eight
  columns; MNLI-mm and WNLI are left out). When some of them are missing, the mean covers those
  present and says so: "81.32 (5 of 8 tasks)", since it is not comparable with a full mean.
  """
  if center not in ("mean", "median"):
    raise ValueError(f"center must be 'mean' or 'median', not {center!r}.")
  columns = glue_data.GLUE_MEAN_TASKS
  lines = ["| model | " + " | ".join(glue_data.TASKS[t].display_name for t in columns)
           + " | GLUE mean |",
           "|---" * (len(columns) + 2) + "|"]
  for model, tasks in results.items():
    by_name = {glue_data.get_task(t).name: (t, entry) for t, entry in tasks.items()}
    cells, centers = [], []
    for name in columns:
      if name not in by_name:
        cells.append("-")
        continue
      summary = _checked_summary(model, *by_name[name])
      centers.append(summary[center])
      cell = _fmt(summary[center], digits)
      if len(summary["runs"]) > 1:
        cell += f" ± {_fmt(summary['std'], digits)}"
      cells.append(cell)
    if not centers:
      glue_mean = "-"
    else:
      glue_mean = _fmt(statistics.fmean(centers), digits)
      if len(centers) < len(columns):
        glue_mean += f" ({len(centers)} of {len(columns)} tasks)"
    lines.append(f"| {model} | " + " | ".join(cells) + f" | {glue_mean} |")
  return "\n".join(lines) + "\n"


def detail_table_markdown(results: Results, *, digits: int = 2) -> str:
  """A Markdown table of every model and task: metric, mean, median, sd, n and every run.

  Rows follow the results' model order and the task order of glue_data.TASKS; unlike the GLUE
  table it includes MNLI-mm and WNLI.
  """
  order = list(glue_data.TASKS)
  lines = ["| model | task | metric | mean | median | sd | n | runs |",
           "|---|---|---|---|---|---|---|---|"]
  for model, tasks in results.items():
    entries = sorted(((glue_data.get_task(t), t, e) for t, e in tasks.items()),
                     key=lambda item: order.index(item[0].name))
    for spec, task, entry in entries:
      s = _checked_summary(model, task, entry)
      runs = ", ".join(_fmt(r, digits) for r in s["runs"])
      lines.append(f"| {model} | {spec.display_name} | {spec.headline_metric} | "
                   f"{_fmt(s['mean'], digits)} | {_fmt(s['median'], digits)} | "
                   f"{_fmt(s['std'], digits)} | {len(s['runs'])} | {runs} |")
  return "\n".join(lines) + "\n"
