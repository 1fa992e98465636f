"""What the Pallas TPU kernels (fused_logsumexp, fused_attention) share."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def dot_in_float32(a, b, dims):
  """A float32 matmul of blocks in HBM's (possibly lower) precision. Mosaic compiles bfloat16
  matmuls for TPU v4 and later only (v3 refuses them, error E2001: tried ahead of time), so the
  operands are widened in VMEM, exactly; one pass at the default precision, as XLA's."""
  return jax.lax.dot_general(a.astype(jnp.float32), b.astype(jnp.float32), (dims, ((), ())),
                             precision=jax.lax.Precision.DEFAULT,
                             preferred_element_type=jnp.float32)


NT = ((1,), (1,))  # a @ b.T
NN = ((1,), (0,))  # a @ b
TN = ((0,), (0,))  # a.T @ b


def run_in_interpret_mode(mesh) -> bool:
  """Whether the kernels run in Pallas's interpret mode: on any backend but TPU (tests)."""
  devices = mesh.devices.flat if mesh is not None else jax.devices()
  return next(iter(devices)).platform != "tpu"


def mix32(x):
  """A bijective 32-bit integer hash (Wellons' "lowbias32"), on int32 with logical shifts so
  that it lowers on the TPU's vector unit as in plain XLA: the kernels' counter-based random
  bits (attention dropout, Gumbel noise)."""
  srl = jax.lax.shift_right_logical
  x = x ^ srl(x, jnp.int32(16))
  x = x * jnp.int32(0x7FEB352D)
  x = x ^ srl(x, jnp.int32(15))
  x = x * jnp.int32(np.int32(np.uint32(0x846CA68B).view(np.int32)))
  return x ^ srl(x, jnp.int32(16))
