"""The TFDS sources of the fine-tuning commands (`--data_dir=tfds` for GLUE, `--tfds=squad/...`
for SQuAD), through TFDS's real builders and `tfds.load`, with fixture records served by TFDS's
testing hook instead of a download (tests/tfds_fixture.py)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT, run_module, shared_workdir
from tfds_fixture import serve

from script_jax.data import tfds_fetch
from script_jax.finetune import glue_data
from script_jax.finetune import squad_data
from script_jax.finetune import squad_official

pytest.importorskip("tensorflow_datasets")

_CONTEXTS = {
    "Rivers": "The Nile is a major river in Africa. It flows north into the Mediterranean.",
    "Paris": "Paris is the capital of France. The Eiffel Tower was built in 1889.",
    "Music": "A piano has 88 keys. Its strings are struck by hammers covered with felt.",
}
_QUESTIONS = [("Rivers", "Where is the Nile?", "Africa"),
              ("Rivers", "Where does the Nile flow?", "north"),
              ("Paris", "What is the capital of France?", "Paris"),
              ("Paris", "When was the tower built?", "1889"),
              ("Music", "How many keys has a piano?", "88"),
              ("Music", "What strikes the strings?", "hammers")]


def _squad_records(version, copies=1):
  """TFDS `squad/<version>` records: one per question, answers as parallel lists."""
  records = []
  for copy in range(copies):
    for n, (title, question, answer) in enumerate(_QUESTIONS):
      context = _CONTEXTS[title]
      record = {"id": f"q{copy}-{n}", "title": f"{title}{copy}", "context": context,
                "question": question,
                "answers": {"text": [answer], "answer_start": [context.index(answer)]}}
      if version == "v2.0":
        impossible = n % 3 == 2
        record["is_impossible"] = impossible
        record["plausible_answers"] = record["answers"] if impossible else {
            "text": [], "answer_start": []}
        if impossible:
          record["answers"] = {"text": [], "answer_start": []}
      records.append(record)
  return records


def test_dataset_from_tfds_regroups_questions_into_the_official_format():
  records = [  # bytes and numpy values, as tfds.as_numpy yields them
      {"id": b"a", "title": b"T", "context": b"Red fox. Blue sky.", "question": b"What fox?",
       "answers": {"text": np.array([b"Red", b"Red fox"], dtype=object),
                   "answer_start": np.array([0, 0], np.int32)}},
      {"id": b"b", "title": b"U", "context": b"Caf\xc3\xa9 ol\xc3\xa9.", "question": b"Where?",
       "answers": {"text": np.array([b"Caf\xc3\xa9"], dtype=object),
                   "answer_start": np.array([0], np.int32)}},
      {"id": b"c", "title": b"T", "context": b"Red fox. Blue sky.", "question": b"What sky?",
       "answers": {"text": np.array([b"Blue"], dtype=object),
                   "answer_start": np.array([9], np.int32)}},
  ]
  dataset = squad_data.dataset_from_tfds(records, "squad/v1.1")
  assert squad_official.dataset_version(dataset) == "1.1"
  assert [a["title"] for a in dataset["data"]] == ["T", "U"]
  paragraph = dataset["data"][0]["paragraphs"]
  assert len(paragraph) == 1 and [q["id"] for q in paragraph[0]["qas"]] == ["a", "c"]
  assert paragraph[0]["qas"][0]["answers"] == [{"text": "Red", "answer_start": 0},
                                               {"text": "Red fox", "answer_start": 0}]
  assert dataset["data"][1]["paragraphs"][0]["context"] == "Café olé."
  examples = squad_data.examples_from_dataset(dataset)
  assert [(e.qas_id, e.answers) for e in examples] == [
      ("a", [("Red", 0), ("Red fox", 0)]), ("c", [("Blue", 9)]), ("b", [("Café", 0)])]

  impossible = dict(records[0], is_impossible=np.bool_(True),
                    answers={"text": np.array([], dtype=object),
                             "answer_start": np.array([], np.int32)})
  v2 = squad_data.dataset_from_tfds([impossible], "squad/v2.0")
  assert squad_official.dataset_version(v2) == "2.0"
  assert v2["data"][0]["paragraphs"][0]["qas"][0]["is_impossible"] is True

  with pytest.raises(squad_official.SquadDataError, match="record 0.*2 answer texts but 1"):
    squad_data.dataset_from_tfds([dict(records[0], answers={
        "text": [b"Red", b"fox"], "answer_start": [0]})], "squad/v1.1")
  with pytest.raises(squad_official.SquadDataError, match="record 0.*question"):
    squad_data.dataset_from_tfds([{k: v for k, v in records[0].items() if k != "question"}],
                                 "squad/v1.1")
  with pytest.raises(squad_official.SquadDataError, match="squad/v1.1, squad/v2.0"):
    squad_data.dataset_from_tfds(records, "squad/v3")


@pytest.mark.parametrize("version", ["v1.1", "v2.0"])
def test_load_tfds_squad_through_tfds(version):
  train, dev = _squad_records(version, copies=2), _squad_records(version)
  with serve({f"squad/{version}": {"train": train, "validation": dev}}):
    loaded = {split: squad_data.load_tfds_squad(f"squad/{version}", split)
              for split in ("train", "dev")}
  for split, records in [("train", train), ("dev", dev)]:
    examples = squad_data.examples_from_dataset(loaded[split])
    assert sorted(e.qas_id for e in examples) == sorted(r["id"] for r in records)
    by_id = {r["id"]: r for r in records}
    for e in examples:
      record = by_id[e.qas_id]
      assert (e.question, e.context, e.title) == (record["question"], record["context"],
                                                  record["title"])
      assert e.answers == list(zip(record["answers"]["text"],
                                   record["answers"]["answer_start"]))
      assert e.is_impossible == record.get("is_impossible", False)
  assert squad_official.dataset_version(loaded["dev"]) == version.lstrip("v")


_GLUE = {
    "glue/cola": {split: [{"sentence": s, "label": label, "idx": i} for i, (s, label) in
                          enumerate([("The cat sat on the mat.", 1), ("Cat the mat on sat.", 0),
                                     ("She gave him a book.", 1), ("She him gave book a.", 0)]
                                    * repeat)]
                  for split, repeat in [("train", 6), ("validation", 2)]},
    "glue/stsb": {split: [{"sentence1": a, "sentence2": b, "label": score, "idx": i}
                          for i, (a, b, score) in enumerate(
                              [("A plane is taking off.", "An air plane is taking off.", 5.0),
                               ("A man plays a flute.", "A man is eating.", 0.6),
                               ("Two dogs run in a field.", "Dogs are running outside.", 3.8)]
                              * repeat)]
                  for split, repeat in [("train", 6), ("validation", 2)]},
    "glue/mnli": {"validation_mismatched": [
        {"premise": "P one.", "hypothesis": "H one.", "label": 2, "idx": 0}]},
}


def test_load_tfds_split_through_tfds():
  with serve(_GLUE):
    cola = glue_data.load_tfds_split("cola", "dev", check_counts=False)
    stsb = glue_data.load_tfds_split("stsb", "train", check_counts=False)
    mnli_mm = glue_data.load_tfds_split("mnli_mm", "dev", check_counts=False)
    with pytest.raises(glue_data.GlueDataError, match="1,043|1043"):
      glue_data.load_tfds_split("cola", "dev")  # the real count is checked by default
  assert [(e.text_a, e.label) for e in cola] == [
      (r["sentence"], r["label"]) for r in _GLUE["glue/cola"]["validation"]]
  assert stsb[1].text_b == "A man is eating." and stsb[1].label == pytest.approx(0.6)
  assert mnli_mm == [glue_data.Example("mnli_mm-dev-0", "P one.", "H one.", 2)]


def _run_with_tfds(tmp_path, records, module, args, timeout=600):
  """`python -m script_jax.<module> ARGS` with tfds.load serving `records`."""
  fixture = tmp_path / "tfds_records.json"
  fixture.write_text(json.dumps(records))
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
  return subprocess.run([sys.executable, os.path.join(ROOT, "tests", "tfds_fixture.py"),
                         str(fixture), f"script_jax.{module}", *args], cwd=ROOT,
                        capture_output=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_squad_command_with_tfds(tmp_path, tmp_path_factory):
  workdir = shared_workdir(tmp_path_factory)
  out = tmp_path / "out"
  records = {"squad/v2.0": {"train": _squad_records("v2.0", copies=3),
                            "validation": _squad_records("v2.0")}}
  result = _run_with_tfds(tmp_path, records, "finetune.squad", [
      f"--init_from={workdir}", "--tfds=squad/v2.0", f"--output_dir={out}",
      "--config.num_seeds=1", "--config.epochs=1", "--config.batch_size=8",
      "--config.squad.max_length=32", "--config.squad.doc_stride=8",
      "--config.squad.max_query_length=8"])
  stderr = result.stderr.decode()
  assert result.returncode == 0, stderr[-3000:]
  assert "TFDS squad/v2.0 train/validation" in stderr
  assert "18 questions" in stderr and "6 questions" in stderr
  scores = json.loads((out / "results.json").read_text())["runs"]["squad"]["0"]
  # The evaluated set is written in the official format; the official-interface command
  # re-scores the run's files to the same numbers.
  # (span_predictions.json: the spans behind the threshold's blanks, for the official sweep.)
  thresh = json.loads((out / "results.json").read_text())["na_prob_thresh"]
  rescored = run_module("finetune.squad_eval", [
      str(out / "eval_dataset.json"), str(out / "seed_0" / "span_predictions.json"),
      "--na-prob-file", str(out / "seed_0" / "na_probs.json"), f"--na-prob-thresh={thresh}"],
                        timeout=300)
  assert rescored.returncode == 0, rescored.stderr.decode()
  official = json.loads(rescored.stdout.decode())
  assert official["total"] == 6 and official["NoAns_total"] == 2
  for key, value in official.items():
    assert scores[key] == pytest.approx(value), key

  both = _run_with_tfds(tmp_path, records, "finetune.squad", [
      f"--init_from={workdir}", "--tfds=squad/v2.0", "--dev_split=0.5",
      f"--output_dir={tmp_path / 'bad'}"], timeout=300)
  assert both.returncode == 2 and b"leave out" in both.stderr, both.stderr.decode()[-2000:]
  unknown = run_module("finetune.squad", [f"--init_from={workdir}", "--tfds=squad/v3",
                                          f"--output_dir={tmp_path / 'bad'}"], timeout=300)
  assert unknown.returncode == 2 and b"squad/v1.1, squad/v2.0" in unknown.stderr
  neither = run_module("finetune.squad", [f"--init_from={workdir}",
                                          f"--output_dir={tmp_path / 'bad'}"], timeout=300)
  assert neither.returncode == 2 and b"--tfds" in neither.stderr
  assert b"Traceback" not in unknown.stderr + neither.stderr


@pytest.mark.slow
def test_glue_command_with_tfds(tmp_path, tmp_path_factory):
  workdir = shared_workdir(tmp_path_factory)
  out = tmp_path / "out"
  result = _run_with_tfds(tmp_path, _GLUE, "finetune.glue", [
      f"--init_from={workdir}", "--data_dir=tfds", "--tasks=cola,stsb", f"--output_dir={out}",
      "--nocheck_counts", "--config.num_seeds=1", "--config.epochs=1", "--config.batch_size=8",
      "--config.max_length=32"])
  assert result.returncode == 0, result.stderr.decode()[-3000:]
  runs = json.loads((out / "results.json").read_text())["runs"]
  assert runs["cola"]["0"]["train_examples"] == 24
  assert runs["stsb"]["0"]["train_examples"] == 2 * 18  # the pairs and their swaps
  assert "| model | CoLA" in result.stdout.decode()


@pytest.mark.parametrize("load", ["glue", "squad"])
def test_tfds_without_network_is_one_clear_error(load, tmp_path, monkeypatch):
  """No network: TFDS's retries end in requests' ConnectionError; the loaders turn it into a
  UserError that names the dataset, the folder and the offline alternative. (Proxy to a closed
  local port so that it fails at once whatever the machine's network; retries off for speed.)"""
  from tensorflow_datasets.core.download import downloader
  monkeypatch.setattr(downloader, "MAX_RETRIES", 0)
  for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
    monkeypatch.setenv(var, "http://127.0.0.1:9")
  for var in ("NO_PROXY", "no_proxy"):
    monkeypatch.delenv(var, raising=False)
  if load == "glue":
    with pytest.raises(tfds_fetch.TfdsFetchError,
                       match=r"glue/rte into .*ConnectionError.*\$TFDS_DATA_DIR.*--data_dir"):
      glue_data.load_tfds_split("rte", "dev", data_dir=str(tmp_path))
  else:
    with pytest.raises(tfds_fetch.TfdsFetchError, match=r"squad/v2.0 into .*--train_file"):
      squad_data.load_tfds_squad("squad/v2.0", "dev", data_dir=str(tmp_path))
