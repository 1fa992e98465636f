"""One fine-tuning run: a task model trained for a number of steps, then its predictions.

  params = fit(model, params, loss_fn, train_arrays, ft, seed=..., num_layers=..., ...)
  outputs = predict(model, params, eval_arrays, ...)

Data-parallel over every device of every host (the pretraining mesh, model axis 1): parameters
replicated, each global batch split over the 'data' axis, each host feeding its slice.

Steps and order: as ELECTRA (preprocessing.py pads the training set with zero-weight rows to
whole batches), every epoch trains on every example once, the last batch filled with zero-weight
rows, so steps = ceil(N / batch) * epochs. The order is ours, one documented choice: a fresh
permutation of the examples per epoch drawn from the seed (`epoch_batches`). ELECTRA shuffles
the examples once when writing its TFRecords, then reads them repeated through a 100-example
shuffle buffer, so its epochs are not permutations and its batches cross epoch borders.
Prediction pads the examples to whole batches and trims the outputs, so every example counts
exactly once, on any number of devices and hosts. The logged accuracy (mse, ...) is a mean over
the real rows only; padding rows count in neither. Records go through the pretraining's writer
(metrics_records.py: RUN_DIR/metrics/, `python -m script_jax.metrics_log --workdir=RUN_DIR`).
Dropout randomness is fold_in(key(seed), step): the seed fixes the head's initialisation, the
dropout masks and the data order.
"""

from __future__ import annotations

import functools
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from script_jax import fs
from script_jax import metrics_records
from script_jax import sharding as sharding_lib
from script_jax.finetune import optim
from script_jax.finetune.seed_runs import FinetuneError

P = jax.sharding.PartitionSpec
LossFn = Callable[..., tuple[jax.Array, dict]]


def data_mesh() -> jax.sharding.Mesh:
  """All devices on one 'data' axis (across slices on a multi-slice job: sharding.py)."""
  return sharding_lib.make_mesh((jax.device_count(),), ("data",))


def _global_batch(mesh, rows: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """A global batch from the full batch every host holds: each host gives its own slice."""
  sharding = jax.sharding.NamedSharding(mesh, P("data"))
  count, index = jax.process_count(), jax.process_index()
  out = {}
  for k, v in rows.items():
    per_host = v.shape[0] // count
    out[k] = jax.make_array_from_process_local_data(
        sharding, np.ascontiguousarray(v[index * per_host:(index + 1) * per_host]))
  return out


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The order of the examples in an epoch: a permutation fixed by (seed, epoch)."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def epoch_batches(num_examples: int, batch_size: int, seed: int,
                  epoch: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """An epoch's batches as (example rows [B], weights [B]): every example once, in the epoch's
  order, the last batch filled up with weight-0 copies of row 0 (ELECTRA's padding rows)."""
  order = epoch_order(num_examples, seed, epoch)
  num_batches = -(-num_examples // batch_size)
  padding = num_batches * batch_size - num_examples
  rows = np.concatenate([order, np.zeros(padding, order.dtype)])
  weights = np.concatenate([np.ones(num_examples, np.float32), np.zeros(padding, np.float32)])
  return [(rows[b * batch_size:(b + 1) * batch_size], weights[b * batch_size:(b + 1) * batch_size])
          for b in range(num_batches)]


# The train step's metrics of the step itself; the others (the task's: accuracy, mse ...) are
# means over the batch's real rows, weighted by "real_rows" when several steps are averaged.
STEP_METRICS = ("loss", "grad_norm", "learning_rate")


def make_train_step(model, loss_fn: LossFn, tx, schedule, loss_reduction: str, seed: int,
                    replicated) -> Callable:
  """The jitted step (params, opt_state, batch, step) -> (params, opt_state, metrics): one
  value_and_grad of the task loss (summed, or averaged, over the batch's rows of weight 1: its
  `example_weight`, 0 for padding rows), then the optimizer. Parameters and optimizer state are
  donated; dropout draws from fold_in(key(seed), step). The metrics: STEP_METRICS, "real_rows"
  (the batch's weight) and the task's per-row metrics averaged over those rows."""
  dropout_key = jax.random.key(seed)

  def real_mean(values_B, weights_B):
    return jnp.sum(values_B * weights_B) / jnp.maximum(jnp.sum(weights_B), 1.0)

  def reduce(losses_B, weights_B):
    if loss_reduction == "sum":
      return jnp.sum(losses_B * weights_B)
    return real_mean(losses_B, weights_B)

  @functools.partial(jax.jit, donate_argnums=(0, 1), out_shardings=(replicated,) * 3)
  def train_step(params, opt_state, batch, step):
    def loss_of(p):
      outputs = model.apply({"params": p}, batch["input_ids"], batch["segment_ids"],
                            batch["input_mask"], deterministic=False,
                            rngs={"dropout": jax.random.fold_in(dropout_key, step)},
                            **{k: batch[k] for k in getattr(model, "train_inputs", ())})
      losses_B, metrics_B = loss_fn(outputs, batch)
      return reduce(losses_B, batch["example_weight"]), metrics_B
    (loss, metrics_B), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    weights_B = batch["example_weight"]
    metrics = {**{k: real_mean(v, weights_B) for k, v in metrics_B.items()},
               "loss": loss, "grad_norm": optax.global_norm(grads),
               "learning_rate": schedule(step), "real_rows": jnp.sum(weights_B)}
    return optax.apply_updates(params, updates), opt_state, metrics

  return train_step


def fit(model, params, loss_fn: LossFn, train_arrays: dict[str, np.ndarray], ft, *,
        seed: int, num_layers: int, epochs: int, label: str = "",
        log_dir: Optional[str] = None) -> tuple[Any, dict[str, float]]:
  """Trains `params` with ELECTRA's fine-tuning recipe; returns (params, last metrics).

  Args:
    model: a Flax module called as model.apply({"params": p}, ids, segment_ids, input_mask,
      deterministic=..., rngs=..., **extra), extra being the batch fields the module names in
      `train_inputs` (and, in predict, `predict_inputs`).
    params: the initial parameters (pretrained backbone and fresh head).
    loss_fn: (outputs, batch) -> (per-example losses [B], per-example metrics {name: [B]}).
    train_arrays: "input_ids", "segment_ids", "input_mask" and the task's targets, [N, ...].
    ft: the `finetune` config section (batch_size, learning_rate, ...).
    seed: fixes dropout and the data order (the head's initialisation is the caller's).
    num_layers: of the encoder (for the layer-wise learning-rate decay).
    epochs: passes over the training examples.
    label: shown in the progress lines.
    log_dir: TensorBoard and the metrics records (metrics_records.py; None: none written).
  """
  mesh = data_mesh()
  num_examples = len(train_arrays["input_ids"])
  batch_size = ft.batch_size
  if batch_size % jax.device_count():
    raise FinetuneError(f"finetune.batch_size={batch_size} is not divisible by the "
                     f"{jax.device_count()} devices.")
  if num_examples == 0:
    raise FinetuneError(f"{label}: no training examples.")
  steps_per_epoch = -(-num_examples // batch_size)  # the last batch padded, as ELECTRA
  total_steps = steps_per_epoch * epochs
  tx, schedule = optim.make_optimizer(ft, params, num_layers, total_steps)
  replicated = jax.sharding.NamedSharding(mesh, P())
  # A copy through the host: the train step donates its buffers, the caller keeps its params.
  params = jax.device_put(jax.tree.map(np.asarray, params), replicated)
  opt_state = jax.jit(tx.init, out_shardings=replicated)(params)
  train_step = make_train_step(model, loss_fn, tx, schedule, ft.loss_reduction, seed,
                               replicated)

  chief = jax.process_index() == 0
  records = metrics_records.MetricsLog(log_dir, enabled=bool(log_dir) and chief)
  board = None
  if log_dir and chief:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top  (heavy: tensorflow, through clu)
    board = metric_writers.SummaryWriter(log_dir)
  every = max(1, ft.log_every_steps)
  totals, count, real_rows, last = {}, 0, 0.0, {}
  step, last_step, last_time = 0, 0, time.time()
  try:
    for epoch in range(epochs):
      for rows, weights in epoch_batches(num_examples, batch_size, seed, epoch):
        batch = _global_batch(mesh, {**{k: v[rows] for k, v in train_arrays.items()},
                                     "example_weight": weights})
        params, opt_state, metrics = train_step(params, opt_state, batch, jnp.int32(step))
        step += 1
        metrics = jax.device_get(metrics)
        if not np.isfinite(metrics["loss"]):
          raise FinetuneError(f"[{label}] the loss is {metrics['loss']} at step {step}; "
                              "lower finetune.learning_rate.")
        rows_here = float(metrics.pop("real_rows"))
        for k, v in metrics.items():
          totals[k] = totals.get(k, 0.0) + float(v) * (1.0 if k in STEP_METRICS else rows_here)
        count, real_rows = count + 1, real_rows + rows_here
        if step % every and step != total_steps:
          continue
        now = time.time()
        rate = (step - last_step) / max(now - last_time, 1e-9)
        averages = {k: v / (count if k in STEP_METRICS else real_rows) for k, v in totals.items()}
        if chief:
          print(f"[{label}] " + metrics_records.progress_line(step, total_steps, averages,
                                                             rate),
                file=sys.stderr, flush=True)
        last = {"step": step, **averages, "steps_per_sec": rate}
        records.write(last)
        if board is not None:
          board.write_scalars(step, {k: v for k, v in last.items() if k != "step"})
        totals, count, real_rows, last_step, last_time = {}, 0, 0.0, step, now
  finally:
    records.close(raise_errors=sys.exc_info()[0] is None)
    if board is not None:
      board.close()
  return params, last


def predict(model, params, arrays: dict[str, np.ndarray], batch_size: int) -> Any:
  """The model's outputs on every example, in order (a tree of [N, ...] numpy arrays)."""
  mesh = data_mesh()
  num_examples = len(arrays["input_ids"])
  batch_size = round_up(batch_size, jax.device_count() * jax.process_count())
  replicated = jax.sharding.NamedSharding(mesh, P())
  params = jax.device_put(params, replicated)

  @functools.partial(jax.jit, out_shardings=replicated)
  def forward(params, batch):
    return model.apply({"params": params}, batch["input_ids"], batch["segment_ids"],
                       batch["input_mask"], deterministic=True,
                       **{k: batch[k] for k in extra_inputs})

  extra_inputs = tuple(getattr(model, "predict_inputs", ()))
  keys = ("input_ids", "segment_ids", "input_mask") + extra_inputs
  padded = round_up(max(num_examples, 1), batch_size)
  inputs = {k: np.concatenate([arrays[k], np.zeros((padded - num_examples,) + arrays[k].shape[1:],
                                                   arrays[k].dtype)]) for k in keys}
  outputs = []
  for start in range(0, padded, batch_size):
    batch = _global_batch(mesh, {k: v[start:start + batch_size] for k, v in inputs.items()})
    outputs.append(jax.device_get(forward(params, batch)))
  stacked = jax.tree.map(lambda *xs: np.concatenate(xs), *outputs)
  return jax.tree.map(lambda x: x[:num_examples], stacked)


def save_params(path: str, params) -> None:
  """Writes parameters with orbax (local or gs://) for `load_params`."""
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, jax.device_get(params), force=True)


def load_params(path: str, abstract) -> Any:
  """Parameters saved by `save_params`, in the shapes of `abstract`."""
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(path, abstract)


def resolved(path: str) -> str:
  """An absolute path for orbax (which wants one locally); gs:// paths pass through."""
  return fs.abspath(path)
