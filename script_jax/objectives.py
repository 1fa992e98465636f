"""Pretraining objectives: SCRIPT, ELECTRA and BERT-MLM, each a pure function -> (loss, metrics).

Every loss function has the signature `loss_fn(params, batch, rng, *, model, config, mesh=None)`
(`mesh`: the step's mesh, for kernels that run per device) where `batch` holds the masked input
from the data pipeline:
  input_ids [B, T] (masked), input_mask [B, T], segment_ids [B, T],
  masked_positions [B, P], masked_ids [B, P] (the originals), masked_weights [B, P].
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from script_jax import config_lib
from script_jax import fused_logsumexp
from script_jax import models
from script_jax import random_bits

Array = jax.Array


# ----------------------------------------------------------------------------- the critic (eqs. 4-5)

def critic_log_probs(logsumexp_BxT: Array) -> tuple[Array, Array]:
  """(log p(t+|x), log p(t-|x)) from logsumexp_v s_tv, eqs. 4-5.

  The V+1-class softmax with a zero logit for "replaced" gives p(t+) = sigmoid(lse(s_t)).
  """
  return jax.nn.log_sigmoid(logsumexp_BxT), jax.nn.log_sigmoid(-logsumexp_BxT)


def binary_disc_loss(original_logit_BxT: Array, is_original_BxT: Array, weights_BxT: Array):
  """Weighted mean binary cross-entropy of "token is original" (eq. 6) and its accuracy.

  `original_logit` is the logit of p(original): logsumexp(s_t) for SCRIPT, the discriminator's
  output for ELECTRA. Averaged over weighted tokens, as ELECTRA does.
  """
  label = is_original_BxT.astype(jnp.float32)
  log_p_pos = jax.nn.log_sigmoid(original_logit_BxT)
  log_p_neg = jax.nn.log_sigmoid(-original_logit_BxT)
  nll_BxT = -(label * log_p_pos + (1.0 - label) * log_p_neg)
  denom = jnp.maximum(weights_BxT.sum(), 1e-6)
  loss = (nll_BxT * weights_BxT).sum() / denom
  predicted_original = original_logit_BxT > 0
  accuracy = ((predicted_original == is_original_BxT) * weights_BxT).sum() / denom
  original_share = (label * weights_BxT).sum() / denom
  return loss, {"disc_loss": loss, "disc_accuracy": accuracy, "disc_original_share": original_share}


def chunked_logsumexp(features_BxTxE: Array, table_VxE: Array, bias_V: Array,
                      chunk_size: int) -> Array:
  """logsumexp_v (W e_bt + b)_v at every position, in chunks of about chunk_size tokens, so the
  [B, T, V] logits never exist at once: [B, T].

  A chunk is every sequence's next C = max(1, chunk_size // B) positions, the batch axis kept
  whole and outermost: under data parallelism each device computes its own rows' chunk, with
  no collective (chunking the flattened B*T rows would put the sharded batch axis inside the
  chunks, and devices would gather the global batch). Each chunk is rematerialised in the
  backward pass (jax.checkpoint), so the peak temporary memory is one [B, C, V] block.
  """
  b, t, e = features_BxTxE.shape
  positions = max(1, chunk_size // b)
  num_chunks = -(-t // positions)
  positions = -(-t // num_chunks)  # equal chunks: the least padding
  padded = jnp.pad(features_BxTxE, ((0, 0), (0, num_chunks * positions - t), (0, 0)))
  chunks_NxBxCxE = padded.reshape(b, num_chunks, positions, e).transpose(1, 0, 2, 3)

  @jax.checkpoint
  def one_chunk(chunk_BxCxE):
    return jax.nn.logsumexp(models.tied_logits(chunk_BxCxE, table_VxE, bias_V), axis=-1)

  lse_NxBxC = jax.lax.map(one_chunk, chunks_NxBxCxE)
  return lse_NxBxC.transpose(1, 0, 2).reshape(b, num_chunks * positions)[:, :t]


def critic_logsumexp(features_BxTxE: Array, table_VxE: Array, bias_V: Array,
                     chunk_size: int = 0, impl: str = "plain", mesh=None) -> Array:
  """logsumexp over the vocabulary of the tied logits at every position: [B, T] float32.

  impl "pallas": fused matmul + logsumexp kernels that never hold the [B, T, V] logits in HBM,
  forward or backward (fused_logsumexp.py; chunk_size is then not used), run on each device's
  rows of the batch over `mesh` (the step's); "plain": the formula, in chunks of positions when
  chunk_size > 0.
  """
  if impl == "pallas":
    return fused_logsumexp.pallas_logsumexp(features_BxTxE, table_VxE, bias_V, mesh=mesh)
  if impl != "plain":
    raise ValueError(f"logsumexp impl must be one of {', '.join(config_lib.LOGSUMEXP_IMPLS)}, got {impl!r}")
  if chunk_size and chunk_size > 0:
    return chunked_logsumexp(features_BxTxE, table_VxE, bias_V, chunk_size)
  return jax.nn.logsumexp(models.tied_logits(features_BxTxE, table_VxE, bias_V), axis=-1)


# ----------------------------------------------------------------------------- shared pieces

def first_argmax(x: Array, backend: str | None = None) -> Array:
  """jnp.argmax(x, axis=-1) for NaN-free x (the first maximum), int32.

  On CPU as two plain reductions (`two_reduction_argmax`): XLA:CPU compiles argmax's (value,
  index) reduction into a scalar loop that also evaluates everything fused into it (measured
  over Gumbel-perturbed logits in docs/benchmarks_log.md section (h)). On TPU and GPU, where
  that loop is not slow, argmax itself (one reduction instead of two). The form follows the
  platform the program is lowered for (jax.lax.platform_dependent), not the host's default
  backend: a TPU program compiled on a CPU host (bench/tpu_compile.py) gets argmax, as on a
  TPU. `backend` forces one form.
  """
  argmax = lambda v: jnp.argmax(v, axis=-1).astype(jnp.int32)
  if backend is not None:
    return two_reduction_argmax(x) if backend == "cpu" else argmax(x)
  return jax.lax.platform_dependent(x, cpu=two_reduction_argmax, default=argmax)


def two_reduction_argmax(x: Array) -> Array:
  """The first maximum's index as a max, then the smallest index that attains it."""
  maximum = jnp.max(x, axis=-1, keepdims=True)
  index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  return jnp.min(jnp.where(x == maximum, index, x.shape[-1] - 1), axis=-1)


def mlm_terms(logits_BxPxV: Array, masked_ids_BxP: Array) -> tuple[Array, Array]:
  """Per prediction: the negative log-likelihood of the original token, and whether the most
  likely token is the original."""
  logits_BxPxV = logits_BxPxV.astype(jnp.float32)
  # -log softmax(s)_y = logsumexp(s) - s_y: no [B, P, V] log-probabilities kept for backward.
  target_BxP = jnp.take_along_axis(logits_BxPxV, masked_ids_BxP[..., None], axis=-1)[..., 0]
  nll_BxP = jax.nn.logsumexp(logits_BxPxV, axis=-1) - target_BxP
  return nll_BxP, first_argmax(logits_BxPxV) == masked_ids_BxP


def mlm_loss(logits_BxPxV: Array, masked_ids_BxP: Array, masked_weights_BxP: Array):
  """Weighted mean negative log-likelihood of the original tokens (eqs. 1-2) and accuracy."""
  return mlm_loss_of_terms(*mlm_terms(logits_BxPxV, masked_ids_BxP), masked_weights_BxP)


def mlm_loss_of_terms(nll_BxP: Array, correct: Array, masked_weights_BxP: Array):
  """`mlm_loss` from `mlm_terms` (computed once when the objectives also return them)."""
  denom = jnp.maximum(masked_weights_BxP.sum(), 1e-6)
  loss = (nll_BxP * masked_weights_BxP).sum() / denom
  accuracy = (correct * masked_weights_BxP).sum() / denom
  return loss, {"mlm_loss": loss, "mlm_accuracy": accuracy}


def gumbel_max_sample(rng: Array, logits_BxPxV: Array, temperature: float) -> Array:
  """A hard sample from softmax(logits / tau) by Gumbel-max (eq. 3); no gradient through it."""
  logits = jax.lax.stop_gradient(logits_BxPxV).astype(jnp.float32)
  gumbel = random_bits.gumbel(rng, logits.shape, jnp.float32)
  return first_argmax(logits / temperature + gumbel)


def inverse_cdf_sample(rng: Array, logits_BxPxV: Array, temperature: float) -> Array:
  """The same distribution as gumbel_max_sample, from one uniform per position instead of V.

  Returns the first v whose cumulative probability exceeds u ~ U(0, total). Cheaper on CPU
  (one [B, P] draw and a cumulative sum instead of [B, P, V] Gumbel noise); opt-in through
  `config.sampler`, since it consumes the random stream differently.
  """
  logits = jax.lax.stop_gradient(logits_BxPxV).astype(jnp.float32) / temperature
  cdf_BxPxV = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)
  u_BxPx1 = random_bits.uniform(rng, logits.shape[:-1] + (1,)) * cdf_BxPxV[..., -1:]
  sample = jnp.sum(cdf_BxPxV <= u_BxPx1, axis=-1)
  return jnp.minimum(sample, logits.shape[-1] - 1).astype(jnp.int32)


SAMPLERS = {"gumbel": gumbel_max_sample, "inverse_cdf": inverse_cdf_sample}


def scatter_at_positions(ids_BxT: Array, positions_BxP: Array, values_BxP: Array,
                         weights_BxP: Array) -> Array:
  """ids with values written at the (weighted) positions; padding slots are left alone.

  A one-hot select within each row, not an XLA scatter: elementwise along the batch axis, so a
  batch sharded over devices stays local (the partitioner all-gathers a scatter's indices and
  updates across the batch axis). The weighted positions of a row are distinct (masking draws
  them without replacement). [B, P, T] booleans: small beside the logits.
  """
  t = ids_BxT.shape[1]
  # Padding slots point past the end, so they match no position (and never overwrite 0).
  positions_BxP = jnp.where(weights_BxP > 0, positions_BxP, t)
  hit_BxPxT = positions_BxP[:, :, None] == jnp.arange(t)[None, None, :]
  written_BxT = jnp.sum(jnp.where(hit_BxPxT, values_BxP[:, :, None].astype(ids_BxT.dtype), 0),
                        axis=1)
  return jnp.where(hit_BxPxT.any(axis=1), written_BxT, ids_BxT)


def original_ids(batch) -> Array:
  """The unmasked sequence: the masked input with the original tokens written back."""
  return scatter_at_positions(batch["input_ids"], batch["masked_positions"], batch["masked_ids"],
                              batch["masked_weights"])


def _sample_replacements(rng, logits_BxPxV, batch, temperature, vocab_size=None,
                         sampler: str = "gumbel"):
  """(sampled sequence x_bar [B, T], is_original [B, T], replaced share at masked positions,
  the sampled tokens [B, P]).

  With `vocab_size`, only the first vocab_size columns are candidates: padding columns are
  never drawn, and the noise (so the sample) is the same as without padding.
  """
  if vocab_size is not None:
    logits_BxPxV = logits_BxPxV[..., :vocab_size]
  return _replace(batch, SAMPLERS[sampler](rng, logits_BxPxV, temperature))


def _replace(batch, sampled_BxP: Array):
  """`_sample_replacements`'s values for tokens already drawn at the masked positions."""
  weights = batch["masked_weights"]
  sampled_ids = scatter_at_positions(batch["input_ids"], batch["masked_positions"], sampled_BxP,
                                     weights)
  is_original = sampled_ids == original_ids(batch)
  replaced = ((sampled_BxP != batch["masked_ids"]) * weights).sum() / jnp.maximum(weights.sum(), 1)
  return sampled_ids, is_original, replaced, sampled_BxP


def _outputs(batch, nll_BxP, correct_BxP, sampled_BxP=None, critic_logit=None,
             is_original=None, critic_weights=None) -> dict:
  """The per-prediction and per-token values held-out evaluation sums (evaluation.py)."""
  outputs = {"mlm_nll": nll_BxP, "mlm_correct": correct_BxP,
             "mlm_weights": batch["masked_weights"].astype(jnp.float32)}
  if sampled_BxP is not None:
    outputs.update(sampled_is_original=sampled_BxP == batch["masked_ids"],
                   critic_logit=critic_logit.astype(jnp.float32), is_original=is_original,
                   critic_weights=critic_weights)
  return outputs


def mlm_head(features_BxPxE, table_VxE, bias_V, batch, config, mesh, sample_rng=None,
             temperature: float = 1.0):
  """The MLM head at the masked positions: ((nll, correct) [B, P], the logits [B, P, V] or
  None, the sampled tokens [B, P] or None).

  config.mlm_head_impl "xla": the logits in HBM (returned; the caller samples from them).
  "pallas": fused_logsumexp.pallas_mlm_head, no logits; with `sample_rng` it also draws the
  Gumbel-max sample (its own noise stream, keys drawn from sample_rng)."""
  if config.mlm_head_impl == "xla":
    logits_BxPxV = models.tied_logits(features_BxPxE, table_VxE, bias_V)
    return mlm_terms(logits_BxPxV, batch["masked_ids"]), logits_BxPxV, None
  keys_2 = (jnp.zeros((2,), jnp.int32) if sample_rng is None else jax.lax.bitcast_convert_type(
      jax.random.bits(sample_rng, (2,), jnp.uint32), jnp.int32))
  nll_BxP, argmax_BxP, sampled_BxP = fused_logsumexp.pallas_mlm_head(
      features_BxPxE, table_VxE, bias_V, batch["masked_ids"], keys_2, temperature,
      config.model.vocab_size, sample_rng is not None, mesh=mesh)
  terms = (nll_BxP, argmax_BxP == batch["masked_ids"])
  return terms, None, sampled_BxP if sample_rng is not None else None


def _replacements(sample_rng, logits_BxPxV, sampled_BxP, batch, temperature, config):
  """`_sample_replacements` from the xla head's logits, or of the pallas head's sample."""
  if sampled_BxP is not None:
    return _replace(batch, sampled_BxP)
  return _sample_replacements(sample_rng, logits_BxPxV, batch, temperature,
                              config.model.vocab_size, config.sampler)


# ----------------------------------------------------------------------------- the objectives

def script_objective(params, batch, rng, *, model: models.MaskedLM, config,
                     deterministic: bool = False, with_outputs: bool = False, mesh=None):
  """SCRIPT: L = L_MLM + alpha * L_Disc (alpha = config.disc_weight), one model, two forward
  passes (Section 2).

  Every objective takes `deterministic` (no dropout: evaluation) and `with_outputs` (the
  per-token values under metrics["outputs"], see `_outputs`).
  """
  dropout1, dropout2, sample_rng = jax.random.split(rng, 3)
  apply = functools.partial(model.apply, {"params": params})
  table_VxE, bias_V = apply(method=model.output_embedding)

  # Pass 1: MLM on the masked input, logits only at the masked positions.
  features_BxPxE = apply(batch["input_ids"], batch["segment_ids"], batch["input_mask"],
                         batch["masked_positions"], deterministic=deterministic,
                         rngs={"dropout": dropout1})
  terms, logits_BxPxV, sampled_BxP = mlm_head(features_BxPxE, table_VxE, bias_V, batch, config,
                                              mesh, sample_rng, config.script.temperature)
  loss_mlm, metrics = mlm_loss_of_terms(*terms, batch["masked_weights"])

  # The model proposes replacements from its own distribution.
  sampled_ids, is_original, replaced, sampled_BxP = _replacements(
      sample_rng, logits_BxPxV, sampled_BxP, batch, config.script.temperature, config)

  # Pass 2: the same model is the critic, p(t+) = sigmoid(logsumexp(s_t)) at every position
  # ("all"), or at the masked positions only ("masked": the head and the V-wide logsumexp run
  # at those P positions alone).
  if config.script.disc_positions == "masked":
    critic_positions = batch["masked_positions"]
    is_original = jnp.take_along_axis(is_original, critic_positions, axis=1)
    weights = batch["masked_weights"].astype(jnp.float32)
  elif config.script.disc_positions == "all":
    critic_positions = None
    weights = batch["input_mask"].astype(jnp.float32)
  else:
    raise ValueError(f"disc_positions must be 'all' or 'masked', got "
                     f"{config.script.disc_positions!r}")
  features = apply(sampled_ids, batch["segment_ids"], batch["input_mask"], critic_positions,
                   deterministic=deterministic, rngs={"dropout": dropout2})
  lse = critic_logsumexp(features, table_VxE, bias_V, config.script.logsumexp_chunk,
                         config.script.logsumexp_impl, mesh)
  loss_disc, disc_metrics = binary_disc_loss(lse, is_original, weights)

  loss = loss_mlm + config.disc_weight * loss_disc
  metrics.update(disc_metrics, loss=loss, replaced_fraction=replaced)
  if with_outputs:
    metrics["outputs"] = _outputs(batch, *terms,
                                  sampled_BxP, lse, is_original, weights)
  return loss, metrics


def electra_objective(params, batch, rng, *, model: models.ElectraPretrainer, config,
                      deterministic: bool = False, with_outputs: bool = False, mesh=None):
  """ELECTRA: L = L_gen + 50 * L_disc with a separate small generator (Clark et al., 2020)."""
  dropout1, dropout2, sample_rng = jax.random.split(rng, 3)
  apply = functools.partial(model.apply, {"params": params})
  head = apply(batch["input_ids"], batch["segment_ids"], batch["input_mask"],
               batch["masked_positions"], deterministic=deterministic,
               rngs={"dropout": dropout1}, method=model.generator_features)
  terms, logits_BxPxV, sampled_BxP = mlm_head(*head, batch, config, mesh, sample_rng,
                                              config.electra.temperature)
  loss_gen, metrics = mlm_loss_of_terms(*terms, batch["masked_weights"])
  sampled_ids, is_original, replaced, sampled_BxP = _replacements(
      sample_rng, logits_BxPxV, sampled_BxP, batch, config.electra.temperature, config)
  disc_logit_BxT = apply(sampled_ids, batch["segment_ids"], batch["input_mask"],
                         deterministic=deterministic, rngs={"dropout": dropout2},
                         method=model.discriminate)
  weights = batch["input_mask"].astype(jnp.float32)
  loss_disc, disc_metrics = binary_disc_loss(disc_logit_BxT, is_original, weights)
  loss = loss_gen + config.disc_weight * loss_disc
  metrics.update(disc_metrics, loss=loss, replaced_fraction=replaced)
  if with_outputs:
    metrics["outputs"] = _outputs(batch, *terms,
                                  sampled_BxP, disc_logit_BxT, is_original, weights)
  return loss, metrics


def mlm_objective(params, batch, rng, *, model: models.MaskedLM, config,
                  deterministic: bool = False, with_outputs: bool = False, mesh=None):
  """BERT's masked language modelling."""
  apply = functools.partial(model.apply, {"params": params})
  table_VxE, bias_V = apply(method=model.output_embedding)
  features_BxPxE = apply(batch["input_ids"], batch["segment_ids"], batch["input_mask"],
                         batch["masked_positions"], deterministic=deterministic,
                         rngs={"dropout": rng})
  terms, _, _ = mlm_head(features_BxPxE, table_VxE, bias_V, batch, config, mesh)
  loss, metrics = mlm_loss_of_terms(*terms, batch["masked_weights"])
  metrics["loss"] = loss
  if with_outputs:
    metrics["outputs"] = _outputs(batch, *terms)
  return loss, metrics


OBJECTIVES: dict[str, Callable] = {
    "script": script_objective,
    "electra": electra_objective,
    "mlm": mlm_objective,
}


def get_objective(name: str) -> Callable:
  """The loss function for `config.objective`, with a clear error for an unknown name."""
  if name not in OBJECTIVES:
    raise ValueError(f"Unknown objective {name!r}: choose one of {', '.join(OBJECTIVES)} "
                     "(--config.objective=...).")
  return OBJECTIVES[name]
