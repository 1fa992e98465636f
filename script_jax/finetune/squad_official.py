"""SQuAD evaluation: the rules of the official evaluate-v1.1.py and evaluate-v2.0.py, rewritten.

Scores (percent), as the official scripts compute them:

  normalize_answer(s)   lower-case, drop string.punctuation, drop the whole words a/an/the,
                        collapse whitespace.
  exact match           the normalized prediction equals a normalized gold answer.
  F1                    token-overlap F1 of the normalized tokens (multiset intersection). In 2.0,
                        when the gold answer or the prediction has no tokens, F1 = their EM (so ""
                        against "" scores 1); in 1.1 such a pair scores 0.
  per question          the max over its gold answers. 2.0 drops gold answers that normalize to
                        nothing; a question left with none (an unanswerable one) has the gold [""].

2.0 with no-answer probabilities: a prediction whose na_prob > na_prob_thresh (default 1.0, i.e.
never) counts as "" ; "best_exact"/"best_f1" are the best scores over all thresholds, found the
official way: sort the questions by na_prob and sweep, starting from "abstain on everything".
The sweep moves one question at a time, so on tied na_probs its threshold can be one that, when
applied, abstains on fewer questions than the sweep counted (an official quirk, kept so the
numbers match). In the sweep an unanswerable question costs 1 whenever its raw prediction string
is non-empty (also official).

Missing predictions. evaluate-v1.1 counts them as 0 and warns on stderr; `evaluate_v1` does the
same. evaluate-v2.0 skips them in the overall score (its "total" is the number predicted) and
then fails with a KeyError in the HasAns/NoAns breakdown, so it has no usable answer to copy.
`evaluate_v2` does as 1.1 does: a missing prediction scores 0 (EM and F1, answerable or not, at
any threshold), counts in every total, is warned about on stderr, and never gains in the best-
threshold sweep. With no prediction missing, every number equals the official script's.

The command line, `python -m script_jax.finetune.squad_eval`, is finetune/squad_eval.py.
"""

from __future__ import annotations

import collections
import re
import string
import sys
from typing import Any, Iterator, Mapping, Optional, Sequence

from script_jax import cli_errors
from script_jax import fs

VERSIONS = ("1.1", "2.0")
_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


class SquadDataError(cli_errors.UserError):
  """A SQuAD data, prediction or na-prob file that cannot be read or used; the message says
  what and where."""


# ----------------------------------------------------------------------------------------------
# Scores of one prediction against one gold answer.


def normalize_answer(text: str) -> str:
  """Lower-case, remove punctuation, then the articles a/an/the, then extra whitespace."""
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", text).split())


def exact_score(prediction: str, gold: str) -> float:
  """1.0 when the normalized strings are equal, else 0.0."""
  return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str, version: str = "2.0") -> float:
  """Token-overlap F1 of the normalized answers; `version` picks the rule for empty answers."""
  pred_tokens = normalize_answer(prediction).split()
  gold_tokens = normalize_answer(gold).split()
  if version == "2.0" and (not pred_tokens or not gold_tokens):
    return float(pred_tokens == gold_tokens)
  num_same = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
  if num_same == 0:
    return 0.0
  precision = num_same / len(pred_tokens)
  recall = num_same / len(gold_tokens)
  return 2 * precision * recall / (precision + recall)


# ----------------------------------------------------------------------------------------------
# Checking the inputs: every problem becomes a SquadDataError that names the place.


def iter_questions(dataset_json: Any) -> Iterator[tuple[dict, dict, dict]]:
  """Yields (article, paragraph, qa) for every question of a SQuAD dataset dict.

  Checks the shape on the way (data -> paragraphs -> context, qas -> id, answers -> text) and
  raises SquadDataError naming the first thing that is wrong.
  """
  if not isinstance(dataset_json, dict) or not isinstance(dataset_json.get("data"), list):
    raise SquadDataError('not a SQuAD dataset: expected a JSON object with a "data" list')
  for a, article in enumerate(dataset_json["data"]):
    where = f"data[{a}]"
    if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
      raise SquadDataError(f'{where} has no "paragraphs" list')
    for p, paragraph in enumerate(article["paragraphs"]):
      where_p = f"{where}.paragraphs[{p}]"
      if not isinstance(paragraph, dict) or not isinstance(paragraph.get("context"), str):
        raise SquadDataError(f'{where_p} has no "context" string')
      if not isinstance(paragraph.get("qas"), list):
        raise SquadDataError(f'{where_p} has no "qas" list')
      for q, qa in enumerate(paragraph["qas"]):
        where_q = f"{where_p}.qas[{q}]"
        if not isinstance(qa, dict) or not isinstance(qa.get("id"), str):
          raise SquadDataError(f'{where_q} has no "id" string')
        answers = qa.get("answers")
        if not isinstance(answers, list) or not all(
            isinstance(x, dict) and isinstance(x.get("text"), str) for x in answers):
          raise SquadDataError(f'{where_q} (id {qa["id"]}) needs an "answers" list of '
                                 '{"text": ...} objects')
        yield article, paragraph, qa


def _check_predictions(predictions: Any) -> Mapping[str, str]:
  if not isinstance(predictions, dict) or not all(
      isinstance(k, str) and isinstance(v, str) for k, v in predictions.items()):
    raise SquadDataError("predictions must be a JSON object mapping question id to answer "
                           "text")
  return predictions


def _check_na_probs(na_probs: Any) -> Mapping[str, float]:
  if not isinstance(na_probs, dict) or not all(
      isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
      for k, v in na_probs.items()):
    raise SquadDataError("no-answer probabilities must be a JSON object mapping question id "
                           "to a number")
  return na_probs


def _warn_missing(missing: Sequence[str], total: int) -> None:
  # One line per question, as the official script, would bury the score under 10k lines.
  if missing:
    shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
    print(f"warning: {len(missing)} of {total} questions have no prediction and score 0 "
          f"({shown})", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# The two evaluations.


def evaluate_v1(dataset_json: Mapping[str, Any], predictions: Mapping[str, str]) -> dict:
  """Official SQuAD 1.1 scores: {"exact_match": %, "f1": %} over every question of the data.

  A question without a prediction scores 0 (with a warning on stderr).
  """
  predictions = _check_predictions(predictions)
  exact = f1 = 0.0
  total = 0
  missing = []
  for _, _, qa in iter_questions(dataset_json):
    total += 1
    golds = [a["text"] for a in qa["answers"]]
    if not golds:
      raise SquadDataError(f"question {qa['id']} has no gold answer: a SQuAD 2.0 file? "
                             "Evaluate it as version 2.0.")
    if qa["id"] not in predictions:
      missing.append(qa["id"])
      continue
    prediction = predictions[qa["id"]]
    exact += max(exact_score(prediction, g) for g in golds)
    f1 += max(f1_score(prediction, g, version="1.1") for g in golds)
  if not total:
    raise SquadDataError("the dataset has no questions")
  _warn_missing(missing, total)
  return {"exact_match": 100.0 * exact / total, "f1": 100.0 * f1 / total}


def _best_threshold(predictions: Mapping[str, str], raw_scores: Mapping[str, float],
                    na_probs: Mapping[str, float], has_answer: Mapping[str, bool],
                    total: int) -> tuple[float, float]:
  """(best score %, its na_prob threshold): the official sweep over questions sorted by na_prob."""
  # Start by abstaining on every predicted question: each unanswerable one is then right.
  score = sum(1.0 for qid in raw_scores if not has_answer[qid])
  best_score, best_thresh = score, 0.0
  for qid in sorted(na_probs, key=lambda k: na_probs[k]):  # stable: ties keep the file's order
    if qid not in raw_scores:
      continue
    if has_answer[qid]:
      score += raw_scores[qid]
    elif predictions[qid]:
      score -= 1.0
    if score > best_score:
      best_score, best_thresh = score, na_probs[qid]
  return 100.0 * best_score / total, best_thresh


def evaluate_v2(dataset_json: Mapping[str, Any], predictions: Mapping[str, str],
                na_probs: Optional[Mapping[str, float]] = None,
                na_prob_thresh: float = 1.0) -> dict:
  """Official SQuAD 2.0 scores (percent) with the official keys.

  Args:
    dataset_json: the data file's JSON ({"version", "data": [...]}).
    predictions: question id -> answer text; "" predicts "no answer".
    na_probs: question id -> probability of no answer, or None. Every predicted question of the
      data needs one. With them the result has best_exact(_thresh) and best_f1(_thresh).
    na_prob_thresh: a prediction with na_prob > this counts as "".

  Returns:
    {"exact", "f1", "total"}, then "HasAns_*" and "NoAns_*" (exact, f1, total) when the data
    has such questions, then the best-threshold keys when `na_probs` is given. Missing
    predictions score 0 (see the module docstring).
  """
  predictions = _check_predictions(predictions)
  if na_probs is not None:
    na_probs = _check_na_probs(na_probs)
  has_answer, exact_raw, f1_raw = {}, {}, {}
  for _, _, qa in iter_questions(dataset_json):
    qid = qa["id"]
    has_answer[qid] = bool(qa["answers"])
    if qid not in predictions:
      continue
    golds = [a["text"] for a in qa["answers"] if normalize_answer(a["text"])] or [""]
    exact_raw[qid] = max(exact_score(predictions[qid], g) for g in golds)
    f1_raw[qid] = max(f1_score(predictions[qid], g, version="2.0") for g in golds)
  total = len(has_answer)
  if not total:
    raise SquadDataError("the dataset has no questions")
  _warn_missing([q for q in has_answer if q not in exact_raw], total)
  probs = na_probs if na_probs is not None else {}
  lacking = [q for q in exact_raw if q not in probs]
  if na_probs is not None and lacking:
    raise SquadDataError(f"{len(lacking)} predicted questions have no no-answer probability "
                           f"(e.g. {lacking[0]})")

  def thresholded(raw):
    # Missing predictions stay at 0 whatever the threshold.
    return {qid: (float(not has_answer[qid]) if probs.get(qid, 0.0) > na_prob_thresh
                  else raw[qid]) if qid in raw else 0.0 for qid in has_answer}

  exact, f1 = thresholded(exact_raw), thresholded(f1_raw)

  def summary(qids):
    return {"exact": 100.0 * sum(exact[q] for q in qids) / len(qids),
            "f1": 100.0 * sum(f1[q] for q in qids) / len(qids), "total": len(qids)}

  result = summary(list(has_answer))
  for prefix, wanted in (("HasAns", True), ("NoAns", False)):
    qids = [q for q, v in has_answer.items() if v == wanted]
    if qids:
      result.update({f"{prefix}_{k}": v for k, v in summary(qids).items()})
  if na_probs is not None:
    result["best_exact"], result["best_exact_thresh"] = _best_threshold(
        predictions, exact_raw, na_probs, has_answer, total)
    result["best_f1"], result["best_f1_thresh"] = _best_threshold(
        predictions, f1_raw, na_probs, has_answer, total)
  return result


def dataset_version(dataset_json: Mapping[str, Any]) -> str:
  """"1.1" or "2.0": the file's "version" field ("1.1", "v2.0"), else 2.0 iff a question has
  "is_impossible"."""
  version = str(dataset_json.get("version", "")).lower().lstrip("v")
  if version in VERSIONS:
    return version
  has_flag = any("is_impossible" in qa for _, _, qa in iter_questions(dataset_json))
  return "2.0" if has_flag else "1.1"


# ----------------------------------------------------------------------------------------------
# Files.


def load_json(path: str, what: str = "file") -> Any:
  """Reads a JSON file (local or gs://); SquadDataError when it is missing or not JSON."""
  return fs.read_json_for_user(path, SquadDataError, what)


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as JSON to a local or gs:// path, on one line as the official scripts do."""
  try:
    fs.write_json_atomically(path, obj, indent=None, sort_keys=False)
  except OSError as e:
    raise SquadDataError(f"cannot write {path}: {e}") from None


def run(data_file: str, pred_file: str, na_prob_file: Optional[str] = None,
        na_prob_thresh: float = 1.0, version: Optional[str] = None) -> tuple[str, dict]:
  """Evaluates the files as the official script of `version` (default: the data's) does.

  Returns (the version evaluated, the scores).
  """
  dataset_json = load_json(data_file, "data file")
  predictions = load_json(pred_file, "prediction file")
  if not isinstance(dataset_json, dict):
    raise SquadDataError(f"data file {data_file} is not a SQuAD dataset (not a JSON object)")
  found = dataset_version(dataset_json)
  if version is None:
    version = found
  elif version != found:
    print(f"warning: evaluating as SQuAD {version}, but {data_file} looks like {found}",
          file=sys.stderr)
  if version == "1.1":
    if na_prob_file:
      raise SquadDataError("--na-prob-file applies to SQuAD 2.0 only")
    return version, evaluate_v1(dataset_json, predictions)
  na_probs = load_json(na_prob_file, "no-answer probability file") if na_prob_file else None
  return version, evaluate_v2(dataset_json, predictions, na_probs, na_prob_thresh)
