"""Checkpoints: an orbax CheckpointManager per workdir, and loading for later stages.

A workdir holds `run_config.json` (the config it was started with) and `checkpoints/<step>/`.
Fine-tuning, scoring and export call `load_pretrained(workdir)`, whatever the objective was.
"""

from __future__ import annotations

import json
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import orbax.checkpoint as ocp

from script_jax import cli_errors
from script_jax import config_lib
from script_jax import fs
from script_jax import models
from script_jax import state as state_lib

RUN_CONFIG = "run_config.json"
# What fixes the shapes of the parameters: a checkpoint only resumes under the same values.
SHAPE_KEYS = ("objective", "model.vocab_size", "model.embedding_size", "model.hidden_size",
              "model.num_layers", "model.num_heads", "model.intermediate_size",
              "model.max_position_embeddings", "model.type_vocab_size", "model.scan_layers",
              "model.vocab_pad_multiple",
              "electra.generator_hidden_size", "electra.generator_num_heads",
              "electra.generator_intermediate_size", "electra.generator_num_layers",
              "optim.recipe",  # the optimizer state's tree
              "rng_impl")  # the random stream (resolved from "auto" per platform)


class CheckpointMismatchError(cli_errors.UserError):
  """The workdir holds a run whose model differs from the config asked for."""


def _lookup(config: dict, dotted: str) -> Any:
  value = config
  for part in dotted.split("."):
    value = value.get(part) if isinstance(value, dict) else None
  return value


def _read_json_config(path: str) -> dict:
  """run_config.json's contents, upgraded (config_lib.upgrade_run_config: the keys it predates
  at the values its run used); one clear error when it is not whole JSON (truncated)."""
  try:
    recorded = fs.read_json(path)
  except ValueError as e:
    raise cli_errors.UserError(
        f"{path} is damaged ({e}; {fs.getsize(path)} bytes): it records the config this "
        "workdir's run was started with. Restore it from a copy, or delete it: the next start "
        "writes it again from its --config, and a checkpoint of another model is still refused "
        "when it is restored.") from e
  return config_lib.upgrade_run_config(recorded)


def check_run_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Refuses a config whose model differs from the workdir's run (run_config.json); reads only."""
  path = fs.join(workdir, RUN_CONFIG)
  new = json.loads(config.to_json())
  if fs.isfile(path):
    old = _read_json_config(path)
    diffs = [f"{k}: workdir has {_lookup(old, k)!r}, config asks for {_lookup(new, k)!r}"
             for k in SHAPE_KEYS
             if _lookup(old, k) is not None and _lookup(old, k) != _lookup(new, k)]
    if any(d.startswith("rng_impl:") for d in diffs):
      diffs.append("(rng_impl decides the run's random stream; on another platform \"auto\" "
                   f"may choose another: pass --config.rng_impl={_lookup(old, 'rng_impl')} to "
                   "continue the same stream)")
    if diffs:
      raise CheckpointMismatchError(
          f"The workdir {workdir} holds a run of a different model, so its checkpoints cannot "
          "be resumed with this config:\n  " + "\n  ".join(diffs) +
          "\nUse a new --workdir, or the config that run was started with "
          f"(saved in {path}). Nothing in the workdir was changed.")


def write_run_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Records the config in WORKDIR/run_config.json (process 0), once every check has passed."""
  if jax.process_index() == 0:
    fs.makedirs(workdir)
    fs.write_atomically(fs.join(workdir, RUN_CONFIG), config.to_json(indent=2))


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir's run was started with."""
  path = fs.join(workdir, RUN_CONFIG)
  if not fs.exists(path):
    raise FileNotFoundError(f"{workdir} is not a script_jax workdir: {path} does not exist. "
                            "Pretrain first: python -m script_jax.main --config=... "
                            f"--workdir={workdir}")
  return ml_collections.ConfigDict(_read_json_config(path))


def make_manager(workdir: str, config, read_only: bool = False) -> ocp.CheckpointManager:
  """Saves every `checkpoint_every_steps`; keeps the last `keep_checkpoints` and every one at a
  multiple of `keep_checkpoint_every_steps` (when > 0), the checkpoints a curve needs."""
  policies = ocp.checkpoint_managers
  keep = policies.LatestN(n=config.keep_checkpoints)
  keep_every = config.keep_checkpoint_every_steps
  if keep_every:
    keep = policies.AnyPreservationPolicy([keep, policies.EveryNSteps(interval_steps=keep_every)])
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=config.checkpoint_every_steps,
      preservation_policy=keep,
      create=not read_only,
      read_only=read_only,
      enable_async_checkpointing=not read_only,
  )
  return ocp.CheckpointManager(fs.abspath(fs.join(workdir, "checkpoints")),
                               options=options)


def restore_state(manager: ocp.CheckpointManager, step: int, abstract_state):
  """Restores `step` into the shapes and shardings of `abstract_state`, with a clear error."""
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointMismatchError(
        f"Checkpoint {step} in {manager.directory} does not match this model's parameters "
        f"({type(e).__name__}: {str(e)[:500]}). Use a new --workdir or the config it was "
        "written with. Nothing was changed.") from e


@jax.jit
def non_finite_count_traced(tree) -> jax.Array:
  """`non_finite_count` as a device scalar, for use inside a jitted step."""
  leaves = [x for x in jax.tree.leaves(tree) if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)]
  return sum((jax.numpy.sum(~jax.numpy.isfinite(x)) for x in leaves), jax.numpy.int32(0))


def non_finite_count(tree) -> int:
  """How many NaN or Inf values the floating-point arrays of `tree` hold (a state's parameters
  and optimizer moments, or parameters alone)."""
  return int(non_finite_count_traced(tree))


DAMAGED_FOLDER = "damaged_checkpoints"


def _shapes(tree) -> list[tuple[int, ...]]:
  return [tuple(x.shape) for x in jax.tree.leaves(tree) if hasattr(x, "shape")]


def _is_other_model(manager: ocp.CheckpointManager, step: int, abstract_state) -> bool:
  """Whether checkpoint `step` reads as whole but holds other shapes than `abstract_state`
  (another model), rather than being damaged (its description unreadable)."""
  try:
    saved = manager.item_metadata(step)
  except Exception:  # pylint: disable=broad-except
    return False
  saved = getattr(saved, "tree", saved)
  return saved is not None and sorted(_shapes(saved)) != sorted(_shapes(abstract_state))


def restore_newest_good(manager: ocp.CheckpointManager, workdir: str, abstract_state):
  """(state, step) of the newest checkpoint that restores whole and finite; (None, None) when
  there is none. Newer ones that are damaged or hold NaN/Inf are moved to
  WORKDIR/damaged_checkpoints/ (kept, out of the way of the steps this run saves again), each
  with a warning that says why. A checkpoint of another model is CheckpointMismatchError."""
  steps = sorted(manager.all_steps(), reverse=True)
  skipped = []
  for step in steps:
    try:
      state = manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # pylint: disable=broad-except
      if isinstance(e, (ValueError, KeyError, TypeError)) and _is_other_model(
          manager, step, abstract_state):
        raise CheckpointMismatchError(
            f"Checkpoint {step} in {manager.directory} does not match this model's parameters "
            f"({type(e).__name__}: {str(e)[:500]}). Use a new --workdir or the config it was "
            "written with. Nothing was changed.") from e
      detail = " ".join(str(e).split("See full TensorStore details")[0].split())[:200]
      why = f"is damaged ({type(e).__name__}: {detail})"
    else:
      bad = non_finite_count(state)
      if not bad:
        break
      why = f"holds {bad:,} NaN or Inf values"
      del state
    skipped.append((step, why))
  else:
    state, step = None, None
  if skipped and jax.process_index() == 0:
    for bad_step, why in skipped:
      target = fs.join(workdir, DAMAGED_FOLDER, str(bad_step))
      if fs.exists(target):
        fs.remove_tree(target)
      fs.move_tree(fs.join(str(manager.directory), str(bad_step)), target)
      logging.warning("Checkpoint %d %s: skipped, moved to %s.", bad_step, why, target)
  if skipped:
    if jax.process_count() > 1:  # every host reloads once process 0 has moved them
      multihost_utils.sync_global_devices("script_jax damaged checkpoints moved")
    manager.reload()
  if state is None and skipped:
    raise cli_errors.UserError(
        f"No checkpoint in {manager.directory} restores: " +
        "; ".join(f"{s} {why}" for s, why in skipped) +
        f". They were moved to {fs.join(workdir, DAMAGED_FOLDER)}; start again to train from "
        "scratch in this workdir, or use another --workdir.")
  return state, step


def remove_unfinished_saves(workdir: str) -> None:
  """Deletes the temporary folders of saves that never finished (a run killed mid-save); call
  only while holding the workdir's lock, when no save of this workdir can be under way."""
  for path in fs.glob(fs.join(workdir, "checkpoints", "*.orbax-checkpoint-tmp*")):
    logging.info("Removing %s, a save that never finished.", path)
    fs.remove_tree(path)


def load_pretrained(workdir: str, step: int | None = None,
                    sharding: jax.sharding.Sharding | None = None):
  """(config, model, params) of the latest (or given) checkpoint of a pretraining workdir.

  Restores the parameters alone, whatever topology wrote the checkpoint (no optimizer is built
  and its state is not read): onto this process's first device, or straight into `sharding`
  (e.g. replicated over a multi-host mesh, where a host cannot device_put onto other hosts'
  devices).
  """
  config = read_run_config(workdir)
  manager = make_manager(workdir, config, read_only=True)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints: train longer than "
                            "checkpoint_every_steps, or let the run finish.")
  model = models.build_model(config)
  device = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = {"params": jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
      state_lib.abstract_params(config, model))}
  try:
    restored = manager.restore(step, args=ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True))
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointMismatchError(
        f"Checkpoint {step} in {manager.directory} does not match the model of its "
        f"run_config.json ({type(e).__name__}: {str(e)[:500]}).") from e
  bad = non_finite_count(restored["params"])
  if bad:
    raise cli_errors.UserError(
        f"Checkpoint {step} in {manager.directory} holds {bad:,} NaN or Inf parameters: it is "
        "not a model to use. Pick an earlier step, or train again from a finite one.")
  return config, model, restored["params"]



def encoder_params(config, params) -> dict:

  """The transformer encoder that fine-tuning builds on, in one layout for every objective.

  Returns {"embeddings": ..., "encoder": ...}, the parameters `models.MaskedLM.encode` uses:
  for script and mlm the model itself, for electra the discriminator (the generator is dropped,
  as ELECTRA does after pretraining). Layers are always per-layer (layer_0 ...), as a model
  built with model.scan_layers=False expects, whichever layout the run trained in.
  """
  params = models.unstack_layers(params)  # one layout whether or not the run scanned its layers
  if config.objective == "electra":
    return {"embeddings": params["embeddings"], "encoder": params["discriminator"]}
  return {"embeddings": params["embeddings"], "encoder": params["encoder"]}
