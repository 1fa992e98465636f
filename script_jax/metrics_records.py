"""A run's metrics records, pretraining's and fine-tuning's: written off the training loop,
never rewritten; and the console's progress line. `python -m script_jax.metrics_log` prints
them (metrics_log.py).

The trainer hands each record (one per log step, one per evaluation) to `MetricsLog.write`,
which only queues it. A background thread writes the queued records every `flush_seconds` as a
new file, `WORKDIR/metrics/<number>.jsonl` (JSON lines), and `flush()` (at every checkpoint, at a
preemption and at the end) writes what is queued and waits for it. Nothing written is opened
again: on gs:// an append would download and re-upload the whole object (TensorFlow's GCS
client), a cost that grows with the run; a new object per flush costs the same at step ten
million as at step ten.

`read_records(workdir)` merges the files in the order they were written. A resumed run repeats
the steps after its checkpoint, so a record written later for the same step and kind (training
or evaluation) replaces the earlier one: each logged step and each evaluation appears once.
Workdirs (and fine-tuning run folders) written before this layout have one `metrics.jsonl`;
it is read first.
"""

from __future__ import annotations

import json
import math
import queue
import threading
import time
from typing import Any, Optional

from script_jax import cli_errors
from script_jax import fs

FOLDER = "metrics"
LEGACY_FILE = "metrics.jsonl"
_DIGITS = 6


def segment_paths(workdir: str) -> list[str]:
  """The metrics files of a workdir, in the order they were written."""
  folder = fs.join(workdir, FOLDER)
  if not fs.isdir(folder):
    return []
  names = [n.rstrip("/") for n in fs.listdir(folder)]
  numbered = sorted(int(n[:-len(".jsonl")]) for n in names
                    if n.endswith(".jsonl") and n[:-len(".jsonl")].isdigit())
  return [fs.join(folder, f"{number:0{_DIGITS}d}.jsonl") for number in numbered]


def is_eval(record: dict[str, Any]) -> bool:
  """A held-out evaluation's record (its metrics are prefixed eval_), not a training step's."""
  return any(k.startswith("eval_") for k in record)


def _kind(record: dict[str, Any]) -> str:
  return "eval" if is_eval(record) else "train"


def read_records(workdir: str) -> list[dict[str, Any]]:
  """Every record of a run, in step order (training before evaluation at a step), the last
  written of each (step, kind)."""
  paths = segment_paths(workdir)
  legacy = fs.join(workdir, LEGACY_FILE)
  if fs.exists(legacy):
    paths.insert(0, legacy)
  latest: dict[tuple[int, str], dict[str, Any]] = {}
  for path in paths:
    for number, line in enumerate(fs.read_bytes(path).decode("utf-8", "replace").splitlines()):
      if line.strip():
        try:
          record = json.loads(line)
          latest[(int(record["step"]), _kind(record))] = record
        except (ValueError, KeyError, TypeError) as e:
          raise cli_errors.UserError(
              f"{path}, line {number + 1}, is not a whole metrics record ({e}): the file is "
              "damaged (cut short?). Move it away to read the others; the trainer never reads "
              "these files back, so training is not affected.") from e
  return [latest[key] for key in sorted(latest, key=lambda k: (k[0], k[1] == "eval"))]


def format_eta(seconds: float) -> str:
  """`1h02m`, `4m05s`, or `?` when the rate is not known yet."""
  if not math.isfinite(seconds):
    return "?"
  h, rem = divmod(int(seconds), 3600)
  return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def progress_line(step: int, total_steps: int, metrics: dict[str, float],
                  steps_per_sec: float) -> str:
  """The console line of a log step: `step 120/1000 | loss 2.31 | 3.10 steps/s | ETA 4m44s`."""
  eta = (total_steps - step) / steps_per_sec if steps_per_sec > 0 else float("inf")
  shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
  return (f"step {step}/{total_steps} | {shown} | {steps_per_sec:.2f} steps/s | "
          f"ETA {format_eta(eta)}")


class MetricsLog:
  """Queues records; a background thread writes them as new files (process 0 only)."""

  def __init__(self, workdir: str, enabled: bool, flush_seconds: float = 300.0):
    self.workdir, self.enabled, self.flush_seconds = workdir, enabled, flush_seconds
    self._queue: queue.Queue = queue.Queue()
    self._error: Optional[BaseException] = None
    if not enabled:
      return
    fs.makedirs(fs.join(workdir, FOLDER))
    existing = segment_paths(workdir)
    self._next = int(existing[-1].rsplit("/", 1)[-1][:_DIGITS]) + 1 if existing else 0
    self._thread = threading.Thread(target=self._run, name="metrics-log", daemon=True)
    self._thread.start()

  def write(self, record: dict[str, Any]) -> None:
    """Queues one record (returns at once)."""
    if self.enabled:
      self._raise_if_failed()
      self._queue.put(("record", record))

  def flush(self) -> None:
    """Writes everything queued so far and waits until it is written."""
    if self.enabled:
      done = threading.Event()
      self._queue.put(("flush", done))
      done.wait()
      self._raise_if_failed()

  def close(self, raise_errors: bool = True) -> None:
    """Flushes and stops the thread; a failed write is raised unless `raise_errors` is False
    (when another error is on its way out, which it must not hide)."""
    if self.enabled and self._thread.is_alive():
      self._queue.put(("close", None))
      self._thread.join()
    if raise_errors:
      self._raise_if_failed()

  def _raise_if_failed(self) -> None:
    if self._error is not None:
      error, self._error = self._error, None
      raise error

  def _write_segment(self, records: list[dict[str, Any]]) -> None:
    if not records or self._error is not None:
      return
    path = fs.join(self.workdir, FOLDER, f"{self._next:0{_DIGITS}d}.jsonl")
    try:
      fs.write_atomically(path, "".join(json.dumps(r) + "\n" for r in records))
      self._next += 1
    except Exception as e:  # pylint: disable=broad-except
      self._error = e  # raised in the training thread at its next write or flush

  def _run(self) -> None:
    buffered: list[dict[str, Any]] = []
    deadline = time.monotonic() + self.flush_seconds
    while True:
      try:
        kind, value = self._queue.get(timeout=max(deadline - time.monotonic(), 0.01))
      except queue.Empty:
        kind, value = "timer", None
      if kind == "record":
        buffered.append(value)
      if kind in ("timer", "flush", "close") or time.monotonic() >= deadline:
        self._write_segment(buffered)
        buffered = []
        deadline = time.monotonic() + self.flush_seconds
      if kind == "flush":
        value.set()
      if kind == "close":
        return
