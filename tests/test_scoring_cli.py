"""`python -m script_jax.scoring.score` end to end on a workdir made by `python -m script_jax.main`: its
checkpoint, its SentencePiece tokenizer and the prepared-data metadata the scorer reads."""

import os

import numpy as np
import pytest
from helpers import run_module, shared_workdir

from script_jax.scoring import score
from script_jax.scoring import pll_scorer

pytestmark = pytest.mark.slow

SENTENCES = ["The function returns a new list of the items.", "",
             "A class definition is an executable statement.", "   ",
             "Caf\u00e9 names are fine too.", "the"]


@pytest.fixture
def scoring_workdir(tmp_path_factory):
  return shared_workdir(tmp_path_factory)


@pytest.fixture
def workdir(scoring_workdir):
  return scoring_workdir


def _parse(text):
  rows = [line.split("\t", 2) for line in text.split("\n")[:-1]]
  return [(float(p), int(n), s) for p, n, s in rows]


def test_score_cli_writes_one_line_per_input_line(workdir):
  stdin = ("\n".join(SENTENCES) + "\n").encode()
  result = run_module("scoring.score", [f"--workdir={workdir}", "--input=-", "--batch_size=4"], stdin=stdin)
  assert result.returncode == 0, result.stderr.decode()[-3000:]
  assert b"sentences/s" in result.stderr
  rows = _parse(result.stdout.decode("utf-8"))
  assert [s for _, _, s in rows] == SENTENCES
  assert rows[1][:2] == (0.0, 0) and rows[3][:2] == (0.0, 0)
  assert all(p < 0 and n > 0 for i, (p, n, _) in enumerate(rows) if i not in (1, 3))

  # The same numbers as the library on the same checkpoint.
  scorer = pll_scorer.Scorer.from_workdir(workdir, batch_size=4)
  pll, num_tokens = scorer.score(SENTENCES)
  np.testing.assert_allclose([p for p, _, _ in rows], pll, atol=2e-6)
  assert [n for _, n, _ in rows] == list(num_tokens)


def test_score_run_writes_an_output_file(workdir, tmp_path):
  input_path = tmp_path / "in.txt"
  input_path.write_text("\n".join(SENTENCES[:3]) + "\n", encoding="utf-8")
  output_path = tmp_path / "out.tsv"
  assert score.run(workdir, str(input_path), str(output_path), batch_size=4) == 3
  rows = _parse(output_path.read_text(encoding="utf-8"))
  assert [s for _, _, s in rows] == SENTENCES[:3] and rows[1][:2] == (0.0, 0)
  assert sorted(os.listdir(tmp_path)) == ["in.txt", "out.tsv"]  # no temporary file left


def test_score_in_process_from_stdin_like_stream_with_mlm(workdir, tmp_path):
  import io  # pylint: disable=g-import-not-at-top
  scorer = pll_scorer.Scorer.from_workdir(workdir, method="mlm", batch_size=16)
  out = io.StringIO()
  lines = score.read_lines(io.BytesIO("\n".join(SENTENCES).encode()), "<stdin>")
  assert score.score_lines(scorer, lines, out, chunk_lines=4) == len(SENTENCES)
  rows = _parse(out.getvalue())
  assert [s for _, _, s in rows] == SENTENCES
  pll, num_tokens = scorer.score(SENTENCES)
  np.testing.assert_allclose([p for p, _, _ in rows], pll, atol=2e-6)
  assert rows[1][:2] == (0.0, 0)


def test_score_cli_errors_are_one_line_and_status_2(workdir, tmp_path):
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"fine line\nbad \xff byte\n")
  result = run_module("scoring.score", [f"--workdir={tmp_path / 'nope'}", f"--input={bad}"])
  assert result.returncode == 2
  stderr = result.stderr.decode()
  assert "Traceback" not in stderr and "bad.txt: line 2 is not valid UTF-8" in stderr
  assert "--errors=replace" in stderr


def test_score_run_checks_inputs(workdir, tmp_path):
  with pytest.raises(pll_scorer.ScoringError, match="input file .* does not exist"):
    score.run(workdir, str(tmp_path / "missing.txt"))
  good = tmp_path / "good.txt"
  good.write_text("a line\n")
  with pytest.raises(pll_scorer.ScoringError, match="workdir .* does not exist"):
    score.run(str(tmp_path / "no_workdir"), str(good))
  empty_workdir = tmp_path / "empty"
  empty_workdir.mkdir()
  with pytest.raises(FileNotFoundError, match="not a script_jax workdir"):
    score.run(str(empty_workdir), str(good))


def test_score_run_replace_and_long_lines(workdir, tmp_path):
  path = tmp_path / "in.txt"
  long_line = " ".join(["the function returns a list"] * 20)
  path.write_bytes(b"ok \xff here\n" + long_line.encode() + b"\n")
  with pytest.raises(pll_scorer.ScoringError, match=r"line 2 has \d+ tokens"):
    score.run(workdir, str(path), str(tmp_path / "o.tsv"), errors="replace")
  assert not (tmp_path / "o.tsv").exists()  # nothing half-written
  score.run(workdir, str(path), str(tmp_path / "o.tsv"), errors="replace", long="window")
  rows = _parse((tmp_path / "o.tsv").read_text(encoding="utf-8"))
  assert rows[0][2] == "ok \ufffd here" and rows[1][1] > 30
