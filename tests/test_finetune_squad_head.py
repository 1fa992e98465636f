"""ELECTRA's SQuAD head (finetune.model.JointSpanHead) against a NumPy reference written from
ELECTRA's qa_tasks.py formulas (the qa_hidden dense over the concatenation [h_start; h_t]), on
fresh random hidden states, in training (gold start) and prediction (beam) modes."""

import jax
import numpy as np
import pytest
from scipy.special import erf, log_softmax, softmax

from script_jax import models
from script_jax.finetune import model as task_models


def _gelu(x):
  return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def _dense(p, x):
  return x @ np.asarray(p["kernel"], np.float64) + (
      np.asarray(p["bias"], np.float64) if "bias" in p else 0.0)


def _reference(params, h, answer_mask, start_positions=None, beam=None):
  """ELECTRA's head in float64 with the end layer's kernel as one [2H, D] matrix."""
  h = np.asarray(h, np.float64)
  outside = 1000.0 * (answer_mask - 1.0)
  start = _dense(params["start"], h)[..., 0] + outside
  qa_hidden = {"kernel": np.concatenate([params["end_from_start"]["kernel"],
                                         params["end_from_position"]["kernel"]]),
               "bias": params["end_from_start"]["bias"]}

  def end_given(s):  # [B] start positions -> [B, T] end logits
    start_h = h[np.arange(len(h)), s]
    pair = np.concatenate([np.broadcast_to(start_h[:, None], h.shape), h], axis=-1)
    return _dense(params["end"], _gelu(_dense(qa_hidden, pair)))[..., 0] + outside

  start_feature = np.einsum("bt,bth->bh", softmax(start, axis=-1), h)
  answerable = _dense(params["answerable"], _gelu(_dense(
      params["answerable_hidden"], np.concatenate([h[:, 0], start_feature], -1))))[:, 0]
  if start_positions is not None:
    return start, end_given(start_positions), answerable
  start_lp = log_softmax(start, axis=-1)
  start_index = np.argsort(-start_lp, axis=-1, kind="stable")[:, :beam]
  end_lp = np.stack([log_softmax(end_given(start_index[:, i]), axis=-1)
                     for i in range(beam)], axis=1)  # [B, K, T]
  end_index = np.argsort(-end_lp, axis=-1, kind="stable")[..., :beam]
  return (np.take_along_axis(start_lp, start_index, -1), start_index,
          np.take_along_axis(end_lp, end_index, -1), end_index, answerable)


@pytest.mark.parametrize("seed", [0, 1])
def test_joint_head_matches_reference(seed):
  rng = np.random.default_rng(seed)
  batch, length, hidden, beam = 3, 11, 6, 4
  h = rng.normal(size=(batch, length, hidden)).astype(np.float32)
  answer_mask = (rng.random((batch, length)) < 0.6).astype(np.float32)
  answer_mask[:, 0] = 1.0  # [CLS] may always be chosen
  head = task_models.JointSpanHead(beam_size=beam, hidden_size=5,
                                   kernel_init=jax.nn.initializers.normal(0.5))
  params = head.init(jax.random.key(seed), h, answer_mask)["params"]
  params = jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(np.float32) * 0.3, params)

  gold = rng.integers(0, length, size=batch)
  got = head.apply({"params": params}, h, answer_mask, gold)
  want = _reference(params, h, answer_mask, start_positions=gold)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), w, rtol=2e-5, atol=2e-4)

  got = head.apply({"params": params}, h, answer_mask)
  want = _reference(params, h, answer_mask, beam=beam)
  np.testing.assert_array_equal(np.asarray(got[1]), want[1])  # start indices
  np.testing.assert_array_equal(np.asarray(got[3]), want[3])  # end indices per start
  for i in (0, 2, 4):
    np.testing.assert_allclose(np.asarray(got[i]), want[i], rtol=2e-5, atol=2e-4)
  # No start or end outside the answer positions while there are enough inside.
  inside = answer_mask.sum(-1)
  for b in range(batch):
    k = int(min(beam, inside[b]))
    assert answer_mask[b, np.asarray(got[1])[b, :k]].all()
    assert answer_mask[b, np.asarray(got[3])[b, :, :k]].all()


@pytest.mark.slow
def test_joint_extractor_trains_with_the_gold_start_and_predicts_beams():
  cfg = models.EncoderConfig(vocab_size=50, embedding_size=8, hidden_size=16, num_layers=2,
                             num_heads=2, intermediate_size=32, max_position_embeddings=16)
  model = task_models.JointSpanExtractor(cfg, beam_size=3)
  ids = np.arange(2 * 12).reshape(2, 12) % 50
  ones = np.ones_like(ids)
  context = np.zeros_like(ids)
  context[:, [0, 5, 6, 7, 8, 9]] = 1
  params = model.init(jax.random.key(0), ids, ones * 0, ones, context_mask=context)["params"]
  assert set(params) == {"backbone", "head"}
  start_lp, start_index, end_lp, end_index, answerable = model.apply(
      {"params": params}, ids, ones * 0, ones, context_mask=context)
  assert start_index.shape == (2, 3) and end_index.shape == (2, 3, 3)
  assert answerable.shape == (2,)
  # Training at a start taken from the beam gives that start's end distribution.
  start, end, answerable_train = model.apply({"params": params}, ids, ones * 0, ones,
                                             context_mask=context,
                                             start_positions=start_index[:, 1])
  np.testing.assert_allclose(np.asarray(jax.nn.log_softmax(end, -1)[
      np.arange(2)[:, None], end_index[:, 1]]), end_lp[:, 1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(jax.nn.log_softmax(start, -1)[
      np.arange(2)[:, None], start_index]), start_lp, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(answerable_train, answerable, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("version,answerable_on_v1", [("1.1", False), ("1.1", True),
                                                      ("2.0", False)])
def test_span_loss_matches_reference(version, answerable_on_v1):
  """squad_runs.span_loss: the mean of start and end cross-entropies over the allowed positions,
  plus the weighted answerable BCE where the head trains it (2.0, or 1.1 for ELECTRA's head)."""
  from script_jax.finetune import squad_runs
  rng = np.random.default_rng(7)
  b, t, weight = 5, 11, 0.5
  start, end, answerable = (rng.normal(size=(b, t)) * 3, rng.normal(size=(b, t)) * 3,
                            rng.normal(size=b) * 2)
  context_mask = (rng.random((b, t)) < 0.6).astype(np.int32)
  context_mask[:, 0] = 1
  start_positions = np.array([rng.choice(np.flatnonzero(m)) for m in context_mask])
  end_positions = np.array([rng.choice(np.flatnonzero(m)) for m in context_mask])
  is_impossible = rng.random(b) < 0.5 if version == "2.0" else np.zeros(b, bool)
  batch = {"context_mask": context_mask, "start_positions": start_positions,
           "end_positions": end_positions, "is_impossible": is_impossible}
  losses, _ = squad_runs.span_loss((start, end, answerable), batch, weight, version,
                              answerable_on_v1=answerable_on_v1)

  def ce(logits, gold):  # only the allowed positions enter the softmax
    masked = np.where(context_mask > 0, logits, -np.inf)
    return -log_softmax(masked, axis=-1)[np.arange(b), gold]

  want = 0.5 * (ce(start, start_positions) + ce(end, end_positions))
  if version == "2.0" or answerable_on_v1:
    y = is_impossible.astype(np.float64)
    p = 1.0 / (1.0 + np.exp(-answerable))
    want = want - weight * (y * np.log(p) + (1 - y) * np.log(1 - p))
  np.testing.assert_allclose(np.asarray(losses), want, rtol=1e-5, atol=1e-5)
