"""SQuAD answers: turning a model's logits over squad_data's windows back into answer text, and
the no-answer thresholds of SQuAD 2.0.

  postprocess(examples, features, logits...)        -> ({qid: text}, {qid: na_prob} or None)
  postprocess_joint(examples, features, beams...)   -> the same from ELECTRA's joint head
  with_no_answers(predictions, na_probs, thresh)    -> {qid: text}, "" where na_prob > thresh
  na_prob_thresh_for(head, configured)              -> the threshold a run applies

The examples and windows (SquadExample, SquadFeatures, make_features) come from squad_data.py.

Answer text always comes from the original context through character offsets
(context[start of first token : end of last token]), never from detokenized pieces, so case,
accents, punctuation and spacing come out as written.

No-answer probability (SQuAD 2.0), as ELECTRA scores it, squashed into [0, 1] so that the
official --na-prob-thresh semantics apply:
  without a no-answer head: na_prob = sigmoid(min over the example's windows of
      (start_logit[CLS] + end_logit[CLS]) - score of the best span), BERT's null-score difference;
  with one (`no_answer_logits`, ELECTRA's "answerable" classifier trained against is_impossible,
      so higher means no answer): na_prob = sigmoid(min over windows of that logit).
`postprocess` returns the best non-empty span for every question and leaves the abstaining to
the threshold (`with_no_answers`, or evaluate_v2's na_prob_thresh): predictions already blanked
would make the official best-threshold search blind to the answers behind them. na_prob > 0.5 is
BERT's default rule (null score difference > 0).
"""

from __future__ import annotations

import collections
import math
from typing import Mapping, Optional, Sequence

import numpy as np

from script_jax.finetune import squad_data
from script_jax.finetune import squad_official

DEFAULT_NA_PROB_THRESH = 0.5  # sigmoid(0): the null score beats the best span (BERT's rule)
# ELECTRA abstains when its answerable logit is above -2.75 (qa_metrics.py, squad_official_eval
# .py): a no-answer probability above sigmoid(-2.75) = 0.0601.
ELECTRA_NA_PROB_THRESH = 1.0 / (1.0 + math.exp(2.75))


def na_prob_thresh_for(head: str, configured: float) -> float:
  """The no-answer threshold a run applies: `configured` when in [0, 1], else the head's own
  (ELECTRA's cut for "electra", BERT's null-score rule for "bert")."""
  if 0.0 <= configured <= 1.0:
    return configured
  return ELECTRA_NA_PROB_THRESH if head == "electra" else DEFAULT_NA_PROB_THRESH


def _sigmoid(x: float) -> float:
  return 0.5 * (1.0 + math.tanh(0.5 * x))  # no overflow at +-inf


def postprocess(examples: Sequence[squad_data.SquadExample],
                features: squad_data.SquadFeatures,
                start_logits: np.ndarray, end_logits: np.ndarray,
                no_answer_logits: Optional[np.ndarray] = None, *, n_best: int = 20,
                max_answer_length: int = 30,
                version: str = "1.1") -> tuple[dict[str, str], Optional[dict[str, float]]]:
  """Best answer span per question from BERT's head, and (2.0) the no-answer probability.

  Per window, the n_best highest start logits among tokens that may start an answer (context,
  max-context here) and the n_best highest end logits among context tokens are paired; a pair is
  kept when start <= end and it spans at most max_answer_length tokens. (BERT ranks all
  positions first and then filters, which can crowd out valid ones; ranking only valid ones
  never does worse.) The best pair over the question's windows by start + end logit gives
  context[char_start(start) : char_end(end)].

  Args:
    examples, features: as given to / returned by squad_data.make_features.
    start_logits, end_logits: [N, L] for the N windows.
    no_answer_logits: optional [N] logit that the window's question has no answer (2.0 only).
    n_best, max_answer_length: ELECTRA's defaults.
    version: "1.1" or "2.0".

  Returns:
    (predictions {qas_id: text}, na_probs {qas_id: P(no answer)} for 2.0, None for 1.1). Every
    prediction is the best non-empty span ("" only if the question has no valid span at all,
    with na_prob 1); apply the threshold with `with_no_answers` or at evaluation (see the module
    docstring). Examples without windows (dropped by make_features in training) are absent.
  """
  shape = features.input_ids.shape
  start_logits = np.asarray(start_logits, np.float64)
  end_logits = np.asarray(end_logits, np.float64)
  if start_logits.shape != shape or end_logits.shape != shape:
    raise ValueError(f"start/end logits {start_logits.shape}/{end_logits.shape} do not match "
                     f"the features' {shape}")
  starts_ok, is_context = _answer_positions(features)
  k = max(1, min(n_best, shape[1]))

  def top(logits, ok):
    logits = np.where(ok & ~np.isnan(logits), logits, -np.inf)
    index = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return index, np.take_along_axis(logits, index, axis=1)

  start_index, start_value = top(start_logits, starts_ok)
  end_index, end_value = top(end_logits, is_context)
  n = len(features)
  candidates = (np.repeat(start_index, k, axis=1), np.tile(end_index, (1, k)),
                (start_value[:, :, None] + end_value[:, None, :]).reshape(n, k * k))
  null_score = (start_logits[:, squad_data.NO_ANSWER_INDEX] +
                end_logits[:, squad_data.NO_ANSWER_INDEX])
  return _select(examples, features, candidates, max_answer_length, version,
                 (starts_ok, is_context), no_answer_logits=no_answer_logits,
                 null_score=null_score)


def postprocess_joint(examples: Sequence[squad_data.SquadExample],
                      features: squad_data.SquadFeatures,
                      start_top_log_probs: np.ndarray, start_top_index: np.ndarray,
                      end_top_log_probs: np.ndarray, end_top_index: np.ndarray,
                      answerable_logits: np.ndarray, *, n_best: int = 20,
                      max_answer_length: int = 30,
                      version: str = "1.1") -> tuple[dict[str, str], Optional[dict[str, float]]]:
  """Best answer span per question from ELECTRA's joint head (model.JointSpanHead's beams).

  Candidates are the beam's (start i, end j given start i) pairs, scored by
  log p(start) + log p(end | start), the first n_best of each; a pair counts when the start may
  start an answer (context, max-context window), the end is context, start <= end and it spans
  at most max_answer_length tokens (ELECTRA's qa_metrics rules). The best pair over the
  question's windows gives the text; for 2.0 the no-answer probability is sigmoid of the
  smallest answerable logit over the windows (ELECTRA's null odds, squashed).

  Args:
    start_top_log_probs, start_top_index: [N, K]; end_top_log_probs, end_top_index: [N, K, K].
    answerable_logits: [N], higher means no answer.
    Others as in `postprocess`.
  """
  start_top_index = np.asarray(start_top_index)
  n, beam = start_top_index.shape
  k = max(1, min(n_best, beam))
  start_lp = np.asarray(start_top_log_probs, np.float64)[:, :k]
  end_lp = np.asarray(end_top_log_probs, np.float64)[:, :k, :k]
  if n != len(features) or end_lp.shape != (n, k, k):
    raise ValueError(f"beams {start_top_index.shape}/{np.shape(end_top_log_probs)} do not "
                     f"match the {len(features)} windows")
  candidates = (np.repeat(start_top_index[:, :k], k, axis=1),
                np.asarray(end_top_index)[:, :k, :k].reshape(n, k * k),
                (start_lp[:, :, None] + end_lp).reshape(n, k * k))
  return _select(examples, features, candidates, max_answer_length, version,
                 _answer_positions(features), no_answer_logits=answerable_logits)


def _answer_positions(features: squad_data.SquadFeatures) -> tuple[np.ndarray, np.ndarray]:
  """([N, L] may start an answer: context in its max-context window, [N, L] is context)."""
  offsets = features.token_offsets
  is_context = (offsets[..., 0] >= 0) & (offsets[..., 1] > offsets[..., 0])
  return is_context & features.is_max_context, is_context


def _select(examples, features, candidates, max_answer_length, version, answer_positions, *,
            no_answer_logits=None, null_score=None):
  """Per question, the best valid candidate span over its windows, and (2.0) its na_prob.

  candidates: (start [N, C], end [N, C], score [N, C]) token positions and scores per window.
  answer_positions: `_answer_positions(features)`.
  na_prob: sigmoid(min over windows of no_answer_logits) when given, else sigmoid(min over
  windows of null_score - the best span's score) (BERT's null-score difference).
  """
  if version not in squad_official.VERSIONS:
    raise ValueError(f"version must be one of {squad_official.VERSIONS}, not {version!r}")
  if len(features) and features.example_index.max() >= len(examples):
    raise ValueError("the features were made from more examples than given")
  starts_ok, is_context = answer_positions
  start, end, score = (np.asarray(a) for a in candidates)
  window = np.arange(len(features))[:, None]
  length = end - start + 1
  valid = (starts_ok[window, start] & is_context[window, end] & (length >= 1) &
           (length <= max_answer_length) & ~np.isnan(score))
  score = np.where(valid, np.asarray(score, np.float64), -np.inf)
  best = score.argmax(axis=1) if score.size else np.zeros(len(features), int)
  window = np.arange(len(features))
  best_score = score[window, best] if score.size else np.full(len(features), -np.inf)
  best_start, best_end = start[window, best], end[window, best]
  if no_answer_logits is not None:
    no_answer_logits = np.asarray(no_answer_logits, np.float64).reshape(-1)
    if len(no_answer_logits) != len(features):
      raise ValueError(f"{len(no_answer_logits)} no-answer logits for {len(features)} windows")

  windows_of = collections.defaultdict(list)
  for w, index in enumerate(features.example_index):
    windows_of[int(index)].append(w)
  offsets = features.token_offsets
  predictions, na_probs = {}, {}
  for index, example in enumerate(examples):
    windows = windows_of.get(index)
    if not windows:
      continue
    w = windows[int(np.argmax(best_score[windows]))]  # first window on ties
    if not np.isfinite(best_score[w]):
      predictions[example.qas_id] = ""
      na_probs[example.qas_id] = 1.0
      continue
    char_start = offsets[w, best_start[w], 0]
    char_end = offsets[w, best_end[w], 1]
    predictions[example.qas_id] = example.context[char_start:char_end]
    if no_answer_logits is not None:
      na_probs[example.qas_id] = _sigmoid(float(np.min(no_answer_logits[windows])))
    else:
      na_probs[example.qas_id] = _sigmoid(float(np.min(null_score[windows]) - best_score[w]))
  return predictions, (na_probs if version == "2.0" else None)


def with_no_answers(predictions: Mapping[str, str], na_probs: Mapping[str, float],
                    na_prob_thresh: float = DEFAULT_NA_PROB_THRESH) -> dict[str, str]:
  """Predictions with "" where na_prob > na_prob_thresh: a 2.0 prediction file that needs no
  na-prob file (what evaluate_v2 scores at that threshold)."""
  return {qid: "" if na_probs[qid] > na_prob_thresh else text
          for qid, text in predictions.items()}
