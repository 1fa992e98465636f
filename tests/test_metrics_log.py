"""The pretraining metrics records: written off the loop as new files, never rewritten, merged
on reading (a resumed run's repeated steps replace the earlier records)."""

import json
import time
import uuid

import pytest

from helpers import run_module
from script_jax import fs
from script_jax import metrics_records


def _record(step, **extra):
  return {"step": step, "loss": 0.25, **extra}


def test_each_flush_writes_one_new_file_of_its_own_records_and_touches_no_other():
  """On ram:// (TensorFlow's in-memory file system, served by the same tf.io.gfile as gs://):
  the bytes written per record stay the same however long the log grows."""
  workdir = f"ram://metrics_log_{uuid.uuid4().hex}/run"
  log = metrics_records.MetricsLog(workdir, enabled=True, flush_seconds=1e6)
  written, sizes = {}, []
  for flush in range(6):
    records = [_record(1000 + 100 * flush + i) for i in range(25)]
    for record in records:
      log.write(record)
    log.flush()
    paths = metrics_records.segment_paths(workdir)
    assert len(paths) == flush + 1  # one new file per flush
    new = fs.read_bytes(paths[-1])
    assert new == "".join(json.dumps(r) + "\n" for r in records).encode()
    sizes.append(len(new) / len(records))
    assert {p: fs.read_bytes(p) for p in written} == written  # earlier files untouched
    written[paths[-1]] = new
  log.close()
  assert len(set(sizes)) == 1  # bytes per record: the same however long the log
  assert [r["step"] for r in metrics_records.read_records(workdir)] == [
      1000 + 100 * f + i for f in range(6) for i in range(25)]


def test_records_are_written_by_the_timer_without_a_flush(tmp_path):
  log = metrics_records.MetricsLog(str(tmp_path), enabled=True, flush_seconds=0.2)
  log.write(_record(1))
  deadline = time.time() + 30
  while not metrics_records.segment_paths(str(tmp_path)) and time.time() < deadline:
    time.sleep(0.05)
  assert [r["step"] for r in metrics_records.read_records(str(tmp_path))] == [1]
  log.close()
  disabled = metrics_records.MetricsLog(str(tmp_path / "other"), enabled=False)
  disabled.write(_record(1))
  disabled.flush()
  assert not (tmp_path / "other").exists()  # not process 0: writes nothing


@pytest.mark.slow
def test_a_resumed_run_replaces_the_repeated_steps_and_the_old_file_is_read_first(tmp_path):
  (tmp_path / "metrics.jsonl").write_text("".join(  # a workdir of the one-file layout
      json.dumps(r) + "\n" for r in [_record(10), _record(20), _record(30, old=True)]))
  first = metrics_records.MetricsLog(str(tmp_path), enabled=True)
  for record in [_record(40, old=True), {"step": 40, "eval_mlm_loss": 9.0}]:
    first.write(record)
  first.close()
  resumed = metrics_records.MetricsLog(str(tmp_path), enabled=True)  # from checkpoint 20
  for record in [_record(30), _record(40), {"step": 40, "eval_mlm_loss": 5.0}, _record(50)]:
    resumed.write(record)
  resumed.close()
  assert [p.rsplit("/", 1)[1] for p in metrics_records.segment_paths(str(tmp_path))] == [
      "000000.jsonl", "000001.jsonl"]
  records = metrics_records.read_records(str(tmp_path))
  assert [(r["step"], metrics_records.is_eval(r)) for r in records] == [
      (10, False), (20, False), (30, False), (40, False), (40, True), (50, False)]
  assert not any(r.get("old") for r in records) and records[4]["eval_mlm_loss"] == 5.0

  printed = run_module("metrics_log", [f"--workdir={tmp_path}"], timeout=120)
  assert printed.returncode == 0, printed.stderr.decode()[-2000:]
  assert [json.loads(l) for l in printed.stdout.decode().splitlines()] == records


def test_a_failed_write_is_raised_in_the_training_thread(tmp_path):
  log = metrics_records.MetricsLog(str(tmp_path), enabled=True, flush_seconds=1e6)
  (tmp_path / "metrics").rmdir()
  (tmp_path / "metrics").write_text("a file where the folder was")
  log.write(_record(1))
  with pytest.raises(Exception):
    log.flush()
  log.close()


def test_progress_line_and_eta():
  """The one console line of pretraining and fine-tuning log steps."""
  assert metrics_records.format_eta(245.9) == "4m05s"
  assert metrics_records.format_eta(3725) == "1h02m"
  assert metrics_records.format_eta(float("inf")) == "?"
  line = metrics_records.progress_line(120, 1000, {"loss": 2.31234, "accuracy": 0.5}, 4.0)
  assert line == "step 120/1000 | loss 2.312 accuracy 0.5 | 4.00 steps/s | ETA 3m40s"
  assert metrics_records.progress_line(0, 10, {}, 0.0).endswith("| 0.00 steps/s | ETA ?")
