"""`python -m script_jax.finetune.squad` end to end on a SQuAD fixture (1.1 and 2.0), from a
pretraining workdir made by the real trainer; its files re-scored by the official-interface
command give the same numbers."""

import json

import pytest
from helpers import run_module, shared_workdir

_CONTEXTS = [
    ("Python", "Python was created by Guido van Rossum and first released in 1991. It is a "
     "programming language that lets you work quickly."),
    ("Rivers", "The Nile is a major river in Africa. It flows north into the Mediterranean Sea "
     "and is about 6,650 km long."),
    ("Paris", "Paris is the capital of France. The Eiffel Tower was built in 1889 for the "
     "World's Fair."),
    ("Music", "A piano has 88 keys. Its strings are struck by hammers covered with felt."),
]
_QUESTIONS = {
    "Python": [("Who created Python?", "Guido van Rossum"), ("When was it released?", "1991")],
    "Rivers": [("Where is the Nile?", "Africa"), ("How long is the Nile?", "about 6,650 km")],
    "Paris": [("What is the capital of France?", "Paris"), ("When was the tower built?", "1889")],
    "Music": [("How many keys has a piano?", "88"), ("What strikes the strings?", "hammers")],
}


def _dataset(version):
  data = []
  for title, context in _CONTEXTS:
    qas = []
    for i, (question, answer) in enumerate(_QUESTIONS[title]):
      qas.append({"id": f"{title}-{i}", "question": question,
                  "answers": [{"text": answer, "answer_start": context.index(answer)}]})
      if version == "v2.0":
        qas[-1]["is_impossible"] = False
    if version == "v2.0":
      qas.append({"id": f"{title}-none", "question": "What colour is the moon's cheese?",
                  "answers": [], "plausible_answers": [], "is_impossible": True})
    data.append({"title": title, "paragraphs": [{"context": context, "qas": qas}]})
  return {"version": version, "data": data * 3}


@pytest.mark.slow
@pytest.mark.parametrize("version, head", [("1.1", "electra"), ("v2.0", "electra"),
                                           ("v2.0", "bert")])
def test_squad_command_end_to_end(version, head, tmp_path, tmp_path_factory):
  workdir = shared_workdir(tmp_path_factory)
  dev = tmp_path / "dev.json"
  dev.write_text(json.dumps(_dataset(version)))
  out = tmp_path / "out"
  result = run_module("finetune.squad", [
      f"--init_from={workdir}", f"--dev_file={dev}", "--dev_split=0.75", f"--output_dir={out}",
      "--config.num_seeds=1", "--config.epochs=2", "--config.batch_size=8",
      "--config.squad.max_length=32", "--config.squad.doc_stride=8",
      "--config.squad.max_query_length=8", "--config.log_every_steps=1",
      f"--config.squad.head={head}"], timeout=600)
  stderr = result.stderr.decode()
  assert result.returncode == 0, stderr[-3000:]
  assert "development split" in stderr and "ETA" in stderr
  scores = json.loads((out / "results.json").read_text())["runs"]["squad"]["0"]
  predictions = json.loads((out / "seed_0" / "predictions.json").read_text())
  held_out = json.loads((out / "eval_dataset.json").read_text())
  qids = {q["id"] for a in held_out["data"] for p in a["paragraphs"] for q in p["qas"]}
  assert set(predictions) == qids and all(isinstance(t, str) for t in predictions.values())
  args = [str(out / "eval_dataset.json"), str(out / "seed_0" / "predictions.json")]
  rescored = run_module("finetune.squad_eval", args, timeout=300)
  assert rescored.returncode == 0, rescored.stderr.decode()
  official = json.loads(rescored.stdout.decode())
  # The written predictions, scored as they stand (2.0: blanks where P(no answer) > the
  # threshold), give the run's exact and f1.
  for key in ("exact_match", "f1") if version == "1.1" else ("exact", "f1"):
    assert scores[key] == pytest.approx(official[key]), key
  if version == "v2.0":
    results = json.loads((out / "results.json").read_text())
    thresh = results["na_prob_thresh"]
    assert thresh == pytest.approx(0.0601, abs=1e-4) if head == "electra" else thresh == 0.5
    na_probs = json.loads((out / "seed_0" / "na_probs.json").read_text())
    assert set(na_probs) == qids and all(0.0 <= p <= 1.0 for p in na_probs.values())
    spans = json.loads((out / "seed_0" / "span_predictions.json").read_text())
    assert all(predictions[q] == ("" if na_probs[q] > thresh else spans[q]) for q in qids)
    # The spans with na_probs.json at the run's threshold: every number, the sweep's included.
    rescored = run_module("finetune.squad_eval", [
        str(out / "eval_dataset.json"), str(out / "seed_0" / "span_predictions.json"),
        "--na-prob-file", str(out / "seed_0" / "na_probs.json"), f"--na-prob-thresh={thresh}"],
                          timeout=300)
    official = json.loads(rescored.stdout.decode())
    assert "best_f1" in official
    for key, value in official.items():
      assert scores[key] == pytest.approx(value), key
    assert f"P(no answer) > {thresh:.4g}" in (out / "results.md").read_text()
  assert "| f1 |" in (out / "results.md").read_text()


def test_squad_v2_scores_abstain_at_the_heads_threshold():
  """Hand-made answerable logits (ELECTRA's: higher means no answer), scores worked out by hand
  with the official rules."""
  import math  # pylint: disable=g-import-not-at-top
  from script_jax.finetune import squad_runs, squad_answers  # pylint: disable=g-import-not-at-top
  context = "Paris is the capital of France and the sky above it is the blue sky."
  questions = [("q1", "What is the capital?", "Paris"), ("q2", "Capital of Mars?", None),
               ("q3", "Capital of the Moon?", None), ("q4", "What colour?", "blue sky")]
  qas = [{"id": q, "question": text, "is_impossible": answer is None,
          "answers": [] if answer is None else [{"text": answer,
                                                 "answer_start": context.index(answer)}]}
         for q, text, answer in questions]
  dataset = {"version": "v2.0", "data": [{"title": "t", "paragraphs": [
      {"context": context, "qas": qas}]}]}
  spans = {"q1": "Paris", "q2": "France", "q3": "the sky", "q4": "the blue sky"}
  logits = {"q1": -4.0, "q2": -2.0, "q3": -3.0, "q4": -5.0}
  na_probs = {q: 1 / (1 + math.exp(-l)) for q, l in logits.items()}
  electra = squad_answers.na_prob_thresh_for("electra", -1.0)
  assert electra == pytest.approx(0.0601, abs=1e-4)
  assert squad_answers.na_prob_thresh_for("bert", -1.0) == 0.5
  assert squad_answers.na_prob_thresh_for("bert", 0.2) == 0.2
  # ELECTRA's cut: q2 (0.119) abstains, rightly; q3 (0.047) answers, wrongly; q1 and q4 answer
  # ("the blue sky" is "blue sky" once articles are dropped): 3 of 4.
  scores, written = squad_runs.score_v2(dataset, spans, na_probs, electra)
  assert written == {**spans, "q2": ""}
  assert scores["exact"] == pytest.approx(75.0) and scores["f1"] == pytest.approx(75.0)
  # The sweep: answering q4 and q1 and abstaining on q3 and q2 gets all 4, at q1's na_prob.
  assert scores["best_exact"] == pytest.approx(100.0)
  assert scores["best_exact_thresh"] == pytest.approx(na_probs["q1"])
  # BERT's 0.5, or the never-abstaining 1.0 of before: only q1 and q4.
  for thresh in (0.5, 1.0):
    scores, written = squad_runs.score_v2(dataset, spans, na_probs, thresh)
    assert written == spans and scores["exact"] == pytest.approx(50.0)


@pytest.mark.slow
def test_squad_command_needs_a_train_file_or_a_split(tmp_path, tmp_path_factory):
  workdir = shared_workdir(tmp_path_factory)
  dev = tmp_path / "dev.json"
  dev.write_text(json.dumps(_dataset("1.1")))
  result = run_module("finetune.squad", [f"--init_from={workdir}", f"--dev_file={dev}",
                                         f"--output_dir={tmp_path / 'out'}"], timeout=300)
  assert result.returncode == 2 and b"--dev_split" in result.stderr
  assert b"Traceback" not in result.stderr
  # The tiny model has 128 positions: ELECTRA's 512-token windows are refused, clearly.
  result = run_module("finetune.squad", [f"--init_from={workdir}", f"--dev_file={dev}",
                                         "--dev_split=0.5", f"--output_dir={tmp_path / 'out'}"],
                      timeout=300)
  assert result.returncode == 2 and b"exceeds the model's 128 positions" in result.stderr
  result = run_module("finetune.squad", [f"--init_from={workdir}", f"--dev_file={dev}",
                                         "--dev_split=0.5", "--config.squad.head=xlnet",
                                         f"--output_dir={tmp_path / 'out'}"], timeout=300)
  assert result.returncode == 2 and b"use one of electra, bert" in result.stderr
