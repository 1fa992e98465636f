"""Tests of script_jax/finetune/squad_official.py and its command squad_eval.py against scores
worked out by hand from the official SQuAD 1.1 / 2.0 rules (the arithmetic is in the comments)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from script_jax.finetune import squad_eval
from script_jax.finetune import squad_official
from script_jax.finetune.squad_official import SquadDataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dataset(questions, version="1.1"):
  """A one-article dataset: questions are (id, [gold texts], is_impossible)."""
  context = "A context the scorer never reads."
  qas = [{"id": qid, "question": "?", "is_impossible": impossible,
          "answers": [{"text": t, "answer_start": 0} for t in golds]}
         for qid, golds, impossible in questions]
  return {"version": version,
          "data": [{"title": "T", "paragraphs": [{"context": context, "qas": qas}]}]}


V1_DATA = _dataset([
    ("q1", ["The Eiffel Tower", "Eiffel Tower."], False),
    ("q2", ["Denver Broncos"], False),
    ("q3", ["1990", "in 1990s"], False),
    ("q4", ["Paris"], False),
])
V1_PREDICTIONS = {
    "q1": "eiffel  tower",            # EM 1, F1 1 (article, case, punctuation, spaces)
    "q2": "the Denver Broncos team",  # "denver broncos team" vs "denver broncos": P 2/3, R 1,
                                      # F1 = 2 * (2/3) / (5/3) = 0.8; EM 0
    "q3": "1990s",                    # vs "1990": 0; vs "in 1990s": P 1, R 1/2, F1 2/3; EM 0
    # q4 missing: 0
}

# SQuAD 2.0: two answerable (a1, a2), three unanswerable (n1, n2, n3).
V2_DATA = _dataset([
    ("a1", ["Paris"], False),
    ("a2", ["blue whale", "whale"], False),
    ("n1", [], True),
    ("n2", [], True),
    ("n3", [], True),
], version="v2.0")
V2_PREDICTIONS = {
    "a1": "Paris",            # EM 1, F1 1
    "a2": "the whale shark",  # "whale shark": vs "blue whale" F1 1/2; vs "whale" P 1/2, R 1,
                              # F1 2/3; EM 0
    "n1": "Berlin",           # gold [""]: EM 0, F1 0
    "n2": "",                 # EM 1, F1 1
    "n3": "London",           # 0, 0
}
V2_NA_PROBS = {"a1": 0.1, "a2": 0.2, "n1": 0.3, "n3": 0.8, "n2": 0.9}


def test_normalize_answer():
  assert squad_official.normalize_answer("The  Cat's  hat!") == "cats hat"
  assert squad_official.normalize_answer("An apple a day, the end.") == "apple day end"
  # Articles go only as whole words; punctuation goes first, so "the-end" is one word.
  assert squad_official.normalize_answer("Anne theatre Thea") == "anne theatre thea"
  assert squad_official.normalize_answer("the-end") == "theend"
  assert squad_official.normalize_answer("A.M.") == "am"
  assert squad_official.normalize_answer("Élan\tVital") == "élan vital"  # not ASCII-folded
  assert squad_official.normalize_answer(" The ") == ""


def test_exact_and_f1_of_one_pair():
  assert squad_official.exact_score("The Eiffel Tower.", "eiffel tower") == 1.0
  assert squad_official.f1_score("the Denver Broncos team", "Denver Broncos") == pytest.approx(0.8)
  # "x y y" vs "y y z w": common 2, P 2/3, R 2/4, F1 = 2 * (1/3) / (7/6) = 4/7.
  assert squad_official.f1_score("x y y", "y y z w") == pytest.approx(4 / 7)
  # "a" is an article: "a b b" is "b b", so P 1, R 2/4, F1 2/3.
  assert squad_official.f1_score("a b b", "b b c d") == pytest.approx(2 / 3)
  # Repeated tokens count as a multiset: "x x" vs "x": common 1, P 1/2, R 1.
  assert squad_official.f1_score("x x", "x") == pytest.approx(2 / 3)
  # Empty answers: 2.0 scores agreement, 1.1 scores 0 (no common token).
  assert squad_official.f1_score("", "the", version="2.0") == 1.0
  assert squad_official.f1_score("", "the", version="1.1") == 0.0
  assert squad_official.f1_score("x", "", version="2.0") == 0.0


def test_evaluate_v1_by_hand(capsys):
  scores = squad_official.evaluate_v1(V1_DATA, V1_PREDICTIONS)
  assert list(scores) == ["exact_match", "f1"]
  assert scores["exact_match"] == pytest.approx(100 * 1 / 4)
  assert scores["f1"] == pytest.approx(100 * (1 + 0.8 + 2 / 3 + 0) / 4)  # 61.67
  assert "q4" in capsys.readouterr().err  # the missing question is warned about


def test_evaluate_v1_rejects_unanswerable_questions():
  with pytest.raises(SquadDataError, match="no gold answer.*2.0"):
    squad_official.evaluate_v1(V2_DATA, V2_PREDICTIONS)


def test_evaluate_v2_without_na_probs():
  scores = squad_official.evaluate_v2(V2_DATA, V2_PREDICTIONS)
  assert scores == pytest.approx({
      "exact": 100 * 2 / 5, "f1": 100 * (1 + 2 / 3 + 0 + 1 + 0) / 5, "total": 5,
      "HasAns_exact": 100 * 1 / 2, "HasAns_f1": 100 * (1 + 2 / 3) / 2, "HasAns_total": 2,
      "NoAns_exact": 100 * 1 / 3, "NoAns_f1": 100 * 1 / 3, "NoAns_total": 3})
  assert list(scores) == ["exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total",
                          "NoAns_exact", "NoAns_f1", "NoAns_total"]


def test_evaluate_v2_threshold_and_best_threshold():
  scores = squad_official.evaluate_v2(V2_DATA, V2_PREDICTIONS, V2_NA_PROBS, na_prob_thresh=0.5)
  # na_prob > 0.5 turns n3 (0.8) and n2 (0.9) into "": n3 becomes right, n2 stays right.
  # Scores (EM / F1): a1 1/1, a2 0/(2/3), n1 0/0, n2 1/1, n3 1/1.
  # Best threshold, sweeping a1 0.1, a2 0.2, n1 0.3, n3 0.8, n2 0.9 from "abstain on all" = 3:
  #   EM: a1 +1 -> 4 (best, 0.1), a2 +0, n1 -1, n3 -1, n2 0 -> best 4/5 at 0.1.
  #   F1: a1 +1 -> 4, a2 +2/3 -> 4.67 (best, 0.2), n1 -1, n3 -1, n2 0 -> best 4.67/5 at 0.2.
  assert scores == pytest.approx({
      "exact": 100 * 3 / 5, "f1": 100 * (1 + 2 / 3 + 0 + 1 + 1) / 5, "total": 5,
      "HasAns_exact": 50.0, "HasAns_f1": 100 * (1 + 2 / 3) / 2, "HasAns_total": 2,
      "NoAns_exact": 100 * 2 / 3, "NoAns_f1": 100 * 2 / 3, "NoAns_total": 3,
      "best_exact": 80.0, "best_exact_thresh": 0.1,
      "best_f1": 100 * (4 + 2 / 3) / 5, "best_f1_thresh": 0.2})
  assert list(scores)[-4:] == ["best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh"]


def test_evaluate_v2_threshold_is_strict_and_defaults_to_never():
  # The default threshold 1.0 abstains on nothing: the same scores as without na_probs.
  default = squad_official.evaluate_v2(V2_DATA, V2_PREDICTIONS, V2_NA_PROBS)
  plain = squad_official.evaluate_v2(V2_DATA, V2_PREDICTIONS)
  assert {k: default[k] for k in plain} == plain
  # At exactly 0.8, n3 (na_prob 0.8) is not above it: only n2 abstains, which changes nothing.
  assert squad_official.evaluate_v2(V2_DATA, V2_PREDICTIONS, V2_NA_PROBS, 0.8)["exact"] == 40.0
  assert squad_official.evaluate_v2(V2_DATA, V2_PREDICTIONS, V2_NA_PROBS, 0.79)["exact"] == 60.0
  # Threshold 0: everything abstains; an answerable question abstained on scores 0.
  zero = squad_official.evaluate_v2(V2_DATA, V2_PREDICTIONS, V2_NA_PROBS, 0.0)
  assert zero["HasAns_exact"] == 0.0 and zero["NoAns_exact"] == 100.0


def test_evaluate_v2_best_threshold_when_abstaining_everywhere_is_best():
  predictions = {"a1": "Rome", "a2": "fish", "n1": "x", "n2": "y", "n3": "z"}
  scores = squad_official.evaluate_v2(V2_DATA, predictions, V2_NA_PROBS)
  # Answering anything only loses: the best is the start, 3/5 at threshold 0.0.
  assert scores["best_exact"] == 60.0 and scores["best_exact_thresh"] == 0.0
  assert scores["best_f1"] == 60.0 and scores["best_f1_thresh"] == 0.0


def test_evaluate_v2_gold_answers_that_normalize_to_nothing_mean_no_answer():
  data = _dataset([("q", ["The", "a."], False)], version="v2.0")
  scores = squad_official.evaluate_v2(data, {"q": ""})
  assert scores["exact"] == 100.0 and scores["HasAns_total"] == 1  # counted as answerable


def test_evaluate_v2_missing_predictions_score_zero(capsys):
  predictions = {k: v for k, v in V2_PREDICTIONS.items() if k not in ("a1", "n2")}
  na_probs = {k: v for k, v in V2_NA_PROBS.items() if k not in ("a1", "n2")}
  scores = squad_official.evaluate_v2(V2_DATA, predictions, na_probs, na_prob_thresh=0.5)
  # Left: a2 0/(2/3), n1 0/0, n3 abstains (0.8 > 0.5) 1/1; a1 and n2 score 0 in every total.
  assert scores["total"] == 5 and scores["NoAns_total"] == 3
  assert scores["exact"] == pytest.approx(100 * 1 / 5)
  assert scores["f1"] == pytest.approx(100 * (2 / 3 + 1) / 5)
  assert scores["NoAns_exact"] == pytest.approx(100 * 1 / 3)
  # The sweep starts from 2 (n1 and n3 abstaining; missing n2 gets no credit): a2 +0 (EM),
  # n1 -1, n3 -1 -> best stays 2/5 at 0.0. F1: a2 +2/3 -> 2.67 at 0.2.
  assert scores["best_exact"] == pytest.approx(40.0) and scores["best_exact_thresh"] == 0.0
  assert scores["best_f1"] == pytest.approx(100 * (2 + 2 / 3) / 5)
  assert scores["best_f1_thresh"] == 0.2
  err = capsys.readouterr().err
  assert "2 of 5 questions have no prediction" in err and "a1" in err


def test_evaluate_v2_needs_na_probs_for_every_prediction():
  with pytest.raises(SquadDataError, match="no no-answer probability"):
    squad_official.evaluate_v2(V2_DATA, V2_PREDICTIONS, {"a1": 0.5})


@pytest.mark.parametrize("bad, match", [
    ([], "JSON object"), ({"data": {}}, "JSON object"),
    ({"data": [{"title": "x"}]}, "paragraphs"),
    ({"data": [{"paragraphs": [{"qas": []}]}]}, "context"),
    ({"data": [{"paragraphs": [{"context": "c", "qas": [{"answers": []}]}]}]}, "id"),
    ({"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "q", "answers": ["x"]}]}]}]},
     "answers"),
])
def test_malformed_datasets_are_named(bad, match):
  with pytest.raises(SquadDataError, match=match):
    squad_official.evaluate_v2(bad, {})


def test_malformed_predictions():
  with pytest.raises(SquadDataError, match="predictions must be"):
    squad_official.evaluate_v1(V1_DATA, ["q1"])
  with pytest.raises(SquadDataError, match="predictions must be"):
    squad_official.evaluate_v2(V2_DATA, {"a1": 3})
  with pytest.raises(SquadDataError, match="no-answer probabilities"):
    squad_official.evaluate_v2(V2_DATA, V2_PREDICTIONS, {"a1": "high"})


def test_dataset_version():
  assert squad_official.dataset_version(V1_DATA) == "1.1"
  assert squad_official.dataset_version(V2_DATA) == "2.0"
  # Without a version field, a question with "is_impossible" means 2.0.
  assert squad_official.dataset_version({"data": V2_DATA["data"]}) == "2.0"
  no_flags = json.loads(json.dumps(V1_DATA).replace('"is_impossible": false, ', ""))
  assert squad_official.dataset_version({"data": no_flags["data"]}) == "1.1"


# ----------------------------------------------------------------------------------------------
# The command line, as a user runs it.


def _cli(*args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run([sys.executable, "-m", "script_jax.finetune.squad_eval", *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def _write(path, obj):
  path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
  return str(path)


@pytest.mark.slow
def test_cli_v1_and_v2(tmp_path):
  data1 = _write(tmp_path / "dev1.json", V1_DATA)
  pred1 = _write(tmp_path / "pred1.json", V1_PREDICTIONS)
  run = _cli(data1, pred1)
  assert run.returncode == 0, run.stderr
  assert json.loads(run.stdout) == pytest.approx({"exact_match": 25.0,
                                                  "f1": 100 * (1 + 0.8 + 2 / 3) / 4})
  assert run.stdout.count("\n") == 1  # one line, as evaluate-v1.1.py prints it

  data2 = _write(tmp_path / "dev2.json", V2_DATA)
  pred2 = _write(tmp_path / "pred2.json", V2_PREDICTIONS)
  na2 = _write(tmp_path / "na.json", V2_NA_PROBS)
  run = _cli(data2, pred2, "--na-prob-file", na2, "--na-prob-thresh", "0.5")
  assert run.returncode == 0, run.stderr
  assert json.loads(run.stdout) == pytest.approx(
      squad_official.evaluate_v2(V2_DATA, V2_PREDICTIONS, V2_NA_PROBS, 0.5))
  assert list(json.loads(run.stdout)) == [
      "exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total", "NoAns_exact",
      "NoAns_f1", "NoAns_total", "best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh"]

  out = tmp_path / "eval.json"
  run = _cli(data2, pred2, "--out-file", str(out), "--version", "2.0")
  assert run.returncode == 0 and not run.stdout.strip()
  assert json.loads(out.read_text())["exact"] == 40.0


@pytest.mark.slow
def test_cli_bad_input_exits_2_without_traceback(tmp_path):
  pred = _write(tmp_path / "pred.json", V1_PREDICTIONS)
  for data_file, message in [(str(tmp_path / "missing.json"), "does not exist"),
                             (_write(tmp_path / "notjson.json", "{not json"), "not JSON")]:
    run = _cli(data_file, pred)
    assert run.returncode == 2, (message, run.stderr)
    assert run.stderr.startswith("error: ") or "\nerror: " in run.stderr, run.stderr
    assert message in run.stderr and "Traceback" not in run.stderr


def test_main_reports_bad_input(tmp_path, capsys):
  # The same path as the command line, in-process (each subprocess pays TensorFlow's import).
  data = _write(tmp_path / "dev.json", V1_DATA)
  pred = _write(tmp_path / "pred.json", V1_PREDICTIONS)
  cases = [
      ([_write(tmp_path / "shape.json", {"data": [{"title": "t"}]}), pred], "paragraphs"),
      ([data, _write(tmp_path / "list.json", [1, 2])], "predictions must be"),
      ([data, pred, "--na-prob-file", pred], "SQuAD 2.0 only"),
      ([data, str(tmp_path)], "prediction file"),  # a directory
  ]
  for args, message in cases:
    assert squad_eval.main(args) == 2, message
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
  assert squad_eval.main([data, pred]) == 0
  assert json.loads(capsys.readouterr().out)["exact_match"] == 25.0
