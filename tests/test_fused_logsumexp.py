"""The fused critic logsumexp (Pallas kernels, interpret mode on the CPU) against the plain formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from conftest import load_config, random_batch
from script_jax import fused_logsumexp
from script_jax import models
from script_jax import objectives


def _plain(features, table, bias):
  return jax.nn.logsumexp(models.tied_logits(features, table, bias), axis=-1)


def _inputs(b, t, e, v, vocab_size, dtype, seed=0):
  rng = np.random.default_rng(seed)
  features = jnp.asarray(rng.normal(size=(b, t, e)), dtype)
  table = jnp.asarray(rng.normal(size=(v, e)) * 0.3, jnp.float32)
  raw_bias = jnp.asarray(rng.normal(size=(v,)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=(b, t)), jnp.float32)
  return features, table, raw_bias, cot


def _value_and_grads(lse_fn, features, table, raw_bias, cot, vocab_size):
  """sum(lse * cot) and its gradients w.r.t. features, table and the raw (unmasked) bias, whose
  padding columns go through models.mask_vocab_padding as in the model."""
  def loss(f, w, b):
    return (lse_fn(f, w, models.mask_vocab_padding(b, vocab_size)) * cot).sum()
  return jax.value_and_grad(loss, argnums=(0, 1, 2))(features, table, raw_bias)


# (B, T, E, V padded, vocab_size, block_rows, block_vocab): T and V not multiples of the blocks,
# several row and vocabulary blocks, and the model's padding of the vocabulary (300 -> 384 rows
# with 300 real ones, as 30522 -> 30592).
SIZES = [(3, 11, 16, 384, 300, 16, 128),  # 33 rows in 3 blocks of 16, 3 vocabulary blocks
         (2, 7, 24, 200, 200, 8, 128),    # V = 200 not a multiple of 128: padded to 256
         (1, 5, 8, 130, 129, 2048, 256)]  # one block each way, one padded vocabulary column


@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("sizes", SIZES)
def test_pallas_logsumexp_equals_the_plain_formula(dtype, rtol, sizes):
  b, t, e, v, vocab_size, block_rows, block_vocab = sizes
  features, table, raw_bias, cot = _inputs(b, t, e, v, vocab_size, dtype)
  fused = lambda f, w, bias: fused_logsumexp.pallas_logsumexp(f, w, bias, block_rows,
                                                              block_vocab)
  want, want_grads = _value_and_grads(_plain, features, table, raw_bias, cot, vocab_size)
  got, got_grads = _value_and_grads(fused, features, table, raw_bias, cot, vocab_size)
  np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == jnp.float32 else 1e-3)
  lse = fused(features, table, models.mask_vocab_padding(raw_bias, vocab_size))
  assert lse.dtype == jnp.float32 and lse.shape == (b, t)
  np.testing.assert_allclose(lse, _plain(features, table,
                                         models.mask_vocab_padding(raw_bias, vocab_size)),
                             rtol=1e-6, atol=1e-5)
  for name, g, w in zip(("features", "table", "bias"), got_grads, want_grads):
    assert g.dtype == w.dtype, name
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * np.abs(w).max(), err_msg=name)
  # The padding columns take no part: no gradient to their table rows or their bias.
  d_table, d_bias = np.asarray(got_grads[1]), np.asarray(got_grads[2])
  assert not d_table[vocab_size:].any() and not d_bias[vocab_size:].any()
  assert np.abs(d_table[:vocab_size]).sum(-1).min() > 0 and np.abs(d_bias[:vocab_size]).min() > 0


def test_pallas_logsumexp_under_a_sharded_jit_equals_the_plain_formula():
  """Each device's rows on 8 CPU devices (custom_partitioning): the same values and gradients,
  the table's and bias's gradients summed over the batch."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("replica", "data"))
  rows = NamedSharding(mesh, P(("replica", "data")))
  whole = NamedSharding(mesh, P())
  features, table, raw_bias, cot = _inputs(8, 5, 16, 256, 250, jnp.float32, seed=1)
  features, cot = jax.device_put(features, rows), jax.device_put(cot, rows)

  def step(lse_fn):
    return jax.jit(lambda f, w, b, c: _value_and_grads(lse_fn, f, w, b, c, 250),
                   in_shardings=(rows, whole, whole, rows),
                   out_shardings=(whole, (rows, whole, whole)))

  fused = lambda f, w, b: fused_logsumexp.pallas_logsumexp(f, w, b, 8, 128)
  got, got_grads = step(fused)(features, table, raw_bias, cot)
  want, want_grads = step(_plain)(features, table, raw_bias, cot)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6)
  # Each device ran the kernel on its own row: nothing gathered the features.
  hlo = step(fused).lower(features, table, raw_bias, cot).compile().as_text()
  assert "all-gather" not in hlo


def test_critic_logsumexp_dispatches_on_impl():
  features, table, raw_bias, _ = _inputs(2, 3, 8, 128, 128, jnp.float32, seed=2)
  np.testing.assert_allclose(objectives.critic_logsumexp(features, table, raw_bias, impl="pallas"),
                             objectives.critic_logsumexp(features, table, raw_bias), rtol=1e-6)
  with pytest.raises(ValueError, match="plain, pallas"):
    objectives.critic_logsumexp(features, table, raw_bias, impl="fused")


def test_script_objective_with_the_kernel_equals_the_plain_one():
  small_vocab = {"model.vocab_size": 500}  # 4 vocabulary blocks: seconds in interpret mode
  config = load_config("tiny", **small_vocab)
  pallas = load_config("tiny", **small_vocab, **{"script.logsumexp_impl": "pallas"})
  batch = random_batch(config, 4, seed=3)
  model = models.build_model(config)
  params = model.init(jax.random.key(0), batch["input_ids"], batch["segment_ids"],
                      batch["input_mask"], batch["masked_positions"])["params"]
  rng = jax.random.key(5)

  def value_and_grad(c):
    loss = lambda p: objectives.script_objective(p, batch, rng, model=model, config=c)[0]
    return jax.jit(jax.value_and_grad(loss))(params)

  (want, want_grads), (got, got_grads) = value_and_grad(config), value_and_grad(pallas)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-6)
