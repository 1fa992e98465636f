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
fit in VMEM at BERT's lengths (T <= 512), so each grid step holds one sequence's keys and values
and a block of its queries (Tq = 128), and loops over the heads in groups filling 128 lanes; the
backward kernel sums dk and dv over the query blocks in float32 scratch. Both are needed for a
v3's 16 MiB of VMEM at T = 512 (base's 12 heads of 64, compiled ahead of time): with the heads
unrolled the backward kernel needed 27.2 MiB at query blocks of 128 (each unrolled head kept
its own temporaries), with the head loop over whole sequences 23.3.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from script_jax.pallas_common import NN, NT, TN, dot_in_float32, mix32, run_in_interpret_mode

Array = jax.Array

# ----------------------------------------------------------------------------- the dropout mask

_KEEP_BITS = 24  # the keep test compares the hash's top 24 bits with rate * 2**24


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
  bits = jax.lax.shift_right_logical(mix32(mix32(index ^ key1) ^ key2),
                                     jnp.int32(32 - _KEEP_BITS))
  return bits >= jnp.int32(keep_threshold(rate))


def _first_index(sequence: Array, head: int, num_heads: int, seq_len: int) -> Array:
  """The flat index of score (0, 0) of (sequence, head) in [B, N, T, T] (wraps past 2**31:
  only its bits matter)."""
  return (sequence * jnp.int32(num_heads) + head) * jnp.int32(seq_len * seq_len)


# ----------------------------------------------------------------------------- the kernels

def head_group_width(width: int, head_dim: int) -> int:
  """Lanes of the heads a kernel's loop handles per iteration: the fewest whole heads filling
  whole 128-lane tiles (Mosaic loads and stores at a loop-dependent lane offset only at multiples
  of 128: error E2003), or all heads in one iteration where no such group divides H."""
  lanes = math.lcm(head_dim, 128)
  return lanes if width % lanes == 0 else width


def _lanes(part: int, group, group_width: int, width: int) -> pl.Slice:
  """The lanes of one head group's queries (part 0), keys (1) or values (2) in a [T, 3H] block;
  `group` is the loop's index, or a Python int (static lanes, any offset)."""
  start = part * width + group * group_width
  if isinstance(group, int):
    return slice(start, start + group_width)
  return pl.ds(pl.multiple_of(start, group_width), group_width)


def _for_each_group(num_groups: int, body) -> None:
  """body(group) for each head group, as a loop, not unrolled: Mosaic gives every unrolled head
  its own VMEM temporaries (about 1.8 MB per head at T = 512: a v3's 16 MiB held 8 heads of
  base's 12)."""
  if num_groups == 1:  # static lanes: a group narrower than 128 lanes sits at any offset
    body(0)
  else:
    jax.lax.fori_loop(0, num_groups, lambda group, carry: (body(group), carry)[1], 0)


def default_query_block(seq_len: int) -> int:
  """Queries per grid step: 128 where it divides T, else the whole sequence."""
  return 128 if seq_len % 128 == 0 else seq_len


def _query_rows(block: int) -> pl.Slice:
  """This grid step's query rows in a whole-sequence block."""
  return pl.ds(pl.multiple_of(pl.program_id(1) * block, block), block)


def _probs(q, k, bias, scale):
  """P = softmax(q k^T scale + bias) [Tq, T] float32 for one head."""
  scores = dot_in_float32(q, k, NT) * scale + bias
  exps = jnp.exp(scores - scores.max(axis=-1, keepdims=True))
  return exps / exps.sum(axis=-1, keepdims=True)


def _dropout_scale(keys_ref, first_of_block, head, shapes, rate):
  """K [Tq, T] float32: 1/(1 - rate) where the score is kept, 0 where dropped. first_of_block:
  the flat index of this grid step's first score in head 0 (`_first_of_block`)."""
  first = first_of_block + head * jnp.int32(shapes.seq_len * shapes.seq_len)
  keep = keep_mask(keys_ref[0], keys_ref[1], first, (shapes.block, shapes.seq_len), rate)
  return jnp.where(keep, jnp.float32(1.0 / (1.0 - rate)), jnp.float32(0.0))


class _Shapes:
  """What a kernel reads off its blocks: T, H, the head size and the head groups."""

  def __init__(self, qkv_ref, num_heads: int, block: int):
    self.seq_len, self.width = qkv_ref.shape[1], qkv_ref.shape[2] // 3
    self.block, self.num_heads = block, num_heads
    self.head_dim = self.width // num_heads
    self.scale = 1.0 / math.sqrt(self.head_dim)
    self.group_width = head_group_width(self.width, self.head_dim)
    self.heads_per_group = self.group_width // self.head_dim
    self.num_groups = self.width // self.group_width

  def first_of_block(self, keys_ref):
    """The flat index of this grid step's first score of head 0 (read outside the heads' loop:
    Pallas's interpret mode does not take program_id inside one)."""
    sequence = keys_ref[2] + pl.program_id(0)
    return (_first_index(sequence, 0, self.num_heads, self.seq_len)
            + pl.program_id(1) * jnp.int32(self.block * self.seq_len))

  def heads(self, group):
    """(global head index, its lanes within the group) for each head of a group."""
    d = self.head_dim
    return [(group * self.heads_per_group + h, slice(h * d, (h + 1) * d))
            for h in range(self.heads_per_group)]


def _fwd_kernel(keys_ref, qkv_ref, bias_ref, out_ref, *, num_heads, rate):
  shapes = _Shapes(qkv_ref, num_heads, out_ref.shape[1])
  rows = _query_rows(shapes.block)
  first = shapes.first_of_block(keys_ref)
  gw, width = shapes.group_width, shapes.width

  def one_group(group):
    q = qkv_ref[0, rows, _lanes(0, group, gw, width)]
    k = qkv_ref[0, :, _lanes(1, group, gw, width)]
    v = qkv_ref[0, :, _lanes(2, group, gw, width)]
    outs = []
    for head, lanes in shapes.heads(group):
      probs = _probs(q[:, lanes], k[:, lanes], bias_ref[0], shapes.scale)
      if rate > 0.0:
        probs = probs * _dropout_scale(keys_ref, first, head, shapes, rate)
      # P~ rounded to the compute dtype before the product, as the XLA path's probabilities.
      outs.append(dot_in_float32(probs.astype(v.dtype), v[:, lanes], NN))
    out_ref[0, :, _lanes(0, group, gw, width)] = jnp.concatenate(outs, -1).astype(out_ref.dtype)
  _for_each_group(shapes.num_groups, one_group)


def _bwd_kernel(keys_ref, qkv_ref, bias_ref, d_out_ref, d_qkv_ref, d_kv_sum_ref, *, num_heads,
                rate):
  """One block of queries: dq of its rows; its dk and dv added into d_kv_sum_ref [T, 2H] float32,
  written out after the sequence's last block (d_qkv's block stays in VMEM over them)."""
  shapes = _Shapes(qkv_ref, num_heads, d_out_ref.shape[1])
  rows = _query_rows(shapes.block)
  first = shapes.first_of_block(keys_ref)
  gw, width = shapes.group_width, shapes.width
  low = qkv_ref.dtype

  @pl.when(pl.program_id(1) == 0)
  def _():
    d_kv_sum_ref[...] = jnp.zeros_like(d_kv_sum_ref)

  def one_group(group):
    q = qkv_ref[0, rows, _lanes(0, group, gw, width)]
    k = qkv_ref[0, :, _lanes(1, group, gw, width)]
    v = qkv_ref[0, :, _lanes(2, group, gw, width)]
    d_out = d_out_ref[0, :, _lanes(0, group, gw, width)]  # the output's lanes: the queries'
    d_qs, d_ks, d_vs = [], [], []
    for head, lanes in shapes.heads(group):
      probs = _probs(q[:, lanes], k[:, lanes], bias_ref[0], shapes.scale)
      d_probs = dot_in_float32(d_out[:, lanes], v[:, lanes], NT)  # dP~
      dropped = probs
      if rate > 0.0:
        keep_scale = _dropout_scale(keys_ref, first, head, shapes, rate)
        dropped = probs * keep_scale
        d_probs = d_probs * keep_scale
      delta = (probs * d_probs).sum(axis=-1, keepdims=True)
      d_scores = (probs * (d_probs - delta)).astype(low)
      d_qs.append(dot_in_float32(d_scores, k[:, lanes], NN) * shapes.scale)
      d_ks.append(dot_in_float32(d_scores, q[:, lanes], TN) * shapes.scale)
      d_vs.append(dot_in_float32(dropped.astype(low), d_out[:, lanes], TN))
    d_qkv_ref[0, rows, _lanes(0, group, gw, width)] = (
        jnp.concatenate(d_qs, -1).astype(d_qkv_ref.dtype))
    # dk and dv in the scratch's lanes [0, 2H): those of qkv's [H, 3H) shifted by H.
    for part, grads in ((0, d_ks), (1, d_vs)):
      d_kv_sum_ref[:, _lanes(part, group, gw, width)] += jnp.concatenate(grads, -1)
  _for_each_group(shapes.num_groups, one_group)

  @pl.when(pl.program_id(1) == pl.num_programs(1) - 1)
  def _():
    d_qkv_ref[0, :, width:] = d_kv_sum_ref[...].astype(d_qkv_ref.dtype)


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
  """A whole sequence, the same block for each of its query blocks (read once)."""
  return pl.BlockSpec((1, seq_len, width), lambda b, i: (b, 0, 0))


def _query_block_spec(block: int, width: int):
  return pl.BlockSpec((1, block, width), lambda b, i: (b, i, 0))


def _bias_spec(seq_len: int):
  return pl.BlockSpec((1, 1, seq_len), lambda b, i: (b, 0, 0))


def _grid(batch: int, seq_len: int, block: int) -> tuple[int, int]:
  if seq_len % block:
    raise ValueError(f"the query block ({block}) must divide the sequence length ({seq_len})")
  return batch, seq_len // block


def _keys_spec():
  return pl.BlockSpec(memory_space=pltpu.SMEM)


def _local_fwd(keys_3, qkv_BxTx3H, bias_Bx1xT, num_heads, rate, block, interpret):
  batch, seq_len, width = qkv_BxTx3H.shape[0], qkv_BxTx3H.shape[1], qkv_BxTx3H.shape[2] // 3
  return pl.pallas_call(
      functools.partial(_fwd_kernel, num_heads=num_heads, rate=rate),
      grid=_grid(batch, seq_len, block),
      in_specs=[_keys_spec(), _sequence_spec(seq_len, 3 * width), _bias_spec(seq_len)],
      out_specs=_query_block_spec(block, width),
      out_shape=jax.ShapeDtypeStruct((batch, seq_len, width), qkv_BxTx3H.dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
      cost_estimate=fwd_cost(batch, seq_len, num_heads, width // num_heads,
                             qkv_BxTx3H.dtype.itemsize, rate),
      interpret=interpret,
  )(keys_3, qkv_BxTx3H, bias_Bx1xT)


def _local_bwd(keys_3, qkv_BxTx3H, bias_Bx1xT, d_out_BxTxH, num_heads, rate, block, interpret):
  batch, seq_len, width = d_out_BxTxH.shape
  return pl.pallas_call(
      functools.partial(_bwd_kernel, num_heads=num_heads, rate=rate),
      grid=_grid(batch, seq_len, block),
      in_specs=[_keys_spec(), _sequence_spec(seq_len, 3 * width), _bias_spec(seq_len),
                _query_block_spec(block, width)],
      out_specs=_sequence_spec(seq_len, 3 * width),
      out_shape=jax.ShapeDtypeStruct(qkv_BxTx3H.shape, qkv_BxTx3H.dtype),
      scratch_shapes=[pltpu.VMEM((seq_len, 2 * width), jnp.float32)],
      # The query blocks of a sequence add into one scratch: in order, on one core.
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def pallas_attention(qkv_BxTx3H: Array, mask_bias_BxT: Array, keys_2: Array, num_heads: int,
                     rate: float = 0.0, sharding: tuple | None = None,
                     query_block: int | None = None) -> Array:
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
  under a sharded jit XLA would gather the batch to every device). `query_block`: queries per
  grid step, dividing T (default: `default_query_block`); the results do not depend on it."""
  return _attention(qkv_BxTx3H, mask_bias_BxT, keys_2, num_heads, rate, sharding, query_block)


def _bias_Bx1xT(mask_bias_BxT):
  return mask_bias_BxT.astype(jnp.float32)[:, None, :]


def _attention(qkv, mask_bias_BxT, keys_2, num_heads, rate, sharding, query_block):
  block = query_block or default_query_block(qkv.shape[1])
  fwd = functools.partial(_local_fwd, num_heads=num_heads, rate=rate, block=block)
  return _per_device(fwd, sharding, keys_2.astype(jnp.int32), qkv, _bias_Bx1xT(mask_bias_BxT))


def _attention_fwd(qkv, mask_bias_BxT, keys_2, num_heads, rate, sharding, query_block):
  out = _attention(qkv, mask_bias_BxT, keys_2, num_heads, rate, sharding, query_block)
  return out, (qkv, mask_bias_BxT, keys_2)


def _attention_bwd(num_heads, rate, sharding, query_block, residuals, d_out):
  qkv, mask_bias_BxT, keys_2 = residuals
  block = query_block or default_query_block(qkv.shape[1])
  bwd = functools.partial(_local_bwd, num_heads=num_heads, rate=rate, block=block)
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
