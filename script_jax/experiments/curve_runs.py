"""The sample-efficiency curve (the paper's Figure 2), GLUE against pretraining steps: every kept
checkpoint fine-tuned by finetune.glue_runs, the points, and curve.json, .csv, .md and .png. The
library behind `python -m script_jax.experiments.curve`, whose docstring describes OUT.

matplotlib draws the PNG (in the `experiments` and `test` extras).
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from typing import Any, Optional, Sequence

from script_jax import checkpoints
from script_jax import config_lib
from script_jax import fs
from script_jax import metrics_records
from script_jax.finetune import glue_runs
from script_jax.finetune import glue_data
from script_jax.finetune import seed_runs
from script_jax.finetune.seed_runs import FinetuneError

PRETRAINING_METRICS = ("eval_mlm_loss", "eval_disc_auc")  # the second panel's curves


# ----------------------------------------------------------------------------- inputs

def kept_steps(workdir: str) -> list[int]:
  """The checkpoint steps a pretraining workdir holds, ascending."""
  if not fs.exists(fs.join(workdir, "run_config.json")):
    raise FinetuneError(f"{workdir} is not a pretraining workdir (no run_config.json).")
  config = checkpoints.read_run_config(workdir)
  manager = checkpoints.make_manager(workdir, config, read_only=True)
  try:
    return sorted(int(s) for s in manager.all_steps())
  finally:
    manager.close()


def pretraining_metrics(workdir: str) -> list[dict[str, float]]:
  """The held-out evaluation records of a workdir (metrics_records.read_records), by step."""
  return [{k: v for k, v in r.items() if k == "step" or k.startswith("eval_")}
          for r in metrics_records.read_records(workdir) if metrics_records.is_eval(r)]


def default_labels(workdirs: Sequence[str]) -> list[str]:
  return [os.path.basename(w.rstrip("/")) for w in workdirs]


# ----------------------------------------------------------------------------- the points

def task_point(scores_by_seed: dict[str, float]) -> dict[str, Any]:
  values = list(scores_by_seed.values())
  return {"mean": sum(values) / len(values), "min": min(values), "max": max(values),
          "seeds": len(values)}


def curve_point(results: dict[str, Any], tasks: Sequence[str]) -> Optional[dict[str, Any]]:
  """One checkpoint's point from its finetune.glue results: per task and the GLUE mean (over
  the tasks; its band from the per-seed means over the seeds every task has). None until every
  task has a run."""
  by_task = {}
  for task in tasks:
    headline = glue_data.get_task(task).headline_metric
    runs = results["runs"].get(task, {})
    if not runs:
      return None
    by_task[task] = {seed: r[headline] for seed, r in runs.items()}
  point = {"tasks": {task: task_point(s) for task, s in by_task.items()}}
  point["glue_mean"] = sum(p["mean"] for p in point["tasks"].values()) / len(tasks)
  common = set.intersection(*(set(s) for s in by_task.values()))
  per_seed = [sum(by_task[t][seed] for t in tasks) / len(tasks) for seed in common]
  point["glue_min"], point["glue_max"] = (min(per_seed), max(per_seed)) if per_seed else (
      point["glue_mean"], point["glue_mean"])
  return point


def missing_runs(results: dict[str, Any], tasks: Sequence[str], seeds: Sequence[int]) -> int:
  return sum(str(seed) not in results["runs"].get(e, {})
             for task in tasks for e in glue_data.eval_tasks(task) for seed in seeds)


def run_curve(ft, workdirs: Sequence[str], labels: Sequence[str], data_dir: str,
              output_dir: str, tasks: Sequence[str], steps: Sequence[int] = (),
              check_counts: bool = True) -> dict[str, Any]:
  """Fine-tunes what is missing, then returns the curve (curve.json's content)."""
  config_lib.validate_finetune_config(ft)
  if len(labels) != len(workdirs) or len(set(labels)) != len(labels):
    raise FinetuneError(f"--labels needs one distinct name per workdir; got {list(labels)} for "
                        f"{len(workdirs)} workdir(s).")
  names = glue_runs.tasks_to_run(data_dir, list(tasks))
  seeds = list(range(ft.first_seed, ft.first_seed + ft.num_seeds))
  plan = []
  for workdir, label in zip(workdirs, labels):
    kept = kept_steps(workdir)
    chosen = [s for s in kept if not steps or s in steps]
    absent = sorted(set(steps) - set(kept))
    if absent or not chosen:
      raise FinetuneError(f"{workdir} keeps checkpoints at steps {kept or 'none'}; "
                          f"asked for {absent or 'any'}.")
    plan += [(workdir, label, step) for step in chosen]
  curve = {"tasks": names, "seeds": seeds, "finetune_config": json.loads(ft.to_json()),
           "workdirs": {label: {"workdir": w, "points": [], "pretraining": pretraining_metrics(w)}
                        for w, label in zip(workdirs, labels)}}
  for number, (workdir, label, step) in enumerate(plan, start=1):
    folder = fs.join(output_dir, label, f"step_{step}")
    results = seed_runs.read_results(folder)
    todo = missing_runs(results, names, seeds)
    print(f"[{number}/{len(plan)}] {label} step {step}: "
          f"{f'{todo} run(s) to fine-tune' if todo else 'done'}", file=sys.stderr)
    if todo:
      results = glue_runs.run_glue(ft, workdir, data_dir, folder, tasks=names, step=step,
                                   label=f"{label} step {step}", check_counts=check_counts)
    point = curve_point(results, names)
    if point is not None:
      curve["workdirs"][label]["points"].append({"step": step, **point})
  return curve


# ----------------------------------------------------------------------------- outputs

def _pretraining_at(curve_entry: dict[str, Any], step: int) -> dict[str, float]:
  return next((r for r in curve_entry["pretraining"] if r["step"] == step), {})


def csv_text(curve: dict[str, Any]) -> str:
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(["label", "step", "metric", "mean", "min", "max", "seeds"])
  for label, entry in curve["workdirs"].items():
    for p in entry["points"]:
      writer.writerow([label, p["step"], "glue_mean", p["glue_mean"], p["glue_min"],
                       p["glue_max"], min(t["seeds"] for t in p["tasks"].values())])
      for task, t in p["tasks"].items():
        writer.writerow([label, p["step"], task, t["mean"], t["min"], t["max"], t["seeds"]])
    for record in entry["pretraining"]:
      for key in PRETRAINING_METRICS:
        if key in record:
          writer.writerow([label, record["step"], key, record[key], "", "", ""])
  return out.getvalue()


def markdown(curve: dict[str, Any]) -> str:
  names = [glue_data.get_task(t).display_name for t in curve["tasks"]]
  lines = []
  for label, entry in curve["workdirs"].items():
    lines += [f"**{label}** ({entry['workdir']}), mean over {len(curve['seeds'])} seed(s) "
              "[min, max]:", "",
              "| step | " + " | ".join(names) + " | GLUE mean | held-out MLM loss | "
              "held-out critic AUC |",
              "|---" * (len(names) + 4) + "|"]
    for p in entry["points"]:
      held_out = _pretraining_at(entry, p["step"])
      cells = [f"{t['mean']:.2f} [{t['min']:.2f}, {t['max']:.2f}]" for t in p["tasks"].values()]
      cells.append(f"{p['glue_mean']:.2f} [{p['glue_min']:.2f}, {p['glue_max']:.2f}]")
      cells += [f"{held_out[k]:.4f}" if k in held_out else "-" for k in PRETRAINING_METRICS]
      lines.append(f"| {p['step']:,} | " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)


def plot_png(curve: dict[str, Any]) -> bytes:
  """The figure as PNG bytes: GLUE mean and each task, then the held-out metrics."""
  import matplotlib  # pylint: disable=g-import-not-at-top  (optional: matplotlib)
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top  (optional: matplotlib)
  panels = ["glue_mean", *curve["tasks"]]
  columns = max(len(panels), len(PRETRAINING_METRICS))
  figure, axes = plt.subplots(2, columns, figsize=(4 * columns, 7), squeeze=False)
  for column, name in enumerate(panels):
    ax = axes[0][column]
    for label, entry in curve["workdirs"].items():
      points = entry["points"]
      steps = [p["step"] for p in points]
      if name == "glue_mean":
        center = [p["glue_mean"] for p in points]
        low, high = [p["glue_min"] for p in points], [p["glue_max"] for p in points]
      else:
        center = [p["tasks"][name]["mean"] for p in points]
        low = [p["tasks"][name]["min"] for p in points]
        high = [p["tasks"][name]["max"] for p in points]
      line, = ax.plot(steps, center, marker="o", label=label)
      ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
    title = "GLUE mean" if name == "glue_mean" else (
        f"{glue_data.get_task(name).display_name} ({glue_data.get_task(name).headline_metric})")
    ax.set(title=title, xlabel="pretraining step")
    ax.legend(fontsize="small")
  for column, key in enumerate(PRETRAINING_METRICS):
    ax = axes[1][column]
    for label, entry in curve["workdirs"].items():
      records = [r for r in entry["pretraining"] if key in r]
      if records:
        ax.plot([r["step"] for r in records], [r[key] for r in records], marker=".",
                label=label)
    ax.set(title=f"held-out {'MLM loss' if key == 'eval_mlm_loss' else 'critic AUC'}",
           xlabel="pretraining step")
    if ax.lines:
      ax.legend(fontsize="small")
  for column in range(len(panels), columns):
    axes[0][column].axis("off")
  for column in range(len(PRETRAINING_METRICS), columns):
    axes[1][column].axis("off")
  figure.tight_layout()
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=100)
  plt.close(figure)
  return buffer.getvalue()


def write_outputs(curve: dict[str, Any], output_dir: str) -> None:
  fs.makedirs(output_dir)
  fs.write_json_atomically(fs.join(output_dir, "curve.json"), curve, sort_keys=False)
  fs.write_atomically(fs.join(output_dir, "curve.csv"), csv_text(curve))
  fs.write_atomically(fs.join(output_dir, "curve.md"), markdown(curve))
  fs.write_atomically(fs.join(output_dir, "curve.png"), plot_png(curve))


def parse_steps(values: Sequence[str]) -> list[int]:
  """--steps' values as step numbers; FinetuneError on anything else."""
  try:
    return [int(s) for s in values]
  except ValueError:
    raise FinetuneError(f"--steps takes step numbers: {','.join(values)}") from None
