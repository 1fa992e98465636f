"""The pretraining loop: one pure, sharded train step for every objective.

  state, metrics = train_step(state, batch)   # two forward passes, one value_and_grad, optax

The mesh, the state's layout and the batch's come from sharding.py: the state is replicated on
every device, or with mesh.fsdp its parameters and optimizer moments are split over 'data'
(FSDP); the batch is split over the data-parallel axes. The random numbers of step s are
`fold_in(key(seed), s)` and the data pipeline can start at any step, so a resumed run is the
same run.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
import time

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from script_jax import checkpoints
from script_jax import cli_errors
from script_jax import config_lib
from script_jax import evaluation
from script_jax import fs
from script_jax import metrics_records
from script_jax import models
from script_jax import objectives
from script_jax import run_lock
from script_jax import sharding as sharding_lib
from script_jax import state as state_lib
from script_jax.data import preparation
from script_jax.data import prepared_folder
from script_jax.interop import hf_import

Array = jax.Array
P = jax.sharding.PartitionSpec
BATCH_KEYS = ("input_ids", "input_mask", "segment_ids", "masked_positions", "masked_ids",
              "masked_weights")


class NonFiniteLossError(FloatingPointError, cli_errors.UserError):
  """Training produced a NaN or Inf; the last good checkpoint is left intact."""


class CheckpointSaveError(cli_errors.UserError):
  """A checkpoint could not be written (a full disk, lost permissions): the run stops."""


# ----------------------------------------------------------------------------- state and step

def make_train_step(config, model, state_sharding, mesh):
  """The jitted, sharded train step: (state, batch) -> (state, metrics). State is donated."""
  model, params_at_use = sharding_lib.for_the_step(config, model, state_sharding.params, mesh)
  objective_loss = functools.partial(objectives.get_objective(config.objective), model=model,
                                     config=config, mesh=mesh)

  def loss_fn(params, batch, rng):
    return objective_loss(params_at_use(params), batch, rng)

  schedule = state_lib.learning_rate_schedule(config)
  skip_nonfinite = config.optim.on_nonfinite == "skip"
  seed, rng_impl = config.seed, config_lib.rng_impl_of(config)

  def train_step(state, batch):
    # Step-indexed randomness: the same step draws the same numbers, resumed or not.
    rng = jax.random.fold_in(jax.random.key(seed, impl=rng_impl), state.step)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
    metrics["loss"] = loss
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["learning_rate"] = schedule(state.step)
    new_state = state.apply_gradients(grads=grads)
    if not skip_nonfinite:
      return new_state, metrics
    # Keep the old parameters and moments (the step count moves on with the batches). Judged on
    # the updated state too: a finite gradient times a huge learning rate can still overflow.
    finite = (jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"]) &
              (checkpoints.non_finite_count_traced((new_state.params, new_state.opt_state)) == 0))
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                        (new_state.params, new_state.opt_state), (state.params, state.opt_state))
    metrics["skipped"] = (~finite).astype(jnp.float32)
    return new_state.replace(params=kept[0], opt_state=kept[1]), metrics

  batch_sharding = jax.sharding.NamedSharding(mesh, sharding_lib.batch_spec(mesh))
  replicated = jax.sharding.NamedSharding(mesh, P())
  return jax.jit(train_step, in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, replicated), donate_argnums=0)


def to_global_batch(local_batch: dict[str, np.ndarray], mesh) -> dict[str, Array]:
  """This host's slice of the batch -> global arrays split over the data-parallel axes."""
  sharding = jax.sharding.NamedSharding(mesh, sharding_lib.batch_spec(mesh))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(local_batch[k]))
          for k in BATCH_KEYS}


# ----------------------------------------------------------------------------- logging

# ----------------------------------------------------------------------------- the loop

class SignalDeliveries:
  """Counts how often a signal was delivered, which Python's handlers cannot tell.

  CPython runs a signal's handler once for all of its deliveries that arrive while the main
  thread is inside one C call (a train step, a save), so a second Ctrl-C pressed during a long
  step would be lost. Its C-level handler writes one byte per delivery to the wakeup fd: this
  reads them. Main thread only, like signal.signal.
  """

  def __init__(self, signum: int):
    self._signum = signum
    self._read_fd, self._write_fd = os.pipe()
    os.set_blocking(self._read_fd, False)
    os.set_blocking(self._write_fd, False)
    self._previous_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)

  def since_last_call(self) -> int:
    """Deliveries of the signal since the last call (or since construction)."""
    delivered = 0
    while True:
      try:
        chunk = os.read(self._read_fd, 4096)
      except BlockingIOError:
        return delivered
      if not chunk:
        return delivered
      delivered += chunk.count(self._signum)

  def close(self):
    signal.set_wakeup_fd(self._previous_fd)
    os.close(self._read_fd)
    os.close(self._write_fd)


def _prepare_data(config, workdir):
  """(metadata, data_dir) of the prepared pretraining data; checks the vocab against the model."""
  metadata = preparation.prepare_pretraining_data(config, workdir)
  problem = config_lib.vocab_size_problem(metadata["vocab_size"], config,
                                         metadata.get("tokenizer", {}).get("path", "?"))
  if problem:
    raise config_lib.ConfigError(problem)
  data_dir = prepared_folder.data_dir_of(config, workdir)
  from script_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (heavy: tensorflow)
  pipeline.check_shards(data_dir, metadata)
  return metadata, data_dir


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Pretrains `config.objective` in `workdir`, resuming from its checkpoint if there is one.

  Returns the last logged metrics.
  """
  config_lib.validate_config(config)
  if config.rng_impl == "auto":  # decided here, recorded in run_config.json, kept on resume
    config.rng_impl = config_lib.rng_impl_of(config)
    logging.info("rng_impl auto: %s on %s", config.rng_impl, jax.default_backend())
  if config.init_from:
    if hf_import.is_hf_init(config.init_from):  # its sizes and tokenizer, before any data work
      hf_import.check_pretraining_config(config.init_from, config)
  checkpoints.check_run_config(workdir, config)
  with run_lock.hold(workdir):
    return _train_holding_the_lock(config, workdir)


def _train_holding_the_lock(config, workdir: str) -> dict[str, float]:
  """train_and_evaluate's work once the config is checked and the workdir is this run's."""
  metadata, data_dir = _prepare_data(config, workdir)

  # clu's writers import TensorFlow: only the training loop needs them, not the step functions
  # that benchmarks import on accelerator images without TensorFlow.
  from clu import metric_writers  # pylint: disable=g-import-not-at-top  (heavy: tensorflow, through clu)
  from clu import parameter_overview  # pylint: disable=g-import-not-at-top  (heavy: tensorflow, through clu)

  mesh = sharding_lib.create_mesh(config)
  model = models.build_model(config)
  state, state_sharding = state_lib.init_state(config, model, mesh)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info("Model for objective %s: %s parameters\n%s", config.objective, f"{num_params:,}",
               parameter_overview.get_parameter_overview(state.params))

  if jax.process_index() == 0:
    checkpoints.remove_unfinished_saves(workdir)
  manager = checkpoints.make_manager(workdir, config)
  restored, latest = checkpoints.restore_newest_good(manager, workdir,
                                                     state_lib.abstract_like(state))
  if restored is not None:
    state = restored
    logging.info("Resumed from %s at step %d", manager.directory, latest)
  elif config.init_from:
    if hf_import.is_hf_init(config.init_from):
      pretrained, report = hf_import.pretraining_params(config.init_from, config, state.params)
      logging.info("HuggingFace parameters:\n  %s", "\n  ".join(report))
      state = state.replace(params=jax.device_put(pretrained, state_sharding.params))
    else:
      # Restored replicated over the mesh, relaid out on the devices: on several hosts a
      # device_put of one host's copy onto the global sharding is a cross-host transfer.
      _, _, pretrained = checkpoints.load_pretrained(
          config.init_from, sharding=jax.sharding.NamedSharding(mesh, P()))
      relayout = jax.jit(functools.partial(models.to_layout, scan_layers=config.model.scan_layers),
                         out_shardings=state_sharding.params)
      state = state.replace(params=relayout(pretrained))
    logging.info("Initialised parameters from %s", config.init_from)
  start_step = int(state.step)

  from script_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (heavy: tensorflow)
  dataset = pipeline.create_pretraining_dataset(
      config, metadata, data_dir, start_step=start_step,
      process_index=jax.process_index(), process_count=jax.process_count())
  batches = iter(dataset.as_numpy_iterator())
  checkpoints.write_run_config(workdir, config)  # every check has passed
  train_step = make_train_step(config, model, state_sharding, mesh)
  evaluator = evaluation.Evaluator.create(config, model, state_sharding.params, mesh, metadata,
                                          data_dir)
  if evaluator is not None:
    logging.info("Held-out evaluation every %d steps and at the end on %d sequences of %s.",
                 config.eval_every_steps, evaluator.num_sequences, data_dir)
  elif config.eval_every_steps:
    logging.warning("%s", prepared_folder.no_eval_split_message(data_dir))

  is_chief = jax.process_index() == 0
  # TensorBoard on process 0; the console gets one progress line per log step (below).
  writer = metric_writers.AsyncWriter(metric_writers.SummaryWriter(workdir) if is_chief
                                      else metric_writers.MultiWriter([]))
  if start_step == 0:
    writer.write_hparams(dict(flax.traverse_util.flatten_dict(json.loads(config.to_json()),
                                                              sep=".")))
  # Records leave the loop at once; a background thread writes them as new files (never
  # rewriting one: an append on gs:// re-uploads the whole object). Flushed at every checkpoint,
  # so the records up to the step a resume starts from are all written.
  jsonl = metrics_records.MetricsLog(workdir, is_chief, config.metrics_flush_seconds)
  stop_requested = []
  # One process: SIGTERM means "save and stop" at once. Several: jax.distributed's own SIGTERM
  # handler tells its preemption sync manager, which picks one step for every host
  # (manager.reached_preemption below); a handler of ours would replace it, and the hosts would
  # stop at different steps and abort in a collective.
  own_handler = jax.process_count() == 1
  if own_handler:
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop_requested.append(True))
    ctrl_c_presses = SignalDeliveries(signal.SIGINT)

    def on_ctrl_c(*_):
      # Two presses during one long step reach this handler once: count the deliveries.
      if stop_requested or ctrl_c_presses.since_last_call() >= 2:  # at once, without saving
        print("\nerror: interrupted again: exiting without saving (the checkpoints already "
              "written are intact).", file=sys.stderr, flush=True)
        os._exit(130)  # pylint: disable=protected-access
      stop_requested.append(True)
      logging.warning("Ctrl-C: saving a checkpoint after this step, then stopping (Ctrl-C "
                      "again exits at once, without saving).")
    previous_int_handler = signal.signal(signal.SIGINT, on_ctrl_c)
  # The newest checkpoint known to hold a finite state: the one resumed from, then each saved.
  last_good = latest

  def last_good_text() -> str:
    if last_good is None:
      return f"no checkpoint of a finite state was saved in {manager.directory}"
    return (f"the last good checkpoint, step {last_good} in {manager.directory} (its state "
            "was checked finite), is intact")

  totals: dict[str, float] = {}
  count, last_log_time, last_log_step = 0, time.time(), start_step
  last_record: dict[str, float] = {}

  skips_in_a_row, max_skips = 0, config.optim.max_consecutive_skips
  skip_nonfinite = config.optim.on_nonfinite == "skip"
  skipped_in_window: list[int] = []

  def absorb(step: int, device_metrics) -> None:
    """Fetches one step's metrics (a step late, so the device stays busy) and checks them."""
    nonlocal count, skips_in_a_row
    host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    if host.pop("skipped", 0.0):  # optim.on_nonfinite="skip": the step left the state as it was
      skips_in_a_row += 1
      logging.warning("Step %d: loss %s, gradient norm %s: the update was not finite and was "
                      "skipped (%d in a row; the run stops after %d).", step, host["loss"],
                      host["grad_norm"], skips_in_a_row, max_skips)
      if skips_in_a_row >= max_skips:
        raise NonFiniteLossError(
            f"Step {step}: {skips_in_a_row} updates in a row were NaN or Inf and were skipped "
            f"(optim.max_consecutive_skips={max_skips}). Training stopped; {last_good_text()}. "
            "Try a lower learning rate or float32.")
      skipped_in_window.append(step)
      return
    skips_in_a_row = 0
    if not (math.isfinite(host["loss"]) and math.isfinite(host["grad_norm"])):
      raise NonFiniteLossError(
          f"Step {step}: loss {host['loss']}, gradient norm {host['grad_norm']}. Training "
          f"stopped; {last_good_text()}. Try a lower learning rate or float32"
          + ("" if skip_nonfinite else ", or --config.optim.on_nonfinite=skip to skip such "
             "updates") + ".")
    for k, v in host.items():
      totals[k] = totals.get(k, 0.0) + v
    count += 1

  def log(step: int) -> None:
    nonlocal count, last_log_time, last_log_step, totals, last_record
    now = time.time()
    rate = (step - last_log_step) / max(now - last_log_time, 1e-9)
    record = {k: v / max(count, 1) for k, v in totals.items()}  # over the steps not skipped
    if skip_nonfinite:
      record["skipped_steps"] = float(len(skipped_in_window))
      skipped_in_window.clear()
    record["steps_per_sec"] = rate
    writer.write_scalars(step, record)
    jsonl.write({"step": step, **record})
    shown = {k: record[k] for k in ("loss", "mlm_loss", "mlm_accuracy", "disc_loss",
                                    "disc_accuracy") if k in record}
    logging.info("%s", metrics_records.progress_line(step, config.num_train_steps, shown, rate))
    last_record, totals, count = dict(record), {}, 0
    last_log_time, last_log_step = now, step

  def evaluate(step: int) -> None:
    record = evaluator.evaluate(state.params)
    writer.write_scalars(step, record)
    jsonl.write({"step": step, **record})
    logging.info("eval step %d/%d | %s | %.1f s", step, config.num_train_steps,
                 evaluation.format_metrics(record), record[evaluation.PREFIX + "seconds"])
    last_record.update(record)

  def save(step: int) -> None:
    nonlocal last_good
    bad = checkpoints.non_finite_count((state.params, state.opt_state))
    if bad:
      raise NonFiniteLossError(
          f"Step {step}: the update left {bad:,} NaN or Inf values in the parameters or the "
          f"optimizer's moments, so it was not saved. Training stopped; {last_good_text()}. "
          "Try a lower learning rate or float32.")
    saving.append(step)
    try:
      manager.save(step, args=checkpoints.ocp.args.StandardSave(state), force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise _save_failed(e, step) from e
    last_good = step

  saving = []  # the steps whose save was started

  def _save_failed(error, step: int) -> CheckpointSaveError:
    manager.reload()  # the steps whose save finished
    saved = manager.all_steps()
    unsaved = [s for s in saving if s not in saved]
    text = " ".join(str(error).split())
    reason = cli_errors.write_failure_reason(text)  # before shortening: it may sit in the middle
    if len(text) > 400:
      text = f"{text[:150]} ... {text[-250:]}"
    return CheckpointSaveError(
        f"Saving checkpoint {unsaved[0] if unsaved else step} failed"
        f"{': ' + reason if reason else ''} ({type(error).__name__}: "
        f"{text}); training stopped at step {step}. The earlier checkpoints in "
        f"{manager.directory} are intact (newest: {max(saved) if saved else 'none'}). Free "
        "space or fix the permissions, then start again: it resumes from the newest.")

  pending = None
  step = start_step
  try:
    while step < config.num_train_steps:
      try:
        local_batch = next(batches)
      except Exception as e:  # pylint: disable=broad-except
        raise pipeline.damaged_record_error(e, data_dir) or e
      batch = to_global_batch(local_batch, mesh)
      state, metrics = train_step(state, batch)
      try:
        manager.check_for_errors()  # an asynchronous save that failed stops the run here
      except Exception as e:  # pylint: disable=broad-except
        raise _save_failed(e, step) from e
      if pending is not None:
        absorb(*pending)
      pending = (step + 1, metrics)  # named by the count it produced, as logs and checkpoints
      step += 1
      stopping = bool(stop_requested) or manager.reached_preemption(step)
      must_log = step % config.log_every_steps == 0 or step == config.num_train_steps
      must_save = (stopping or step % config.checkpoint_every_steps == 0
                   or step == config.num_train_steps)
      if must_log or must_save:
        absorb(*pending)  # never save or log a state whose step went NaN
        pending = None
      if must_log:
        log(step)
      if evaluator is not None and (step % config.eval_every_steps == 0 or
                                    step == config.num_train_steps):
        evaluate(step)
      if must_save:
        save(step)
        jsonl.flush()
      if stopping:
        logging.warning("Stop requested (SIGTERM, Ctrl-C or preemption): saved step %d, "
                        "exiting.", step)
        break
  finally:
    failing = sys.exc_info()[0] is not None
    jsonl.close(raise_errors=not failing)
    try:
      manager.wait_until_finished()
      manager.close()
    except Exception as e:  # pylint: disable=broad-except
      if not failing:  # else the error on its way out says more
        raise _save_failed(e, step) from e
    writer.flush()
    if own_handler:
      signal.signal(signal.SIGTERM, previous_handler)
      signal.signal(signal.SIGINT, previous_int_handler)
      ctrl_c_presses.close()
  logging.info("%s at step %d of %d. Checkpoints: %s; metrics: %s (TensorBoard: "
               "tensorboard --logdir %s).",
               "Finished" if step >= config.num_train_steps else "Stopped", step,
               config.num_train_steps, manager.directory, fs.join(workdir, metrics_records.FOLDER),
               workdir)
  return last_record
