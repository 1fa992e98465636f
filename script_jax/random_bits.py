"""jax.random's threefry bits, uniforms, Bernoullis and Gumbels, bit for bit, with faster CPU code.

On CPU, jax lowers the threefry2x32 hash as a rolled five-iteration `while` loop (to keep compile
times short), which XLA:CPU runs slowly, and every dropout mask and Gumbel draw goes through it.
Written out here as the same 20 rounds in plain jnp ops, XLA fuses the hash into one vectorised
loop, several times faster (docs/benchmarks_log.md section (g)). The counters and the output
are jax's own (`jax_threefry_partitionable`, the default: counter = the element's flat index,
output = the two words XORed), so every draw equals `jax.random`'s for the same key;
tests/test_random_bits.py checks it. Keys of other implementations (`rbg`, `unsafe_rbg`), the
non-partitionable layout and float dtypes other than float32 fall back to `jax.random` itself.
On GPU and TPU jax already unrolls the hash, so this is the same program there.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array

# Threefry-2x32 with 20 rounds (Salmon et al., 2011), as in jax.random.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KEY_SCHEDULE_PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(x: Array, bits: int) -> Array:
  return (x << np.uint32(bits)) | (x >> np.uint32(32 - bits))


def threefry2x32(key1: Array, key2: Array, x1: Array, x2: Array) -> tuple[Array, Array]:
  """The Threefry-2x32 hash of the counter pair (x1, x2) under key (key1, key2), unrolled."""
  schedule = (key1, key2, key1 ^ key2 ^ _KEY_SCHEDULE_PARITY)
  x1, x2 = x1 + schedule[0], x2 + schedule[1]
  for block in range(5):
    for rotation in _ROTATIONS[block % 2]:
      x1 = x1 + x2
      x2 = x1 ^ _rotate_left(x2, rotation)
    x1 = x1 + schedule[(block + 1) % 3]
    x2 = x2 + schedule[(block + 2) % 3] + np.uint32(block + 1)
  return x1, x2


def _is_fast_threefry(key: Array, shape: Sequence[int]) -> bool:
  """Whether `key` draws with jax's partitionable threefry, which this module reproduces."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    impl = str(jax.random.key_impl(key))
    if key.shape:
      return False  # batched keys: leave them to jax.random
  else:
    impl = jax.config.jax_default_prng_impl
  return (impl == "threefry2x32" and jax.config.jax_threefry_partitionable
          and int(np.prod(shape, dtype=np.int64)) < 2 ** 32)


def bits(key: Array, shape: Sequence[int]) -> Array:
  """uint32 random bits, equal to jax.random.bits(key, shape, jnp.uint32)."""
  shape = tuple(int(d) for d in shape)
  if not _is_fast_threefry(key, shape):
    return jax.random.bits(key, shape, jnp.uint32)
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  key1, key2 = key[0], key[1]
  if not shape:
    counter_lo = jnp.zeros((), jnp.uint32)
  else:
    # The flat index of every element, built from per-axis iotas so that the SPMD partitioner
    # can give each device its own slice (as jax's iota_2x32_shape does); < 2**32 elements, so
    # the counter's high word is 0.
    strides = np.cumprod((shape[1:] + (1,))[::-1])[::-1]
    counter_lo = sum(lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
                     for axis, stride in enumerate(strides))
  out1, out2 = threefry2x32(key1, key2, jnp.zeros(shape, jnp.uint32), counter_lo)
  return out1 ^ out2


def uniform(key: Array, shape: Sequence[int], dtype=jnp.float32, minval: float = 0.0,
            maxval: float = 1.0) -> Array:
  """U[minval, maxval), equal to jax.random.uniform(key, shape, dtype, minval, maxval)."""
  shape = tuple(int(d) for d in shape)
  if jnp.dtype(dtype) != jnp.float32:
    return jax.random.uniform(key, shape, dtype, minval, maxval)
  # jax's construction: 23 random mantissa bits under the exponent of 1.0 give [1, 2), minus 1.
  mantissa = bits(key, shape) >> np.uint32(32 - 23)
  floats = lax.bitcast_convert_type(mantissa | np.float32(1.0).view(np.uint32),
                                    jnp.float32) - np.float32(1.0)
  low, high = np.float32(minval), np.float32(maxval)
  return lax.max(low, floats * (high - low) + low)


def bernoulli(key: Array, p: float, shape: Sequence[int]) -> Array:
  """True with probability p, equal to jax.random.bernoulli(key, p, shape)."""
  return uniform(key, shape, jnp.float32) < np.float32(p)


def gumbel(key: Array, shape: Sequence[int], dtype=jnp.float32) -> Array:
  """Standard Gumbel noise, equal to jax.random.gumbel(key, shape, dtype)."""
  shape = tuple(int(d) for d in shape)
  if jnp.dtype(dtype) != jnp.float32 or jax.config.jax_high_dynamic_range_gumbel:
    return jax.random.gumbel(key, shape, dtype)
  u = uniform(key, shape, jnp.float32, minval=float(np.finfo(np.float32).tiny), maxval=1.0)
  return -jnp.log(-jnp.log(u))
