"""The experiment commands end to end (the curve, the comparison of objectives), and the curve's
aggregation against a hand count."""

import csv
import json

import numpy as np
import pytest

from helpers import run_module, shared_workdir, tiny_pretraining_flags, write_tiny_corpus
from script_jax.experiments import curve_runs
from test_finetune_glue import _glue_fixture


def test_curve_point_against_a_hand_computation():
  rng = np.random.default_rng()
  scores = {"cola": rng.uniform(-10, 60, 3), "rte": rng.uniform(40, 70, 3)}
  results = {"runs": {"cola": {str(s): {"mcc": float(v)} for s, v in enumerate(scores["cola"])},
                      "rte": {str(s): {"accuracy": float(v)}
                              for s, v in enumerate(scores["rte"])}}}
  point = curve_runs.curve_point(results, ["cola", "rte"])
  per_seed = (scores["cola"] + scores["rte"]) / 2
  assert point["glue_mean"] == pytest.approx(per_seed.mean())
  assert (point["glue_min"], point["glue_max"]) == pytest.approx((per_seed.min(),
                                                                 per_seed.max()))
  assert point["tasks"]["rte"]["max"] == pytest.approx(scores["rte"].max())
  assert curve_runs.curve_point(results, ["cola", "sst2"]) is None  # no SST-2 run yet


@pytest.mark.slow
def test_curve_command_end_to_end(tmp_path, tmp_path_factory):
  workdirs = [shared_workdir(tmp_path_factory, objective) for objective in ("script", "electra")]
  data_dir = _glue_fixture(tmp_path / "glue")
  out = tmp_path / "curve"
  args = [f"--workdirs={','.join(workdirs)}", "--labels=SCRIPT,ELECTRA",
          f"--data_dir={data_dir}", f"--output_dir={out}", "--tasks=cola", "--nocheck_counts",
          "--config.num_seeds=2", "--config.epochs=1", "--config.batch_size=8",
          "--config.max_length=32"]
  result = run_module("experiments.curve", args, timeout=900)
  assert result.returncode == 0, result.stderr.decode()[-3000:]
  data = json.loads((out / "curve.json").read_text())
  for label in ("SCRIPT", "ELECTRA"):
    entry = data["workdirs"][label]
    assert [p["step"] for p in entry["points"]] == [1, 2]  # every kept checkpoint
    for p in entry["points"]:
      assert p["tasks"]["cola"]["seeds"] == 2
      assert p["glue_min"] <= p["glue_mean"] <= p["glue_max"]
    # The held-out pretraining metrics of both steps; the critic's AUC for both objectives.
    assert [r["step"] for r in entry["pretraining"]] == [1, 2]
    assert all(0 <= r["eval_disc_auc"] <= 1 for r in entry["pretraining"])
  rows = list(csv.DictReader((out / "curve.csv").open()))
  assert {(r["label"], r["step"], r["metric"]) for r in rows} >= {
      ("SCRIPT", "2", "glue_mean"), ("ELECTRA", "1", "cola"), ("ELECTRA", "2", "eval_disc_auc")}
  assert "| step | CoLA | GLUE mean | held-out MLM loss | held-out critic AUC |" in (
      out / "curve.md").read_text()
  png = (out / "curve.png").read_bytes()
  assert png.startswith(b"\x89PNG") and len(png) > 20_000  # a drawn figure, not an empty one
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  pixels = matplotlib.image.imread(out / "curve.png")
  assert pixels.shape[0] > 500 and np.std(pixels[..., :3]) > 0.05  # not blank

  # A rerun fine-tunes nothing: every checkpoint's results stay as they were.
  results = sorted(out.glob("*/step_*/results.json"))
  assert len(results) == 4
  stamps = [p.stat().st_mtime_ns for p in results]
  again = run_module("experiments.curve", args, timeout=600)
  assert again.returncode == 0, again.stderr.decode()[-3000:]
  assert again.stderr.decode().count(": done") == 4
  assert [p.stat().st_mtime_ns for p in results] == stamps

  missing = run_module("experiments.curve", [*args, "--steps=7"], timeout=300)
  assert missing.returncode == 2 and b"keeps checkpoints at steps [1, 2]" in missing.stderr


@pytest.mark.slow
def test_compare_command_pretrains_each_objective_on_one_prepared_folder(tmp_path):
  data_dir = _glue_fixture(tmp_path / "glue")
  out = tmp_path / "compare"
  flags = [*tiny_pretraining_flags(write_tiny_corpus(tmp_path)), "--objectives=script,mlm",
           f"--output_dir={out}", f"--data_dir={data_dir}", "--tasks=cola", "--nocheck_counts",
           "--finetune.num_seeds=1", "--finetune.epochs=1", "--finetune.batch_size=8",
           "--finetune.max_length=32"]
  result = run_module("experiments.compare", flags, timeout=900)
  assert result.returncode == 0, result.stderr.decode()[-3000:]
  for objective in ("script", "mlm"):
    config = json.loads((out / objective / "run_config.json").read_text())
    assert config["objective"] == objective and config["data"]["prepared_dir"] == str(out / "data")
  assert not (out / "script" / "data").exists()  # one prepared folder for both
  table = (out / "comparison.md").read_text()
  assert "| SCRIPT (step 2) |" in table and "| MLM (step 2) |" in table
  assert "| MLM | 2 | " in table and "| SCRIPT | 2 | " in table
  assert (out / "curve" / "curve.png").stat().st_size > 20_000
  curve_data = json.loads((out / "curve" / "curve.json").read_text())
  assert [p["step"] for p in curve_data["workdirs"]["MLM"]["points"]] == [1, 2]
  # A rerun trains nothing; --steps keeps the curve to the checkpoints named.
  again = run_module("experiments.compare", [*flags, "--steps=2"], timeout=600)
  assert again.returncode == 0 and again.stderr.decode().count(": pretrained") == 2
  curve_data = json.loads((out / "curve" / "curve.json").read_text())
  assert [p["step"] for p in curve_data["workdirs"]["MLM"]["points"]] == [2]
