"""Sentence scoring: the critic's one-pass pseudo-log-likelihood (eq. 7) and masked-LM PLL.

Two ways to score a sentence x = [x_1, ..., x_n] (natural log, [CLS] x [SEP] fed to the model,
only the n real tokens summed):

  critic  PLL(x) = sum_t log p(t+|x) = sum_t log sigmoid(logsumexp_v s_tv)     (eqs. 5 and 7)
          one forward pass per sentence. For an ELECTRA checkpoint the discriminator's own
          p(original) is used: sum_t log sigmoid(d_t).
  mlm     PLL(x) = sum_t log p(x_t | x with x_t replaced by [MASK])   (Salazar et al., 2019)
          n forward passes per sentence (one masked copy per token); for SCRIPT and MLM
          checkpoints the tied softmax layer (eqs. 1-2), for ELECTRA its generator.

`critic_pll` and `mlm_token_log_probs` are the pure, jitted functions. `Scorer` tokenizes, adds
[CLS]/[SEP], buckets sentences by length (powers of two up to the model's maximum length) and
batches them, so each (batch, bucket) shape compiles once; results come back in input order.

Sentences longer than the model's maximum length (config.seq_len tokens including [CLS] and
[SEP]) follow `long`:
  "error"     (default) raise ScoringError naming the sentence (the input line),
  "truncate"  score the first max_len - 2 tokens only (num_tokens says how many were scored),
  "window"    score every token in overlapping windows of max_len - 2 tokens (stride half a
              window); each token is scored once, in the window where it has the most context
              on its narrower side, and every window gets its own [CLS] ... [SEP].
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from script_jax import checkpoints
from script_jax import cli_errors
from script_jax import fs
from script_jax import models
from script_jax import objectives
from script_jax.data import prepared_folder

Array = jax.Array
METHODS = ("critic", "mlm")
LONG_POLICIES = ("error", "truncate", "window")
MIN_BUCKET = 8
# Rows of the critic's [rows, V] logits block at a time: on CPU 2-3x faster than the whole
# [B*T, V] block at once (it stays in cache), and the peak memory stays small for big V.
DEFAULT_LOGSUMEXP_CHUNK = 256


class ScoringError(cli_errors.UserError):
  """Bad scoring input (a sentence too long, a bad workdir or file); the message says why."""


# ----------------------------------------------------------------------------- pure functions

def critic_token_log_probs(params, ids_BxT: Array, input_mask_BxT: Array, *, model,
                           logsumexp_chunk: int = 0, logsumexp_impl: str = "plain") -> Array:
  """log p(t+|x) at every position, [B, T] float32 (eq. 5 in log form).

  SCRIPT/MLM (MaskedLM): log sigmoid(logsumexp_v s_tv) with s_t = W e_t + b, the self-critic.
  ELECTRA (ElectraPretrainer): log sigmoid(d_t), the discriminator's logit of "original".
  """
  segment_ids_BxT = jnp.zeros_like(ids_BxT)
  variables = {"params": params}
  if isinstance(model, models.ElectraPretrainer):
    disc_logit_BxT = model.apply(variables, ids_BxT, segment_ids_BxT, input_mask_BxT,
                                 method=model.discriminate)
    return jax.nn.log_sigmoid(disc_logit_BxT.astype(jnp.float32))
  features_BxTxE = model.apply(variables, ids_BxT, segment_ids_BxT, input_mask_BxT)
  table_VxE, bias_V = model.apply(variables, method=model.output_embedding)
  lse_BxT = objectives.critic_logsumexp(features_BxTxE, table_VxE, bias_V, logsumexp_chunk,
                                        logsumexp_impl)
  log_p_pos_BxT, _ = objectives.critic_log_probs(lse_BxT)
  return log_p_pos_BxT


@functools.partial(jax.jit, static_argnames=("model", "logsumexp_chunk", "logsumexp_impl"))
def critic_pll(params, ids_BxT: Array, input_mask_BxT: Array, score_mask_BxT: Array, *, model,
               logsumexp_chunk: int = 0, logsumexp_impl: str = "plain") -> Array:
  """PLL(x) = sum_t log p(t+|x) over the positions in `score_mask` (eq. 7), one pass: [B].

  `score_mask_BxT` marks the real tokens of each sentence (not [CLS], [SEP] or padding).
  """
  log_p_BxT = critic_token_log_probs(params, ids_BxT, input_mask_BxT, model=model,
                                     logsumexp_chunk=logsumexp_chunk,
                                     logsumexp_impl=logsumexp_impl)
  return jnp.where(score_mask_BxT > 0, log_p_BxT, 0.0).sum(axis=-1)


@functools.partial(jax.jit, static_argnames=("model",))
def mlm_token_log_probs(params, copies_NxT: Array, input_mask_NxT: Array, positions_N: Array,
                        targets_N: Array, *, model) -> Array:
  """log p(x_t | x with x_t masked) for N masked copies, each scored at its one position: [N].

  The masked-LM log-likelihood of eqs. 1-2 with P = 1 prediction per copy; ELECTRA scores with
  its generator.
  """
  segment_ids_NxT = jnp.zeros_like(copies_NxT)
  positions_Nx1 = positions_N[:, None]
  variables = {"params": params}
  if isinstance(model, models.ElectraPretrainer):
    logits_Nx1xV = model.apply(variables, copies_NxT, segment_ids_NxT, input_mask_NxT,
                               positions_Nx1, method=model.generate)
  else:
    features_Nx1xE = model.apply(variables, copies_NxT, segment_ids_NxT, input_mask_NxT,
                                 positions_Nx1)
    table_VxE, bias_V = model.apply(variables, method=model.output_embedding)
    logits_Nx1xV = models.tied_logits(features_Nx1xE, table_VxE, bias_V)
  log_probs_NxV = jax.nn.log_softmax(logits_Nx1xV[:, 0].astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(log_probs_NxV, targets_N[:, None], axis=-1)[:, 0]


def masked_copies(ids_BxT: np.ndarray, score_mask_BxT: np.ndarray, mask_id: int):
  """One copy of a sentence per scored token, that token replaced by [MASK] (vectorised).

  Returns (copies_NxT, rows_N, positions_N, targets_N): N = number of scored tokens, `rows` the
  sentence each copy comes from, `positions` the masked position, `targets` the original token.
  """
  rows_N, positions_N = np.nonzero(score_mask_BxT)
  copies_NxT = ids_BxT[rows_N]
  n = np.arange(len(rows_N))
  targets_N = copies_NxT[n, positions_N].copy()
  copies_NxT[n, positions_N] = mask_id
  return copies_NxT, rows_N.astype(np.int32), positions_N.astype(np.int32), targets_N


# ----------------------------------------------------------------------------- host-side helpers

def bucket_lengths(max_len: int, min_bucket: int = MIN_BUCKET) -> list[int]:
  """Padded lengths: powers of two from `min_bucket` below `max_len`, then `max_len` itself."""
  lengths, length = [], min_bucket
  while length < max_len:
    lengths.append(length)
    length *= 2
  return lengths + [max_len]


def with_special_tokens(token_ids: Sequence[int], cls_id: int, sep_id: int):
  """([CLS] x [SEP] as int32, the score mask: True at the real tokens)."""
  ids = np.asarray([cls_id, *token_ids, sep_id], np.int32)
  score_mask = np.ones(len(ids), bool)
  score_mask[[0, -1]] = False
  return ids, score_mask


def window_spans(num_tokens: int, window: int) -> list[tuple[int, int, np.ndarray]]:
  """Sliding windows over a long sentence: [(start, end, scored token indices)], each token once.

  Windows of `window` tokens with stride window // 2, the last aligned to the end. A token is
  scored in the window where its context on the narrower side is largest (a window edge that is
  the sentence's own start or end costs no context); ties go to the earlier window.
  """
  if num_tokens <= window:
    return [(0, num_tokens, np.arange(num_tokens))]
  stride = max(1, window // 2)
  starts = list(range(0, num_tokens - window, stride)) + [num_tokens - window]
  starts_W = np.asarray(starts)
  i_N = np.arange(num_tokens)[:, None]
  left = np.where(starts_W == 0, num_tokens, i_N - starts_W)
  right = np.where(starts_W + window == num_tokens, num_tokens, starts_W + window - 1 - i_N)
  covered = (i_N >= starts_W) & (i_N < starts_W + window)
  context = np.where(covered, np.minimum(left, right), -1)
  best_N = np.argmax(context, axis=1)  # first maximum: the earlier window
  return [(s, s + window, np.nonzero(best_N == w)[0]) for w, s in enumerate(starts)]


@dataclasses.dataclass
class _Unit:
  """One model input: a sentence (or a window of one), and the tokens it scores."""
  sentence: int
  ids: np.ndarray
  score_mask: np.ndarray


def _pad_rows(rows: list[np.ndarray], length: int, num_rows: int, value) -> np.ndarray:
  out = np.full((num_rows, length), value, dtype=rows[0].dtype)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out


# ----------------------------------------------------------------------------- the scorer

class Scorer:
  """Scores sentences (text or token ids) with a checkpoint's critic or masked-LM PLL.

  `score(texts)` / `score_ids(token_id_lists)` return (pll_N float64, num_tokens_N int64) in
  input order. An empty sentence scores 0.0 with 0 tokens and never reaches the model.
  """

  def __init__(self, model, params, *, special_ids: dict, max_len: int, method: str = "critic",
               batch_size: int = 64, long: str = "error", tokenizer=None,
               logsumexp_chunk: int = DEFAULT_LOGSUMEXP_CHUNK, chunk_sentences: int = 4096):
    if method not in METHODS:
      raise ScoringError(f"Unknown scoring method {method!r}; choose one of {', '.join(METHODS)}.")
    if long not in LONG_POLICIES:
      raise ScoringError(f"Unknown long-sentence policy {long!r}; choose one of "
                         f"{', '.join(LONG_POLICIES)}.")
    if batch_size < 1:
      raise ScoringError(f"batch_size must be at least 1, got {batch_size}.")
    if max_len < 3:
      raise ScoringError(f"max_len must be at least 3 ([CLS] x [SEP]), got {max_len}.")
    self.model, self.params = model, params
    self.method, self.long, self.batch_size = method, long, batch_size
    self.max_len = max_len
    self.special_ids = dict(special_ids)
    self.tokenizer = tokenizer
    self.logsumexp_chunk = logsumexp_chunk
    self.chunk_sentences = chunk_sentences
    self.buckets = bucket_lengths(max_len)

  @classmethod
  def from_workdir(cls, workdir: str, step: Optional[int] = None, **kwargs) -> "Scorer":
    """A Scorer for a pretraining workdir: its latest (or given) checkpoint and its tokenizer."""
    if not fs.isdir(workdir):
      raise ScoringError(f"The workdir {workdir} does not exist.")
    config, model, params = checkpoints.load_pretrained(workdir, step)
    tokenizer, special_ids = prepared_folder.load_workdir_tokenizer(workdir, config)
    max_len = min(int(config.seq_len), int(config.model.max_position_embeddings))
    return cls(model, params, special_ids=special_ids, max_len=max_len, tokenizer=tokenizer,
               **kwargs)

  # -- public entry points

  def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without [CLS]/[SEP]."""
    if self.tokenizer is None:
      raise ScoringError("This Scorer has no tokenizer; use score_ids with token ids.")
    non_empty = [i for i, t in enumerate(texts) if t.strip()]
    encoded: list[list[int]] = [[] for _ in texts]
    if non_empty:
      batch = [texts[i] for i in non_empty]
      if hasattr(self.tokenizer, "encode_batch"):
        ids = self.tokenizer.encode_batch(batch)
      else:
        ids = [self.tokenizer.encode(t) for t in batch]
      for i, seq in zip(non_empty, ids):
        encoded[i] = list(seq)
    return encoded

  def score(self, texts: Sequence[str], describe: Optional[Callable[[int], str]] = None,
            progress: Optional[Callable[[int], None]] = None):
    """(pll_N, num_tokens_N) of each text, in input order; see `score_ids`."""
    return self.score_ids(self.tokenize(texts), describe=describe, progress=progress)

  def score_ids(self, token_ids: Sequence[Sequence[int]],
                describe: Optional[Callable[[int], str]] = None,
                progress: Optional[Callable[[int], None]] = None):
    """(pll_N float64, num_tokens_N int64) of each token-id list (no [CLS]/[SEP]), input order.

    `describe(i)` names sentence i in errors (default "sentence i+1"); `progress(k)` is called
    as each group of k sentences is finished (one length bucket at a time).
    """
    describe = describe or (lambda i: f"sentence {i + 1}")
    n = len(token_ids)
    if self.long == "error":  # fail before any work, not after hours of it
      for i, ids in enumerate(token_ids):
        self._check_length(i, ids, describe)
    pll_N = np.zeros(n, np.float64)
    num_tokens_N = np.zeros(n, np.int64)
    for start in range(0, n, self.chunk_sentences):
      stop = min(n, start + self.chunk_sentences)
      units = []
      for i in range(start, stop):
        units += self._units(i, token_ids[i], describe)
      for u in units:
        num_tokens_N[u.sentence] += int(u.score_mask.sum())
      empty = (stop - start) - len({u.sentence for u in units})
      if progress is not None and empty:
        progress(empty)
      self._score_units(units, pll_N, progress)
    return pll_N, num_tokens_N

  # -- internals

  def _units(self, index: int, token_ids: Sequence[int], describe) -> list[_Unit]:
    cls_id, sep_id = self.special_ids["cls"], self.special_ids["sep"]
    if len(token_ids) == 0:
      return []
    window = self.max_len - 2
    if len(token_ids) <= window:
      return [_Unit(index, *with_special_tokens(token_ids, cls_id, sep_id))]
    self._check_length(index, token_ids, describe)
    if self.long == "truncate":
      return [_Unit(index, *with_special_tokens(token_ids[:window], cls_id, sep_id))]
    units = []
    for s, e, scored in window_spans(len(token_ids), window):
      ids, _ = with_special_tokens(token_ids[s:e], cls_id, sep_id)
      score_mask = np.zeros(len(ids), bool)
      score_mask[scored - s + 1] = True
      units.append(_Unit(index, ids, score_mask))
    return units

  def _check_length(self, index: int, token_ids: Sequence[int], describe) -> None:
    if self.long == "error" and len(token_ids) > self.max_len - 2:
      raise ScoringError(
          f"{describe(index)} has {len(token_ids)} tokens ({len(token_ids) + 2} with [CLS] and "
          f"[SEP]), more than the model's maximum length of {self.max_len}. Split it, or pass "
          "--long=truncate (score the first tokens) or --long=window (sliding windows).")

  def _bucket_of(self, length: int) -> int:
    return next(b for b in self.buckets if b >= length)

  def _score_units(self, units: list[_Unit], pll_N: np.ndarray, progress=None) -> None:
    by_bucket: dict[int, list[_Unit]] = {}
    units_left: dict[int, int] = {}  # per sentence: a long one may have windows in two buckets
    for u in units:
      by_bucket.setdefault(self._bucket_of(len(u.ids)), []).append(u)
      units_left[u.sentence] = units_left.get(u.sentence, 0) + 1
    for length, group in sorted(by_bucket.items()):
      if self.method == "critic":
        self._critic_bucket(group, length, pll_N)
      else:
        self._mlm_bucket(group, length, pll_N)
      finished = 0
      for u in group:
        units_left[u.sentence] -= 1
        finished += units_left[u.sentence] == 0
      if progress is not None and finished:
        progress(finished)

  def _critic_bucket(self, group: list[_Unit], length: int, pll_N: np.ndarray) -> None:
    pad_id = self.special_ids["pad"]
    pending = []  # dispatched asynchronously, fetched at the end: host and device overlap
    for b in range(0, len(group), self.batch_size):
      batch = group[b:b + self.batch_size]
      rows = self.batch_size  # a fixed shape per bucket: one compilation
      ids = _pad_rows([u.ids for u in batch], length, rows, pad_id)
      input_mask = _pad_rows([np.ones(len(u.ids), np.int32) for u in batch], length, rows, 0)
      score_mask = _pad_rows([u.score_mask for u in batch], length, rows, False)
      pending.append(([u.sentence for u in batch],
                      critic_pll(self.params, ids, input_mask, score_mask, model=self.model,
                                 logsumexp_chunk=self.logsumexp_chunk)))
    _accumulate(pending, pll_N)

  def _mlm_bucket(self, group: list[_Unit], length: int, pll_N: np.ndarray) -> None:
    pad_id = self.special_ids["pad"]
    ids_UxL = _pad_rows([u.ids for u in group], length, len(group), pad_id)
    mask_UxL = _pad_rows([np.ones(len(u.ids), np.int32) for u in group], length, len(group), 0)
    score_UxL = _pad_rows([u.score_mask for u in group], length, len(group), False)
    copies_NxL, rows_N, positions_N, targets_N = masked_copies(ids_UxL, score_UxL,
                                                               self.special_ids["mask"])
    copy_mask_NxL = mask_UxL[rows_N]
    sentence_N = np.asarray([u.sentence for u in group])[rows_N]
    c = self.batch_size  # copies per forward pass, a fixed shape per bucket
    pending = []
    for b in range(0, len(rows_N), c):
      k = min(c, len(rows_N) - b)
      take = lambda a: np.pad(a[b:b + k], ((0, c - k),) + ((0, 0),) * (a.ndim - 1))
      pending.append((sentence_N[b:b + k],
                      mlm_token_log_probs(self.params, take(copies_NxL), take(copy_mask_NxL),
                                          take(positions_N), take(targets_N), model=self.model)))
    _accumulate(pending, pll_N)


def _accumulate(pending, pll_N: np.ndarray) -> None:
  """Adds each batch's scores (device arrays, padding rows last) to its sentences' PLLs."""
  for sentences, scores in pending:
    values = np.asarray(jax.device_get(scores), np.float64)[:len(sentences)]
    np.add.at(pll_N, np.asarray(sentences, np.int64), values)
