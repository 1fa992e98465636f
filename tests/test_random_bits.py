"""random_bits draws what jax.random draws, bit for bit, and Dropout masks what nn.Dropout masks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from script_jax import models
from script_jax import random_bits

SHAPES = [(), (1,), (7,), (3, 5), (2, 3, 5, 7), (4, 19, 301)]


def _fresh_key(rng: np.random.Generator):
  return jax.random.fold_in(jax.random.key(int(rng.integers(2 ** 31))),
                            int(rng.integers(2 ** 31)))


def test_threefry2x32_known_answers():
  # Random123's known-answer vectors for Threefry-2x32 with 20 rounds (Salmon et al., 2011).
  cases = [((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
           ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
           ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0))]
  for key, counter, expected in cases:
    out = random_bits.threefry2x32(*(jnp.uint32(v) for v in key + counter))
    assert tuple(int(v) for v in out) == expected


@pytest.mark.parametrize("shape", SHAPES)
def test_bits_uniform_bernoulli_gumbel_equal_jax_random(shape):
  rng = np.random.default_rng()
  key = _fresh_key(rng)
  p = float(rng.uniform(0.05, 0.95))
  low, high = sorted(rng.uniform(-3, 3, size=2).tolist())
  ours = jax.jit(lambda k: (random_bits.bits(k, shape), random_bits.uniform(k, shape),
                            random_bits.uniform(k, shape, minval=low, maxval=high),
                            random_bits.bernoulli(k, p, shape), random_bits.gumbel(k, shape)))
  # Both under jit: XLA may contract the uniform's scale-and-shift into one FMA either way.
  theirs = jax.jit(lambda k: (jax.random.bits(k, shape, jnp.uint32), jax.random.uniform(k, shape),
                              jax.random.uniform(k, shape, minval=low, maxval=high),
                              jax.random.bernoulli(k, p, shape), jax.random.gumbel(k, shape)))
  for name, a, b in zip(["bits", "uniform", "uniform range", "bernoulli", "gumbel"], ours(key),
                        theirs(key)):
    assert a.dtype == b.dtype and a.shape == b.shape, name
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def test_legacy_uint32_keys_and_other_implementations_equal_jax_random():
  rng = np.random.default_rng()
  seed = int(rng.integers(2 ** 31))
  legacy = jax.random.PRNGKey(seed)
  np.testing.assert_array_equal(random_bits.bits(legacy, (6, 11)),
                                jax.random.bits(legacy, (6, 11), jnp.uint32))
  for impl in ("rbg", "unsafe_rbg"):
    key = jax.random.key(seed, impl=impl)
    np.testing.assert_array_equal(random_bits.bits(key, (6, 11)),
                                  jax.random.bits(key, (6, 11), jnp.uint32))
    np.testing.assert_array_equal(random_bits.gumbel(key, (6, 11)),
                                  jax.random.gumbel(key, (6, 11)))


def test_bits_shard_without_gathering():
  mesh = jax.make_mesh((8,), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  key = _fresh_key(np.random.default_rng())
  draw = jax.jit(lambda k: random_bits.bits(k, (16, 9, 5)), out_shardings=sharding)
  out = draw(key)
  np.testing.assert_array_equal(out, jax.random.bits(key, (16, 9, 5), jnp.uint32))
  # Each device hashes its own counters: nothing is gathered.
  hlo = draw.lower(key).compile().as_text()
  assert "all-gather" not in hlo and "all-reduce" not in hlo


class _TwoDropouts(nn.Module):
  """Two dropout sites under auto-names, as in the encoder; `dropout` picks the class."""
  dropout: type
  rate: float

  @nn.compact
  def __call__(self, x, deterministic):
    y = self.dropout(self.rate)(x, deterministic=deterministic)
    return self.dropout(self.rate)(y * 2.0, deterministic=deterministic)


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.37, 1.0])
def test_dropout_equals_flax_dropout(rate):
  rng = np.random.default_rng()
  x = jnp.asarray(rng.normal(size=(8, 16, 64)).astype(np.float32))
  key = _fresh_key(rng)
  outs = {}
  for name, cls in [("ours", models.Dropout), ("flax", nn.Dropout)]:
    module = _TwoDropouts(cls, rate)
    apply = jax.jit(lambda x, k, m=module: m.apply({}, x, False, rngs={"dropout": k}))
    outs[name] = np.asarray(apply(x, key))
    np.testing.assert_array_equal(module.apply({}, x, True), 2.0 * x)
  np.testing.assert_array_equal(outs["ours"], outs["flax"])
  if 0.0 < rate < 1.0:
    kept = outs["ours"] != 0
    assert 0 < kept.mean() < 1
    np.testing.assert_allclose(outs["ours"][kept],
                               (2.0 * np.asarray(x) / (1 - rate) ** 2)[kept], rtol=1e-6)
