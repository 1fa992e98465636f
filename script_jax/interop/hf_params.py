"""Our parameter trees <-> HuggingFace ELECTRA/BERT state dicts, in NumPy (no torch needed).

One table of entries says where each of our parameters lives in a HuggingFace model and how its
array is laid out there; `to_hf` and `from_hf` walk it in the two directions, so export and
import can never disagree. Names, for layer i (prefix `electra.` or `bert.`):

  ours (per-layer layout)                          HuggingFace                         transform
  embeddings/word_embeddings/embedding [Vp, E]     embeddings.word_embeddings.weight   rows [:V]
  embeddings/{position,token_type}_embeddings      embeddings.*.weight                 as is
  embeddings/layer_norm/{scale,bias}               embeddings.LayerNorm.{weight,bias}  as is
  <encoder>/embeddings_project (E != H)            embeddings_project (ELECTRA only)   kernel.T
  layer_i/attention/{query,key,value} [H, N, D]    encoder.layer.i.attention.self.*    [N*D, H]
  layer_i/attention/output [N, D, H]               ...attention.output.dense           [H, N*D]
  layer_i/attention_norm                           ...attention.output.LayerNorm
  layer_i/intermediate, layer_i/ffn_output         ...intermediate.dense, ...output.dense
  layer_i/ffn_norm                                 ...output.LayerNorm

Heads: the tied MLM head (ours `mlm_head` + `output_bias`; ELECTRA's generator_predictions +
generator_lm_head.bias, BERT's cls.predictions.transform + cls.predictions.bias; the decoder
weight is the word embeddings in all three), and ELECTRA's discriminator head (disc_dense,
disc_output -> discriminator_predictions.dense, .dense_prediction). Our discriminator outputs
the logit of "token is original", HuggingFace's the logit of "token is replaced" (its labels:
1 = replaced): the output layer is negated on the way across.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import numpy as np

FAMILIES = ("electra", "bert")

# The MLM head's HuggingFace names per family: (dense, LayerNorm, output bias).
_MLM_HEAD = {
    "electra": ("generator_predictions.dense", "generator_predictions.LayerNorm",
                "generator_lm_head.bias"),
    "bert": ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
             "cls.predictions.bias"),
}
DISC_HEAD = ("discriminator_predictions.dense", "discriminator_predictions.dense_prediction")


class Entry(NamedTuple):
  """One parameter: its path in our tree, its HuggingFace name, and how the array maps."""
  ours: tuple[str, ...]
  hf: str
  kind: str  # a key of _TO_HF


class Dims(NamedTuple):
  """The sizes the transforms need."""
  vocab_size: int
  padded_vocab_size: int
  num_heads: int
  head_dim: int
  hidden_size: int


def _pad_rows(x, rows: int):
  return np.concatenate([x, np.zeros((rows - x.shape[0],) + x.shape[1:], x.dtype)])


# ours -> HuggingFace, and back. Each keeps float32 and never copies more than needed.
_TO_HF = {
    "copy": lambda x, d: x,
    "dense": lambda x, d: x.T,  # Flax kernel [in, out] -> torch Linear weight [out, in]
    "heads_in": lambda x, d: x.reshape(x.shape[0], -1).T,  # [H, N, D] -> [N*D, H]
    "heads_bias": lambda x, d: x.reshape(-1),  # [N, D] -> [N*D]
    "heads_out": lambda x, d: x.reshape(-1, x.shape[-1]).T,  # [N, D, H] -> [H, N*D]
    "vocab": lambda x, d: x[:d.vocab_size],  # vocabulary padding stripped
    "neg_dense": lambda x, d: -x.T,  # "original" logit -> HuggingFace's "replaced" logit
    "neg": lambda x, d: -x,
}
_FROM_HF = {
    "copy": lambda x, d: x,
    "dense": lambda x, d: x.T,
    "heads_in": lambda x, d: x.T.reshape(x.shape[1], d.num_heads, d.head_dim),
    "heads_bias": lambda x, d: x.reshape(d.num_heads, d.head_dim),
    "heads_out": lambda x, d: x.T.reshape(d.num_heads, d.head_dim, x.shape[0]),
    "vocab": lambda x, d: _pad_rows(x, d.padded_vocab_size),  # pad rows: zeros, masked out
    "neg_dense": lambda x, d: -x.T,
    "neg": lambda x, d: -x,
}


def dims_of(cfg) -> Dims:
  """Dims of a models.EncoderConfig."""
  return Dims(cfg.vocab_size, cfg.padded_vocab_size, cfg.num_heads,
              cfg.hidden_size // cfg.num_heads, cfg.hidden_size)


def _dense(ours: tuple[str, ...], hf: str, kernel_kind: str = "dense",
           bias_kind: str = "copy") -> list[Entry]:
  return [Entry(ours + ("kernel",), hf + ".weight", kernel_kind),
          Entry(ours + ("bias",), hf + ".bias", bias_kind)]


def _norm(ours: tuple[str, ...], hf: str) -> list[Entry]:
  return [Entry(ours + ("scale",), hf + ".weight", "copy"),
          Entry(ours + ("bias",), hf + ".bias", "copy")]


def encoder_entries(cfg, family: str, embeddings: Sequence[str] = ("embeddings",),
                    encoder: Sequence[str] = ("encoder",)) -> list[Entry]:
  """The embeddings and transformer layers of `cfg` (a models.EncoderConfig).

  `embeddings` and `encoder` are the paths of the two subtrees in ours (the ELECTRA generator's
  transformer is ("generator",)). BERT has no E -> H projection: E must equal H.
  """
  if family not in FAMILIES:
    raise ValueError(f"family {family!r}: use one of {FAMILIES}")
  emb, enc, p = tuple(embeddings), tuple(encoder), f"{family}."
  entries = [
      Entry(emb + ("word_embeddings", "embedding"), p + "embeddings.word_embeddings.weight",
            "vocab"),
      Entry(emb + ("position_embeddings", "embedding"),
            p + "embeddings.position_embeddings.weight", "copy"),
      Entry(emb + ("token_type_embeddings", "embedding"),
            p + "embeddings.token_type_embeddings.weight", "copy"),
      *_norm(emb + ("layer_norm",), p + "embeddings.LayerNorm"),
  ]
  if cfg.embedding_size != cfg.hidden_size:
    if family == "bert":
      raise ValueError(f"BERT's layout has no embedding projection: it needs embedding_size == "
                       f"hidden_size, not {cfg.embedding_size} and {cfg.hidden_size}")
    entries += _dense(enc + ("embeddings_project",), p + "embeddings_project")
  for i in range(cfg.num_layers):
    ours, hf = enc + (f"layer_{i}",), f"{p}encoder.layer.{i}."
    for name in ("query", "key", "value"):
      entries += _dense(ours + ("attention", name), hf + f"attention.self.{name}", "heads_in",
                        "heads_bias")
    entries += _dense(ours + ("attention", "output"), hf + "attention.output.dense", "heads_out")
    entries += _norm(ours + ("attention_norm",), hf + "attention.output.LayerNorm")
    entries += _dense(ours + ("intermediate",), hf + "intermediate.dense")
    entries += _dense(ours + ("ffn_output",), hf + "output.dense")
    entries += _norm(ours + ("ffn_norm",), hf + "output.LayerNorm")
  return entries


def mlm_head_entries(family: str, head: Sequence[str] = ("mlm_head",),
                     bias: Sequence[str] = ("output_bias",)) -> list[Entry]:
  """The MLM head before the tied decoder, and the decoder's bias (vocabulary padding stripped)."""
  dense, norm, out_bias = _MLM_HEAD[family]
  head = tuple(head)
  return [*_dense(head + ("dense",), dense), *_norm(head + ("layer_norm",), norm),
          Entry(tuple(bias), out_bias, "vocab")]


def disc_head_entries() -> list[Entry]:
  """ELECTRA's discriminator head; the output layer changes sign (see the module docstring)."""
  dense, prediction = DISC_HEAD
  return [*_dense(("disc_dense",), dense),
          *_dense(("disc_output",), prediction, "neg_dense", "neg")]


# ----------------------------------------------------------------------------- the two directions

def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def to_hf(params, entries: list[Entry], dims: Dims) -> dict[str, np.ndarray]:
  """HuggingFace tensors (float32, contiguous) from our parameters (per-layer layout)."""
  out = {}
  for e in entries:
    x = np.asarray(_get(params, e.ours), np.float32)
    out[e.hf] = np.ascontiguousarray(_TO_HF[e.kind](x, dims))
  return out


def expected_hf_shapes(abstract, entries: list[Entry], dims: Dims) -> dict[str, tuple]:
  """The HuggingFace shape of each entry, from our parameters' shapes (no array allocated)."""
  shapes = {}
  for e in entries:
    zeros = np.broadcast_to(np.zeros((), np.float32), tuple(_get(abstract, e.ours).shape))
    shapes[e.hf] = tuple(_TO_HF[e.kind](zeros, dims).shape)
  return shapes


def shape_problems(state: dict[str, Any], entries: list[Entry], abstract, dims: Dims,
                   implied_by: str = "config.json") -> list[str]:
  """One line per tensor that is missing from `state` or has another shape than ours needs."""
  problems = []
  for name, shape in expected_hf_shapes(abstract, entries, dims).items():
    if name not in state:
      problems.append(f"{name}: missing")
    elif tuple(state[name].shape) != shape:
      problems.append(f"{name}: the folder has {tuple(state[name].shape)}, {implied_by} "
                      f"implies {shape}")
  return problems


def from_hf(state: dict[str, Any], entries: list[Entry], dims: Dims,
            into: Optional[dict] = None) -> dict:
  """Our parameter tree (float32 NumPy) from HuggingFace tensors; check shapes first."""
  tree = {} if into is None else into
  for e in entries:
    x = np.asarray(state[e.hf], np.float32)
    _set(tree, e.ours, np.ascontiguousarray(_FROM_HF[e.kind](x, dims)))
  return tree


# ----------------------------------------------------------------------------- the GLUE classifier

# gelu(x) = x * Phi(x) is x itself in float32 from here on (1 - Phi(8) = 6e-16, below float32's
# resolution at 1), in torch's erf-based GELU as in any other.
GELU_IDENTITY_FROM = 8.0


def classifier_to_hf(kernel_HxC, bias_C, last_norm_scale_H, last_norm_bias_H) -> dict:
  """Our classifier head as HuggingFace's ElectraClassificationHead, with the same outputs.

  Ours: logits = W h + b on the first token's final hidden state h. HuggingFace's head is
  out_proj(gelu(dense(h))), one hidden layer more. Its `dense` computes our logits instead,
  each shifted by s_c into the range where GELU is the identity (its first C units; the other
  H - C are zero), and `out_proj` takes the shifts off: out_proj(gelu(W h + s)) = W h + b.
  The shifts hold for every h the model can produce: h is the last LayerNorm's output,
  gamma * z + beta with sum(z) = 0 and sum(z^2) <= H, so by Cauchy-Schwarz
  |W_c . h - W_c . beta| <= sqrt(H) ||v_c - mean(v_c)|| with v_c = W_c * gamma, and s_c is that
  plus |W_c . beta| plus GELU_IDENTITY_FROM, rounded up to an integer (exact in float32).
  Exact in real arithmetic; in float32 the logits pass through values of the size of s (tens):
  a few 1e-6 of rounding (measured by the tests). In float16/bfloat16 that rounding is
  coarser: keep the head in float32.
  """
  kernel = np.asarray(kernel_HxC, np.float64)
  hidden, classes = kernel.shape
  if classes > hidden:
    raise ValueError(f"{classes} outputs need a hidden size of at least that, not {hidden}")
  scaled_HxC = kernel * np.asarray(last_norm_scale_H, np.float64)[:, None]
  spread_C = np.sqrt(hidden) * np.linalg.norm(scaled_HxC - scaled_HxC.mean(0), axis=0)
  offset_C = np.abs(np.asarray(last_norm_bias_H, np.float64) @ kernel)
  shift_C = np.ceil(spread_C + offset_C + GELU_IDENTITY_FROM)
  dense_w, dense_b = np.zeros((hidden, hidden)), np.zeros(hidden)
  dense_w[:classes], dense_b[:classes] = kernel.T, shift_C
  out_w = np.zeros((classes, hidden))
  out_w[np.arange(classes), np.arange(classes)] = 1.0
  f32 = lambda x: np.ascontiguousarray(x, np.float32)
  return {
      "classifier.dense.weight": f32(dense_w),
      "classifier.dense.bias": f32(dense_b),
      "classifier.out_proj.weight": f32(out_w),
      "classifier.out_proj.bias": f32(np.asarray(bias_C, np.float64) - shift_C),
  }
