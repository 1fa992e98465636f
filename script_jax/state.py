"""The train state: parameters, optimizer (Table 4's AdamW), learning-rate schedule, creation.

The trainer builds its state here; checkpoints restore into the shapes made here; scoring, export
and fine-tuning need only `init_params` / `abstract_params`, no optimizer.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax

from script_jax import sharding as sharding_lib


def electra_schedule(peak: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
  """ELECTRA's (and BERT's) optimization.py: lr * (1 - t / T) * min(1, t / W), the warmup
  factor multiplied onto a linear decay that starts at step 0 (not two joined phases)."""
  warmup, total = max(1, warmup_steps), max(1, total_steps)

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    return peak * jnp.minimum(1.0, t / warmup) * jnp.maximum(0.0, 1.0 - t / total)

  return schedule


class _AdamState(NamedTuple):
  mu: Any
  nu: Any


def scale_by_adam_without_bias_correction(b1: float, b2: float, eps: float):
  """m / (sqrt(v) + eps) with m, v the raw moving averages, as ELECTRA's (and BERT's)
  AdamWeightDecayOptimizer."""
  def init(params):
    return _AdamState(mu=jax.tree.map(jnp.zeros_like, params),
                      nu=jax.tree.map(jnp.zeros_like, params))

  def update(grads, state, params=None):
    del params
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, grads)
    updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu)
    return updates, _AdamState(mu=mu, nu=nu)

  return optax.GradientTransformation(init, update)


def electra_adamw(schedule: optax.Schedule, b1: float, b2: float, eps: float,
                  weight_decay: float) -> optax.GradientTransformation:
  """ELECTRA's AdamWeightDecayOptimizer: -lr(t) * (adam(g) + weight_decay * param), no bias
  correction, no decay of LayerNorm parameters and biases (clip the gradients before it)."""
  return optax.chain(
      scale_by_adam_without_bias_correction(b1, b2, eps),
      optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
      optax.scale_by_schedule(lambda step: -schedule(step)))


def learning_rate_schedule(config) -> optax.Schedule:
  """The learning rate of each pretraining step. optim.recipe "optax": linear warmup to the
  peak, then linear decay to zero at num_train_steps (Table 4); "electra": `electra_schedule`."""
  o = config.optim
  if o.recipe == "electra":
    return electra_schedule(o.learning_rate, config.num_train_steps, o.warmup_steps)
  decay = optax.linear_schedule(o.learning_rate, 0.0, config.num_train_steps - o.warmup_steps)
  if o.warmup_steps == 0:
    return decay
  warmup = optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps)
  return optax.join_schedules([warmup, decay], [o.warmup_steps])


def weight_decay_mask(params) -> Any:
  """True for the weights that decay: not LayerNorm parameters, not biases."""
  def decays(path, _):
    name = str(getattr(path[-1], "key", path[-1]))
    return name not in ("bias", "scale") and not name.endswith("output_bias")
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW (b 0.9/0.999, eps 1e-6, decay 0.01 off LayerNorm and biases), clipped at norm 1:
  optax's (bias-corrected) for optim.recipe "optax", ELECTRA's (`electra_adamw`) for
  "electra"."""
  o = config.optim
  schedule = learning_rate_schedule(config)
  if o.recipe == "electra":
    adamw = electra_adamw(schedule, o.b1, o.b2, o.eps, o.weight_decay)
  else:
    adamw = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                        mask=weight_decay_mask)
  return optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), adamw)


def dummy_batch(config, batch_size: int = 1) -> dict[str, np.ndarray]:
  """A batch of the right shapes and dtypes (for initialisation and shape checks)."""
  t, p = config.seq_len, config.mask.max_predictions_per_seq
  return {
      "input_ids": np.zeros((batch_size, t), np.int32),
      "input_mask": np.ones((batch_size, t), np.int32),
      "segment_ids": np.zeros((batch_size, t), np.int32),
      "masked_positions": np.zeros((batch_size, p), np.int32),
      "masked_ids": np.zeros((batch_size, p), np.int32),
      "masked_weights": np.zeros((batch_size, p), np.float32),
  }


def init_params(config, model, rng) -> dict:
  """Fresh parameters of `model` (call under jit or eval_shape)."""
  b = dummy_batch(config)
  return model.init(rng, b["input_ids"], b["segment_ids"], b["input_mask"],
                    b["masked_positions"])["params"]


def abstract_params(config, model) -> dict:
  """The parameters' shapes and dtypes, without computing them (no optimizer)."""
  return jax.eval_shape(functools.partial(init_params, config, model), jax.random.key(0))


def create_train_state(config, model, rng) -> train_state.TrainState:
  """Fresh parameters and optimizer state (call under jit or eval_shape)."""
  return train_state.TrainState.create(apply_fn=model.apply,
                                       params=init_params(config, model, rng),
                                       tx=make_optimizer(config))


def init_state(config, model, mesh):
  """Initialises abstractly, then runs a sharded jit(init): (state, state_sharding)."""
  init_fn = functools.partial(create_train_state, config, model)
  abstract = jax.eval_shape(init_fn, jax.random.key(config.seed))
  state_sharding = sharding_lib.state_shardings(config, abstract, mesh)
  state = jax.jit(init_fn, out_shardings=state_sharding)(jax.random.key(config.seed))
  return state, state_sharding


def abstract_like(state):
  """ShapeDtypeStructs with the shardings of `state` (the orbax restore target)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)
