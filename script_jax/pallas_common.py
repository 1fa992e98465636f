"""What the Pallas TPU kernels (fused_logsumexp, fused_attention) share."""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
