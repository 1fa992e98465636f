"""The three objectives under identical settings (the paper's Tables 1-2), then their curve.

  python -m script_jax.experiments.compare --config=configs/mini.py --output_dir=OUT \
      --data_dir=GLUE_DIR [--tasks=sst2,rte] [--objectives=script,electra,mlm] [--steps=N,M] \
      [--config.num_train_steps=1500 ...] [--finetune.num_seeds=2 ...]

From one pretraining config, each objective pretrains in OUT/<objective>/ on one prepared
folder, OUT/data (prepared once, by the first run): the same sequences in the same order
(config.seed), the same steps, optimizer and schedule; only `objective` differs. Then the
sample-efficiency curve (experiments/curve.py) fine-tunes every kept checkpoint of the three
with the --finetune recipe (configs/finetune.py) into OUT/curve/, and OUT/comparison.md holds a
Table-1/2-shaped table at the last step: per task mean ± sd over seeds, the GLUE mean, and the
held-out pretraining metrics. Everything resumes: a rerun trains and fine-tunes only what is
missing.

The same as separate commands, e.g. one pretraining per machine:

  python -m script_jax.data.prepare --config=configs/mini.py --output_dir=OUT/data
  python -m script_jax.main --config=configs/mini.py --workdir=OUT/script \
      --config.objective=script --config.data.prepared_dir=OUT/data      # electra, mlm alike
  python -m script_jax.experiments.curve --workdirs=OUT/script,OUT/electra,OUT/mlm \
      --labels=SCRIPT,ELECTRA,MLM --data_dir=GLUE_DIR --output_dir=OUT/curve
"""

from __future__ import annotations

import copy
import os
import sys
from typing import Any, Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

from script_jax import cli_errors
from script_jax import config_lib
from script_jax import fs
from script_jax import train
from script_jax.experiments import curve_runs
from script_jax.finetune import glue_runs
from script_jax.finetune import seed_runs
from script_jax.finetune.seed_runs import FinetuneError

FLAGS = flags.FLAGS
OBJECTIVES = {"script": "SCRIPT", "electra": "ELECTRA", "mlm": "MLM"}


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Pretraining config, e.g. configs/mini.py.",
                                  lock_config=True)
  config_flags.DEFINE_config_file("finetune", "configs/finetune.py",
                                  "The fine-tuning recipe (configs/finetune.py).",
                                  lock_config=True)
  flags.DEFINE_list("objectives", list(OBJECTIVES), "Objectives to compare.")
  flags.DEFINE_string("output_dir", None, "Workdirs, prepared data, curve, table.")
  flags.DEFINE_string("data_dir", None, "GLUE folder in the standard layout, or 'tfds'.")
  flags.DEFINE_list("tasks", [], "GLUE tasks (default: every task found in --data_dir).")
  flags.DEFINE_list("steps", [], "Fine-tune only these checkpoint steps (default: every kept "
                    "one).")
  flags.DEFINE_bool("check_counts", True, "Refuse GLUE files whose row count differs from the "
                    "standard release (turn off for subsets).")
  flags.mark_flags_as_required(["config", "output_dir", "data_dir"])


def objective_config(config, objective: str, prepared_dir: str):
  """The shared config with only the objective (and the shared prepared folder) set."""
  run_config = copy.deepcopy(config)
  with run_config.unlocked():
    run_config.objective = objective
    run_config.data.prepared_dir = prepared_dir
  return run_config


def finished(workdir: str, num_train_steps: int) -> bool:
  """Whether the workdir's pretraining reached its last step (its checkpoint is there)."""
  if not fs.exists(fs.join(workdir, "run_config.json")):
    return False
  steps = curve_runs.kept_steps(workdir)
  return bool(steps) and steps[-1] >= num_train_steps


def comparison_table(curve_data: dict[str, Any], output_dir: str) -> str:
  """Table 2's shape at each workdir's last fine-tuned step, then the held-out metrics."""
  labelled, held_out = {}, []
  for label, entry in curve_data["workdirs"].items():
    if not entry["points"]:
      continue
    step = entry["points"][-1]["step"]
    labelled[f"{label} (step {step:,})"] = seed_runs.read_results(
        fs.join(output_dir, label, f"step_{step}"))
    last = next((r for r in entry["pretraining"] if r["step"] == step), {})
    cells = [f"{last[k]:.4f}" if k in last else "-" for k in
             ("eval_mlm_loss", "eval_mlm_accuracy", "eval_disc_auc", "eval_disc_accuracy")]
    held_out.append(f"| {label} | {step:,} | " + " | ".join(cells) + " |")
  return (glue_runs.tables(labelled) + "\nHeld-out pretraining metrics at that step (ELECTRA's "
          "MLM: its generator's):\n\n| model | step | MLM loss | MLM accuracy | critic AUC | "
          "critic accuracy |\n|---|---|---|---|---|---|\n" + "\n".join(held_out) + "\n")


def run_compare(config, ft, objectives: Sequence[str], output_dir: str, data_dir: str,
                tasks: Sequence[str], check_counts: bool = True,
                steps: Sequence[int] = ()) -> str:
  """Pretrains what is missing, runs the curve, writes and returns comparison.md."""
  unknown = [o for o in objectives if o not in OBJECTIVES]
  if unknown or not objectives:
    raise FinetuneError(f"--objectives takes {', '.join(OBJECTIVES)}; got "
                        f"{','.join(objectives) or 'none'}.")
  prepared_dir = fs.join(output_dir, "data")
  workdirs = [fs.join(output_dir, o) for o in objectives]
  for number, (objective, workdir) in enumerate(zip(objectives, workdirs), start=1):
    if finished(workdir, config.num_train_steps):
      print(f"[{number}/{len(objectives)}] {objective}: pretrained", file=sys.stderr)
      continue
    print(f"[{number}/{len(objectives)}] {objective}: pretraining {config.num_train_steps:,} "
          f"steps in {workdir}", file=sys.stderr)
    train.train_and_evaluate(objective_config(config, objective, prepared_dir), workdir)
  labels = [OBJECTIVES[o] for o in objectives]
  curve_dir = fs.join(output_dir, "curve")
  curve_data = curve_runs.run_curve(ft, workdirs, labels, data_dir, curve_dir, tasks, steps=steps,
                                    check_counts=check_counts)
  curve_runs.write_outputs(curve_data, curve_dir)
  table = comparison_table(curve_data, curve_dir)
  fs.write_atomically(fs.join(output_dir, "comparison.md"), table)
  return table


def main(argv):
  def body():
    # Before JAX starts libtpu, as main.py does.
    libtpu_args = config_lib.libtpu_init_args(FLAGS.config,
                                              os.environ.get("LIBTPU_INIT_ARGS", ""))
    os.environ["LIBTPU_INIT_ARGS"] = libtpu_args
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  (heavy: tensorflow)
    tf.config.set_visible_devices([], "GPU")  # tf.data only
    table = run_compare(FLAGS.config, FLAGS.finetune, FLAGS.objectives, FLAGS.output_dir,
                        FLAGS.data_dir, FLAGS.tasks, FLAGS.check_counts,
                        curve_runs.parse_steps(FLAGS.steps))
    print(table)
    print(f"Curve: {fs.join(FLAGS.output_dir, 'curve', 'curve.png')}; table: "
          f"{fs.join(FLAGS.output_dir, 'comparison.md')}.", file=sys.stderr)
  cli_errors.run_cli(argv, body, quiet=False)  # the pretraining's progress


if __name__ == "__main__":
  define_flags()
  app.run(main)
