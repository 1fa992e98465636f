"""The fused attention (Pallas kernels, interpret mode on the CPU) against numpy and the plain
formula: values, gradients, its dropout mask, per-device runs, the model and the TPU program."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from helpers import load_config, lowbias32_numpy, random_batch
from script_jax import fused_attention
from script_jax import models


def _keep_numpy(key1, key2, b, n, t, rate):
  """The keep mask [B, N, T, T] from the flat index of every score, in numpy uint32."""
  index = np.arange(b * n * t * t, dtype=np.uint64).astype(np.uint32).reshape(b, n, t, t)
  k1, k2 = np.uint32(np.int32(key1).view(np.uint32)), np.uint32(np.int32(key2).view(np.uint32))
  bits = lowbias32_numpy(lowbias32_numpy(index ^ k1) ^ k2) >> np.uint32(8)
  return bits >= np.uint32(round(rate * 2 ** 24))


def _attention_numpy(qkv, bias, keep, rate, num_heads):
  """float64 attention with the given keep mask: [B, T, 3H] -> [B, T, H], heads side by side."""
  b, t, width = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
  q, k, v = (np.asarray(qkv, np.float64)[:, :, i * width:(i + 1) * width].reshape(
      b, t, num_heads, -1) for i in range(3))
  scores = np.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(q.shape[-1])
  scores = scores + np.asarray(bias, np.float64)[:, None, None, :]
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  if rate > 0:
    probs = np.where(keep, probs / (1 - rate), 0.0)
  return np.einsum("bnts,bsnd->btnd", probs, v).reshape(b, t, width)


def _inputs(b, t, n, d, dtype, seed):
  rng = np.random.default_rng(seed)
  qkv = jnp.asarray(rng.normal(size=(b, t, 3 * n * d)), dtype)
  cot = jnp.asarray(rng.normal(size=(b, t, n * d)), dtype)
  lengths = rng.integers(1, t + 1, size=b)
  lengths[0] = t
  bias = jnp.where(np.arange(t)[None, :] < lengths[:, None], 0.0, -1e9).astype(jnp.float32)
  keys = jnp.asarray(rng.integers(-2 ** 31, 2 ** 31, size=2), jnp.int32)
  return qkv, cot, bias, keys


def test_the_dropout_mask_is_the_hash_of_each_score_and_drops_at_the_rate():
  keys = (np.int32(123456789), np.int32(-98765))
  b, n, t, rate = 2, 3, 64, 0.1
  first = fused_attention._first_index(jnp.arange(b, dtype=jnp.int32)[:, None],
                                       jnp.arange(n)[None, :], n, t)
  got = jax.vmap(jax.vmap(lambda f: fused_attention.keep_mask(
      jnp.int32(keys[0]), jnp.int32(keys[1]), f, (t, t), rate)))(first)
  want = _keep_numpy(*keys, b, n, t, rate)
  np.testing.assert_array_equal(np.asarray(got), want)
  # 24,576 scores: the dropped fraction within 4 standard deviations of the rate, and the
  # masks of two heads, two sequences and two key pairs not alike.
  drop = 1 - want.mean()
  assert abs(drop - rate) < 4 * np.sqrt(rate * (1 - rate) / want.size), drop
  assert (want[0, 0] != want[0, 1]).mean() > 0.1 and (want[0, 0] != want[1, 0]).mean() > 0.1
  other = _keep_numpy(keys[0], keys[1] + 1, b, n, t, rate)
  assert (other != want).mean() > 0.1


@pytest.mark.parametrize("dtype,rate", [(jnp.float32, 0.0), (jnp.float32, 0.1),
                                        (jnp.bfloat16, 0.0), (jnp.bfloat16, 0.1)])
def test_pallas_attention_equals_numpy_and_the_plain_formula(dtype, rate):
  """Values against float64 numpy with the same mask; gradients against jax's autodiff of
  reference_attention (the [B, N, T, T] formula), on padded sequences, T not a tile multiple."""
  b, t, n, d = 3, 20, 2, 8
  seed = int(rate * 10) + (dtype == jnp.bfloat16)
  qkv, cot, bias, keys = _inputs(b, t, n, d, dtype, seed)
  out = fused_attention.pallas_attention(qkv, bias, keys, n, rate)
  assert out.dtype == dtype and out.shape == (b, t, n * d)
  keep = _keep_numpy(int(keys[0]), int(keys[1]), b, n, t, rate)
  want = _attention_numpy(qkv, bias, keep, rate, n)
  tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=3e-2, atol=3e-2)
  np.testing.assert_allclose(np.asarray(out, np.float64), want, **tol)

  def loss(fn):
    return lambda qkv: (fn(qkv, bias, keys, n, rate).astype(jnp.float32)
                        * cot.astype(jnp.float32)).sum()
  got = jax.grad(loss(fused_attention.pallas_attention))(qkv)
  ref = jax.grad(loss(fused_attention.reference_attention))(qkv)
  width = n * d
  for i, name in enumerate("qkv"):
    g, r = (np.asarray(x[:, :, i * width:(i + 1) * width], np.float32) for x in (got, ref))
    scale = np.abs(r).max()
    assert np.abs(g - r).max() <= (1e-5 if dtype == jnp.float32 else 2e-2) * scale, name


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_query_blocks_give_the_whole_sequence_results(dtype):
  """Several query blocks per sequence (as at T = 512 on a TPU) and two head groups of 128
  lanes (the kernels' loop): the same values, masks and gradients as one block, dk and dv summed
  over the blocks; against numpy and autodiff too."""
  b, t, n, d, rate = 2, 32, 8, 32, 0.1
  assert fused_attention.head_group_width(n * d, d) == 128
  qkv, cot, bias, keys = _inputs(b, t, n, d, dtype, seed=11)

  def loss(block):
    return lambda qkv: (fused_attention.pallas_attention(qkv, bias, keys, n, rate, None, block)
                        .astype(jnp.float32) * cot.astype(jnp.float32)).sum()
  whole = jax.value_and_grad(loss(t))(qkv)
  blocked = jax.value_and_grad(loss(8))(qkv)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for a, w in zip(blocked, whole):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(w, np.float32),
                               rtol=tol, atol=tol * np.abs(np.asarray(w, np.float32)).max())
  out = fused_attention.pallas_attention(qkv, bias, keys, n, rate, None, 8)
  want = _attention_numpy(qkv, bias, _keep_numpy(int(keys[0]), int(keys[1]), b, n, t, rate),
                          rate, n)
  np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=tol, atol=tol)
  ref = jax.grad(lambda qkv: (fused_attention.reference_attention(qkv, bias, keys, n, rate)
                              .astype(jnp.float32) * cot.astype(jnp.float32)).sum())(qkv)
  got = np.asarray(blocked[1], np.float32)
  assert np.abs(got - np.asarray(ref, np.float32)).max() <= tol * np.abs(
      np.asarray(ref, np.float32)).max()
  assert fused_attention.default_query_block(512) == 128
  assert fused_attention.default_query_block(200) == 200
  with pytest.raises(ValueError, match="must divide"):
    fused_attention.pallas_attention(qkv, bias, keys, n, rate, None, 12)


def test_each_device_runs_its_own_sequences_with_the_same_masks():
  """Over 8 devices (the batch split as the train step splits it) the kernels give the
  whole-batch values and gradients: each device's masks continue the global index."""
  devices = np.array(jax.devices()[:8]).reshape(2, 4, 1)
  mesh = jax.sharding.Mesh(devices, ("replica", "data", "model"))
  batch = P(("replica", "data"))
  qkv, cot, bias, keys = _inputs(8, 16, 2, 8, jnp.float32, seed=7)

  def loss(sharding):
    return lambda qkv: (fused_attention.pallas_attention(qkv, bias, keys, 2, 0.2, sharding)
                        * cot).sum()
  placed = jax.device_put(qkv, NamedSharding(mesh, batch))
  split = jax.jit(jax.value_and_grad(loss((mesh, batch))))(placed)
  whole = jax.value_and_grad(loss(None))(qkv)
  for a, b in zip(jax.tree.leaves(split), jax.tree.leaves(whole)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_the_model_with_the_kernels_trains_as_with_xla_attention():
  """The trainer's SCRIPT step on 8 devices: without attention dropout the kernels give the XLA
  path's loss and gradient norm; with it, a finite loss that differs (other masks)."""
  from script_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from script_jax import state as state_lib  # pylint: disable=g-import-not-at-top
  from script_jax import train  # pylint: disable=g-import-not-at-top
  metrics = {}
  for impl, rate in (("xla", 0.0), ("pallas", 0.0), ("xla", 0.1), ("pallas", 0.1)):
    config = load_config("tiny", rng_impl="threefry2x32",
                         **{"model.attention_impl": impl, "model.attention_dropout_rate": rate})
    mesh = sharding_lib.create_mesh(config)
    model = models.build_model(config)
    state, state_sharding = state_lib.init_state(config, model, mesh)
    batch = train.to_global_batch(random_batch(config, config.batch_size, seed=3), mesh)
    _, out = train.make_train_step(config, model, state_sharding, mesh)(state, batch)
    metrics[impl, rate] = {k: float(out[k]) for k in ("loss", "grad_norm")}
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(metrics["pallas", 0.0][key], metrics["xla", 0.0][key], rtol=1e-5)
  assert np.isfinite(metrics["pallas", 0.1]["loss"])
  assert metrics["pallas", 0.1]["loss"] != metrics["xla", 0.1]["loss"]
  assert metrics["pallas", 0.1]["loss"] != metrics["pallas", 0.0]["loss"]
