"""Packing tokenized documents into fixed-length sequences, as ELECTRA's build_pretraining_dataset.py.

The lines (sentences or paragraphs) of one document are accumulated up to a target length and laid
out as `[CLS] A [SEP] B [SEP]`, with segment ids 0 for `[CLS] A [SEP]` and 1 for `B [SEP]`, then
[PAD]. Most sequences have two segments; 10% have one (as ELECTRA); a share short_seq_prob gets a
random shorter target length. Unlike ELECTRA, nothing is truncated away: a line that does not fit
is split and its rest starts the next sequence, so every token of the corpus is in exactly one
sequence. Pure functions; `writer.py` runs them in worker processes.
"""

from __future__ import annotations

import collections
import random
from typing import Iterable

import numpy as np

SINGLE_SEGMENT_PROB = 0.1  # ELECTRA's share of one-segment sequences (like classification inputs)
PACKING_SEED = 0  # packing does not follow config.seed: other training seeds reuse the data


def _take(pending: collections.deque, n: int) -> list[list[int]]:
  """Removes the first n tokens of `pending` (a deque of lines), splitting the last line."""
  pieces = []
  while n > 0:
    line = pending.popleft()
    if len(line) > n:
      pending.appendleft(line[n:])  # the rest of the line starts the next sequence
      line = line[:n]
    pieces.append(line)
    n -= len(line)
  return pieces


def _split_segments(pieces: list[list[int]], budget: int,
                    rng: random.Random) -> tuple[list[int], list[int]]:
  """ELECTRA's rule for dividing a sequence's lines between segments A and B."""
  first_target = budget // 2
  first, second = [], []
  for piece in pieces:
    # A line joins A when A is empty, when it fits A's target, or, half the time, when it
    # would overflow a not-yet-full A. Lines stay in order (ELECTRA may move a late short line
    # into A; we do not).
    if not second and (not first or len(first) + len(piece) < first_target or
                       (len(first) < first_target and rng.random() < 0.5)):
      first += piece
    else:
      second += piece
  if not second and len(first) > first_target:
    # One long line: split it, or paragraph-per-line corpora would be mostly one segment.
    first, second = first[:first_target], first[first_target:]
  return first, second


def pack_document(lines: Iterable[list[int]], seq_len: int, rng: random.Random,
                  short_seq_prob: float) -> list[tuple[list[int], list[int]]]:
  """Packs one document's tokenized lines into (segment A, segment B) pairs.

  Each pair fits `[CLS] A [SEP] B [SEP]` (or `[CLS] A [SEP]` when B is empty) in seq_len.
  Every token of `lines` lands in exactly one pair, in order.
  """
  pairs = []
  pending = collections.deque()
  pending_len = 0
  target = seq_len

  def make_pair():
    nonlocal pending_len, target
    two_segments = rng.random() >= SINGLE_SEGMENT_PROB
    budget = target - (3 if two_segments else 2)
    n = min(pending_len, budget)
    pieces = _take(pending, n)
    pending_len -= n
    if two_segments:
      pairs.append(_split_segments(pieces, budget, rng))
    else:
      pairs.append(([t for p in pieces for t in p], []))
    # ELECTRA: a small share of sequences get a random shorter target length.
    target = rng.randint(5, seq_len) if rng.random() < short_seq_prob else seq_len

  for line in lines:
    if not line:
      continue
    pending.append(list(line))
    pending_len += len(line)
    while pending_len >= target - 2:  # enough for a sequence, whatever its segment count
      make_pair()
  if pending_len:  # the document's end closes its last, shorter sequence
    make_pair()
  return pairs


def pairs_to_arrays(pairs: list[tuple[list[int], list[int]]], seq_len: int,
                    special_ids: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
  """Lays out (A, B) pairs as input_ids and segment_ids, int32 [n, seq_len]."""
  cls_id, sep_id, pad_id = special_ids["cls"], special_ids["sep"], special_ids["pad"]
  input_ids_NxT = np.full((len(pairs), seq_len), pad_id, np.int32)
  segment_ids_NxT = np.zeros((len(pairs), seq_len), np.int32)
  for i, (first, second) in enumerate(pairs):
    ids = [cls_id, *first, sep_id]
    len_a = len(ids)
    if second:
      ids += [*second, sep_id]
    if len(ids) > seq_len:
      raise AssertionError(f"packed {len(ids)} tokens into {seq_len}")
    input_ids_NxT[i, :len(ids)] = ids
    segment_ids_NxT[i, len_a:len(ids)] = 1
  return input_ids_NxT, segment_ids_NxT
