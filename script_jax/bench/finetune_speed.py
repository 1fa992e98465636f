"""Fine-tuning speed: examples/s of our GLUE and SQuAD train steps beside HuggingFace's, one run.

  python -m script_jax.bench.finetune_speed --config=configs/small.py --output=finetune_speed.json
  python -m script_jax.bench.finetune_speed --config=configs/small.py --batch_size=32 --steps=50 \
      --warmup=5 --skip_hf                                   # an accelerator: ELECTRA's batch 32

Two tasks at the config's model sizes (configs/small.py: vocab 30522, E 128, H 256, 12 layers,
4 heads, FFN 1024, 512 positions), --lengths giving their sequence lengths:

  glue   `finetune.model.Classifier` with 2 outputs (a GLUE classification task), length 128;
         HF: `transformers.ElectraForSequenceClassification` (num_labels 2).
  squad  `finetune.model.SpanExtractor` (BERT's start/end head, `squad.head="bert"`, the one
         HF's model has; SQuAD 1.1's start/end loss), length 384;
         HF: `transformers.ElectraForQuestionAnswering`.

Ours is the train step of `finetune.trainer.fit`, built here the same way (trainer.py is not
refactored for a benchmark): the encoder config of `finetune.seed_runs.load_start` (fine-tuning's
dropout, no scan, no remat), `finetune.optim.make_optimizer` with `config_lib.finetune_config()`
(clip 1.0, Adam without bias correction, layer-wise decay 0.8, the linear schedule), the task's
own loss (`glue_runs.classification_loss`, `squad_runs.span_loss`) summed over the batch,
value_and_grad, the optax update, parameters and optimizer state donated, dropout from
fold_in(key, step), data parallel over the devices (one CPU device here). One fixed random batch
stays on the device and only the end of each window waits for it (fit also fetches the metrics
every step).

HF's side: the same sizes, float32, train mode (dropout 0.1), the stock forward with labels
(mean loss), backward, clip at global norm 1, torch AdamW (fused), on the same numpy batch;
torch threads = the CPU count, OMP_WAIT_POLICY=PASSIVE as in `bench/hf_peer.py` (spinning OpenMP
threads make torch far slower whenever other jobs share the CPUs). HF's classification head is
dense-gelu-dense over [CLS] where ours is one dense layer, and its optimizer has no layer-wise
decay: both are negligible next to the encoder.

Reported: examples/s = batch x steps / seconds of a window, the median of --repeats windows after
--warmup untimed steps, and the CPU share other processes used during that window. Without torch
or transformers the HF side is skipped with a note. Benchmarks are run on purpose; not tests.
"""

from __future__ import annotations

import functools
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from script_jax import config_lib
from script_jax import fs
from script_jax import models
from script_jax.bench import step_timing
from script_jax.finetune import glue_runs
from script_jax.finetune import model as task_models
from script_jax.finetune import optim
from script_jax.finetune import squad_runs
from script_jax.finetune import trainer

FLAGS = flags.FLAGS
TASKS = ("glue", "squad")


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so importing stays free)."""
  config_flags.DEFINE_config_file("config", "configs/small.py",
                                  "Path to a config file (configs/*.py).", lock_config=True)
  flags.DEFINE_integer("batch_size", 8, "Examples per step, both sides (ELECTRA's is 32).")
  flags.DEFINE_integer("steps", 5, "Timed steps per window.")
  flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
  flags.DEFINE_integer("repeats", 3, "Timed windows per side; the median is reported.")
  flags.DEFINE_list("lengths", ["128", "384"], "Sequence lengths of glue and squad, in order.")
  flags.DEFINE_list("tasks", list(TASKS), "Tasks to time (glue, squad).")
  flags.DEFINE_integer("threads", None, "torch.set_num_threads (default: the CPU count).")
  flags.DEFINE_string("omp_wait_policy", "PASSIVE", "OMP_WAIT_POLICY for torch's OpenMP threads "
                      "(set before torch loads; '' leaves the environment alone).")
  flags.DEFINE_bool("skip_hf", False, "Time ours only.")
  flags.DEFINE_string("output", None, "Write the results as JSON to this path.")


def _print(message: str) -> None:
  print(message, flush=True)


# ----------------------------------------------------------------------------- inputs

def random_batch(task: str, batch_size: int, length: int, vocab_size: int,
                 seed: int = 0) -> dict[str, np.ndarray]:
  """One full-length batch: random ids, two segments, random labels or answer spans (numpy)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, vocab_size, (batch_size, length), dtype=np.int32)
  segment = np.zeros((batch_size, length), np.int32)
  first = max(1, length // 4)  # [CLS] + a question of a quarter; the rest is the "context"
  segment[:, first:] = 1
  batch = {"input_ids": ids, "segment_ids": segment,
           "input_mask": np.ones((batch_size, length), np.int32),
           "example_weight": np.ones((batch_size,), np.float32)}
  if task == "glue":
    batch["labels"] = rng.integers(0, 2, (batch_size,), dtype=np.int32)
  else:
    context = segment.copy()
    context[:, 0] = 1  # [CLS] is allowed (no answer)
    start = rng.integers(first, length, (batch_size,), dtype=np.int32)
    end = np.minimum(start + rng.integers(0, 10, (batch_size,), dtype=np.int32), length - 1)
    batch.update(context_mask=context, start_positions=start, end_positions=end.astype(np.int32),
                 is_impossible=np.zeros((batch_size,), np.int32))
  return batch


def _median_window(windows: Sequence[float], others: Sequence[Any]) -> tuple[float, Any]:
  """(the median window's seconds, its others-CPU share); the lower middle one for even counts."""
  order = sorted(range(len(windows)), key=windows.__getitem__)
  middle = order[(len(order) - 1) // 2]
  return statistics.median(windows), others[middle]


# ----------------------------------------------------------------------------- ours

def encoder_config(config):
  """The task model's encoder config, as finetune.seed_runs.load_start builds it."""
  ft = config_lib.finetune_config()
  return models.encoder_config_from(config.model, dropout_rate=ft.dropout_rate,
                                    attention_dropout_rate=ft.attention_dropout_rate,
                                    scan_layers=False, remat=False)


def time_ours(config, task: str, length: int, *, batch_size: int, steps: int, warmup: int,
              repeats: int, devices=None, log: Callable[[str], None] = _print) -> dict[str, Any]:
  """Times our fine-tuning train step (finetune.trainer.fit's) on one fixed random batch."""

  ft = config_lib.finetune_config()
  cfg = encoder_config(config)
  if length > cfg.max_position_embeddings:
    raise ValueError(f"length {length} exceeds the model's {cfg.max_position_embeddings} "
                     "positions")
  if task == "glue":
    model, loss_fn = task_models.Classifier(cfg, 2), glue_runs.classification_loss
  elif task == "squad":
    model = task_models.SpanExtractor(cfg)
    loss_fn = functools.partial(squad_runs.span_loss,
                                no_answer_weight=ft.squad.no_answer_weight, version="1.1")
  else:
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
  devices = list(jax.devices() if devices is None else devices)
  if batch_size % len(devices):
    raise ValueError(f"batch_size {batch_size} is not divisible by the {len(devices)} devices")
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  np_batch = random_batch(task, batch_size, length, cfg.vocab_size)
  batch = {k: jax.device_put(v, split) for k, v in np_batch.items()}

  start = time.perf_counter()
  params = jax.jit(model.init, out_shardings=replicated)(
      jax.random.key(0), np_batch["input_ids"][:1], np_batch["segment_ids"][:1],
      np_batch["input_mask"][:1])["params"]
  num_params = int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))
  # Any total keeps the learning rate above zero over the run; its value does not change speed.
  total_steps = max(1000, warmup + steps * repeats)
  tx, schedule = optim.make_optimizer(ft, params, cfg.num_layers, total_steps)
  opt_state = jax.jit(tx.init, out_shardings=replicated)(params)
  train_step = trainer.make_train_step(model, loss_fn, tx, schedule, ft.loss_reduction, 0,
                                       replicated)  # the step trainer.fit runs

  compiled = train_step.lower(params, opt_state, batch, jnp.int32(0)).compile()
  compile_s = time.perf_counter() - start
  label = f"[ours {task} {batch_size}x{length}]"
  log(f"{label} {num_params:,} parameters; initialised and compiled in {compile_s:.1f} s")
  step = 0
  loss = math.nan
  for _ in range(warmup):
    params, opt_state, metrics = compiled(params, opt_state, batch, jnp.int32(step))
    step += 1
  if warmup:
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
      raise FloatingPointError(f"{label} loss is {loss} after warm-up")
  jax.block_until_ready(params)
  windows, others = [], []
  for _ in range(repeats):
    share = step_timing.CpuShare()
    begin = time.perf_counter()
    for _ in range(steps):
      params, opt_state, metrics = compiled(params, opt_state, batch, jnp.int32(step))
      step += 1
    jax.block_until_ready((params, opt_state, metrics))
    windows.append(time.perf_counter() - begin)
    others.append(share.others())
    log(f"{label} {steps} steps in {windows[-1]:.3f} s "
        f"({batch_size * steps / windows[-1]:.2f} examples/s; other processes used "
        f"{step_timing.percent(others[-1])}% of the CPUs)")
  seconds, other = _median_window(windows, others)
  return {"examples_per_sec": batch_size * steps / seconds, "window_seconds": windows,
          "others_cpu_share": others, "others_cpu_share_median_window": other,
          "num_params": num_params, "compile_s": compile_s, "loss_after_warmup": loss,
          "num_devices": len(devices)}


# ----------------------------------------------------------------------------- HuggingFace

def hf_config(config, task: str):
  """An ElectraConfig with the config's sizes (and fine-tuning's dropout)."""
  from transformers import ElectraConfig  # pylint: disable=g-import-not-at-top  (optional: transformers)
  m, ft = config.model, config_lib.finetune_config()
  return ElectraConfig(
      vocab_size=m.vocab_size, embedding_size=m.embedding_size, hidden_size=m.hidden_size,
      num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
      intermediate_size=m.intermediate_size, max_position_embeddings=m.max_position_embeddings,
      type_vocab_size=m.type_vocab_size, hidden_dropout_prob=ft.dropout_rate,
      attention_probs_dropout_prob=ft.attention_dropout_rate, hidden_act="gelu",
      layer_norm_eps=1e-12, initializer_range=m.get("initializer_range", 0.02),
      num_labels=2)  # glue: two classes; squad: start and end


def build_hf_model(config, task: str):
  import transformers  # pylint: disable=g-import-not-at-top  (optional: transformers)
  cls = (transformers.ElectraForSequenceClassification if task == "glue"
         else transformers.ElectraForQuestionAnswering)
  return cls(hf_config(config, task))


def time_hf(config, task: str, length: int, *, batch_size: int, steps: int, warmup: int,
            repeats: int, log: Callable[[str], None] = _print) -> dict[str, Any]:
  """Times HF's fine-tuning step on the same random batch as ours."""
  import torch  # pylint: disable=g-import-not-at-top  (optional: torch)
  ft = config_lib.finetune_config()
  torch.manual_seed(0)
  model = build_hf_model(config, task).train()
  num_params = sum(p.numel() for p in model.parameters())
  optimizer = torch.optim.AdamW(model.parameters(), lr=ft.learning_rate, betas=(ft.b1, ft.b2),
                                eps=ft.eps, weight_decay=ft.weight_decay, fused=True)
  np_batch = random_batch(task, batch_size, length, config.model.vocab_size)
  t = {k: torch.from_numpy(v).long() for k, v in np_batch.items()}
  inputs = {"input_ids": t["input_ids"], "attention_mask": t["input_mask"],
            "token_type_ids": t["segment_ids"]}
  if task == "glue":
    inputs["labels"] = t["labels"]
  else:
    inputs.update(start_positions=t["start_positions"], end_positions=t["end_positions"])

  def step():
    loss = model(**inputs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), ft.grad_clip_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  label = f"[hf {task} {batch_size}x{length}]"
  loss = step_timing.warm_up_torch(step, warmup, label)
  windows, others = step_timing.timed_windows(
      lambda: [step() for _ in range(steps)], repeats,
      lambda seconds, other: log(f"{label} {steps} steps in {seconds:.3f} s "
                                 f"({batch_size * steps / seconds:.2f} examples/s; other "
                                 f"processes used {step_timing.percent(other)}% of the CPUs)"))
  seconds, other = _median_window(windows, others)
  return {"examples_per_sec": batch_size * steps / seconds, "window_seconds": windows,
          "others_cpu_share": others, "others_cpu_share_median_window": other,
          "num_params": num_params, "loss_after_warmup": loss,
          "attn_implementation": getattr(model.config, "_attn_implementation", None)}


# ----------------------------------------------------------------------------- both

def run_benchmark(config, *, tasks: Sequence[str] = TASKS, lengths: Sequence[int] = (128, 384),
                  batch_size: int = 8, steps: int = 5, warmup: int = 2, repeats: int = 3,
                  hf: bool = True, threads: int | None = None, devices=None,
                  log: Callable[[str], None] = _print) -> dict[str, Any]:
  """Ours and (where torch and transformers import) HF's, per task: the JSON report.

  `lengths` pairs with TASKS ("glue", "squad") by position; `tasks` picks which of them run.
  """
  if len(lengths) != len(TASKS):
    raise ValueError(f"lengths {list(lengths)}: give one per task {TASKS}")
  for task in tasks:
    if task not in TASKS:
      raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
  # Equal shapes: HF's embedding has exactly vocab_size rows, so ours is not padded here.
  config = config.copy_and_resolve_references()
  config.model.vocab_pad_multiple = 1
  report = step_timing.environment()
  hf_note = None
  if hf:
    try:
      import torch  # pylint: disable=g-import-not-at-top  (optional: torch)
      import transformers  # pylint: disable=g-import-not-at-top  (optional: transformers)
    except ImportError as e:
      hf, hf_note = False, f"HuggingFace peer skipped: {e} (pip install torch transformers)"
      log(hf_note)
    else:
      threads = threads or os.cpu_count()
      torch.set_num_threads(threads)
      report["versions"].update(torch=torch.__version__, transformers=transformers.__version__)
  report["settings"] = {
      "tasks": list(tasks), "lengths": dict(zip(TASKS, map(int, lengths))),
      "batch_size": batch_size, "steps": steps, "warmup": warmup, "repeats": repeats,
      "dtype": config.model.dtype, "torch_threads": threads if hf else None,
      "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "hf": hf, "hf_note": hf_note}
  log(f"Fine-tuning speed on {report['device_kind']} ({report['cpu_count']} CPUs, load "
      f"{report['load_average']}): batch {batch_size}, {config.model.num_layers} layers, "
      f"H {config.model.hidden_size}")
  results = {}
  for task, length in zip(TASKS, lengths):
    if task not in tasks:
      continue
    entry = {"seq_len": int(length), "batch_size": batch_size,
             "ours": time_ours(config, task, int(length), batch_size=batch_size, steps=steps,
                               warmup=warmup, repeats=repeats, devices=devices, log=log)}
    if hf:
      entry["hf"] = time_hf(config, task, int(length), batch_size=batch_size, steps=steps,
                            warmup=warmup, repeats=repeats, log=log)
      entry["ours_over_hf"] = entry["ours"]["examples_per_sec"] / entry["hf"]["examples_per_sec"]
    results[task] = entry
  report["results"] = results
  report["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
  return report


def format_table(report: dict[str, Any]) -> str:
  """The human-readable summary of `run_benchmark`'s report."""
  lines = [f"{'task':<6} {'shape':>9} {'side':<5} {'params':>11} {'examples/s':>10} "
           f"{'ms/step':>8} {'ours/hf':>7} {'others %':>8}"]
  for task, entry in report["results"].items():
    for side in ("ours", "hf"):
      if side not in entry:
        continue
      r = entry[side]
      ratio = f"{entry['ours_over_hf']:.2f}" if side == "hf" and "ours_over_hf" in entry else "-"
      ms = 1e3 * entry["batch_size"] / r["examples_per_sec"]
      lines.append(f"{task:<6} {entry['batch_size']:>4}x{entry['seq_len']:<4} {side:<5} "
                   f"{r['num_params']:>11,} {r['examples_per_sec']:>10.2f} {ms:>8.0f} "
                   f"{ratio:>7} "
                   f"{step_timing.percent(r['others_cpu_share_median_window']):>8}")
  s, v = report["settings"], report["versions"]
  lines.append("examples/s: median of the timed windows; others %: CPU share other processes "
               "used in that window; ours/hf on the hf row")
  lines.append(f"{s['steps']} steps x {s['repeats']} windows after {s['warmup']} warm-up, "
               f"{s['dtype']}, {report['device_kind']}, {report['cpu_count']} CPUs; jax "
               f"{v['jax']}" + (f", torch {v['torch']} ({s['torch_threads']} threads, "
                                f"OMP_WAIT_POLICY {s['OMP_WAIT_POLICY'] or 'unset'}), "
                                f"transformers {v['transformers']}" if s["hf"] else ""))
  if s["hf_note"]:
    lines.append(s["hf_note"])
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.omp_wait_policy and not FLAGS.skip_hf:
    os.environ["OMP_WAIT_POLICY"] = FLAGS.omp_wait_policy  # torch is not imported yet
  report = run_benchmark(FLAGS.config, tasks=FLAGS.tasks,
                         lengths=[int(x) for x in FLAGS.lengths], batch_size=FLAGS.batch_size,
                         steps=FLAGS.steps, warmup=FLAGS.warmup, repeats=FLAGS.repeats,
                         hf=not FLAGS.skip_hf, threads=FLAGS.threads)
  report["command"] = " ".join(["python", "-m", "script_jax.bench.finetune_speed", *sys.argv[1:]])
  report["config_file"] = config_flags.get_config_filename(FLAGS["config"])
  _print(format_table(report))
  if FLAGS.output:
    with fs.open(FLAGS.output, "w") as f:
      json.dump(report, f, indent=2, default=str)
    _print(f"Wrote {FLAGS.output}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
