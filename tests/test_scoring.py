"""PLL scoring: the critic (eq. 7) against float64 NumPy, MLM-PLL against the naive loop, the
bucketing and batching of `Scorer`, and the long-sentence policies."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_config

from script_jax import models
from script_jax.scoring import pll_scorer

SPECIAL = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}


@functools.lru_cache(maxsize=None)
def _tiny(objective):
  """(config, model, params) of a random tiny model whose critic is far from saturated."""
  # One layer each: the math is the same and compilation (most of the time here) is halved.
  # Sizes pinned here (not tiny's current ones): the reference weights below are built for them.
  config = load_config("tiny", objective=objective, **{
      "model.num_layers": 1, "electra.generator_num_layers": 1, "model.vocab_size": 2048,
      "model.embedding_size": 32, "model.initializer_range": 0.02})
  model = models.build_model(config)
  ids = np.zeros((1, 8), np.int32)
  params = jax.jit(model.init)(jax.random.key(0), ids, ids, np.ones_like(ids),
                               np.zeros((1, 1), np.int32))["params"]
  rng = np.random.default_rng(1)
  params = dict(params)
  if objective == "electra":
    disc = dict(params["disc_output"])
    disc["kernel"] = jnp.asarray(rng.normal(scale=0.5, size=disc["kernel"].shape), jnp.float32)
    params["disc_output"] = disc
    params["generator_output_bias"] = jnp.asarray(rng.normal(scale=2.0, size=2048), jnp.float32)
  else:
    # Random init gives logits ~ 0 and logsumexp ~ log V, so p(t+) ~ 1 everywhere; a larger W
    # and a negative bias spread p(t+) over (0, 1) so the test sees real variation.
    emb = dict(params["embeddings"])
    # A rank-one part u v^T makes logsumexp_v s_tv depend strongly on v . e_t, i.e. on t.
    table = rng.normal(scale=0.3, size=(2048, 32)) + np.outer(rng.normal(size=2048),
                                                              rng.normal(scale=0.3, size=32))
    emb["word_embeddings"] = {"embedding": jnp.asarray(table, jnp.float32)}
    params["embeddings"] = emb
    params["output_bias"] = jnp.asarray(rng.normal(scale=0.5, size=2048) - 11.0, jnp.float32)
  return config, model, params


@functools.partial(jax.jit, static_argnames=("model", "method"))
def _apply(params, ids, input_mask, positions=None, *, model, method=None):
  """model.apply (jitted: eager Flax is slow) with zero segment ids; `method` by name."""
  args = (ids, jnp.zeros_like(ids), input_mask) + (() if positions is None else (positions,))
  return model.apply({"params": params}, *args,
                     method=getattr(model, method) if method else None)


def _random_sentences(lengths, seed=0, vocab=2048):
  rng = np.random.default_rng(seed)
  return [rng.integers(5, vocab, size=n).tolist() for n in lengths]


def _packed(sentences, length):
  """[CLS] x [SEP] padded to `length`: ids, input mask and the mask of real tokens."""
  b = len(sentences)
  ids = np.zeros((b, length), np.int32)
  input_mask = np.zeros((b, length), np.int32)
  score_mask = np.zeros((b, length), bool)
  for i, s in enumerate(sentences):
    ids[i, :len(s) + 2] = [2, *s, 3]
    input_mask[i, :len(s) + 2] = 1
    score_mask[i, 1:len(s) + 1] = True
  return ids, input_mask, score_mask


def _np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _np_logsumexp(x, axis=-1):
  m = x.max(axis=axis, keepdims=True)
  return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


# ----------------------------------------------------------------------------- the critic

@pytest.mark.parametrize("chunk", [0, pll_scorer.DEFAULT_LOGSUMEXP_CHUNK, 48])
def test_critic_pll_matches_float64_numpy(chunk):
  # SCRIPT and MLM checkpoints share MaskedLM and its parameter tree: one test covers both.
  _, model, params = _tiny("script")
  sentences = _random_sentences([1, 6, 17, 30], seed=2)
  ids, input_mask, score_mask = _packed(sentences, 32)
  features = _apply(params, ids, input_mask, model=model)
  table, bias = model.apply({"params": params}, method=model.output_embedding)
  logits_BxTxV = np.asarray(models.tied_logits(features, table, bias), np.float64)
  log_p_pos = _np_log_sigmoid(_np_logsumexp(logits_BxTxV))  # eq. 5, in float64
  want = (log_p_pos * score_mask).sum(axis=1)
  assert np.ptp(log_p_pos[score_mask]) > 1.0  # p(t+) spread over (0, 1): a real test

  got = pll_scorer.critic_pll(params, ids, input_mask, score_mask, model=model,
                           logsumexp_chunk=chunk)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-4)


@pytest.mark.slow
def test_electra_critic_pll_is_the_discriminators_log_sigmoid():
  _, model, params = _tiny("electra")
  ids, input_mask, score_mask = _packed(_random_sentences([3, 9, 14, 0]), 16)
  logit = np.asarray(_apply(params, ids, input_mask, model=model, method="discriminate"),
                     np.float64)
  want = (_np_log_sigmoid(logit) * score_mask).sum(axis=1)
  got = pll_scorer.critic_pll(params, ids, input_mask, score_mask, model=model)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- MLM-PLL

def _naive_mlm_pll(model, params, sentence):
  """Salazar et al.'s PLL the slow way: one unpadded masked copy per token, one apply each."""
  total = 0.0
  full = np.asarray([[2, *sentence, 3]], np.int32)
  if not isinstance(model, models.ElectraPretrainer):
    table, bias = model.apply({"params": params}, method=model.output_embedding)
  for t in range(1, len(sentence) + 1):
    copy = full.copy()
    copy[0, t] = SPECIAL["mask"]
    args = (params, copy, np.ones_like(copy), np.asarray([[t]], np.int32))
    if isinstance(model, models.ElectraPretrainer):
      logits = _apply(*args, model=model, method="generate")
    else:
      logits = models.tied_logits(_apply(*args, model=model), table, bias)
    logits = np.asarray(logits[0, 0], np.float64)
    total += logits[sentence[t - 1]] - _np_logsumexp(logits)
  return total


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["script", "electra"])
def test_mlm_pll_equals_the_naive_loop(objective):
  _, model, params = _tiny(objective)
  sentences = _random_sentences([4, 11, 1, 4], seed=3)  # two lengths: two compilations
  want = [_naive_mlm_pll(model, params, s) for s in sentences]
  scorer = pll_scorer.Scorer(model, params, special_ids=SPECIAL, max_len=32, method="mlm",
                          batch_size=4)
  pll, num_tokens = scorer.score_ids(sentences)
  np.testing.assert_allclose(pll, want, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(num_tokens, [4, 11, 1, 4])


def test_masked_copies_equal_a_loop():
  ids, _, score_mask = _packed(_random_sentences([2, 5, 3]), 8)
  copies, rows, positions, targets = pll_scorer.masked_copies(ids, score_mask, mask_id=4)
  want = []
  for b in range(len(ids)):
    for t in range(ids.shape[1]):
      if score_mask[b, t]:
        c = ids[b].copy()
        c[t] = 4
        want.append((c, b, t, ids[b, t]))
  assert len(copies) == 10
  for i, (c, b, t, target) in enumerate(want):
    np.testing.assert_array_equal(copies[i], c)
    assert (rows[i], positions[i], targets[i]) == (b, t, target)
  assert ids[0, 1] != 4  # the input is left alone


# ----------------------------------------------------------------------------- the Scorer

@pytest.mark.parametrize("method", ["critic", "mlm"])
def test_batching_and_buckets_equal_one_at_a_time_in_input_order(method):
  _, model, params = _tiny("script")
  lengths = [7, 0, 25, 2, 30, 13, 3, 0, 14, 9, 1, 10, 11, 12, 6]  # buckets 8, 16 and 32
  sentences = _random_sentences(lengths, seed=4)
  batched = pll_scorer.Scorer(model, params, special_ids=SPECIAL, max_len=32, method=method,
                           batch_size=4)
  pll, num_tokens = batched.score_ids(sentences)
  # One sentence per call (and padding rows beside it): the same shapes, no new compilation.
  one_at_a_time = np.asarray([batched.score_ids([s])[0][0] for s in sentences])
  np.testing.assert_allclose(pll, one_at_a_time, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(num_tokens, lengths)
  assert pll[1] == 0.0 and pll[7] == 0.0  # empty sentences, never sent to the model
  assert len(set(np.round(pll, 3))) > 10  # distinct sentences, distinct scores

  order = np.random.default_rng(0).permutation(len(sentences))
  pll_perm, _ = batched.score_ids([sentences[i] for i in order])
  np.testing.assert_allclose(pll_perm, pll[order], rtol=1e-5, atol=1e-4)


def test_chunks_of_the_input_give_the_same_scores():
  _, model, params = _tiny("script")
  sentences = _random_sentences([5, 9, 3, 12, 7], seed=5)
  whole = pll_scorer.Scorer(model, params, special_ids=SPECIAL, max_len=32, batch_size=4)
  chunked = pll_scorer.Scorer(model, params, special_ids=SPECIAL, max_len=32, batch_size=4,
                           chunk_sentences=2)
  done = []
  np.testing.assert_allclose(chunked.score_ids(sentences, progress=done.append)[0],
                             whole.score_ids(sentences)[0], rtol=1e-6)
  assert done == [1, 1, 1, 1, 1]  # chunk [7, 11] tokens -> buckets 8 and 16, and so on


class _CharTokenizer:
  """One token per character: enough to test the text path without a trained model."""

  def encode(self, text):
    return [5 + ord(c) % 2000 for c in text]


def test_score_texts_tokenizes_and_scores_empty_lines_as_empty():
  _, model, params = _tiny("script")
  scorer = pll_scorer.Scorer(model, params, special_ids=SPECIAL, max_len=32,
                          tokenizer=_CharTokenizer(), batch_size=4)
  texts = ["hello world", "", "   ", "scoring"]
  done = []
  pll, num_tokens = scorer.score(texts, progress=done.append)
  assert sum(done) == 4
  np.testing.assert_array_equal(num_tokens, [11, 0, 0, 7])
  assert pll[1] == pll[2] == 0.0 and pll[0] < 0 and pll[3] < 0
  want, _ = scorer.score_ids([_CharTokenizer().encode("scoring")])
  np.testing.assert_allclose(pll[3], want[0], rtol=1e-6)


def test_bucket_lengths():
  assert pll_scorer.bucket_lengths(64) == [8, 16, 32, 64]
  assert pll_scorer.bucket_lengths(100) == [8, 16, 32, 64, 100]
  assert pll_scorer.bucket_lengths(8) == [8]
  assert pll_scorer.bucket_lengths(5) == [5]


# ----------------------------------------------------------------------------- long sentences

def test_too_long_is_an_error_naming_the_sentence():
  _, model, params = _tiny("script")
  scorer = pll_scorer.Scorer(model, params, special_ids=SPECIAL, max_len=16, batch_size=4)
  ok = _random_sentences([14])[0]  # exactly max_len with [CLS] and [SEP]
  assert scorer.score_ids([ok])[1][0] == 14
  with pytest.raises(pll_scorer.ScoringError, match=r"line 7 has 15 tokens .*--long=truncate"):
    scorer.score_ids([ok, ok + [9]], describe=lambda i: f"line {i + 6}")


def test_truncate_scores_the_first_tokens():
  _, model, params = _tiny("script")
  long_sentence = _random_sentences([40], seed=6)[0]
  for method in ("critic", "mlm"):
    kwargs = dict(special_ids=SPECIAL, max_len=16, method=method, batch_size=4)
    truncated = pll_scorer.Scorer(model, params, long="truncate", **kwargs)
    plain = pll_scorer.Scorer(model, params, **kwargs)
    pll, num_tokens = truncated.score_ids([long_sentence])
    assert num_tokens[0] == 14
    np.testing.assert_allclose(pll, plain.score_ids([long_sentence[:14]])[0], rtol=1e-6)


@pytest.mark.parametrize("n,window", [(10, 4), (40, 14), (15, 14), (14, 14), (101, 30), (5, 1)])
def test_windows_score_every_token_once(n, window):
  spans = pll_scorer.window_spans(n, window)
  scored = np.concatenate([s for _, _, s in spans])
  np.testing.assert_array_equal(np.sort(scored), np.arange(n))
  for start, end, s in spans:
    assert 0 <= start and end <= n and end - start == min(window, n)
    assert np.all((s >= start) & (s < end))


@pytest.mark.slow
def test_window_pll_is_the_sum_over_windows():
  _, model, params = _tiny("script")
  sentence = _random_sentences([33], seed=7)[0]
  scorer = pll_scorer.Scorer(model, params, special_ids=SPECIAL, max_len=16, long="window",
                          batch_size=4)
  pll, num_tokens = scorer.score_ids([sentence])
  assert num_tokens[0] == 33
  want = 0.0
  token_log_probs = jax.jit(functools.partial(pll_scorer.critic_token_log_probs, model=model))
  for start, end, scored in pll_scorer.window_spans(33, 14):
    ids, input_mask, _ = _packed([sentence[start:end]], 16)
    log_p = np.asarray(token_log_probs(params, ids, input_mask))
    want += log_p[0, scored - start + 1].sum()
  np.testing.assert_allclose(pll[0], want, rtol=1e-5)


def test_bad_scorer_arguments_are_clear_errors():
  _, model, params = _tiny("script")
  with pytest.raises(pll_scorer.ScoringError, match="Unknown scoring method 'ppl'"):
    pll_scorer.Scorer(model, params, special_ids=SPECIAL, max_len=16, method="ppl")
  with pytest.raises(pll_scorer.ScoringError, match="long-sentence policy"):
    pll_scorer.Scorer(model, params, special_ids=SPECIAL, max_len=16, long="drop")
  with pytest.raises(pll_scorer.ScoringError, match="no tokenizer"):
    pll_scorer.Scorer(model, params, special_ids=SPECIAL, max_len=16).score(["a b"])


def test_benchmark_runs_both_methods_on_the_same_sentences():
  from script_jax.bench import scoring_speed  # pylint: disable=g-import-not-at-top
  _, model, params = _tiny("script")
  result = scoring_speed.benchmark(model, params, SPECIAL, max_len=32, vocab_size=2048,
                                       num_sentences=6, num_tokens=20, batch_size=4)
  assert result["critic"]["sentences_per_sec"] > 0 and result["mlm"]["sentences_per_sec"] > 0
  assert result["speedup"] == pytest.approx(result["critic"]["sentences_per_sec"] /
                                            result["mlm"]["sentences_per_sec"])
  assert 16 <= result["setup"]["mean_tokens"] <= 24
  assert "critic / MLM" in scoring_speed.format_table(result)
