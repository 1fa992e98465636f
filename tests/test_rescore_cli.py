"""`python -m script_jax.scoring.rescore` end to end on a small workdir with plain and gzipped n-best
files, and its errors as a user sees them."""

import gzip
import json

import pytest
from helpers import run_module, shared_workdir

pytestmark = pytest.mark.slow

REFS = ["the function returns a new list", "a class definition is an executable statement",
        "the loop ends when the list is empty"]


def _nbest(refs, seed):
  """Three hypotheses per reference: the reference and two corrupted copies, scores fixed."""
  out = {}
  for i, ref in enumerate(refs):
    words = ref.split()
    swapped = " ".join(words[1:2] + words[:1] + words[2:])
    dropped = " ".join(words[:-1])
    hyps = [dropped, ref, swapped] if (i + seed) % 2 else [swapped, dropped, ref]
    out[f"utt-{seed}-{i}"] = {"ref": ref, **{f"hyp_{k + 1}": {"score": -1.0 - 0.5 * k, "text": h}
                                             for k, h in enumerate(hyps)}}
  return out


def test_rescore_cli_on_plain_and_gz_nbest_files(tmp_path_factory, tmp_path):
  workdir = shared_workdir(tmp_path_factory)
  dev = tmp_path / "dev-clean.am.json"
  dev.write_text(json.dumps(_nbest(REFS, 0)))
  test = tmp_path / "test-clean.am.json.gz"
  test.write_bytes(gzip.compress(json.dumps(_nbest(REFS[::-1], 1)).encode()))
  report_path = tmp_path / "report.json"
  result = run_module("scoring.rescore", [f"--workdir={workdir}", f"--dev={dev}", f"--test={test}",
                               "--method=mlm", "--lambdas=0:1:0.5", "--length_penalty=gnmt",
                               f"--output_json={report_path}", "--batch_size=16"])
  assert result.returncode == 0, result.stderr.decode()[-3000:]
  stdout = result.stdout.decode()
  for row in ("baseline (1-best)", "oracle (3-best)", "rescored (mlm, lambda="):
    assert row in stdout
  assert "| dev-clean" in stdout and "| test-clean" in stdout
  report = json.loads(report_path.read_text())
  assert report["lambda"] in (0.0, 0.5, 1.0) and report["length_penalty"] == "gnmt"
  assert [g["lambda"] for g in report["dev_grid"]] == [0.0, 0.5, 1.0]
  for name in ("dev-clean", "test-clean"):
    wer = report["sets"][name]["wer"]
    assert wer["oracle"] == 0.0 and wer["baseline"] > 0
  dev_wer = report["sets"]["dev-clean"]["wer"]
  assert dev_wer["rescored"] == min(g["wer"] for g in report["dev_grid"]) <= dev_wer["baseline"]


def test_rescore_cli_bad_file_is_one_line_and_status_2(tmp_path):
  dev = tmp_path / "dev.json"
  dev.write_text('{"u1": {"ref": "a b", "hyp_1": {"score": -1.0}}}')
  result = run_module("scoring.rescore", [f"--workdir={tmp_path}", f"--dev={dev}"])
  assert result.returncode == 2
  stderr = result.stderr.decode()
  assert "Traceback" not in stderr
  assert "dev.json: utterance 'u1', hyp_1: expected" in stderr
