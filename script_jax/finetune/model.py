"""Task models for fine-tuning: the pretrained encoder with a new head (ELECTRA's recipe).

Both modules hold the encoder under the names the pretrained models use, `embeddings` and
`encoder` (checkpoints.encoder_params gives them for every objective), and the new head under
`head`, so a pretrained encoder drops in as it is and the head starts from its initializer.

  Classifier      [CLS]'s final hidden state -> dropout -> one dense layer (no pooler, no tanh):
                  num_outputs logits, or one score for a regression task (STS-B).
  SpanExtractor   SQuAD: start and end logits from one dense layer over every position, and a
                  no-answer logit from [CLS] (SQuAD 2.0). The simpler start/end head (BERT's),
                  not ELECTRA's XLNet-style conditioned end head (docs/finetune.md says why).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from script_jax import models

Array = jax.Array


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
    return nn.Dense(self.num_outputs, kernel_init=self.cfg.kernel_init, name="head")(cls_BxH)


class SpanExtractor(nn.Module):
  """Start/end logits at every position and an answerability logit (SQuAD 1.1 and 2.0)."""
  cfg: models.EncoderConfig

  @nn.compact
  def __call__(self, ids_BxT, segment_ids_BxT, input_mask_BxT, deterministic: bool = True):
    """(start_logits [B, T], end_logits [B, T], no_answer_logit [B]), float32."""
    hidden_BxTxH = _Encoder(self.cfg, name="backbone")(ids_BxT, segment_ids_BxT,
                                                       input_mask_BxT, deterministic)
    hidden_BxTxH = hidden_BxTxH.astype(jnp.float32)
    span_BxTx2 = nn.Dense(2, kernel_init=self.cfg.kernel_init, name="head")(hidden_BxTxH)
    no_answer_B = nn.Dense(1, kernel_init=self.cfg.kernel_init, name="no_answer")(
        hidden_BxTxH[:, 0])[:, 0]
    return span_BxTx2[..., 0], span_BxTx2[..., 1], no_answer_B


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
