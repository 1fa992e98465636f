"""Self-attention with its dropout in one Pallas TPU kernel: the [B, N, T, T] scores and
probabilities stay in VMEM, never in HBM.

For each sequence and head, with q, k, v [T, D], the padding bias m [T] (0 or -1e9), the scale
c = 1/sqrt(D) and the dropout keep mask K [T, T] (scaled by 1/(1 - rate)):

  S = c q k^T + m,   P = softmax(S),   P~ = P * K,   O = P~ v

and for a cotangent dO, recomputing S and P from q, k and the bias (no residual of size T x T):

  dv = P~^T dO,  dP~ = dO v^T,  dP = dP~ * K,  delta = rowsum(P * dP),  dS = P (dP - delta),
  dq = c dS k,   dk = c dS^T q.

(delta = rowsum(dO * O), FlashAttention's, computed here from the tile already in VMEM.)

The dropout mask is a counter-based hash (`keep_mask`) of each score's global index (sequence,
head, query, key) under two 32-bit keys drawn from the layer's `dropout` rng: the forward and the
backward kernels recompute the same mask, and it does not depend on how the batch is split over
devices. It is not jax.random's stream: runs with `model.attention_impl="pallas"` draw other
dropout masks than the XLA path (same rate, independent bits).

Precision as models.SelfAttention: the scores and softmax in float32, the probabilities rounded to
the compute dtype for the P~ v product; matmuls accumulate in float32. A whole sequence's keys
fit in VMEM at BERT's lengths (T <= 512), so each grid step holds one sequence, all heads.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from script_jax.pallas_common import NN, NT, TN, dot_in_float32, run_in_interpret_mode

Array = jax.Array

# ----------------------------------------------------------------------------- the dropout mask

_KEEP_BITS = 24  # the keep test compares the hash's top 24 bits with rate * 2**24


def _mix32(x: Array) -> Array:
  """A bijective 32-bit integer hash (Wellons' "lowbias32"), on int32 with logical shifts so
  that it lowers on the TPU's vector unit as in plain XLA."""
  srl = jax.lax.shift_right_logical
  x = x ^ srl(x, jnp.int32(16))
  x = x * jnp.int32(0x7FEB352D)
  x = x ^ srl(x, jnp.int32(15))
  x = x * jnp.int32(np.int32(np.uint32(0x846CA68B).view(np.int32)))
  return x ^ srl(x, jnp.int32(16))


def keep_threshold(rate: float) -> int:
  """Scores whose hash's top 24 bits fall below this are dropped: P(drop) = threshold / 2**24."""
  return int(round(rate * 2 ** _KEEP_BITS))


def keep_mask(key1: Array, key2: Array, first_index: Array, shape: tuple[int, int],
              rate: float) -> Array:
  """The keep mask [T, T] (bool) of the scores whose global flat index starts at `first_index`
  (int32; that of score (0, 0) of one sequence and head): hash(hash(index ^ key1) ^ key2)."""
  rows = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, shape, 1)
  index = first_index + rows * jnp.int32(shape[1]) + cols
  bits = jax.lax.shift_right_logical(_mix32(_mix32(index ^ key1) ^ key2),
                                     jnp.int32(32 - _KEEP_BITS))
  return bits >= jnp.int32(keep_threshold(rate))


def _first_index(sequence: Array, head: int, num_heads: int, seq_len: int) -> Array:
  """The flat index of score (0, 0) of (sequence, head) in [B, N, T, T] (wraps past 2**31:
  only its bits matter)."""
  return (sequence * jnp.int32(num_heads) + jnp.int32(head)) * jnp.int32(seq_len * seq_len)


# ----------------------------------------------------------------------------- the kernels

def _columns(part: int, head: int, width: int, head_dim: int) -> slice:
  """The lanes of one head's query (part 0), key (1) or value (2) in a [T, 3H] block."""
  start = part * width + head * head_dim
  return slice(start, start + head_dim)


def _head_scores(qkv_ref, bias_ref, head, width, head_dim, scale):
  """P = softmax(S) [T, T] float32 for one head of this grid step's sequence."""
  q = qkv_ref[0, :, _columns(0, head, width, head_dim)]
  k = qkv_ref[0, :, _columns(1, head, width, head_dim)]
  scores = dot_in_float32(q, k, NT) * scale + bias_ref[0]
  exps = jnp.exp(scores - scores.max(axis=-1, keepdims=True))
  return exps / exps.sum(axis=-1, keepdims=True)


def _dropout_scale(keys_ref, head, num_heads, seq_len, rate):
  """K [T, T] float32: 1/(1 - rate) where the score is kept, 0 where dropped."""
  sequence = keys_ref[2] + pl.program_id(0)
  keep = keep_mask(keys_ref[0], keys_ref[1], _first_index(sequence, head, num_heads, seq_len),
                   (seq_len, seq_len), rate)
  return jnp.where(keep, jnp.float32(1.0 / (1.0 - rate)), jnp.float32(0.0))


def _fwd_kernel(keys_ref, qkv_ref, bias_ref, out_ref, *, num_heads, rate):
  seq_len, width = qkv_ref.shape[1], qkv_ref.shape[2] // 3
  head_dim = width // num_heads
  scale = 1.0 / math.sqrt(head_dim)
  for head in range(num_heads):
    probs = _head_scores(qkv_ref, bias_ref, head, width, head_dim, scale)
    if rate > 0.0:
      probs = probs * _dropout_scale(keys_ref, head, num_heads, seq_len, rate)
    v = qkv_ref[0, :, _columns(2, head, width, head_dim)]
    # P~ rounded to the compute dtype before the product, as the XLA path's probabilities.
    out = dot_in_float32(probs.astype(v.dtype), v, NN)
    out_ref[0, :, _columns(0, head, width, head_dim)] = out.astype(out_ref.dtype)


def _bwd_kernel(keys_ref, qkv_ref, bias_ref, d_out_ref, d_qkv_ref, *, num_heads, rate):
  seq_len, width = qkv_ref.shape[1], qkv_ref.shape[2] // 3
  head_dim = width // num_heads
  scale = 1.0 / math.sqrt(head_dim)
  low = qkv_ref.dtype
  for head in range(num_heads):
    q_cols, k_cols, v_cols = (_columns(part, head, width, head_dim) for part in range(3))
    probs = _head_scores(qkv_ref, bias_ref, head, width, head_dim, scale)
    d_out = d_out_ref[0, :, q_cols]  # the output's lanes of this head: those of its query
    d_probs = dot_in_float32(d_out, qkv_ref[0, :, v_cols], NT)  # dP~
    dropped = probs
    if rate > 0.0:
      keep_scale = _dropout_scale(keys_ref, head, num_heads, seq_len, rate)
      dropped = probs * keep_scale
      d_probs = d_probs * keep_scale
    d_v = dot_in_float32(dropped.astype(low), d_out, TN)
    delta = (probs * d_probs).sum(axis=-1, keepdims=True)
    d_scores = (probs * (d_probs - delta)).astype(low)
    d_q = dot_in_float32(d_scores, qkv_ref[0, :, k_cols], NN) * scale
    d_k = dot_in_float32(d_scores, qkv_ref[0, :, q_cols], TN) * scale
    for cols, grad in ((q_cols, d_q), (k_cols, d_k), (v_cols, d_v)):
      d_qkv_ref[0, :, cols] = grad.astype(d_qkv_ref.dtype)


def _hash_ops(rate: float) -> int:
  """Vector ops per score of `keep_mask`: index (2 iotas, 2 multiply-adds), two hashes of 9 ops
  and 2 xors, the shift and compare, the select and the product with P: 28; none without
  dropout."""
  return 28 if rate > 0.0 else 0


def fwd_cost(batch: int, seq_len: int, num_heads: int, head_dim: int, itemsize: int,
             rate: float) -> pl.CostEstimate:
  """The forward kernel over its grid (one sequence per step; every block read once, since each
  block index changes every step).

  bytes: qkv [B, T, 3H] read and the output written, 4 * B*T*H*itemsize, and the bias, B*T*4.
  flops: per head two matmuls, 2 * 2*T*T*D, and per score 7 (scale, bias, max, subtract, sum,
  divide, the cast) plus the dropout mask's `_hash_ops`; transcendentals: one exp per score.
  """
  scores = batch * num_heads * seq_len * seq_len
  width = num_heads * head_dim
  return pl.CostEstimate(
      flops=4 * scores * head_dim + (7 + _hash_ops(rate)) * scores,
      transcendentals=scores,
      bytes_accessed=4 * batch * seq_len * width * itemsize + batch * seq_len * 4)


def bwd_cost(batch: int, seq_len: int, num_heads: int, head_dim: int, itemsize: int,
             rate: float) -> pl.CostEstimate:
  """The backward kernel over its grid (one sequence per step, every block read once).

  bytes: qkv and dO read, d_qkv written, 7 * B*T*H*itemsize, and the bias, B*T*4.
  flops: per head five matmuls (S again, dP~, dv, dq, dk), 5 * 2*T*T*D, and per score 7 for
  the softmax again, 6 for delta and dS (product, sum, subtract, product, cast, the cast of P~),
  plus the mask's `_hash_ops` and its product with dP~; transcendentals: one exp per score.
  """
  scores = batch * num_heads * seq_len * seq_len
  width = num_heads * head_dim
  return pl.CostEstimate(
      flops=10 * scores * head_dim + (13 + _hash_ops(rate) + (1 if rate > 0 else 0)) * scores,
      transcendentals=scores,
      bytes_accessed=7 * batch * seq_len * width * itemsize + batch * seq_len * 4)


def _sequence_spec(seq_len: int, width: int):
  return pl.BlockSpec((1, seq_len, width), lambda b: (b, 0, 0))


def _keys_spec():
  return pl.BlockSpec(memory_space=pltpu.SMEM)


def _local_fwd(keys_3, qkv_BxTx3H, bias_Bx1xT, num_heads, rate, interpret):
  batch, seq_len, width = qkv_BxTx3H.shape[0], qkv_BxTx3H.shape[1], qkv_BxTx3H.shape[2] // 3
  return pl.pallas_call(
      functools.partial(_fwd_kernel, num_heads=num_heads, rate=rate),
      grid=(batch,),
      in_specs=[_keys_spec(), _sequence_spec(seq_len, 3 * width),
                pl.BlockSpec((1, 1, seq_len), lambda b: (b, 0, 0))],
      out_specs=_sequence_spec(seq_len, width),
      out_shape=jax.ShapeDtypeStruct((batch, seq_len, width), qkv_BxTx3H.dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      cost_estimate=fwd_cost(batch, seq_len, num_heads, width // num_heads,
                             qkv_BxTx3H.dtype.itemsize, rate),
      interpret=interpret,
  )(keys_3, qkv_BxTx3H, bias_Bx1xT)


def _local_bwd(keys_3, qkv_BxTx3H, bias_Bx1xT, d_out_BxTxH, num_heads, rate, interpret):
  batch, seq_len, width = d_out_BxTxH.shape
  return pl.pallas_call(
      functools.partial(_bwd_kernel, num_heads=num_heads, rate=rate),
      grid=(batch,),
      in_specs=[_keys_spec(), _sequence_spec(seq_len, 3 * width),
                pl.BlockSpec((1, 1, seq_len), lambda b: (b, 0, 0)),
                _sequence_spec(seq_len, width)],
      out_specs=_sequence_spec(seq_len, 3 * width),
      out_shape=jax.ShapeDtypeStruct(qkv_BxTx3H.shape, qkv_BxTx3H.dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      cost_estimate=bwd_cost(batch, seq_len, num_heads, width // num_heads,
                             qkv_BxTx3H.dtype.itemsize, rate),
      interpret=interpret,
  )(keys_3, qkv_BxTx3H, bias_Bx1xT, d_out_BxTxH)


# ----------------------------------------------------------------------------- per device
# As fused_logsumexp: a kernel is opaque to XLA's partitioner, so under the step's mesh each
# device runs it on its own sequences (jax.shard_map over the batch axes); the keys gain the
# device's first global sequence, so the masks do not depend on the split.

def _per_device(fn, sharding, keys_2, *batched):
  """fn(keys_3, *batched) -> one array [B, ...], on each device's sequences: `sharding` is
  (mesh, the batch's PartitionSpec), or None for the whole batch."""
  if sharding is None:
    keys_3 = jnp.concatenate([keys_2, jnp.zeros((1,), jnp.int32)])
    return fn(keys_3, *batched, interpret=run_in_interpret_mode(None))
  mesh, batch = sharding
  interpret = run_in_interpret_mode(mesh)
  axes = batch[0] if isinstance(batch[0], tuple) else (batch[0],)

  def local(keys, *arrays):
    first = jax.lax.axis_index(axes) * arrays[0].shape[0]
    return fn(jnp.concatenate([keys, first[None].astype(jnp.int32)]), *arrays,
              interpret=interpret)

  rows = P(axes)
  return jax.shard_map(local, mesh=mesh, in_specs=(P(), *([rows] * len(batched))),
                       out_specs=rows, check_vma=False)(keys_2, *batched)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def pallas_attention(qkv_BxTx3H: Array, mask_bias_BxT: Array, keys_2: Array, num_heads: int,
                     rate: float = 0.0, sharding: tuple | None = None) -> Array:
  """Multi-head attention softmax(q k^T / sqrt(D) + bias) v with dropout `rate` on the
  probabilities, by Pallas TPU kernels (on other backends the same kernels in interpret mode,
  for tests). qkv: [B, T, 3H], the queries, keys and values side by side, each [B, T, H] with
  its heads side by side (H = num_heads * D, as [B, T, N, D] flattened); the result [B, T, H]
  in qkv's dtype. Flat, so that no [..., N, D] array with D < 128 is padded to the TPU's 128
  lanes or re-laid out around the kernel, and one array, so that the three projections are one
  product forward and backward with nothing sliced or joined between it and the kernels.

  mask_bias_BxT: float32 additive bias of each key (0, or -1e9 for padding). keys_2: two int32
  keys of the dropout mask (`keep_mask`), unused when rate is 0. `sharding`: (the step's mesh,
  the batch's PartitionSpec); each device runs the kernels on its own sequences (without it,
  under a sharded jit XLA would gather the batch to every device)."""
  return _attention(qkv_BxTx3H, mask_bias_BxT, keys_2, num_heads, rate, sharding)


def _bias_Bx1xT(mask_bias_BxT):
  return mask_bias_BxT.astype(jnp.float32)[:, None, :]


def _attention(qkv, mask_bias_BxT, keys_2, num_heads, rate, sharding):
  fwd = functools.partial(_local_fwd, num_heads=num_heads, rate=rate)
  return _per_device(fwd, sharding, keys_2.astype(jnp.int32), qkv, _bias_Bx1xT(mask_bias_BxT))


def _attention_fwd(qkv, mask_bias_BxT, keys_2, num_heads, rate, sharding):
  out = _attention(qkv, mask_bias_BxT, keys_2, num_heads, rate, sharding)
  return out, (qkv, mask_bias_BxT, keys_2)


def _attention_bwd(num_heads, rate, sharding, residuals, d_out):
  qkv, mask_bias_BxT, keys_2 = residuals
  bwd = functools.partial(_local_bwd, num_heads=num_heads, rate=rate)
  d_qkv = _per_device(bwd, sharding, keys_2.astype(jnp.int32), qkv, _bias_Bx1xT(mask_bias_BxT),
                      d_out.astype(qkv.dtype))
  return d_qkv, jnp.zeros_like(mask_bias_BxT), None


pallas_attention.defvjp(_attention_fwd, _attention_bwd)


def reference_attention(qkv_BxTx3H: Array, mask_bias_BxT: Array, keys_2: Array,
                        num_heads: int, rate: float = 0.0) -> Array:
  """The same function in plain jnp, differentiated by jax (tests): [B, N, T, T] scores in
  HBM, the same dropout mask."""
  b, t, width = qkv_BxTx3H.shape[0], qkv_BxTx3H.shape[1], qkv_BxTx3H.shape[2] // 3
  n, d = num_heads, width // num_heads
  low = qkv_BxTx3H.dtype
  q, k, v = (qkv_BxTx3H[:, :, i * width:(i + 1) * width].reshape(b, t, n, d).astype(jnp.float32)
             for i in range(3))
  scores = jnp.einsum("btnd,bsnd->bnts", q, k) / math.sqrt(d)
  probs = jax.nn.softmax(scores + mask_bias_BxT[:, None, None, :].astype(jnp.float32), axis=-1)
  if rate > 0.0:
    keys = keys_2.astype(jnp.int32)
    first = _first_index(jnp.arange(b, dtype=jnp.int32)[:, None], jnp.arange(n)[None, :], n, t)
    masks = jax.vmap(jax.vmap(lambda f: keep_mask(keys[0], keys[1], f, (t, t), rate)))(first)
    probs = jnp.where(masks, probs / (1.0 - rate), 0.0)
  out = jnp.einsum("bnts,bsnd->btnd", probs.astype(low).astype(jnp.float32), v)
  return out.reshape(b, t, width).astype(low)
