"""run_lock on a workdir with no flock (gs://, served here by TensorFlow's in-memory ram://
through the same tf.io.gfile code): the lease object, its refusal and its take-over."""

import json
import socket
import subprocess
import sys
import uuid

import pytest

from script_jax import fs
from script_jax import run_lock


def _dead_pid() -> int:
  """The pid of a process that has exited (and been reaped)."""
  proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  return int(proc.stdout)


def _write_lease(workdir: str, holder: dict) -> None:
  fs.makedirs(workdir)
  with fs.open(fs.join(workdir, run_lock.LOCK_FILE), "w") as f:
    f.write(json.dumps(holder))


def test_a_remote_lease_is_held_refused_to_a_second_run_and_released():
  workdir = f"ram://lock-{uuid.uuid4().hex}/run"
  lease = fs.join(workdir, run_lock.LOCK_FILE)
  with run_lock.hold(workdir):
    with fs.open(lease) as f:
      holder = json.loads(f.read())
    assert holder["host"] == socket.gethostname() and isinstance(holder["pid"], int)
    with pytest.raises(run_lock.WorkdirBusyError) as refused:
      with run_lock.hold(workdir):
        pytest.fail("a second run took the held lease")
    text = str(refused.value)
    assert f"another run is using --workdir {workdir}" in text
    assert f"host {holder['host']}, process {holder['pid']}, started {holder['started']}" in text
  assert not fs.exists(lease)  # released at the end


def test_a_lease_left_by_a_dead_run_on_this_host_is_taken_over(caplog):
  workdir = f"ram://lock-{uuid.uuid4().hex}/run"
  pid = _dead_pid()
  _write_lease(workdir, {"host": socket.gethostname(), "pid": pid, "started": "then",
                         "process_start": "1"})
  with caplog.at_level("WARNING"):
    with run_lock.hold(workdir):
      with fs.open(fs.join(workdir, run_lock.LOCK_FILE)) as f:
        assert json.loads(f.read())["pid"] != pid  # now ours
  assert any("ended without releasing it" in r.getMessage() and f"process {pid}" in r.getMessage()
             for r in caplog.records)


def test_a_lease_from_another_host_is_refused_with_how_to_clear_it():
  workdir = f"ram://lock-{uuid.uuid4().hex}/run"
  _write_lease(workdir, {"host": "another-host-0", "pid": 12, "started": "2026-12-07T01:00:00"})
  lease = fs.join(workdir, run_lock.LOCK_FILE)
  with pytest.raises(run_lock.WorkdirBusyError,
                     match=f"host another-host-0, process 12.*delete {lease} and start again"):
    with run_lock.hold(workdir):
      pytest.fail("took another host's lease")
  assert fs.exists(lease)  # left for its owner
