"""The SCRIPT critic, the losses and the sampling against independent float64 NumPy references."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_config, random_batch

from script_jax import models
from script_jax import objectives


def _np_logsumexp(x, axis=-1):
  m = x.max(axis=axis, keepdims=True)
  return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_critic_probability_matches_both_float64_forms(seed):
  rng = np.random.default_rng(seed)
  logits = rng.normal(scale=3.0, size=(3, 7, 50))  # fresh random logits s_t
  # Form 1: sigmoid(logsumexp(s_t)).
  p_pos_sigmoid = 1.0 / (1.0 + np.exp(-_np_logsumexp(logits)))
  # Form 2: the V+1-class softmax with a zero logit for "replaced" (eqs. 4-5), summed over V.
  augmented = np.concatenate([logits, np.zeros(logits.shape[:-1] + (1,))], axis=-1)
  softmax = np.exp(augmented - _np_logsumexp(augmented)[..., None])
  p_pos_softmax, p_neg_softmax = softmax[..., :-1].sum(-1), softmax[..., -1]
  np.testing.assert_allclose(p_pos_sigmoid, p_pos_softmax, rtol=1e-12)

  lse = jax.nn.logsumexp(jnp.asarray(logits, jnp.float32), axis=-1)
  log_pos, log_neg = objectives.critic_log_probs(lse)
  np.testing.assert_allclose(np.exp(log_pos), p_pos_softmax, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.exp(log_neg), p_neg_softmax, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("seed", [0, 1])
def test_disc_loss_matches_float64_cross_entropy(seed):
  rng = np.random.default_rng(seed)
  logits = rng.normal(scale=2.0, size=(4, 9, 30))
  is_original = rng.random((4, 9)) < 0.7
  weights = (rng.random((4, 9)) < 0.8).astype(np.float64)
  augmented = np.concatenate([logits, np.zeros((4, 9, 1))], axis=-1)
  log_softmax = augmented - _np_logsumexp(augmented)[..., None]
  log_pos = _np_logsumexp(log_softmax[..., :-1])
  log_neg = log_softmax[..., -1]
  nll = -(is_original * log_pos + (~is_original) * log_neg)
  want = (nll * weights).sum() / weights.sum()
  want_acc = (((log_pos > log_neg) == is_original) * weights).sum() / weights.sum()

  lse = jax.nn.logsumexp(jnp.asarray(logits, jnp.float32), axis=-1)
  loss, metrics = objectives.binary_disc_loss(lse, jnp.asarray(is_original),
                                              jnp.asarray(weights, jnp.float32))
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["disc_accuracy"]), want_acc, rtol=1e-6)


def test_mlm_loss_matches_float64_reference():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 5, 40))
  ids = rng.integers(0, 40, size=(2, 5))
  weights = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.float64)
  log_probs = logits - _np_logsumexp(logits)[..., None]
  nll = -np.take_along_axis(log_probs, ids[..., None], -1)[..., 0]
  want = (nll * weights).sum() / weights.sum()
  loss, _ = objectives.mlm_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(ids),
                                jnp.asarray(weights, jnp.float32))
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_first_argmax_equals_numpy_argmax_with_ties_and_masked_columns():
  rng = np.random.default_rng()
  # Small integers make ties common; -inf columns are masked vocabulary padding.
  x = rng.integers(-3, 4, size=(4, 7, 301)).astype(np.float32)
  x[..., -5:] = -np.inf
  x[0, 0, :] = -np.inf  # a row with nothing but -inf: index 0, like argmax
  x[1] = rng.normal(size=(7, 301))
  got = jax.jit(objectives.first_argmax)(jnp.asarray(x))
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), np.argmax(x, axis=-1))
  # The CPU form and argmax itself (what TPUs and GPUs run) agree, ties and -inf rows included.
  np.testing.assert_array_equal(np.asarray(jax.jit(objectives.two_reduction_argmax)(x)),
                                np.asarray(jax.jit(lambda a: jnp.argmax(a, axis=-1))(x)))


@pytest.mark.parametrize("backend, primitive", [("cpu", "reduce_min"), ("gpu", "argmax"),
                                                ("tpu", "argmax")])
def test_first_argmax_form_follows_the_backend(backend, primitive):
  jaxpr = str(jax.make_jaxpr(lambda x: objectives.first_argmax(x, backend))(jnp.zeros((2, 5))))
  assert primitive in jaxpr
  assert ("argmax" in jaxpr) == (backend != "cpu")


@pytest.mark.parametrize("platform, cpu_form", [("cpu", True), ("tpu", False), ("cuda", False)])
def test_first_argmax_form_follows_the_platform_it_is_lowered_for(platform, cpu_form):
  """Lowered for a TPU on this CPU host (as bench/tpu_compile does), the program is argmax's
  one (value, index) reduction, not the CPU's max and min."""
  lowered = jax.jit(objectives.first_argmax).trace(jnp.zeros((2, 5))).lower(
      lowering_platforms=(platform,))
  text = lowered.as_text()
  assert ("stablehlo.minimum" in text) == cpu_form
  assert ("stablehlo.reduce" in text)


@pytest.mark.parametrize("rng_impl", ["threefry2x32", "rbg"])
def test_gumbel_max_sample_follows_tempered_softmax(rng_impl):
  logits = jnp.log(jnp.array([0.6, 0.3, 0.1]))
  draws = jax.vmap(lambda k: objectives.gumbel_max_sample(k, logits[None, None], 1.0))(
      jax.random.split(jax.random.key(0, impl=rng_impl), 20000)).ravel()
  freq = np.bincount(np.asarray(draws), minlength=3) / draws.size
  np.testing.assert_allclose(freq, [0.6, 0.3, 0.1], atol=0.015)
  # tau = 2 flattens: softmax(log p / 2) is proportional to sqrt(p).
  draws = jax.vmap(lambda k: objectives.gumbel_max_sample(k, logits[None, None], 2.0))(
      jax.random.split(jax.random.key(1, impl=rng_impl), 20000)).ravel()
  want = np.sqrt([0.6, 0.3, 0.1]) / np.sqrt([0.6, 0.3, 0.1]).sum()
  np.testing.assert_allclose(np.bincount(np.asarray(draws), minlength=3) / draws.size, want,
                             atol=0.015)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_inverse_cdf_sample_follows_tempered_softmax(temperature):
  rng = np.random.default_rng(int(temperature * 10))
  logits = jnp.asarray(rng.normal(size=(6,)) * 2, jnp.float32)
  draws = objectives.inverse_cdf_sample(
      jax.random.key(3), jnp.broadcast_to(logits, (200, 100, 6)), temperature).ravel()
  z = np.asarray(logits, np.float64) / temperature
  want = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
  np.testing.assert_allclose(np.bincount(np.asarray(draws), minlength=6) / draws.size, want,
                             atol=0.01)
  # A near-one-hot distribution never yields another token, nor one past the end.
  peaked = objectives.inverse_cdf_sample(
      jax.random.key(4), jnp.array([[[-50.0, -50.0, 50.0]]] * 1000), 1.0)
  assert set(np.asarray(peaked).ravel().tolist()) == {2}


def test_scatter_leaves_padding_slots_and_position_zero_alone():
  ids = jnp.array([[7, 8, 9, 10]])
  out = objectives.scatter_at_positions(ids, jnp.array([[2, 0]]), jnp.array([[99, 55]]),
                                        jnp.array([[1.0, 0.0]]))
  np.testing.assert_array_equal(out, [[7, 8, 99, 10]])


@pytest.mark.parametrize("chunk", [7, 64])
def test_chunked_logsumexp_equals_plain_value_and_gradients(chunk):
  rng = np.random.default_rng(4)
  feats = jnp.asarray(rng.normal(size=(3, 11, 16)), jnp.float32)
  table = jnp.asarray(rng.normal(size=(50, 16)) * 0.3, jnp.float32)
  bias = jnp.asarray(rng.normal(size=(50,)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=(3, 11)), jnp.float32)
  f = lambda c: lambda *a: (objectives.critic_logsumexp(*a, chunk_size=c) * cot).sum()
  plain, plain_grads = jax.value_and_grad(f(0), argnums=(0, 1, 2))(feats, table, bias)
  chunked, chunked_grads = jax.value_and_grad(f(chunk), argnums=(0, 1, 2))(feats, table, bias)
  np.testing.assert_allclose(chunked, plain, rtol=1e-5)
  for g_c, g_p in zip(chunked_grads, plain_grads):
    np.testing.assert_allclose(g_c, g_p, rtol=1e-4, atol=1e-5)


def _init(config, batch):
  model = models.build_model(config)
  params = model.init(jax.random.key(0), batch["input_ids"], batch["segment_ids"],
                      batch["input_mask"], batch["masked_positions"])["params"]
  return model, params


@pytest.mark.slow
def test_script_gradients_flow_through_both_passes_and_not_through_the_sample():
  config = load_config("tiny")
  batch = random_batch(config, 4, seed=5)
  model, params = _init(config, batch)
  rng = jax.random.key(7)
  loss_fn = functools.partial(objectives.script_objective, model=model, config=config)
  grads = jax.grad(lambda p: loss_fn(p, batch, rng)[0])(params)

  # Rebuild the same step with the sample frozen as a constant input.
  _, _, sample_rng = jax.random.split(rng, 3)
  table, bias = model.apply({"params": params}, method=model.output_embedding)
  feats = model.apply({"params": params}, batch["input_ids"], batch["segment_ids"],
                      batch["input_mask"], batch["masked_positions"])
  sampled_ids, is_original, _, _ = objectives._sample_replacements(  # pylint: disable=protected-access
      sample_rng, models.tied_logits(feats, table, bias), batch, config.script.temperature)

  def pass1(p):
    t, b = model.apply({"params": p}, method=model.output_embedding)
    f = model.apply({"params": p}, batch["input_ids"], batch["segment_ids"], batch["input_mask"],
                    batch["masked_positions"])
    return objectives.mlm_loss(models.tied_logits(f, t, b), batch["masked_ids"],
                               batch["masked_weights"])[0]

  def pass2(p):
    t, b = model.apply({"params": p}, method=model.output_embedding)
    f = model.apply({"params": p}, sampled_ids, batch["segment_ids"], batch["input_mask"])
    lse = objectives.critic_logsumexp(f, t, b)
    return config.disc_weight * objectives.binary_disc_loss(
        lse, is_original, batch["input_mask"].astype(jnp.float32))[0]

  g1, g2 = jax.grad(pass1)(params), jax.grad(pass2)(params)
  layer_kernel = lambda g: g["encoder"]["layer_0"]["intermediate"]["kernel"]
  assert float(jnp.abs(layer_kernel(g1)).sum()) > 0  # MLM pass reaches the encoder
  assert float(jnp.abs(layer_kernel(g2)).sum()) > 0  # critic pass reaches the encoder
  expected = jax.tree.map(jnp.add, g1, g2)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)


@pytest.mark.slow
def test_critic_on_masked_positions_only_equals_the_full_pass_weighted_there():
  """disc_positions="masked" runs the head at P positions; the loss is the full pass's there."""
  config = load_config("tiny", **{"script.disc_positions": "masked"})
  batch = random_batch(config, 4, seed=8)
  model, params = _init(config, batch)
  rng = jax.random.key(3)
  loss, metrics = objectives.script_objective(params, batch, rng, model=model, config=config)

  _, _, sample_rng = jax.random.split(rng, 3)
  table, bias = model.apply({"params": params}, method=model.output_embedding)
  feats = model.apply({"params": params}, batch["input_ids"], batch["segment_ids"],
                      batch["input_mask"], batch["masked_positions"])
  logits = models.tied_logits(feats, table, bias)
  sampled_ids, is_original, _, _ = objectives._sample_replacements(  # pylint: disable=protected-access
      sample_rng, logits, batch, config.script.temperature)
  full = model.apply({"params": params}, sampled_ids, batch["segment_ids"], batch["input_mask"])
  lse = np.asarray(objectives.critic_logsumexp(full, table, bias), np.float64)
  label = np.asarray(is_original, np.float64)
  nll = np.logaddexp(0, -lse) * label + np.logaddexp(0, lse) * (1 - label)
  weights = np.zeros_like(lse)
  for b, (pos, w) in enumerate(zip(np.asarray(batch["masked_positions"]),
                                   np.asarray(batch["masked_weights"]))):
    weights[b, pos[w > 0]] = 1.0
  want_disc = (nll * weights).sum() / weights.sum()
  want_mlm = float(objectives.mlm_loss(logits, batch["masked_ids"], batch["masked_weights"])[0])
  np.testing.assert_allclose(float(metrics["disc_loss"]), want_disc, rtol=1e-5)
  np.testing.assert_allclose(float(loss), want_mlm + config.disc_weight * want_disc, rtol=1e-5)
  # Some sampled tokens equal the original in a tiny random model's draws, or none; either way
  # the share is over the masked positions only, well below the all-positions share.
  assert float(metrics["disc_original_share"]) < 0.5


def test_script_and_mlm_have_identical_parameter_trees():
  shapes = {}
  for objective in ("script", "mlm"):
    config = load_config("small", objective=objective)
    model = models.build_model(config)
    b = {k: jnp.zeros((1, config.seq_len), jnp.int32) for k in ("ids", "seg", "mask")}
    pos = jnp.zeros((1, config.mask.max_predictions_per_seq), jnp.int32)
    tree = jax.eval_shape(model.init, jax.random.key(0), b["ids"], b["seg"], b["mask"], pos)
    shapes[objective] = jax.tree.map(lambda x: (x.shape, x.dtype), tree)
  assert shapes["script"] == shapes["mlm"]


def _param_shapes(config):
  model = models.build_model(config)
  z = jnp.zeros((1, config.seq_len), jnp.int32)
  pos = jnp.zeros((1, config.mask.max_predictions_per_seq), jnp.int32)
  return jax.eval_shape(model.init, jax.random.key(0), z, z, z, pos)["params"]


@pytest.mark.parametrize("name,low,high", [("small", 13e6, 15e6), ("base", 105e6, 115e6),
                                           ("large", 330e6, 340e6)])  # ELECTRA-large: 335M
def test_parameter_counts_match_the_paper(name, low, high):
  config = load_config(name)
  count = sum(x.size for x in jax.tree.leaves(_param_shapes(config)))
  assert low < count < high
  assert count == models.encoder_config_from(config.model).num_params()


def test_electra_generator_sizes():
  params = _param_shapes(load_config("small", objective="electra"))
  gen, disc = params["generator"], params["discriminator"]
  assert gen["embeddings_project"]["kernel"].shape == (128, 64)
  assert gen["layer_0"]["intermediate"]["kernel"].shape == (64, 256)
  assert gen["layer_0"]["attention"]["query"]["kernel"].shape == (64, 1, 64)  # 1 head of 64
  assert len([k for k in gen if k.startswith("layer_")]) == 12
  assert disc["layer_0"]["intermediate"]["kernel"].shape == (256, 1024)
  # One embedding table, shared by generator and discriminator.
  # 30522 padded to 239 x 128 rows (model.vocab_pad_multiple).
  assert params["embeddings"]["word_embeddings"]["embedding"].shape == (30592, 128)
  assert params["generator_head"]["dense"]["kernel"].shape == (64, 128)
  assert params["disc_output"]["kernel"].shape == (256, 1)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["script", "electra", "mlm"])
def test_bfloat16_compute_keeps_float32_params_and_close_loss(objective):
  batch = random_batch(load_config("tiny"), 2, seed=6)
  losses, grads = {}, {}
  for dtype in ("float32", "bfloat16"):
    config = load_config("tiny", objective=objective, **{"model.dtype": dtype})
    model, params = _init(config, batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    (loss, _), g = jax.value_and_grad(objectives.get_objective(objective), has_aux=True)(
        params, batch, jax.random.key(0), model=model, config=config)
    losses[dtype], grads[dtype] = float(loss), g
  assert np.isfinite(losses["bfloat16"])
  np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=0.05)
  # The bf16 backward (the tied softmax layer's custom rule included) points the same way
  # (the smallest cosine seen on tiny is 0.9997).
  for path, g32 in jax.tree_util.tree_leaves_with_path(grads["float32"]):
    g16 = np.asarray(_leaf(grads["bfloat16"], path), np.float64).ravel()
    g32 = np.asarray(g32, np.float64).ravel()
    assert g16.shape == g32.shape
    if np.linalg.norm(g32) > 1e-6:
      cosine = g16 @ g32 / (np.linalg.norm(g16) * np.linalg.norm(g32))
      assert cosine > 0.99, (jax.tree_util.keystr(path), cosine)


def _leaf(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def test_unknown_objective_is_a_clear_error():
  with pytest.raises(ValueError, match="Unknown objective 'gan'.*script, electra, mlm"):
    objectives.get_objective("gan")


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["script", "electra", "mlm"])
def test_vocabulary_padding_changes_nothing_but_the_shapes(objective):
  """Pad rows of W (whatever their values) never reach a loss, a sample or a gradient."""
  plain = load_config("tiny", objective=objective, **{"model.vocab_size": 500,
                                                      "model.vocab_pad_multiple": 1})
  padded = load_config("tiny", objective=objective, **{"model.vocab_size": 500,
                                                       "model.vocab_pad_multiple": 128})
  batch = random_batch(plain, 4, seed=9)
  model_plain, params_plain = _init(plain, batch)
  model_padded, params_padded = _init(padded, batch)
  assert params_padded["embeddings"]["word_embeddings"]["embedding"].shape[0] == 512

  # The padded model with the plain model's real rows, random pad rows and pad biases.
  rng = np.random.default_rng(0)
  def pad(plain_leaf, padded_leaf):
    if plain_leaf.shape == padded_leaf.shape:
      return plain_leaf
    extra = rng.normal(size=(padded_leaf.shape[0] - plain_leaf.shape[0],) + plain_leaf.shape[1:])
    return jnp.concatenate([plain_leaf, jnp.asarray(extra * 10, plain_leaf.dtype)])
  params_padded = jax.tree.map(pad, params_plain, params_padded)

  rng_key = jax.random.key(11)
  fn = objectives.get_objective(objective)
  (loss_p, m_p), g_p = jax.value_and_grad(
      lambda p: fn(p, batch, rng_key, model=model_plain, config=plain), has_aux=True)(params_plain)
  (loss_q, m_q), g_q = jax.value_and_grad(
      lambda p: fn(p, batch, rng_key, model=model_padded, config=padded),
      has_aux=True)(params_padded)
  np.testing.assert_allclose(float(loss_q), float(loss_p), rtol=1e-5)
  for key in m_p:
    np.testing.assert_allclose(float(m_q[key]), float(m_p[key]), rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(g_p), jax.tree.leaves(g_q)):
    if a.shape != b.shape:  # real rows equal, pad rows get nothing
      np.testing.assert_allclose(b[:a.shape[0]], a, rtol=1e-4, atol=1e-6)
      np.testing.assert_array_equal(b[a.shape[0]:], 0)
    else:
      np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def _dot_operand_dtypes(jaxpr):
  """(lhs, rhs) dtypes of every dot_general in a jaxpr, nested calls and custom rules included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else [param]):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          found += _dot_operand_dtypes(inner)
  return found


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tied_logits_value_and_gradients_match_float64(dtype):
  """bf16 features: forward and backward matmuls in bf16 (f32 accumulation), within bf16
  rounding of a float64 reference; float32 features: float32 throughout, to float32 rounding."""
  rng = np.random.default_rng()
  feats = rng.normal(size=(3, 7, 16))
  table = rng.normal(size=(40, 16)) * 0.3
  bias = rng.normal(size=(40,))
  cot = rng.normal(size=(3, 7, 40))
  want = feats @ table.T + bias
  want_grads = (cot @ table, np.einsum("btv,bte->ve", cot, feats), cot.sum((0, 1)))
  f = lambda x, w, b: (models.tied_logits(x, w, b) * jnp.asarray(cot, jnp.float32)).sum()
  args = (jnp.asarray(feats, dtype), jnp.asarray(table, jnp.float32),
          jnp.asarray(bias, jnp.float32))
  logits = models.tied_logits(*args)
  grads = jax.grad(f, argnums=(0, 1, 2))(*args)
  assert logits.dtype == jnp.float32 and grads[0].dtype == jnp.dtype(dtype)
  assert grads[1].dtype == grads[2].dtype == jnp.float32
  tol = 1e-5 if dtype == "float32" else 2e-2
  rel = lambda a, b: np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)
  assert rel(logits, want) < tol
  for got, ref in zip(grads, want_grads):
    assert rel(got, ref) < tol
  dots = _dot_operand_dtypes(jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2)))(*args).jaxpr)
  # forward, d_features, d_table and d_bias (a column sum written as a matrix-vector product)
  assert len(dots) == 4 and all(pair == (dtype, dtype) for pair in dots), dots


def test_sampler_names_are_config_lib_s():
  """config_lib.SAMPLERS is the one list of names the config accepts; objectives dispatches on
  exactly those."""
  from script_jax import config_lib  # pylint: disable=g-import-not-at-top
  assert tuple(objectives.SAMPLERS) == config_lib.SAMPLERS


@pytest.mark.parametrize("dtype,rtol", [("float32", 1e-6), ("bfloat16", 1e-2)])
def test_softmax_kept_in_a_dtype_matches_a_float64_reference(dtype, rtol):
  """models.softmax_kept_in on fresh random scores (a masked column included): the
  probabilities and the gradient of a weighted sum against float64 formulas. In bfloat16 it
  keeps only the bfloat16 probabilities for the backward pass; the float32 path is
  jax.nn.softmax itself."""
  rng = np.random.default_rng(int(np.random.default_rng().integers(1 << 30)))
  scores = rng.normal(scale=3.0, size=(2, 3, 5, 7)).astype(np.float32)
  scores[..., -1] -= 1e9  # a padded key
  weights = rng.normal(size=scores.shape).astype(np.float32)
  s64 = scores.astype(np.float64)
  p64 = np.exp(s64 - s64.max(-1, keepdims=True))
  p64 /= p64.sum(-1, keepdims=True)
  g64 = p64 * (weights - (weights * p64).sum(-1, keepdims=True))  # d/ds of sum(w * softmax(s))
  probs = models.softmax_kept_in(jnp.asarray(scores), jnp.dtype(dtype))
  assert probs.dtype == jnp.dtype(dtype)
  np.testing.assert_allclose(np.asarray(probs, np.float64), p64, rtol=rtol, atol=1e-7)
  grad = jax.grad(lambda s: jnp.sum(models.softmax_kept_in(s, jnp.dtype(dtype))
                                    .astype(jnp.float32) * weights))(jnp.asarray(scores))
  assert grad.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(grad, np.float64), g64, rtol=rtol,
                             atol=rtol * np.abs(g64).max())


@pytest.mark.parametrize("dtype,rtol", [("float32", 1e-5), ("bfloat16", 1e-2)])
def test_gelu_keeping_input_matches_a_float64_reference(dtype, rtol):
  """models.gelu_keeping_input on fresh random inputs (large and tiny ones included): its value
  x Phi(x) and the gradient of a weighted sum, x Phi(x)' = Phi(x) + x phi(x), against float64
  formulas; its values equal jax.nn.gelu's, and in bfloat16 the gradient keeps only the input
  (one residual, x itself; float32 is jax.nn.gelu, which keeps more)."""
  rng = np.random.default_rng(int(np.random.default_rng().integers(1 << 30)))
  x = rng.normal(scale=3.0, size=(4, 5, 33)).astype(np.float32)
  x[0, 0, :4] = [-12.0, 12.0, 1e-6, 0.0]
  weights = rng.normal(size=x.shape).astype(np.float32)
  xd = jnp.asarray(x).astype(dtype)
  x64 = np.asarray(xd, np.float64)
  cdf = 0.5 * (1.0 + np.vectorize(math.erf)(x64 / math.sqrt(2.0)))
  pdf = np.exp(-0.5 * x64 ** 2) / math.sqrt(2.0 * math.pi)
  value = models.gelu_keeping_input(xd)
  assert value.dtype == jnp.dtype(dtype)
  np.testing.assert_array_equal(np.asarray(value, np.float32),
                                np.asarray(jax.nn.gelu(xd, approximate=False), np.float32))
  np.testing.assert_allclose(np.asarray(value, np.float64), x64 * cdf, rtol=rtol,
                             atol=rtol * 1e-2 * np.abs(x64).max())
  loss = lambda v: jnp.sum(models.gelu_keeping_input(v).astype(jnp.float32) * weights)
  grad = jax.grad(loss)(xd)
  assert grad.dtype == jnp.dtype(dtype)
  expected = weights * (cdf + x64 * pdf)
  np.testing.assert_allclose(np.asarray(grad, np.float64), expected, rtol=rtol,
                             atol=rtol * np.abs(expected).max())
  if dtype == "bfloat16":
    _, residuals = jax.vjp(models.gelu_keeping_input, xd)
    kept = [leaf for leaf in jax.tree_util.tree_leaves(residuals) if hasattr(leaf, "shape")
            and leaf.shape == x.shape]
    assert len(kept) == 1, "the backward pass keeps more than the input"
