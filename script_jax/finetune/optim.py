"""The fine-tuning optimizer of ELECTRA's recipe (the SCRIPT paper's Table 5).

  update = -lr(t) * layer_scale * (adam(g) + weight_decay * param)

- lr(t) = lr * min(1, t / W) * (1 - t / T): the warmup factor multiplied onto a linear decay
  that starts at step 0, as ELECTRA's code does (not two joined phases); W = warmup_fraction * T.
- Adam with b1 0.9, b2 0.999, eps 1e-6 and, as ELECTRA's AdamWeightDecayOptimizer, no bias
  correction (`finetune.adam_bias_correction` switches it on).
- Weight decay (0 in the paper's table) skips LayerNorm parameters and biases.
- Gradients clipped to global norm 1.0.
- Layer-wise learning-rate decay: depth 0 = the embeddings (word, position, type, their
  LayerNorm, and the E->H projection), depth i+1 = transformer layer i, the task head at the full
  rate. ELECTRA's code scales depth d by decay^(L + 2 - d), so its top layer gets decay^2 (a
  leftover of a removed pooler its authors kept, google-research/electra issues #51/#64); that is
  our default, so that our numbers are comparable with the paper's. `finetune.top_layer_at_decay_2
  = False` gives the top layer decay^1 (the depth rule without the quirk).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from script_jax import state as state_lib


def learning_rate_schedule(peak: float, total_steps: int, warmup_fraction: float):
  """lr * min(1, t / W) * max(0, 1 - t / T) with W = round(warmup_fraction * T)."""
  warmup_steps = max(1, int(round(warmup_fraction * total_steps)))
  return state_lib.electra_schedule(peak, total_steps, warmup_steps)


def layer_depths(params: dict, num_layers: int) -> Any:
  """A tree like `params` of each parameter's depth (0 = embeddings, L + 1 = the task head)."""
  def depth(path, _):
    names = [str(getattr(k, "key", k)) for k in path]
    if names[0] != "backbone":
      return num_layers + 1  # the task head
    if names[1] == "embeddings" or "embeddings_project" in names:
      return 0
    layer = next(n for n in names if n.startswith("layer_"))
    return int(layer[len("layer_"):]) + 1
  return jax.tree_util.tree_map_with_path(depth, params)


def layer_scales(params: dict, num_layers: int, decay: float,
                 top_layer_at_decay_2: bool = True) -> Any:
  """The learning-rate multiplier of every parameter (see the module docstring)."""
  top = num_layers + (2 if top_layer_at_decay_2 else 1)

  def scale(d):
    return 1.0 if d == num_layers + 1 else float(decay ** (top - d))
  return jax.tree.map(scale, layer_depths(params, num_layers))


def make_optimizer(ft, params: dict, num_layers: int, total_steps: int):
  """The optimizer for `params` from the `finetune` config section `ft`."""
  schedule = learning_rate_schedule(ft.learning_rate, total_steps, ft.warmup_fraction)
  adam = (optax.scale_by_adam(ft.b1, ft.b2, ft.eps) if ft.adam_bias_correction
          else state_lib.scale_by_adam_without_bias_correction(ft.b1, ft.b2, ft.eps))
  scales = layer_scales(params, num_layers, ft.layerwise_lr_decay, ft.top_layer_at_decay_2)
  return optax.chain(
      optax.clip_by_global_norm(ft.grad_clip_norm),
      adam,
      optax.add_decayed_weights(ft.weight_decay, mask=state_lib.weight_decay_mask),
      optax.scale_by_schedule(lambda step: -schedule(step)),
      optax.GradientTransformation(
          lambda _: optax.EmptyState(),
          lambda updates, state, params=None: (
              jax.tree.map(lambda u, s: u * s, updates, scales), state)),
  ), schedule
