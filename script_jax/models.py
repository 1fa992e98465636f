"""The ELECTRA/BERT encoder in Flax Linen, and the two pretraining models built from it.

`MaskedLM` is BERT with the tied softmax output layer W; SCRIPT and MLM both train it, so their
parameter trees are identical (SCRIPT adds no parameter: the critic is derived from W, eqs. 4-5).
`ElectraPretrainer` is ELECTRA's generator + discriminator with shared embeddings.

Shapes: B batch, T sequence length, P predictions per sequence, E embedding size, H hidden size,
V vocabulary size, N = number of heads.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from script_jax import fused_attention, random_bits

Array = jax.Array
_LN_EPS = 1e-12  # BERT's LayerNorm epsilon


class Dropout(nn.Module):
  """flax.linen.Dropout with the mask drawn by random_bits: the same mask, faster on CPU.

  Same class name, so the same auto-names (Dropout_0, ...) and so the same `make_rng` keys as
  nn.Dropout: models, checkpoints and the random stream are unchanged.
  """
  rate: float

  @nn.compact
  def __call__(self, inputs: Array, deterministic: bool) -> Array:
    if self.rate == 0.0 or deterministic:
      return inputs
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)
    keep_prob = 1.0 - self.rate
    keep = random_bits.bernoulli(self.make_rng("dropout"), keep_prob, inputs.shape)
    return jax.lax.select(keep, inputs / keep_prob, jnp.zeros_like(inputs))


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Sizes of one transformer encoder (Table 4 of the paper)."""
  vocab_size: int
  embedding_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  dtype: str = "float32"
  remat: bool = False
  scan_layers: bool = False  # one scanned layer with stacked [L, ...] parameters
  # The softmax layer's rows are padded to a multiple of this (TPU/GPU tiles are 128 wide);
  # the pad columns are masked out of every softmax, logsumexp and sample (mask_vocab_padding).
  vocab_pad_multiple: int = 1
  # Query, key and value as one [H, 3, N, D] matmul (the same three parameters, stacked at run
  # time): one GEMM, one bias reduction and one input gradient instead of three.
  fused_qkv: bool = False
  attention_impl: str = "xla"  # "pallas": fused_attention.pallas_attention
  initializer_range: float = 0.02  # BERT's; tiny models need more to learn attention quickly
  # With scan_layers: a function of one layer's parameters applied where the scan uses them
  # (FSDP's per-layer gather, sharding.LayerGather); set by the train step, never by a config.
  layer_params_at_use: Any = None
  # The embeddings' lookups in place of jnp.take, (table [V, E], ids [B, T]) -> [B, T, E], with
  # .for_every_sequence(table, positions [T], B): under FSDP, lookups whose gradients go straight
  # into each table's shards (sharding.ShardedLookup); set by the train step, never by a config.
  lookup: Any = None
  # (the step's mesh, the batch's PartitionSpec), for kernels that run on each device's
  # sequences (attention_impl="pallas"); set by the train and evaluation steps
  # (sharding.for_the_step), never by a config.
  kernel_sharding: Any = None

  @property
  def kernel_init(self):
    """The weights' initializer (BERT's truncated normal); not Flax's Module.init."""
    return nn.initializers.truncated_normal(stddev=self.initializer_range)

  @property
  def padded_vocab_size(self) -> int:
    m = max(1, self.vocab_pad_multiple)
    return -(-self.vocab_size // m) * m

  @property
  def compute_dtype(self) -> Any:
    return jnp.dtype(self.dtype)

  def num_params(self, with_embeddings: bool = True) -> int:
    """Analytic parameter count of this encoder with its MLM head (for the start-up log)."""
    v, e, h, f, l = (self.padded_vocab_size, self.embedding_size, self.hidden_size,
                     self.intermediate_size, self.num_layers)
    emb = (v + self.max_position_embeddings + self.type_vocab_size) * e + 2 * e
    proj = (e * h + h) if e != h else 0
    layer = 4 * (h * h + h) + 2 * h + (h * f + f) + (f * h + h) + 2 * h
    head = h * e + e + 2 * e + v
    return (emb if with_embeddings else 0) + proj + l * layer + head


def encoder_config_from(model_config, **overrides) -> EncoderConfig:
  """Builds an EncoderConfig from `config.model` (an ml_collections.ConfigDict)."""
  fields = {f.name for f in dataclasses.fields(EncoderConfig)}
  values = {k: model_config[k] for k in fields if k in model_config}
  values.update(overrides)
  return EncoderConfig(**values)


def float32_product(lhs: Array, rhs: Array, dimension_numbers, precision=None,
                    preferred_element_type=None) -> Array:
  """The dense layers' product: activations (lhs) times a float32 parameter (rhs, cast to the
  activations' dtype for the product), accumulated into a float32 result (callers cast it to
  the compute dtype; `as_stored` keeps Flax from casting kernel and bias first).

  Its gradient is written out (`_product_bwd`) so that in a bfloat16 run the weight gradient
  never passes through bfloat16: XLA places the data-parallel all-reduce (or FSDP's
  reduce-scatter) on each weight gradient's per-device partial sums and moves it past a convert,
  so with the autodiff of a bfloat16 product, or of a cast parameter, the gradient is summed
  across devices in bfloat16, at 8 bits of mantissa. The activation gradient stays in the
  compute dtype. In float32 runs these are autodiff's own products.
  """
  del preferred_element_type
  return _product(lhs, rhs, tuple(map(lambda d: tuple(map(tuple, d)), dimension_numbers)),
                  precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _product(lhs: Array, rhs: Array, dimension_numbers, precision) -> Array:
  return jax.lax.dot_general(lhs, rhs.astype(lhs.dtype), dimension_numbers, precision=precision,
                             preferred_element_type=jnp.float32)


def _product_fwd(lhs, rhs, dimension_numbers, precision):
  return _product(lhs, rhs, dimension_numbers, precision), (lhs, rhs)


def _product_bwd(dimension_numbers, precision, residuals, g):
  # The transposes of the two linear maps, autodiff's own products (no forward recomputed).
  lhs, rhs = residuals
  low = lhs.dtype
  (d_lhs,) = jax.linear_transpose(
      lambda l: jax.lax.dot_general(l, rhs.astype(low), dimension_numbers, precision=precision),
      jax.ShapeDtypeStruct(lhs.shape, low))(g.astype(low))
  (d_rhs,) = jax.linear_transpose(
      lambda r: jax.lax.dot_general(lhs.astype(jnp.float32), r, dimension_numbers,
                                    precision=precision),
      jax.ShapeDtypeStruct(rhs.shape, jnp.float32))(g.astype(jnp.float32))
  return d_lhs, d_rhs.astype(rhs.dtype)


_product.defvjp(_product_fwd, _product_bwd)


def as_stored(*args, dtype=None, inexact=True):
  """Flax's `promote_dtype` hook that casts nothing: `float32_product` takes the kernel as
  stored (float32) and the bias is added to its float32 result."""
  del dtype, inexact
  return args


FLOAT32_DENSE = {"dot_general": float32_product, "promote_dtype": as_stored}


class Embeddings(nn.Module):
  """Word + position + token-type embeddings, LayerNorm and dropout -> [B, T, E]."""
  cfg: EncoderConfig

  def setup(self):
    c = self.cfg
    self.word_embeddings = nn.Embed(c.padded_vocab_size, c.embedding_size, embedding_init=c.kernel_init)
    self.position_embeddings = nn.Embed(c.max_position_embeddings, c.embedding_size,
                                        embedding_init=c.kernel_init)
    self.token_type_embeddings = nn.Embed(c.type_vocab_size, c.embedding_size,
                                          embedding_init=c.kernel_init)
    self.layer_norm = nn.LayerNorm(epsilon=_LN_EPS)
    self.dropout = Dropout(c.dropout_rate)

  def __call__(self, ids_BxT: Array, segment_ids_BxT: Array, deterministic: bool) -> Array:
    positions_T = jnp.arange(ids_BxT.shape[1])
    if self.cfg.lookup is None:
      x_BxTxE = (self.word_embeddings(ids_BxT) + self.position_embeddings(positions_T)[None]
                 + self.token_type_embeddings(segment_ids_BxT))
    else:
      lookup = self.cfg.lookup
      x_BxTxE = (lookup(self.word_embeddings.embedding, ids_BxT)
                 + lookup.for_every_sequence(self.position_embeddings.embedding, positions_T,
                                             ids_BxT.shape[0])
                 + lookup(self.token_type_embeddings.embedding, segment_ids_BxT))
    x_BxTxE = self.layer_norm(x_BxTxE)
    return self.dropout(x_BxTxE, deterministic=deterministic).astype(self.cfg.compute_dtype)

  def table(self) -> Array:
    """The word-embedding matrix [V, E], the tied softmax layer W."""
    return self.word_embeddings.embedding


class _ProjectionParams(nn.Module):
  """nn.DenseGeneral(features)'s kernel [*in_shape, *features] and bias, created exactly as it
  creates them (same names, same draws), returned instead of applied: fused_qkv stacks three of
  them, attention_impl="pallas" uses them flat."""
  features: tuple[int, ...]
  kernel_init: Any

  @nn.compact
  def __call__(self, in_shape: int | tuple[int, ...]) -> tuple[Array, Array]:
    in_shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)
    flat = (int(np.prod(in_shape)), int(np.prod(self.features)))
    kernel = self.param("kernel", lambda rng, shape: self.kernel_init(
        rng, flat, jnp.float32).reshape(shape), (*in_shape, *self.features))
    bias = self.param("bias", lambda rng, shape: jnp.zeros(shape, jnp.float32), self.features)
    return kernel, bias


def softmax_kept_in(scores: Array, dtype: Any) -> Array:
  """softmax over the last axis, computed in float32 and returned in `dtype`, with a gradient
  that keeps only that `dtype` copy: jax.nn.softmax's keeps its float32 output for the backward
  pass, the [B, N, T, T] probabilities that the bfloat16 step reads back most (docs/benchmarks.md
  7.7). The backward pass widens them to float32 again. float32: jax.nn.softmax itself."""
  if jnp.dtype(dtype) == jnp.float32:
    return jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
  return _softmax_kept_in(scores, jnp.dtype(dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _softmax_kept_in(scores: Array, dtype) -> Array:
  return jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(dtype)


def _softmax_kept_in_fwd(scores, dtype):
  probs = _softmax_kept_in(scores, dtype)
  return probs, (probs, jnp.zeros((0,), scores.dtype))


def _softmax_kept_in_bwd(dtype, residuals, g):
  del dtype
  probs, scores_dtype = residuals
  p, g = probs.astype(jnp.float32), g.astype(jnp.float32)
  d_scores = p * (g - jnp.sum(g * p, axis=-1, keepdims=True))
  return (d_scores.astype(scores_dtype.dtype),)


_softmax_kept_in.defvjp(_softmax_kept_in_fwd, _softmax_kept_in_bwd)


def gelu_keeping_input(x: Array) -> Array:
  """The exact GELU, x * Phi(x) (jax.nn.gelu, approximate=False); below float32, with a
  gradient that keeps only its input: autodiff of jax.nn.gelu keeps both x and erf's value, so
  the bfloat16 TPU program wrote two [B, T, 4H] arrays per layer and pass and read both back
  (docs/benchmarks.md 7.11). Its backward pass recomputes Phi(x) + x phi(x) from x, in float32.
  float32: jax.nn.gelu itself (there the TPU program moved more bytes with the recomputation)."""
  if x.dtype == jnp.float32:
    return jax.nn.gelu(x, approximate=False)
  return _gelu_keeping_input(x)


@jax.custom_vjp
def _gelu_keeping_input(x: Array) -> Array:
  return jax.nn.gelu(x, approximate=False)


def _gelu_keeping_input_fwd(x):
  return _gelu_keeping_input(x), x


def _gelu_keeping_input_bwd(x, g):
  x32 = x.astype(jnp.float32)
  cdf = 0.5 * (1.0 + jax.lax.erf(x32 * (1.0 / math.sqrt(2.0))))
  pdf = jnp.exp(-0.5 * x32 * x32) * (1.0 / math.sqrt(2.0 * math.pi))
  return ((g.astype(jnp.float32) * (cdf + x32 * pdf)).astype(x.dtype),)


_gelu_keeping_input.defvjp(_gelu_keeping_input_fwd, _gelu_keeping_input_bwd)


class SelfAttention(nn.Module):
  """Multi-head self-attention with a float32 softmax (its probabilities kept in the compute
  dtype: `softmax_kept_in`), or with attention_impl="pallas" one fused kernel per pass."""
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x_BxTxH: Array, mask_bias_Bx1x1xT: Array, deterministic: bool) -> Array:
    c = self.cfg
    if c.attention_impl == "pallas":
      dropout = not deterministic and c.attention_dropout_rate > 0.0
      return self._fused(x_BxTxH, mask_bias_Bx1x1xT,
                         self.make_rng("dropout") if dropout else None)
    head_dim = c.hidden_size // c.num_heads
    if c.fused_qkv:
      pairs = [_ProjectionParams((c.num_heads, head_dim), c.kernel_init, name=n)(c.hidden_size)
               for n in ("query", "key", "value")]
      w_Hx3xNxD = jnp.stack([w for w, _ in pairs], axis=1)
      b_3xNxD = jnp.stack([b for _, b in pairs])
      x_BxTxH = x_BxTxH.astype(c.compute_dtype)
      qkv_BxTx3xNxD = (float32_product(x_BxTxH, w_Hx3xNxD, (((2,), (0,)), ((), ())))
                       + b_3xNxD).astype(c.compute_dtype)
      q_BxTxNxD, k_BxTxNxD, v_BxTxNxD = (qkv_BxTx3xNxD[:, :, i] for i in range(3))
    else:
      dense = lambda name: nn.DenseGeneral((c.num_heads, head_dim), kernel_init=c.kernel_init,
                                           dtype=c.compute_dtype, name=name, **FLOAT32_DENSE)
      q_BxTxNxD = dense("query")(x_BxTxH).astype(c.compute_dtype)
      k_BxTxNxD = dense("key")(x_BxTxH).astype(c.compute_dtype)
      v_BxTxNxD = dense("value")(x_BxTxH).astype(c.compute_dtype)
    out_BxTxNxD = _xla_attention(c, q_BxTxNxD, k_BxTxNxD, v_BxTxNxD, mask_bias_Bx1x1xT,
                                 deterministic)
    return nn.DenseGeneral(c.hidden_size, axis=(-2, -1), kernel_init=c.kernel_init,
                           dtype=c.compute_dtype, **FLOAT32_DENSE,
                           name="output")(out_BxTxNxD).astype(c.compute_dtype)

  def _fused(self, x_BxTxH: Array, mask_bias_Bx1x1xT: Array, dropout_rng) -> Array:
    """attention_impl="pallas": the same parameters (DenseGeneral's [H, N, D] and [N, D, H]
    kernels) used flat, [H, H], so the heads stay side by side in [B, T, H] arrays: on a TPU a
    [B, T, N, D] array with D = 64 is padded to 128 lanes and re-laid out around a kernel
    (docs/benchmarks.md 7.9). The attention and its dropout by fused_attention's kernels, the
    mask's two keys drawn from `dropout_rng` (None: no dropout)."""
    c = self.cfg
    h, n = c.hidden_size, c.num_heads
    x_BxTxH = x_BxTxH.astype(c.compute_dtype)
    params = [_ProjectionParams((n, h // n), c.kernel_init, name=name)(h)
              for name in ("query", "key", "value")]
    contract = (((2,), (0,)), ((), ()))
    # The three projections as one product whatever model.fused_qkv says: its [B, T, 3H]
    # result is the kernel's operand as it is, and the kernel's gradient the product's.
    w_Hx3H = jnp.concatenate([w.reshape(h, h) for w, _ in params], axis=1)
    b_3H = jnp.concatenate([b.reshape(h) for _, b in params])
    qkv_BxTx3H = (float32_product(x_BxTxH, w_Hx3H, contract) + b_3H).astype(c.compute_dtype)
    rate = c.attention_dropout_rate if dropout_rng is not None else 0.0
    keys_2 = (jax.lax.bitcast_convert_type(random_bits.bits(dropout_rng, (2,)), jnp.int32)
              if rate > 0.0 else jnp.zeros((2,), jnp.int32))
    mask_bias_BxT = mask_bias_Bx1x1xT.reshape(mask_bias_Bx1x1xT.shape[0], -1)
    out_BxTxH = fused_attention.pallas_attention(qkv_BxTx3H, mask_bias_BxT, keys_2, n, rate,
                                                 c.kernel_sharding)
    w_NxDxH, b_H = _ProjectionParams((h,), c.kernel_init, name="output")((n, h // n))
    return (float32_product(out_BxTxH, w_NxDxH.reshape(h, h), contract) + b_H).astype(
        c.compute_dtype)


def _xla_attention(c: EncoderConfig, q_BxTxNxD, k_BxTxNxD, v_BxTxNxD, mask_bias_Bx1x1xT,
                   deterministic: bool) -> Array:
  """The attention as einsums and a float32 softmax that XLA fuses; called inside
  SelfAttention, whose Dropout_0 it creates (the same names and rng stream as before)."""
  head_dim = q_BxTxNxD.shape[-1]
  scores_BxNxTxT = jnp.einsum("btnd,bsnd->bnts", q_BxTxNxD, k_BxTxNxD,
                              preferred_element_type=jnp.float32) / jnp.sqrt(head_dim)
  probs_BxNxTxT = softmax_kept_in(scores_BxNxTxT + mask_bias_Bx1x1xT, c.compute_dtype)
  probs_BxNxTxT = Dropout(c.attention_dropout_rate)(probs_BxNxTxT, deterministic=deterministic)
  return jnp.einsum("bnts,bsnd->btnd", probs_BxNxTxT.astype(c.compute_dtype), v_BxTxNxD)


class TransformerLayer(nn.Module):
  """A post-LayerNorm BERT layer: attention and a GELU feed-forward block, each with residual."""
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x_BxTxH: Array, mask_bias_Bx1x1xT: Array, deterministic: bool) -> Array:
    c = self.cfg
    attn = SelfAttention(c, name="attention")(x_BxTxH, mask_bias_Bx1x1xT, deterministic)
    attn = Dropout(c.dropout_rate)(attn, deterministic=deterministic)
    x_BxTxH = nn.LayerNorm(epsilon=_LN_EPS, dtype=c.compute_dtype, name="attention_norm")(
        x_BxTxH + attn)
    h_BxTxF = nn.Dense(c.intermediate_size, kernel_init=c.kernel_init, dtype=c.compute_dtype,
                       **FLOAT32_DENSE, name="intermediate")(x_BxTxH)
    h_BxTxF = h_BxTxF.astype(c.compute_dtype)
    h_BxTxF = gelu_keeping_input(h_BxTxF)
    h_BxTxH = nn.Dense(c.hidden_size, kernel_init=c.kernel_init, dtype=c.compute_dtype,
                       **FLOAT32_DENSE, name="ffn_output")(h_BxTxF)
    h_BxTxH = h_BxTxH.astype(c.compute_dtype)
    h_BxTxH = Dropout(c.dropout_rate)(h_BxTxH, deterministic=deterministic)
    return nn.LayerNorm(epsilon=_LN_EPS, dtype=c.compute_dtype, name="ffn_norm")(x_BxTxH + h_BxTxH)


class Transformer(nn.Module):
  """Embedding projection (when E != H) and L transformer layers: [B, T, E] -> [B, T, H]."""
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x_BxTxE: Array, input_mask_BxT: Array, deterministic: bool) -> Array:
    c = self.cfg
    if c.embedding_size != c.hidden_size:
      x_BxTxE = nn.Dense(c.hidden_size, kernel_init=c.kernel_init, dtype=c.compute_dtype,
                         **FLOAT32_DENSE, name="embeddings_project")(x_BxTxE)
      x_BxTxE = x_BxTxE.astype(c.compute_dtype)
    # Large negative (not -inf) so a fully padded row stays finite.
    mask_bias_Bx1x1xT = jnp.where(input_mask_BxT[:, None, None, :] > 0, 0.0, -1e9).astype(
        jnp.float32)
    if c.scan_layers:
      # One layer body compiled once and looped L times. With remat, XLA:CPU (which ignores
      # rematerialisation in unrolled code) keeps one layer's activations at a time.
      body = _ScanBody
      if c.layer_params_at_use is not None:
        # Inside remat, so the backward pass gathers each layer again rather than keeping all L.
        body = nn.map_variables(_ScanBody, "params", trans_in_fn=c.layer_params_at_use)
      if c.remat:
        body = nn.remat(body, prevent_cse=False)
      scanned = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True,
                                                                      "dropout": True},
                        in_axes=nn.broadcast, length=c.num_layers)
      x_BxTxE, _ = scanned(c, deterministic, name="layers")(x_BxTxE, mask_bias_Bx1x1xT)
      return x_BxTxE
    layer_cls = TransformerLayer
    if c.remat:
      layer_cls = nn.remat(TransformerLayer, static_argnums=(3,))
    for i in range(c.num_layers):
      x_BxTxE = layer_cls(c, name=f"layer_{i}")(x_BxTxE, mask_bias_Bx1x1xT, deterministic)
    return x_BxTxE


class _ScanBody(nn.Module):
  """One TransformerLayer in nn.scan's (carry, x) -> (carry, y) form."""
  cfg: EncoderConfig
  deterministic: bool

  @nn.compact
  def __call__(self, x_BxTxH: Array, mask_bias_Bx1x1xT: Array):
    return TransformerLayer(self.cfg, name="layer")(x_BxTxH, mask_bias_Bx1x1xT,
                                                    self.deterministic), None


def _is_transformer(tree) -> bool:
  return isinstance(tree, dict) and ("layers" in tree or "layer_0" in tree)


def stack_layers(params):
  """Per-layer parameters (layer_0 ... layer_{L-1}) -> the `scan_layers` layout, in any tree."""
  if not isinstance(params, dict):
    return params
  if _is_transformer(params) and "layer_0" in params:
    names = sorted((k for k in params if k.startswith("layer_")), key=lambda k: int(k[6:]))
    rest = {k: v for k, v in params.items() if k not in names}
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(params[k] for k in names))
    return {**rest, "layers": {"layer": stacked}}
  return {k: stack_layers(v) for k, v in params.items()}


def to_layout(params, scan_layers: bool):
  """`params` in the layout a model with this `model.scan_layers` expects, from either layout."""
  params = unstack_layers(params)
  return stack_layers(params) if scan_layers else params


def unstack_layers(params):
  """The `scan_layers` layout -> per-layer parameters (layer_0 ...), in any tree."""
  if not isinstance(params, dict):
    return params
  if _is_transformer(params) and "layers" in params:
    stacked = params["layers"]["layer"]
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    rest = {k: v for k, v in params.items() if k != "layers"}
    return {**rest, **{f"layer_{i}": jax.tree.map(lambda x, i=i: x[i], stacked)
                       for i in range(num_layers)}}
  return {k: unstack_layers(v) for k, v in params.items()}


class MLMHeadTransform(nn.Module):
  """ELECTRA's MLM head before the tied decoder: dense to E, GELU, LayerNorm."""
  embedding_size: int
  dtype: Any = jnp.float32
  initializer_range: float = 0.02

  @nn.compact
  def __call__(self, h_BxNxH: Array) -> Array:
    x = nn.Dense(self.embedding_size,
                 kernel_init=nn.initializers.truncated_normal(stddev=self.initializer_range),
                 dtype=self.dtype, **FLOAT32_DENSE, name="dense")(h_BxNxH)
    x = x.astype(self.dtype)
    x = gelu_keeping_input(x)
    return nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, name="layer_norm")(x)


@jax.custom_vjp
def tied_logits(features_xE: Array, table_VxE: Array, bias_V: Array) -> Array:
  """Softmax-layer logits s = W e + b in float32 (matmul in the features' dtype).

  The backward is written out (`_tied_logits_bwd`) for two reasons. With low-precision features
  its matmuls run in that dtype too: autodiff alone would multiply the float32 cotangent of the
  logits by W and by e in float32 (TF32 GEMMs on a GPU). And the bias gradient, a column sum of
  the [N, V] cotangent, is a matrix-vector product: XLA:CPU's column reduction over V is far
  slower than the same sum as a dot (docs/benchmarks_log.md sections (e) and (f)).
  """
  return _tied_logits(features_xE, table_VxE, bias_V)


def _tied_logits(features_xE: Array, table_VxE: Array, bias_V: Array) -> Array:
  logits = jnp.einsum("...e,ve->...v", features_xE, table_VxE.astype(features_xE.dtype),
                      preferred_element_type=jnp.float32)
  return logits + bias_V.astype(jnp.float32)


def _tied_logits_fwd(features_xE, table_VxE, bias_V):
  return _tied_logits(features_xE, table_VxE, bias_V), (features_xE, table_VxE, bias_V)


def _tied_logits_bwd(residuals, g_xV):
  features_xE, table_VxE, bias_V = residuals
  low = features_xE.dtype
  # The features' dtype for the operands, float32 accumulation: the forward's precision.
  g_low_xV = g_xV.astype(low)
  g_NxV = g_low_xV.reshape(-1, g_xV.shape[-1])
  features_NxE = features_xE.reshape(-1, features_xE.shape[-1])
  d_features = jnp.einsum("...v,ve->...e", g_low_xV, table_VxE.astype(low),
                          preferred_element_type=jnp.float32).astype(low)
  d_table = jnp.einsum("nv,ne->ve", g_NxV, features_NxE,
                       preferred_element_type=jnp.float32).astype(table_VxE.dtype)
  d_bias = jnp.einsum("nv,n->v", g_NxV, jnp.ones(g_NxV.shape[:1], low),
                      preferred_element_type=jnp.float32).astype(bias_V.dtype)
  return d_features, d_table, d_bias


tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)


def mask_vocab_padding(bias_V: Array, vocab_size: int) -> Array:
  """The output bias with the padding columns (ids >= vocab_size) at -1e9: exp() of them is 0,
  so no softmax, logsumexp, argmax or Gumbel-max sample ever sees them, and they get no gradient.
  """
  if bias_V.shape[0] == vocab_size:
    return bias_V
  real = jnp.arange(bias_V.shape[0]) < vocab_size
  return jnp.where(real, bias_V.astype(jnp.float32), -1e9)


def gather_positions(x_BxTxH: Array, positions_BxP: Array) -> Array:
  """x at the given positions of each sequence: [B, T, H], [B, P] -> [B, P, H]."""
  return jnp.take_along_axis(x_BxTxH, positions_BxP[..., None], axis=1)


class MaskedLM(nn.Module):
  """BERT with a tied softmax output layer; the model both SCRIPT and MLM train.

  `__call__` returns the MLM-head features [B, T or P, E]; with `output_embedding()` (W and b)
  these give logits s_t = W e_t + b. Keeping the logits out of the module lets the objectives
  compute them only where needed (masked positions) or in chunks (the critic's logsumexp).
  """
  cfg: EncoderConfig

  def setup(self):
    c = self.cfg
    self.embeddings = Embeddings(c)
    self.encoder = Transformer(c)
    self.mlm_head = MLMHeadTransform(c.embedding_size, c.compute_dtype, c.initializer_range)
    self.output_bias = self.param("output_bias", nn.initializers.zeros, (c.padded_vocab_size,))

  def __call__(self, ids_BxT, segment_ids_BxT, input_mask_BxT, positions_BxP=None,
               deterministic: bool = True):
    """Head features at `positions_BxP` (all positions when None): [B, P or T, E]."""
    hidden_BxTxH = self.encode(ids_BxT, segment_ids_BxT, input_mask_BxT, deterministic)
    if positions_BxP is not None:
      hidden_BxTxH = gather_positions(hidden_BxTxH, positions_BxP)
    return self.mlm_head(hidden_BxTxH)

  def encode(self, ids_BxT, segment_ids_BxT, input_mask_BxT, deterministic: bool = True):
    """The encoder's last hidden states [B, T, H] (what fine-tuning builds on)."""
    x_BxTxE = self.embeddings(ids_BxT, segment_ids_BxT, deterministic)
    return self.encoder(x_BxTxE, input_mask_BxT, deterministic)

  def output_embedding(self):
    """(W [V, E], b [V]) of the tied softmax layer; b is -1e9 on vocabulary padding columns."""
    return self.embeddings.table(), mask_vocab_padding(self.output_bias, self.cfg.vocab_size)


class ElectraPretrainer(nn.Module):
  """ELECTRA: a small MLM generator and a discriminator sharing the embeddings."""
  disc_cfg: EncoderConfig
  gen_cfg: EncoderConfig

  def setup(self):
    self.embeddings = Embeddings(self.disc_cfg)
    self.generator = Transformer(self.gen_cfg)
    g = self.gen_cfg
    self.generator_head = MLMHeadTransform(g.embedding_size, g.compute_dtype, g.initializer_range)
    self.generator_output_bias = self.param("generator_output_bias", nn.initializers.zeros,
                                            (self.gen_cfg.padded_vocab_size,))
    self.discriminator = Transformer(self.disc_cfg)
    self.disc_dense = nn.Dense(self.disc_cfg.hidden_size, kernel_init=self.disc_cfg.kernel_init,
                               dtype=self.disc_cfg.compute_dtype, **FLOAT32_DENSE)
    self.disc_output = nn.Dense(1, kernel_init=self.disc_cfg.kernel_init, dtype=jnp.float32)

  def __call__(self, ids_BxT, segment_ids_BxT, input_mask_BxT, positions_BxP,
               deterministic: bool = True):
    """Both networks on the same input (used for initialisation)."""
    return (self.generate(ids_BxT, segment_ids_BxT, input_mask_BxT, positions_BxP, deterministic),
            self.discriminate(ids_BxT, segment_ids_BxT, input_mask_BxT, deterministic))

  def generate(self, ids_BxT, segment_ids_BxT, input_mask_BxT, positions_BxP,
               deterministic: bool = True):
    """Generator logits at the masked positions: [B, P, V] float32."""
    return tied_logits(*self.generator_features(ids_BxT, segment_ids_BxT, input_mask_BxT,
                                                positions_BxP, deterministic))

  def generator_features(self, ids_BxT, segment_ids_BxT, input_mask_BxT, positions_BxP,
                         deterministic: bool = True):
    """(features [B, P, E] at the masked positions, W [V, E], b [V]) of the generator's tied
    softmax layer (b is -1e9 on vocabulary padding): its logits are tied_logits of them."""
    x_BxTxE = self.embeddings(ids_BxT, segment_ids_BxT, deterministic)
    h_BxTxH = self.generator(x_BxTxE, input_mask_BxT, deterministic)
    features_BxPxE = self.generator_head(gather_positions(h_BxTxH, positions_BxP))
    bias_V = mask_vocab_padding(self.generator_output_bias, self.gen_cfg.vocab_size)
    return features_BxPxE, self.embeddings.table(), bias_V

  def discriminate(self, ids_BxT, segment_ids_BxT, input_mask_BxT, deterministic: bool = True):
    """Discriminator logits of "token is original" [B, T] float32."""
    return self.discriminator_logits(self.encode(ids_BxT, segment_ids_BxT, input_mask_BxT,
                                                 deterministic))

  def encode(self, ids_BxT, segment_ids_BxT, input_mask_BxT, deterministic: bool = True):
    """The discriminator's last hidden states [B, T, H] (what fine-tuning builds on)."""
    x_BxTxE = self.embeddings(ids_BxT, segment_ids_BxT, deterministic)
    return self.discriminator(x_BxTxE, input_mask_BxT, deterministic)

  def discriminator_logits(self, h_BxTxH):
    h = gelu_keeping_input(self.disc_dense(h_BxTxH).astype(self.disc_cfg.compute_dtype))
    return self.disc_output(h.astype(jnp.float32))[..., 0]


def generator_config(config) -> EncoderConfig:
  """ELECTRA's generator: the discriminator's sizes but for hidden, heads, FFN and depth."""
  e = config.electra
  return encoder_config_from(config.model, hidden_size=e.generator_hidden_size,
                             num_heads=e.generator_num_heads,
                             intermediate_size=e.generator_intermediate_size,
                             num_layers=e.generator_num_layers)


def build_model(config) -> nn.Module:
  """The Flax module that `config.objective` trains."""
  disc_cfg = encoder_config_from(config.model)
  if config.objective == "electra":
    return ElectraPretrainer(disc_cfg, generator_config(config))
  return MaskedLM(disc_cfg)
