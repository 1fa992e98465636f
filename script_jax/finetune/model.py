"""Task models for fine-tuning: the pretrained encoder with a new head (ELECTRA's recipe).

Both modules hold the encoder under the names the pretrained models use, `embeddings` and
`encoder` (checkpoints.encoder_params gives them for every objective), and the new head under
`head`, so a pretrained encoder drops in as it is and the head starts from its initializer.

  Classifier      [CLS]'s final hidden state -> dropout -> one dense layer (no pooler, no tanh):
                  num_outputs logits, or one score for a regression task (STS-B).
  JointSpanExtractor  SQuAD, ELECTRA's head (`squad.head="electra"`, the default): start
                  logits; end logits conditioned on the start (the gold start in training, a
                  beam of the top starts in prediction); an answerability logit from [CLS] and
                  the start-weighted hidden state.
  SpanExtractor   SQuAD, BERT's head (`squad.head="bert"`): start and end logits from one dense
                  layer over every position, and a no-answer logit from [CLS] (SQuAD 2.0).

A module may name batch fields it needs beyond ids/segments/mask in `train_inputs` and
`predict_inputs`; the trainer passes them as keyword arguments.
"""

from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from script_jax import models

Array = jax.Array
# ELECTRA's task heads are tf.layers.dense with its default kernel initializer, Glorot-uniform
# (the encoder below keeps the pretraining's truncated normal); biases start at zero.
HEAD_INIT = nn.initializers.glorot_uniform()


class _Encoder(nn.Module):
  """Embeddings and transformer with the pretrained models' parameter names."""
  cfg: models.EncoderConfig

  def setup(self):
    self.embeddings = models.Embeddings(self.cfg)
    self.encoder = models.Transformer(self.cfg)

  def __call__(self, ids_BxT, segment_ids_BxT, input_mask_BxT, deterministic: bool):
    x_BxTxE = self.embeddings(ids_BxT, segment_ids_BxT, deterministic)
    return self.encoder(x_BxTxE, input_mask_BxT, deterministic)


class Classifier(nn.Module):
  """Sequence classification or regression from the first token's final hidden state."""
  cfg: models.EncoderConfig
  num_outputs: int

  @nn.compact
  def __call__(self, ids_BxT, segment_ids_BxT, input_mask_BxT, deterministic: bool = True):
    """Logits [B, num_outputs] float32 (for regression, num_outputs = 1: the score)."""
    hidden_BxTxH = _Encoder(self.cfg, name="backbone")(ids_BxT, segment_ids_BxT,
                                                       input_mask_BxT, deterministic)
    cls_BxH = hidden_BxTxH[:, 0].astype(jnp.float32)
    cls_BxH = models.Dropout(self.cfg.dropout_rate)(cls_BxH, deterministic=deterministic)
    return nn.Dense(self.num_outputs, kernel_init=HEAD_INIT, name="head")(cls_BxH)


class SpanExtractor(nn.Module):
  """Start/end logits at every position and an answerability logit (SQuAD 1.1 and 2.0)."""
  cfg: models.EncoderConfig

  @nn.compact
  def __call__(self, ids_BxT, segment_ids_BxT, input_mask_BxT, deterministic: bool = True):
    """(start_logits [B, T], end_logits [B, T], no_answer_logit [B]), float32."""
    hidden_BxTxH = _Encoder(self.cfg, name="backbone")(ids_BxT, segment_ids_BxT,
                                                       input_mask_BxT, deterministic)
    hidden_BxTxH = hidden_BxTxH.astype(jnp.float32)
    span_BxTx2 = nn.Dense(2, kernel_init=HEAD_INIT, name="head")(hidden_BxTxH)
    no_answer_B = nn.Dense(1, kernel_init=HEAD_INIT, name="no_answer")(
        hidden_BxTxH[:, 0])[:, 0]
    return span_BxTx2[..., 0], span_BxTx2[..., 1], no_answer_B


# ELECTRA adds 1000 * (mask - 1) to the logits of positions that cannot hold an answer.
_OUTSIDE = -1000.0


class JointSpanHead(nn.Module):
  """ELECTRA's SQuAD head (its qa_tasks.py with joint_prediction, answerable_classifier and
  answerable_uses_start_logits, the defaults) on the encoder's final hidden states.

  start_logits[t] = w_s . h[t], over the answer positions (context and [CLS]).
  end_logits[s, t] = w_e . gelu(W [h[s]; h[t]] + b) + b_e: the end given the start s, with the
    gold start in training and each of the `beam_size` most likely starts in prediction. W is
    held as its two halves (`end_from_start`, with b, and `end_from_position`), the same map,
    so prediction adds a [B, K, 512] and a [B, T, 512] term instead of projecting [B, K, T, 2H].
  answerable logit (higher = no answer) = w_a . gelu(A [h[0]; sum_t softmax(start)[t] h[t]]).
  """
  beam_size: int = 20
  hidden_size: int = 512  # ELECTRA's qa_hidden width, the same for every model size
  kernel_init: nn.initializers.Initializer = nn.initializers.glorot_uniform()

  @nn.compact
  def __call__(self, hidden_BxTxH, answer_mask_BxT, start_positions_B=None):
    """Training (start_positions given): (start_logits [B, T], end_logits [B, T],
    answerable [B]). Prediction: (start_top_log_probs [B, K], start_top_index [B, K],
    end_top_log_probs [B, K, K], end_top_index [B, K, K], answerable [B]), K = beam_size."""
    h = hidden_BxTxH.astype(jnp.float32)
    outside_BxT = jnp.where(answer_mask_BxT > 0, 0.0, _OUTSIDE)
    dense = functools.partial(nn.Dense, kernel_init=self.kernel_init)
    start_BxT = dense(1, name="start")(h)[..., 0] + outside_BxT

    start_p_BxT = jax.nn.softmax(start_BxT, axis=-1)
    start_feature_BxH = jnp.einsum("bt,bth->bh", start_p_BxT, h)
    answerable_Bx2H = jnp.concatenate([h[:, 0], start_feature_BxH], axis=-1)
    answerable_B = dense(1, name="answerable")(
        nn.gelu(dense(self.hidden_size, name="answerable_hidden")(answerable_Bx2H),
                approximate=False))[:, 0]

    from_position_BxTxD = dense(self.hidden_size, use_bias=False, name="end_from_position")(h)
    from_start = dense(self.hidden_size, name="end_from_start")
    end_out = dense(1, name="end")
    if start_positions_B is not None:
      start_h_BxH = jnp.take_along_axis(h, start_positions_B[:, None, None], axis=1)[:, 0]
      pair_BxTxD = from_start(start_h_BxH)[:, None] + from_position_BxTxD
      end_BxT = end_out(nn.gelu(pair_BxTxD, approximate=False))[..., 0]
      return start_BxT, end_BxT + outside_BxT, answerable_B

    k = min(self.beam_size, h.shape[1])
    start_top_log_probs_BxK, start_top_index_BxK = jax.lax.top_k(
        jax.nn.log_softmax(start_BxT, axis=-1), k)
    start_h_BxKxH = jnp.take_along_axis(h, start_top_index_BxK[..., None], axis=1)
    pair_BxKxTxD = from_start(start_h_BxKxH)[:, :, None] + from_position_BxTxD[:, None]
    end_BxKxT = end_out(nn.gelu(pair_BxKxTxD, approximate=False))[..., 0]
    end_BxKxT = end_BxKxT + outside_BxT[:, None]
    end_top_log_probs_BxKxK, end_top_index_BxKxK = jax.lax.top_k(
        jax.nn.log_softmax(end_BxKxT, axis=-1), k)
    return (start_top_log_probs_BxK, start_top_index_BxK, end_top_log_probs_BxKxK,
            end_top_index_BxKxK, answerable_B)


class JointSpanExtractor(nn.Module):
  """The encoder with ELECTRA's SQuAD head (JointSpanHead, under `head`)."""
  cfg: models.EncoderConfig
  beam_size: int = 20
  hidden_size: int = 512
  train_inputs = ("context_mask", "start_positions")
  predict_inputs = ("context_mask",)

  @nn.compact
  def __call__(self, ids_BxT, segment_ids_BxT, input_mask_BxT, deterministic: bool = True, *,
               context_mask: jax.Array, start_positions: Optional[jax.Array] = None):
    """See JointSpanHead; `context_mask` marks the answer positions (context and [CLS])."""
    hidden_BxTxH = _Encoder(self.cfg, name="backbone")(ids_BxT, segment_ids_BxT,
                                                       input_mask_BxT, deterministic)
    return JointSpanHead(self.beam_size, self.hidden_size, HEAD_INIT, name="head")(
        hidden_BxTxH, context_mask, start_positions)


def with_pretrained_encoder(params: dict, encoder: dict) -> dict:
  """`params` of a task model with its backbone replaced by a pretrained encoder
  ({"embeddings", "encoder"}, as checkpoints.encoder_params returns). Shapes must agree."""
  backbone = params["backbone"]
  if set(backbone) != set(encoder):
    raise ValueError(f"encoder parts {sorted(encoder)} differ from {sorted(backbone)}")
  mismatched = []
  for part in backbone:
    want = jax.tree_util.tree_flatten_with_path(backbone[part])[0]
    got = dict(jax.tree_util.tree_flatten_with_path(encoder[part])[0])
    for path, leaf in want:
      if path not in got:
        mismatched.append(f"{part}{jax.tree_util.keystr(path)} missing")
      elif got[path].shape != leaf.shape:
        mismatched.append(f"{part}{jax.tree_util.keystr(path)}: checkpoint "
                          f"{got[path].shape}, model {leaf.shape}")
  if mismatched:
    raise ValueError("the pretrained encoder does not fit this model: " +
                     "; ".join(mismatched[:8]))
  return {**params, "backbone": {part: encoder[part] for part in backbone}}
