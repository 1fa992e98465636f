"""The critic's logsumexp over the tied vocabulary without the [N, V] logits in HBM.

lse_n = logsumexp_v (W e_n + b)_v (eqs. 4-5: p(t+|x) = sigmoid(lse)), and its gradient

  d lse_n / d s_nv = p_nv = exp(s_nv - lse_n):   d e = (g p) W,  d W = (g p)^T e,  d b = 1^T (g p)

for a cotangent g [N]. Both formulations below recompute the logits a vocabulary tile at a time
in the backward pass instead of keeping the [N, V] float32 logits (and their float32 gradient)
from the forward pass (Wijmans et al., 2024, "Cut Your Losses in Large-Vocabulary Language
Models"):

  `xla_logsumexp`:    a custom VJP over static vocabulary tiles (an unrolled loop) that XLA fuses:
                      each tile's logits exist only inside that tile's fusions.
  `pallas_logsumexp`: Pallas TPU kernels (forward; backward) with the tile in VMEM, never in HBM.

Precision as `models.tied_logits`: the matmuls in the features' dtype with float32 accumulation,
the logsumexp and p in float32, p cast to the features' dtype for the backward matmuls.
Vocabulary padding (ids >= vocab_size) is excluded by its bias of -1e9 (models.mask_vocab_padding),
as in the plain formula; the tiles' own padding is excluded the same way.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from script_jax import sharding as sharding_lib
from script_jax.pallas_common import NN, NT, TN, dot_in_float32, mix32, run_in_interpret_mode

Array = jax.Array
_PAD_BIAS = -1e9  # the bias of padding columns: exp() of it is 0 (models.mask_vocab_padding)


def _tile_bounds(v: int, tile: int) -> list[tuple[int, int]]:
  """[start, stop) of near-equal vocabulary tiles of at most about `tile` columns, each a multiple
  of 128 wide but the last (V = 30592, tile 4096: seven of 3840 and one of 3712)."""
  num = max(1, -(-v // tile))
  width = -(-(-(-v // num)) // 128) * 128
  return [(start, min(start + width, v)) for start in range(0, v, width)]


# ----------------------------------------------------------------------------- XLA formulation

def _tile_logits(features_xE, table_VxE, bias_V, start, stop):
  low = features_xE.dtype
  logits = jnp.einsum("...e,ve->...v", features_xE, table_VxE[start:stop].astype(low),
                      preferred_element_type=jnp.float32)
  return logits + bias_V[start:stop].astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def xla_logsumexp(features_xE: Array, table_VxE: Array, bias_V: Array, tile: int = 4096) -> Array:
  """logsumexp_v (W e + b)_v over the last axis of the features, float32, in vocabulary tiles of
  about `tile` columns (a static, unrolled loop: the compiler's cost analysis counts every tile).

  Each tile's logsumexp is independent; the tiles' results are combined by one logsumexp over
  the tiles. The backward pass recomputes each tile's logits (see the module docstring).
  """
  return _xla_fwd(features_xE, table_VxE, bias_V, tile)[0]


def _xla_fwd(features_xE, table_VxE, bias_V, tile):
  per_tile = [jax.nn.logsumexp(_tile_logits(features_xE, table_VxE, bias_V, a, b), axis=-1)
              for a, b in _tile_bounds(table_VxE.shape[0], tile)]
  lse = jax.nn.logsumexp(jnp.stack(per_tile, axis=-1), axis=-1)
  return lse, (features_xE, table_VxE, bias_V, lse)


def _xla_bwd(tile, residuals, g):
  features_xE, table_VxE, bias_V, lse = residuals
  low = features_xE.dtype
  features_NxE = features_xE.reshape(-1, features_xE.shape[-1])
  d_features = jnp.zeros(features_xE.shape, jnp.float32)
  d_table, d_bias = [], []
  for a, b in _tile_bounds(table_VxE.shape[0], tile):
    p = jnp.exp(_tile_logits(features_xE, table_VxE, bias_V, a, b) - lse[..., None])
    gp_xV = (p * g[..., None].astype(jnp.float32)).astype(low)
    gp_NxV = gp_xV.reshape(-1, b - a)
    d_features += jnp.einsum("...v,ve->...e", gp_xV, table_VxE[a:b].astype(low),
                             preferred_element_type=jnp.float32)
    d_table.append(jnp.einsum("nv,ne->ve", gp_NxV, features_NxE,
                              preferred_element_type=jnp.float32))
    d_bias.append(jnp.einsum("nv,n->v", gp_NxV, jnp.ones(gp_NxV.shape[:1], low),
                             preferred_element_type=jnp.float32))
  return (d_features.astype(low), jnp.concatenate(d_table).astype(table_VxE.dtype),
          jnp.concatenate(d_bias).astype(bias_V.dtype))


xla_logsumexp.defvjp(_xla_fwd, _xla_bwd)


# ----------------------------------------------------------------------------- Pallas TPU kernels

def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _columns(shape: tuple[int, int], j) -> Array:
  """The vocabulary index of each logit of vocabulary block j: [rows, block_vocab] int32."""
  return j * jnp.int32(shape[1]) + jax.lax.broadcasted_iota(jnp.int32, shape, 1)


def _fwd_kernel(features_ref, table_ref, bias_ref, lse_ref, max_ref, sum_ref):
  """One (row block i, vocabulary block j) step of an online logsumexp over j."""
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _():
    max_ref[...] = jnp.full(max_ref.shape, -jnp.inf, jnp.float32)
    sum_ref[...] = jnp.zeros(sum_ref.shape, jnp.float32)

  features = features_ref[...]
  # The table rounded to the features' dtype in VMEM, as models.tied_logits does in HBM.
  logits = dot_in_float32(features, table_ref[...].astype(features.dtype), NT) + bias_ref[...]
  old_max = max_ref[...]
  new_max = jnp.maximum(old_max, logits.max(axis=1, keepdims=True))
  sum_ref[...] = (sum_ref[...] * jnp.exp(old_max - new_max)
                  + jnp.exp(logits - new_max).sum(axis=1, keepdims=True))
  max_ref[...] = new_max

  @pl.when(j == pl.num_programs(1) - 1)
  def _():
    lse_ref[...] = max_ref[...] + jnp.log(sum_ref[...])


def _bwd_kernel(*refs, block_rows, with_labels):
  """One (vocabulary block j, row block i) step: d_table/d_bias's block j accumulates over i,
  d_features (every row, resident in VMEM for the whole grid) over j. With labels (the MLM
  head's cross-entropy lse - s_label) the logits' gradient is g (p - onehot(label))."""
  if with_labels:
    (features_ref, table_ref, bias_ref, lse_ref, g_ref, labels_ref, d_features_ref, d_table_ref,
     d_bias_ref) = refs
  else:
    (features_ref, table_ref, bias_ref, lse_ref, g_ref, d_features_ref, d_table_ref,
     d_bias_ref) = refs
  j, i = pl.program_id(0), pl.program_id(1)

  @pl.when((j == 0) & (i == 0))
  def _():
    d_features_ref[...] = jnp.zeros(d_features_ref.shape, jnp.float32)

  @pl.when(i == 0)
  def _():
    d_table_ref[...] = jnp.zeros(d_table_ref.shape, jnp.float32)
    d_bias_ref[...] = jnp.zeros(d_bias_ref.shape, jnp.float32)

  features = features_ref[...]
  table = table_ref[...].astype(features.dtype)
  logits = dot_in_float32(features, table, NT) + bias_ref[...]
  probs = jnp.exp(logits - lse_ref[...])
  if with_labels:
    probs = probs - (_columns(logits.shape, j) == labels_ref[...]).astype(jnp.float32)
  gp = (probs * g_ref[...]).astype(features.dtype)
  rows = pl.ds(pl.multiple_of(i * block_rows, block_rows), block_rows)
  d_features_ref[rows, :] += dot_in_float32(gp, table, NN)
  d_table_ref[...] += dot_in_float32(gp, features, TN)
  d_bias_ref[...] += gp.astype(jnp.float32).sum(axis=0, keepdims=True)


def fwd_cost(rows: int, vocab: int, e: int, block_rows: int, block_vocab: int,
             features_itemsize: int, table_itemsize: int) -> pl.CostEstimate:
  """The forward kernel's cost over its grid (rows/block_rows, vocab/block_vocab), padded sizes.

  bytes: Pallas fetches an input block again only when its block index changes between
  consecutive grid steps. The features' block (i, 0) is constant over the inner vocabulary axis:
  read once, rows*e*features_itemsize. The table's block (j, 0) and the bias's (0, j) change
  every step: read once per row block, n_i * vocab * (e*table_itemsize + 4) (once in all when
  there is one vocabulary block). The output lse, rows*4, is written once.
  flops: the matmul, 2*rows*vocab*e, and 5 per logit (bias add, max, subtract, sum, rescale);
  transcendentals: one exp per logit.
  """
  n_i, n_j = rows // block_rows, vocab // block_vocab
  table_reads = n_i if n_j > 1 else 1
  return pl.CostEstimate(
      flops=2 * rows * vocab * e + 5 * rows * vocab, transcendentals=rows * vocab,
      bytes_accessed=(rows * e * features_itemsize + table_reads * vocab * (e * table_itemsize + 4)
                      + rows * 4))


def bwd_cost(rows: int, vocab: int, e: int, block_rows: int, block_vocab: int,
             features_itemsize: int, table_itemsize: int) -> pl.CostEstimate:
  """The backward kernel's cost over its grid (vocab/block_vocab, rows/block_rows), padded sizes.

  bytes: the features' block (i, 0), lse's and g's change on the inner row axis: read once per
  vocabulary block, n_j * rows * (e*features_itemsize + 8) (once in all when there is one row
  block). The table's and the bias's block j: read once, vocab * (e*table_itemsize + 4).
  Written once each: d_features (resident for the whole grid) rows*e*4, d_table and d_bias
  vocab*(e*4 + 4).
  flops: three matmuls (the logits again, d_features, d_table), 3 * 2*rows*vocab*e, and 6 per
  logit (bias add, subtract, times g, cast, the bias gradient's sum, its conversion);
  transcendentals: one exp per logit.
  """
  n_i, n_j = rows // block_rows, vocab // block_vocab
  row_reads = n_j if n_i > 1 else 1
  return pl.CostEstimate(
      flops=6 * rows * vocab * e + 6 * rows * vocab, transcendentals=rows * vocab,
      bytes_accessed=(row_reads * rows * (e * features_itemsize + 8)
                      + vocab * (e * table_itemsize + 4) + rows * e * 4 + vocab * (e * 4 + 4)))


# d_features stays in VMEM for a whole backward call: at most this many bytes of it per call
# (v3's VMEM is 16 MiB), more rows in several calls.
_RESIDENT_BYTES = 4 * 2**20


def _vocab_block(v: int, block_vocab: int) -> int:
  """The vocabulary block: the widest multiple of 128 up to block_vocab that divides V (30592 =
  128 * 239: 128), so the table and bias go to the kernel as they are, without a padded copy;
  block_vocab when none does (V is then padded)."""
  for width in range(block_vocab // 128 * 128, 0, -128):
    if v % width == 0:
      return width
  return min(block_vocab, _round_up(v, 128))


# A row block's features (widened to float32 in VMEM for the matmul, dot_in_float32) at most this
# many elements: 2048 rows at small's E = 128, 336 at base's 768, where 2048 rows took 17.4 MiB
# of a v3's 16 MiB of VMEM and 680 rows 16.5 (compiled ahead of time).
_ROW_BLOCK_ELEMENTS = 2 ** 18


def _rows_block(n: int, block_rows: int, e: int) -> int:
  """The row block: block_rows, fewer where E is wide (VMEM), all rows (a multiple of 8) when
  there are fewer."""
  widest = max(8, _ROW_BLOCK_ELEMENTS // e // 8 * 8)
  return min(block_rows, widest, _round_up(n, 8))


def _operands(features_xE, table_VxE, bias_V, block_rows, block_vocab):
  """[rows, E] features, [vocab, E] table, [1, vocab] float32 bias, padded to whole blocks where
  needed: padded rows are zeros, padded vocabulary columns zero rows with bias -1e9."""
  e = features_xE.shape[-1]
  features_NxE = features_xE.reshape(-1, e)
  n, v = features_NxE.shape[0], table_VxE.shape[0]
  rows, vocab = _round_up(n, block_rows), _round_up(v, block_vocab)
  if rows > n:
    features_NxE = jnp.pad(features_NxE, ((0, rows - n), (0, 0)))
  bias = bias_V.astype(jnp.float32)
  if vocab > v:
    table_VxE = jnp.pad(table_VxE, ((0, vocab - v), (0, 0)))
    bias = jnp.pad(bias, (0, vocab - v), constant_values=_PAD_BIAS)
  return features_NxE, table_VxE, bias[None, :]


def _local_lse(features_BxTxE, table_VxE, bias_V, block_rows, block_vocab, interpret):
  """The forward kernel over one device's rows: lse [B, T] float32."""
  n, v = math.prod(features_BxTxE.shape[:-1]), table_VxE.shape[0]
  bn, bv = _rows_block(n, block_rows, features_BxTxE.shape[-1]), _vocab_block(v, block_vocab)
  features, table, bias = _operands(features_BxTxE, table_VxE, bias_V, bn, bv)
  (rows, e), vocab = features.shape, table.shape[0]
  lse = pl.pallas_call(
      _fwd_kernel,
      grid=(rows // bn, vocab // bv),
      in_specs=[pl.BlockSpec((bn, e), lambda i, j: (i, 0)),
                pl.BlockSpec((bv, e), lambda i, j: (j, 0)),
                pl.BlockSpec((1, bv), lambda i, j: (0, j))],
      out_specs=pl.BlockSpec((bn, 1), lambda i, j: (i, 0)),
      out_shape=jax.ShapeDtypeStruct((rows, 1), jnp.float32),
      scratch_shapes=[pltpu.VMEM((bn, 1), jnp.float32), pltpu.VMEM((bn, 1), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      cost_estimate=fwd_cost(rows, vocab, e, bn, bv, features.dtype.itemsize,
                             table.dtype.itemsize),
      interpret=interpret,
  )(features, table, bias)
  return lse[:n, 0].reshape(features_BxTxE.shape[:-1])


def _bwd_call(features, table, bias, lse_Nx1, g_Nx1, labels_Nx1, bn, bv, interpret):
  """(d_features [rows, E], d_table [vocab, E], d_bias [1, vocab]), float32, for one group of
  rows (a multiple of bn) and the whole (padded) vocabulary; labels_Nx1 None or int32."""
  (rows, e), vocab = features.shape, table.shape[0]
  row_block = pl.BlockSpec((bn, 1), lambda j, i: (i, 0))
  with_labels = labels_Nx1 is not None
  return pl.pallas_call(
      functools.partial(_bwd_kernel, block_rows=bn, with_labels=with_labels),
      grid=(vocab // bv, rows // bn),
      in_specs=[pl.BlockSpec((bn, e), lambda j, i: (i, 0)),
                pl.BlockSpec((bv, e), lambda j, i: (j, 0)),
                pl.BlockSpec((1, bv), lambda j, i: (0, j)),
                row_block, row_block] + [row_block] * with_labels,
      out_specs=[pl.BlockSpec((rows, e), lambda j, i: (0, 0)),
                 pl.BlockSpec((bv, e), lambda j, i: (j, 0)),
                 pl.BlockSpec((1, bv), lambda j, i: (0, j))],
      out_shape=[jax.ShapeDtypeStruct((rows, e), jnp.float32),
                 jax.ShapeDtypeStruct((vocab, e), jnp.float32),
                 jax.ShapeDtypeStruct((1, vocab), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary", "arbitrary")),
      cost_estimate=bwd_cost(rows, vocab, e, bn, bv, features.dtype.itemsize,
                             table.dtype.itemsize),
      interpret=interpret,
  )(features, table, bias, lse_Nx1, g_Nx1, *([labels_Nx1] if with_labels else []))


def _local_grads(features_BxTxE, table_VxE, bias_V, lse_BxT, g_BxT, block_rows, block_vocab,
                 interpret, labels_BxT=None):
  """The backward kernel over one device's rows: d_features in the features' dtype, and this
  device's d_table and d_bias in float32 (summed over devices before they are cast)."""
  n, v = math.prod(features_BxTxE.shape[:-1]), table_VxE.shape[0]
  bn, bv = _rows_block(n, block_rows, features_BxTxE.shape[-1]), _vocab_block(v, block_vocab)
  features, table, bias = _operands(features_BxTxE, table_VxE, bias_V, bn, bv)
  rows, e = features.shape
  column = lambda x: jnp.pad(x.reshape(-1).astype(jnp.float32), (0, rows - n))[:, None]
  lse_Nx1, g_Nx1 = column(lse_BxT), column(g_BxT)
  labels_Nx1 = None if labels_BxT is None else jnp.pad(
      labels_BxT.reshape(-1).astype(jnp.int32), (0, rows - n), constant_values=-1)[:, None]
  group = max(1, _RESIDENT_BYTES // (e * 4 * bn)) * bn
  d_features, d_table, d_bias = [], 0.0, 0.0
  for start in range(0, rows, group):
    part = slice(start, min(start + group, rows))
    d_f, d_t, d_b = _bwd_call(features[part], table, bias, lse_Nx1[part], g_Nx1[part],
                              None if labels_Nx1 is None else labels_Nx1[part], bn, bv, interpret)
    d_features.append(d_f)
    d_table, d_bias = d_table + d_t, d_bias + d_b
  d_features = jnp.concatenate(d_features) if len(d_features) > 1 else d_features[0]
  return (d_features[:n].reshape(features_BxTxE.shape).astype(features_BxTxE.dtype),
          d_table[:v], d_bias[0, :v])


# ----------------------------------------------------------------------------- per device
# A kernel is opaque to XLA's partitioner, which would gather the whole batch onto every device
# to run it. Under the step's mesh, jax.shard_map runs it on each device's rows (the batch split
# as sharding.batch_spec; table and bias whole on every device) and sums d_table and d_bias over
# the batch axes in float32, as the plain formula's partitioned matmul does.

def _batch_axes(mesh) -> tuple[str, ...]:
  axes = sharding_lib.batch_spec(mesh)[0]
  return axes if isinstance(axes, tuple) else (axes,)


def _lse(features_BxTxE, table_VxE, bias_V, block_rows, block_vocab, mesh):
  local = functools.partial(_local_lse, block_rows=block_rows, block_vocab=block_vocab,
                            interpret=run_in_interpret_mode(mesh))
  if mesh is None:
    return local(features_BxTxE, table_VxE, bias_V)
  rows = P(_batch_axes(mesh))
  return jax.shard_map(local, mesh=mesh, in_specs=(rows, P(), P()), out_specs=rows,
                       check_vma=False)(features_BxTxE, table_VxE, bias_V)


def _grads(features_BxTxE, table_VxE, bias_V, lse_BxT, g_BxT, block_rows, block_vocab, mesh,
           labels_BxT=None):
  interpret = run_in_interpret_mode(mesh)
  axes = () if mesh is None else _batch_axes(mesh)

  def local(features, table, bias, lse, g, *labels):
    d_features, d_table, d_bias = _local_grads(features, table, bias, lse, g, block_rows,
                                               block_vocab, interpret, *labels)
    if axes:  # float32 sums over the batch, cast after
      d_table, d_bias = jax.lax.psum((d_table, d_bias), axes)
    return d_features, d_table.astype(table.dtype), d_bias.astype(bias.dtype)

  labels = () if labels_BxT is None else (labels_BxT,)
  if mesh is None:
    return local(features_BxTxE, table_VxE, bias_V, lse_BxT, g_BxT, *labels)
  rows = P(axes)
  return jax.shard_map(local, mesh=mesh,
                       in_specs=(rows, P(), P(), rows, rows, *[rows] * len(labels)),
                       out_specs=(rows, P(), P()), check_vma=False)(
                           features_BxTxE, table_VxE, bias_V, lse_BxT, g_BxT, *labels)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def pallas_logsumexp(features_BxTxE: Array, table_VxE: Array, bias_V: Array,
                     block_rows: int = 2048, block_vocab: int = 256,
                     mesh: jax.sharding.Mesh | None = None) -> Array:
  """logsumexp_v (W e + b)_v at every position of [B, T, E] features: [B, T] float32, by Pallas
  TPU kernels (on other backends the same kernels in interpret mode, for tests).

  `mesh`: the step's mesh, whose data-parallel axes split the batch (sharding.batch_spec): each
  device runs the kernels on its own rows (jax.shard_map) and d_table, d_bias are summed over
  those axes in float32. Without a mesh the kernels see the whole batch (under a sharded jit
  XLA would gather it to every device). The table goes to the kernels in its own dtype and is
  rounded to the features' in VMEM. Blocks: rows (block_rows) x vocabulary (the widest
  multiple of 128 up to block_vocab that divides V).
  """
  return _lse(features_BxTxE, table_VxE, bias_V, block_rows, block_vocab, mesh)


def _pallas_fwd(features_BxTxE, table_VxE, bias_V, block_rows, block_vocab, mesh):
  lse = _lse(features_BxTxE, table_VxE, bias_V, block_rows, block_vocab, mesh)
  return lse, (features_BxTxE, table_VxE, bias_V, lse)


def _pallas_bwd(block_rows, block_vocab, mesh, residuals, g_BxT):
  return _grads(*residuals, g_BxT, block_rows, block_vocab, mesh)


pallas_logsumexp.defvjp(_pallas_fwd, _pallas_bwd)


# ----------------------------------------------------------------------------- the MLM head
# At the masked positions the MLM head needs, per position n, the cross-entropy lse_n - s_{n,y}
# (y the original token), whether argmax_v s_nv = y (accuracy) and a Gumbel-max sample
# argmax_v (s_nv / tau + G_nv) (SCRIPT's and ELECTRA's replacements). One forward kernel computes
# all of them from each logits tile in VMEM; the backward is the kernel above with the one-hot
# of y. The Gumbel noise G is a counter-based hash of (global row, vocabulary index) under two
# keys (pallas_common.mix32), not jax.random's stream: the same distribution, other draws.

_INT_MAX = 2 ** 31 - 1


def gumbel_noise(key1: Array, key2: Array, rows_Nx1: Array, columns_NxV: Array) -> Array:
  """G = -log(-log(u)), u in (0, 1) from the top 24 bits of hash(hash(hash(row ^ key1) ^ column)
  ^ key2): [N, V] float32 for int32 global row and vocabulary indices."""
  bits = mix32(mix32(mix32(rows_Nx1 ^ key1) ^ columns_NxV) ^ key2)
  uniform = (jax.lax.shift_right_logical(bits, jnp.int32(8)).astype(jnp.float32) + 0.5) * 2.0 ** -24
  return -jnp.log(-jnp.log(uniform))


def _running_argmax(values, columns, best_ref, index_ref):
  """Fold one tile's first argmax per row into the running (best value, its index): a later
  tile wins only when strictly greater, so ties keep the first index, as jnp.argmax."""
  tile_best = values.max(axis=1, keepdims=True)
  tile_index = jnp.min(jnp.where(values == tile_best, columns, _INT_MAX), axis=1, keepdims=True)
  take = tile_best > best_ref[...]
  index_ref[...] = jnp.where(take, tile_index, index_ref[...])
  best_ref[...] = jnp.where(take, tile_best, best_ref[...])


def _head_fwd_kernel(keys_ref, features_ref, table_ref, bias_ref, labels_ref,
                     lse_ref, target_ref, argmax_ref, sample_ref,
                     max_ref, sum_ref, target_acc_ref, best_ref, best_index_ref, noisy_ref,
                     noisy_index_ref, *, temperature, vocab_size, sample):
  """One (row block i, vocabulary block j) step: the online logsumexp, the label's logit, the
  running argmax of the logits and (with `sample`) of the noisy logits over j."""
  i, j = pl.program_id(0), pl.program_id(1)

  @pl.when(j == 0)
  def _():
    for ref, value in ((max_ref, -jnp.inf), (sum_ref, 0.0), (target_acc_ref, 0.0),
                       (best_ref, -jnp.inf), (noisy_ref, -jnp.inf)):
      ref[...] = jnp.full(ref.shape, value, jnp.float32)
    best_index_ref[...] = jnp.zeros(best_index_ref.shape, jnp.int32)
    noisy_index_ref[...] = jnp.zeros(noisy_index_ref.shape, jnp.int32)

  features = features_ref[...]
  logits = dot_in_float32(features, table_ref[...].astype(features.dtype), NT) + bias_ref[...]
  columns = _columns(logits.shape, j)
  old_max = max_ref[...]
  new_max = jnp.maximum(old_max, logits.max(axis=1, keepdims=True))
  sum_ref[...] = (sum_ref[...] * jnp.exp(old_max - new_max)
                  + jnp.exp(logits - new_max).sum(axis=1, keepdims=True))
  max_ref[...] = new_max
  target_acc_ref[...] += jnp.where(columns == labels_ref[...], logits, 0.0).sum(axis=1,
                                                                                 keepdims=True)
  _running_argmax(logits, columns, best_ref, best_index_ref)
  if sample:
    rows = (keys_ref[2] + i * jnp.int32(logits.shape[0])
            + jax.lax.broadcasted_iota(jnp.int32, (logits.shape[0], 1), 0))
    noisy = logits / temperature + gumbel_noise(keys_ref[0], keys_ref[1], rows, columns)
    _running_argmax(jnp.where(columns < vocab_size, noisy, -jnp.inf), columns, noisy_ref,
                    noisy_index_ref)

  @pl.when(j == pl.num_programs(1) - 1)
  def _():
    lse_ref[...] = max_ref[...] + jnp.log(sum_ref[...])
    target_ref[...] = target_acc_ref[...]
    argmax_ref[...] = best_index_ref[...]
    sample_ref[...] = noisy_index_ref[...]


def head_fwd_cost(rows: int, vocab: int, e: int, block_rows: int, block_vocab: int,
                  features_itemsize: int, table_itemsize: int, sample: bool) -> pl.CostEstimate:
  """The head's forward kernel over its grid: `fwd_cost`'s reads, and four [rows] outputs
  written instead of one (plus the labels read, rows*4). flops: per logit also the label's
  compare and select and the argmax's max, compare, select and min (6), and with `sample` the
  noise's three hashes (27), the scale and add, the padding select and the argmax again (8);
  transcendentals: per logit one exp, and with `sample` two logs."""
  base = fwd_cost(rows, vocab, e, block_rows, block_vocab, features_itemsize, table_itemsize)
  logits = rows * vocab
  return pl.CostEstimate(
      flops=base.flops + (6 + (35 if sample else 0)) * logits,
      transcendentals=logits * (3 if sample else 1),
      bytes_accessed=base.bytes_accessed + rows * 4 * 4)


def _local_head(keys_3, features_BxPxE, table_VxE, bias_V, labels_BxP, temperature, vocab_size,
                sample, block_rows, block_vocab, interpret):
  """The head's forward kernel over one device's rows: (lse, label logit) float32 and (argmax,
  sample) int32, each [B, P]."""
  n, v = math.prod(features_BxPxE.shape[:-1]), table_VxE.shape[0]
  bn, bv = _rows_block(n, block_rows, features_BxPxE.shape[-1]), _vocab_block(v, block_vocab)
  features, table, bias = _operands(features_BxPxE, table_VxE, bias_V, bn, bv)
  (rows, e), vocab = features.shape, table.shape[0]
  labels = jnp.pad(labels_BxP.reshape(-1).astype(jnp.int32), (0, rows - n),
                   constant_values=-1)[:, None]
  row_block = pl.BlockSpec((bn, 1), lambda i, j: (i, 0))
  column = lambda dtype: jax.ShapeDtypeStruct((rows, 1), dtype)
  outputs = pl.pallas_call(
      functools.partial(_head_fwd_kernel, temperature=temperature, vocab_size=vocab_size,
                        sample=sample),
      grid=(rows // bn, vocab // bv),
      in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM),
                pl.BlockSpec((bn, e), lambda i, j: (i, 0)),
                pl.BlockSpec((bv, e), lambda i, j: (j, 0)),
                pl.BlockSpec((1, bv), lambda i, j: (0, j)),
                row_block],
      out_specs=[row_block] * 4,
      out_shape=[column(jnp.float32), column(jnp.float32), column(jnp.int32),
                 column(jnp.int32)],
      scratch_shapes=([pltpu.VMEM((bn, 1), jnp.float32)] * 3
                      + [pltpu.VMEM((bn, 1), jnp.float32), pltpu.VMEM((bn, 1), jnp.int32)] * 2),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      cost_estimate=head_fwd_cost(rows, vocab, e, bn, bv, features.dtype.itemsize,
                                  table.dtype.itemsize, sample),
      interpret=interpret,
  )(keys_3, features, table, bias, labels)
  shape = features_BxPxE.shape[:-1]
  return tuple(x[:n, 0].reshape(shape) for x in outputs)


def _head(features_BxPxE, table_VxE, bias_V, labels_BxP, keys_2, temperature, vocab_size, sample,
          block_rows, block_vocab, mesh):
  local = functools.partial(_local_head, temperature=temperature, vocab_size=vocab_size,
                            sample=sample, block_rows=block_rows, block_vocab=block_vocab,
                            interpret=run_in_interpret_mode(mesh))
  keys_2 = keys_2.astype(jnp.int32)
  if mesh is None:
    return local(jnp.concatenate([keys_2, jnp.zeros((1,), jnp.int32)]), features_BxPxE,
                 table_VxE, bias_V, labels_BxP)
  axes = _batch_axes(mesh)

  def per_device(keys, features, table, bias, labels):
    # The device's first global row, so that the noise does not depend on the split.
    first = jax.lax.axis_index(axes) * math.prod(labels.shape)
    return local(jnp.concatenate([keys, first[None].astype(jnp.int32)]), features, table, bias,
                 labels)

  rows = P(axes)
  return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), rows, P(), P(), rows),
                       out_specs=(rows,) * 4, check_vma=False)(
                           keys_2, features_BxPxE, table_VxE, bias_V, labels_BxP)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10))
def pallas_mlm_head(features_BxPxE: Array, table_VxE: Array, bias_V: Array, labels_BxP: Array,
                    keys_2: Array, temperature: float = 1.0, vocab_size: int | None = None,
                    sample: bool = True, block_rows: int = 512, block_vocab: int = 256,
                    mesh: jax.sharding.Mesh | None = None) -> tuple[Array, Array, Array]:
  """The MLM head at the masked positions without the [B, P, V] logits in HBM: (nll [B, P]
  float32 = lse - s_label, differentiable in features, table and bias; argmax [B, P] int32, the
  first most likely token; sample [B, P] int32, argmax over the first vocab_size tokens of
  s / temperature + Gumbel noise (`gumbel_noise` under the two int32 keys_2), zeros without
  `sample`). Precision, blocks and `mesh` as `pallas_logsumexp`."""
  lse, target, argmax, sampled = _head(features_BxPxE, table_VxE, bias_V, labels_BxP, keys_2,
                                       temperature, vocab_size or table_VxE.shape[0], sample,
                                       block_rows, block_vocab, mesh)
  return lse - target, argmax, sampled


def _head_fwd(features_BxPxE, table_VxE, bias_V, labels_BxP, keys_2, temperature, vocab_size,
              sample, block_rows, block_vocab, mesh):
  lse, target, argmax, sampled = _head(features_BxPxE, table_VxE, bias_V, labels_BxP, keys_2,
                                       temperature, vocab_size or table_VxE.shape[0], sample,
                                       block_rows, block_vocab, mesh)
  return (lse - target, argmax, sampled), (features_BxPxE, table_VxE, bias_V, labels_BxP, lse)


def _head_bwd(temperature, vocab_size, sample, block_rows, block_vocab, mesh, residuals,
              cotangents):
  del temperature, vocab_size, sample
  features_BxPxE, table_VxE, bias_V, labels_BxP, lse = residuals
  grads = _grads(features_BxPxE, table_VxE, bias_V, lse, cotangents[0], block_rows, block_vocab,
                 mesh, labels_BxP)
  return (*grads, None, None)


pallas_mlm_head.defvjp(_head_fwd, _head_bwd)
