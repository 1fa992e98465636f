"""GLUE test sets and the submission files: reading, format, the choice of run, the command."""

import json
import pathlib
import zipfile

import numpy as np
import pytest

from script_jax.finetune import glue_data
from script_jax.finetune import glue_submission
from script_jax.finetune import submit
from helpers import run_module

_BY_NAME = {s.name: s for s in glue_submission.TEST_SETS}

# Headers and a row of each test file as the standard GLUE release has them.
_TEST_FILES = {
    "CoLA": ("index\tsentence\n", lambda i: f"{i}\tSentence number {i}.\n"),
    "SST-2": ("index\tsentence\n", lambda i: f"{i}\tit 's a \"film\" {i} .\n"),
    "MRPC": ("\ufeffindex\t#1 ID\t#2 ID\t#1 String\t#2 String\n",
             lambda i: f"{i}\t{100 + i}\t{200 + i}\tFirst {i}.\tSecond {i}.\n"),
    "STS-B": ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\n",
              lambda i: f"{i}\tmain\tMSRvid\t2012test\t{i:04d}\tnone\tnone\tA {i}.\tB {i}.\n"),
    "QQP": ("id\tquestion1\tquestion2\n", lambda i: f"{i}\tWhy {i}?\tHow {i}?\n"),
    "MNLI-m": ("index\tpromptID\tpairID\tgenre\ts1b\ts2b\ts1p\ts2p\tsentence1\tsentence2\n",
               lambda i: f"{i}\t1\t{i}n\tfiction\t(\t(\t(\t(\tPremise {i}.\tHypothesis {i}.\n"),
    "RTE": ("index\tsentence1\tsentence2\n", lambda i: f"{i}\tText {i}.\tClaim {i}.\r\n"),
}


def _write_test_file(root: pathlib.Path, name: str, rows: int) -> None:
  test_set = _BY_NAME[name]
  header, row = _TEST_FILES[name]
  folder = root / test_set.folder
  folder.mkdir(parents=True, exist_ok=True)
  (folder / test_set.file).write_text(header + "".join(row(i) for i in range(rows)),
                                      encoding="utf-8")


def test_every_test_set_is_read_with_its_index_and_texts(tmp_path):
  for name in _TEST_FILES:
    _write_test_file(tmp_path, name, 5)
    test_set = _BY_NAME[name]
    indices, examples = glue_submission.read_test_set(str(tmp_path), test_set,
                                                      check_counts=False)
    assert indices == [str(i) for i in range(5)], name
    spec = glue_data.get_task(test_set.task)
    assert all(isinstance(e.label, float) == spec.is_regression for e in examples)
    assert (examples[3].text_b is None) == (not spec.is_pair), name
  rte = glue_submission.read_test_set(str(tmp_path), _BY_NAME["RTE"], check_counts=False)[1]
  assert (rte[2].text_a, rte[2].text_b) == ("Text 2.", "Claim 2.")  # "\r" dropped
  sst = glue_submission.read_test_set(str(tmp_path), _BY_NAME["SST-2"], check_counts=False)[1]
  assert sst[1].text_a == "it 's a \"film\" 1 ."  # quotes are text
  mnli = glue_submission.read_test_set(str(tmp_path), _BY_NAME["MNLI-m"], check_counts=False)[1]
  assert (mnli[0].text_a, mnli[0].text_b) == ("Premise 0.", "Hypothesis 0.")
  with pytest.raises(glue_data.GlueDataError, match="expected 1,063 test rows"):
    glue_submission.read_test_set(str(tmp_path), _BY_NAME["CoLA"])


def test_a_test_file_without_its_header_or_with_short_rows_is_refused(tmp_path):
  with pytest.raises(glue_data.GlueDataError, match="header starting with 'index'"):
    glue_submission.parse_test_tsv("0\tA sentence.\n", _BY_NAME["CoLA"])
  with pytest.raises(glue_data.GlueDataError, match=r":3: 2 tab-separated"):
    glue_submission.parse_test_tsv("index\ts1\ts2\n0\ta\tb\n1\ta\n", _BY_NAME["RTE"])
  with pytest.raises(glue_data.GlueDataError, match="repeated indices"):
    glue_submission.parse_test_tsv("index\ts1\ts2\n0\ta\tb\n0\tc\td\n", _BY_NAME["RTE"])


def test_the_sets_each_model_predicts():
  names = lambda task: [s.name for s in glue_submission.sets_predicted_by(task)]
  assert names("mnli") == ["MNLI-m", "MNLI-mm", "AX"] == names("mnli_mm")
  assert names("stsb") == ["STS-B"] and names("QQP") == ["QQP"]
  assert [s.submission_file for s in glue_submission.TEST_SETS] == [
      "CoLA.tsv", "SST-2.tsv", "MRPC.tsv", "STS-B.tsv", "QQP.tsv", "MNLI-m.tsv",
      "MNLI-mm.tsv", "QNLI.tsv", "RTE.tsv", "WNLI.tsv", "AX.tsv"]


def test_submission_text_uses_the_servers_labels_and_clips_scores():
  rng = np.random.default_rng()
  text = glue_submission.submission_text(_BY_NAME["AX"], ["7", "8", "9"], np.array([0, 1, 2]))
  assert text == "index\tprediction\n7\tentailment\n8\tneutral\n9\tcontradiction\n"
  rte = glue_submission.submission_text(_BY_NAME["RTE"], ["0", "1"], np.array([1, 0]))
  assert rte.splitlines()[1:] == ["0\tnot_entailment", "1\tentailment"]
  labels = rng.integers(0, 2, 20)
  cola = glue_submission.submission_text(_BY_NAME["CoLA"], [str(i) for i in range(20)], labels)
  assert [line.split("\t")[1] for line in cola.splitlines()[1:]] == [str(l) for l in labels]
  scores = rng.uniform(-2, 7, 50)
  stsb = glue_submission.submission_text(_BY_NAME["STS-B"], [str(i) for i in range(50)], scores)
  written = np.array([float(line.split("\t")[1]) for line in stsb.splitlines()[1:]])
  np.testing.assert_allclose(written, np.minimum(np.maximum(scores, 0), 5), atol=5e-4)
  with pytest.raises(ValueError, match="2 indices but 3 predictions"):
    glue_submission.submission_text(_BY_NAME["CoLA"], ["0", "1"], np.array([0, 1, 1]))


@pytest.mark.parametrize("trial", range(5))
def test_median_seed_is_statistics_median_low(trial):
  rng = np.random.default_rng()
  n = int(rng.integers(1, 9))
  scores = {str(s): float(v) for s, v in zip(rng.permutation(20)[:n], rng.integers(0, 4, n))}
  chosen = submit.median_seed(scores)
  ordered = sorted(scores.values())
  assert scores[chosen] == ordered[(n - 1) // 2]  # the lower middle value
  assert int(chosen) == min(int(s) for s, v in scores.items() if v == scores[chosen])
  del trial


def _fake_glue_output(out: pathlib.Path, rows: dict[str, int]) -> dict:
  """A finetune.glue output folder: results.json and the runs' test predictions."""
  rng = np.random.default_rng(0)
  results = {"runs": {"cola": {"0": {"mcc": 10.0}, "1": {"mcc": 30.0}, "2": {"mcc": 20.0}},
                      "stsb": {"0": {"spearman": 50.0}, "1": {"spearman": 40.0}},
                      "mnli": {"3": {"accuracy": 70.0}}, "mnli_mm": {"3": {"accuracy": 71.0}},
                      "rte": {"0": {"accuracy": 55.0}}}}
  out.mkdir(parents=True)
  (out / "results.json").write_text(json.dumps(results))
  for task, by_seed in results["runs"].items():
    for seed in by_seed:
      for test_set in glue_submission.sets_predicted_by(task):
        if test_set.name not in rows or task == "mnli_mm":
          continue
        n = rows[test_set.name]
        spec = glue_data.get_task(test_set.task)
        predictions = (rng.uniform(0, 5, n) if spec.is_regression
                       else rng.integers(0, len(spec.labels), n))
        path = pathlib.Path(glue_submission.predictions_path(str(out / task / f"seed_{seed}"),
                                                             test_set))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(glue_submission.submission_text(
            test_set, [str(i) for i in range(n)], predictions))
  return results


@pytest.mark.slow
def test_submit_command_assembles_the_median_runs_files(tmp_path):
  rows = {"CoLA": 6, "STS-B": 4, "MNLI-m": 5, "MNLI-mm": 3, "AX": 2}
  out = tmp_path / "glue"
  _fake_glue_output(out, rows)
  result = run_module("finetune.submit", [f"--output_dir={out}"], timeout=120)
  assert result.returncode == 0, result.stderr.decode()[-2000:]
  table = result.stdout.decode()
  assert "| CoLA.tsv | cola | 2 (median mcc of 3 seed(s)) | 20.00 | 6 |" in table
  assert "RTE.tsv: seed 0 has no RTE.tsv" in table and "SST-2.tsv: no fine-tuned run" in table
  submission = out / "submission"
  record = json.loads((submission / "results.json").read_text())
  # median_low of STS-B's 50 and 40 is 40: seed 1.
  assert {n: f["seed"] for n, f in record["files"].items()} == {
      "CoLA.tsv": 2, "STS-B.tsv": 1, "MNLI-m.tsv": 3, "MNLI-mm.tsv": 3, "AX.tsv": 3}
  assert len(record["missing"]) == 6
  with zipfile.ZipFile(submission / "submission.zip") as zipped:
    assert sorted(zipped.namelist()) == sorted(record["files"])
    for name, n in rows.items():
      text = zipped.read(f"{name}.tsv").decode()
      source = pathlib.Path(record["files"][f"{name}.tsv"]["source"])
      assert text == source.read_text() == (submission / f"{name}.tsv").read_text()
      lines = text.splitlines()
      assert lines[0] == "index\tprediction" and len(lines) == n + 1
  for name, want in [("AX", {"entailment", "neutral", "contradiction"}),
                     ("CoLA", {"0", "1"})]:
    labels = {line.split("\t")[1] for line in (submission / f"{name}.tsv").read_text()
              .splitlines()[1:]}
    assert labels <= want

  named = run_module("finetune.submit", [f"--output_dir={out}", "--seed=1",
                                         f"--submission_dir={tmp_path / 'seed1'}"], timeout=120)
  assert named.returncode == 0, named.stderr.decode()[-2000:]
  assert "MNLI-m.tsv: no run of seed 1 (seeds run: 3)" in named.stdout.decode()
  assert set(json.loads((tmp_path / "seed1" / "results.json").read_text())["files"]) == {
      "CoLA.tsv", "STS-B.tsv"}

  # A broken prediction file, an empty folder: one error line each.
  bad = out / "cola" / "seed_2" / "test_predictions" / "CoLA.tsv"
  bad.write_text("index\tprediction\n0\tmaybe\n")
  broken = run_module("finetune.submit", [f"--output_dir={out}"], timeout=120)
  assert broken.returncode == 2 and b"CoLA.tsv:2: not a valid CoLA prediction row" in \
      broken.stderr and b"Traceback" not in broken.stderr
  empty = run_module("finetune.submit", [f"--output_dir={tmp_path / 'nothing'}"], timeout=120)
  assert empty.returncode == 2 and b"error: No results.json" in empty.stderr
