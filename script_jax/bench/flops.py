"""Model FLOPs of one pretraining step (SCRIPT, ELECTRA, BERT-MLM), counted analytically.

Only matrix multiplications are counted, each as 2*m*n*k (a multiply and an add); embedding
look-ups, LayerNorm, GELU, softmax, the losses, the sampling and the optimizer update are not.
This is the "model FLOPs" convention of utilisation figures (MFU): what the model needs, not
what the compiled program executes (rematerialisation, `model.remat` or the chunked critic
logsumexp's `jax.checkpoint`, recomputes forward matmuls; those are not model FLOPs).

One encoder pass over B sequences of T tokens (E embedding, H hidden, F FFN, L layers):

  embeddings_project   2*B*T*E*H               (only when E != H)
  attention_qkv        L * 3 * 2*B*T*H*H
  attention_output     L * 2*B*T*H*H
  attention_scores     L * 2*B*T*T*H           (Q K^T over all heads: N * T*T*(H/N))
  attention_values     L * 2*B*T*T*H           (probs V)
  ffn                  L * 2 * 2*B*T*H*F       (H->F and F->H)

Heads on top of it (P = predictions per sequence, V vocabulary):

  mlm_head_dense       2*B*P*H*E               (ELECTRA's MLM head: dense H->E, at P positions)
  logits               2*B*P*E*V               (tied decoder W e, at the P masked positions)

The objectives:

  mlm      one pass ("mlm_pass": encoder + head at P).
  script   the MLM pass, then the critic pass on the sampled sequence with the same model
           ("critic_pass": encoder + mlm_head_dense and logits at all B*T positions, because the
           critic needs logsumexp_v s_tv everywhere, eqs. 4-5; at the B*P masked positions
           only with script.disc_positions="masked").
  electra  the generator (its own H, F, L and heads; shared embeddings of size E, so its
           embeddings_project is E->H_gen) with head and logits at P, and the discriminator
           encoder + its head at all B*T positions: dense H->H and dense H->1.

Backward = 2x forward (one matmul for the gradient of each operand) for every pass that gets
gradients. In all three objectives every pass does: SCRIPT's critic pass and MLM pass both
train the one model, ELECTRA trains generator and discriminator. The sampling (Gumbel-max on
stop_gradient'ed logits) gets no gradient and has no matmul, so a train step is 3x forward.

Executed but not model FLOPs: besides rematerialisation, the tied softmax layer computes its
bias gradient (a column sum of the [rows, V] cotangent) as a matrix-vector product, 2*rows*V
per softmax layer (`softmax_bias_grad_flops`), because XLA:CPU's column reduction is far slower.
"""

from __future__ import annotations

import math
from typing import Any

import jax

from script_jax import config_lib
from script_jax import models

BACKWARD_FACTOR = 2  # gradients w.r.t. both operands of each matmul


def encoder_forward_flops(batch_size: int, seq_len: int, embedding_size: int, hidden_size: int,
                          num_layers: int, intermediate_size: int) -> dict[str, int]:
  """Forward matmul FLOPs of one Transformer pass over B*T tokens, by component."""
  tokens = batch_size * seq_len
  h, e, f, l = hidden_size, embedding_size, intermediate_size, num_layers
  return {
      "embeddings_project": 2 * tokens * e * h if e != h else 0,
      "attention_qkv": l * 3 * 2 * tokens * h * h,
      "attention_output": l * 2 * tokens * h * h,
      "attention_scores": l * 2 * tokens * seq_len * h,
      "attention_values": l * 2 * tokens * seq_len * h,
      "ffn": l * 2 * 2 * tokens * h * f,
  }


def _mlm_head_flops(rows: int, hidden_size: int, embedding_size: int, vocab_size: int):
  return {"mlm_head_dense": 2 * rows * hidden_size * embedding_size,
          "logits": 2 * rows * embedding_size * vocab_size}


def _prefixed(prefix: str, flops: dict[str, int]) -> dict[str, int]:
  return {f"{prefix}/{k}": v for k, v in flops.items()}


def forward_flops(config, objective: str | None = None,
                  batch_size: int | None = None) -> dict[str, int]:
  """Forward matmul FLOPs of one step of `objective`, by "pass/component".

  Defaults: `config.objective` and the global `config.batch_size`.
  """
  objective = objective or config.objective
  if objective not in config_lib.OBJECTIVES:
    raise ValueError(f"Unknown objective {objective!r}; choose one of {config_lib.OBJECTIVES}")
  b = config.batch_size if batch_size is None else batch_size
  m, t, p = config.model, config.seq_len, config.mask.max_predictions_per_seq
  # The padded vocabulary: its pad columns are multiplied too (then masked).
  v = models.encoder_config_from(m).padded_vocab_size
  e, h = m.embedding_size, m.hidden_size
  encoder = encoder_forward_flops(b, t, e, h, m.num_layers, m.intermediate_size)

  if objective == "electra":
    g = config.electra
    gen = encoder_forward_flops(b, t, e, g.generator_hidden_size, g.generator_num_layers,
                                g.generator_intermediate_size)
    gen.update(_mlm_head_flops(b * p, g.generator_hidden_size, e, v))
    disc = dict(encoder, head_dense=2 * b * t * h * h, head_output=2 * b * t * h * 1)
    return {**_prefixed("generator", gen), **_prefixed("discriminator", disc)}

  mlm_pass = dict(encoder, **_mlm_head_flops(b * p, h, e, v))
  if objective == "mlm":
    return _prefixed("mlm_pass", mlm_pass)
  critic_positions = p if config.script.disc_positions == "masked" else t
  critic_pass = dict(encoder, **_mlm_head_flops(b * critic_positions, h, e, v))
  return {**_prefixed("mlm_pass", mlm_pass), **_prefixed("critic_pass", critic_pass)}


def passes_with_gradients(objective: str) -> tuple[str, ...]:
  """The passes whose matmuls are differentiated (all of them, see the module docstring)."""
  return {"script": ("mlm_pass", "critic_pass"), "electra": ("generator", "discriminator"),
          "mlm": ("mlm_pass",)}[objective]


def train_step_flops(config, objective: str | None = None,
                     batch_size: int | None = None) -> dict[str, Any]:
  """Model FLOPs of one train step: {"forward", "backward", "total", "by_component"}.

  `by_component` is the forward count of `forward_flops`; backward is 2x forward of every
  pass that gets gradients.
  """
  objective = objective or config.objective
  by_component = forward_flops(config, objective, batch_size)
  trained = passes_with_gradients(objective)
  forward = sum(by_component.values())
  backward = BACKWARD_FACTOR * sum(f for k, f in by_component.items()
                                   if k.split("/")[0] in trained)
  return {"forward": forward, "backward": backward, "total": forward + backward,
          "by_component": by_component}


def softmax_bias_grad_flops(config, objective: str | None = None,
                            batch_size: int | None = None) -> int:
  """The matrix-vector FLOPs of the tied softmax layers' bias gradients (`models.tied_logits`):
  executed by a train step, not model FLOPs (2 * rows * V for each softmax layer)."""
  objective = objective or config.objective
  b = config.batch_size if batch_size is None else batch_size
  v = models.encoder_config_from(config.model).padded_vocab_size
  p, t = config.mask.max_predictions_per_seq, config.seq_len
  rows = b * p  # the MLM (or generator) logits at the masked positions
  if objective == "script":
    rows += b * (p if config.script.disc_positions == "masked" else t)  # the critic's logits
  return 2 * rows * v


# ----------------------------------------------------------------------------- a traced count

def _sub_jaxprs(params) -> list[Any]:
  """The jaxprs nested in an equation's parameters (pjit, scan, remat, custom_jvp ...)."""
  found = []
  for value in params.values():
    items = value if isinstance(value, (tuple, list)) else (value,)
    for item in items:
      if hasattr(item, "eqns"):
        found.append(item)
      elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
        found.append(item.jaxpr)
  return found


def jaxpr_matmul_flops(jaxpr) -> int:
  """2*m*n*k summed over every dot_general of a jaxpr (scan bodies times their length).

  An independent check of the analytic count: it counts what the traced program multiplies,
  including any rematerialised forward matmuls.
  """
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
      lhs_shape = eqn.invars[0].aval.shape
      k = math.prod(lhs_shape[d] for d in lhs_contracting)
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * k
    subs = [jaxpr_matmul_flops(s) for s in _sub_jaxprs(eqn.params)]
    if eqn.primitive.name == "cond":
      total += max(subs, default=0)  # one branch runs
    elif eqn.primitive.name == "scan":
      total += eqn.params["length"] * sum(subs)
    else:
      total += sum(subs)
  return total


def traced_matmul_flops(fn, *args, **kwargs) -> int:
  """Matmul FLOPs of `fn(*args, **kwargs)` as traced by JAX (see `jaxpr_matmul_flops`)."""
  return jaxpr_matmul_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)
