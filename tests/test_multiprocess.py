"""Two real processes on localhost joined by jax.distributed: the multi-host code path."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT, build_once

from script_jax import checkpoints
from script_jax import metrics_records

pytestmark = pytest.mark.slow


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _two_process_args(folder):
  """100 steps of a one-layer tiny model; the data prepared by process 0 in `folder`/data while
  process 1 waits for it."""
  return ["--config=configs/tiny.py", "--config.num_train_steps=100",
          "--config.checkpoint_every_steps=50", "--config.log_every_steps=2",
          "--config.batch_size=8", "--config.optim.warmup_steps=10",
          "--config.model.num_layers=1", "--config.seq_len=32", "--config.eval_every_steps=50",
          f"--config.data.prepared_dir={folder / 'data'}"]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  """(args, workdir, stderr of each process) of one uninterrupted two-process run, made once:
  the first test checks it, the SIGTERM test compares its resumed run with it."""
  def build(folder):
    workdir = folder / "straight"
    errors = _finish(_launch(_two_process_args(folder) + [f"--workdir={workdir}"],
                             _free_port()))
    (folder / "stderr.json").write_text(json.dumps(errors))
    return str(folder)
  folder = pathlib.Path(build_once(tmp_path_factory, "two_process_run", build))
  return (_two_process_args(folder), folder / "straight",
          json.loads((folder / "stderr.json").read_text()))


def test_two_processes_train_and_checkpoint_together(two_process_run, tmp_path):
  args, workdir, errors = two_process_run
  assert "JAX process 1/2, 2 devices" in errors[1]
  records = metrics_records.read_records(str(workdir))
  # Written once, by process 0.
  assert [r["step"] for r in records if "loss" in r] == list(range(2, 101, 2))
  # The held-out evaluations over both processes' rows, written once.
  evals = [r for r in records if "eval_disc_auc" in r]
  assert [r["step"] for r in evals] == [50, 100] and all(0 < r["eval_disc_auc"] < 1
                                                         for r in evals)
  config, _, params = checkpoints.load_pretrained(str(workdir))
  assert config.objective == "script"
  assert checkpoints.make_manager(str(workdir), config, read_only=True).all_steps() == [50, 100]
  leaves = [np.asarray(x) for x in __import__("jax").tree.leaves(params)]
  assert all(np.isfinite(x).all() for x in leaves)

  # init_from on two processes: the parameters restored straight into the global sharding
  # (a device_put of one host's copy would be a cross-host transfer), relaid out to scanned
  # layers; at learning rate 0 they stay the first run's.
  second = tmp_path / "second"
  errors = _finish(_launch(args + [f"--workdir={second}", f"--config.init_from={workdir}",
                                   "--config.num_train_steps=2", "--config.optim.warmup_steps=0",
                                   "--config.optim.learning_rate=0.0",
                                   "--config.model.scan_layers=True"], _free_port()))
  assert f"Initialised parameters from {workdir}" in errors[0]
  from script_jax import models  # pylint: disable=g-import-not-at-top
  restored = models.unstack_layers(checkpoints.load_pretrained(str(second))[2])
  for a, b in zip(__import__("jax").tree.leaves(restored), leaves):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_host_local_prepared_folder_fails_at_once_on_every_process(tmp_path):
  """The same local path names a different folder on each host (here: a different path per
  process, which is what two hosts' own disks look like): every process stops within seconds
  with the advice to use gs:// or a shared disk, instead of waiting for process 0's data."""
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="")
  args = ["--config=configs/tiny.py", f"--workdir={tmp_path / 'run'}",
          "--config.num_train_steps=2", "--config.optim.warmup_steps=0", "--config.batch_size=8",
          "--config.model.num_layers=1",
          "--config.seq_len=32", "--distributed", f"--coordinator_address=localhost:{port}",
          "--num_processes=2"]
  procs = [subprocess.Popen(
      [sys.executable, "-m", "script_jax.main", *args, f"--process_id={i}",
       f"--config.data.prepared_dir={tmp_path / f'disk_of_host_{i}' / 'data'}"],
      cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  errors = [p.communicate(timeout=300)[1] for p in procs]
  for p, err in zip(procs, errors):
    assert p.returncode == 2, err[-3000:]
    assert "do not share with process 0" in err and "gs://" in err, err[-3000:]
    assert "process(es) [1]" in err, err[-3000:]
  assert not (tmp_path / "disk_of_host_0" / "data" / "metadata.json").exists()


def _launch(args, port):
  env = dict(os.environ, XLA_FLAGS="")
  return [subprocess.Popen(
      [sys.executable, "-m", "script_jax.main", *args, "--distributed",
       f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
      for i in range(2)]


def _finish(procs, timeout=600):
  errors = [p.communicate(timeout=timeout)[1] for p in procs]
  for p, err in zip(procs, errors):
    assert p.returncode == 0, err[-3000:]
  return errors


def test_sigterm_to_one_host_saves_the_same_step_on_both_and_resumes_exactly(tmp_path,
                                                                             two_process_run):
  """SIGTERM to process 1 only: jax.distributed's preemption sync point makes both processes
  save the same step and exit 0; resuming then equals an uninterrupted run."""
  import re  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  args, straight, _ = two_process_run
  interrupted = tmp_path / "interrupted"
  procs = _launch(args + [f"--workdir={interrupted}"], _free_port())
  deadline = time.time() + 300
  # The first checkpoint flushes the metrics: training is under way once a file appears.
  while not metrics_records.segment_paths(str(interrupted)) and time.time() < deadline:
    assert all(p.poll() is None for p in procs), "a process ended before training"
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)
  errors = _finish(procs)
  saved = [re.findall(r"saved step (\d+), exiting", err) for err in errors]
  assert saved[0] and saved[0] == saved[1], errors[0][-2000:]
  step = int(saved[0][0])
  assert 0 < step < 100
  assert checkpoints.make_manager(str(interrupted), checkpoints.read_run_config(
      str(interrupted)), read_only=True).latest_step() == step

  _finish(_launch(args + [f"--workdir={interrupted}"], _free_port()))  # resume to 100
  for a, b in zip(jax.tree.leaves(checkpoints.load_pretrained(str(interrupted))[2]),
                  jax.tree.leaves(checkpoints.load_pretrained(str(straight))[2])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_busy_workdir_stops_every_process_before_anything_is_written(two_process_run,
                                                                       tmp_path):
  """Process 0 takes the run lock for all hosts: while another run holds it, process 0 names
  the holder and process 1 says that process 0 could not take it; both exit 2."""
  from script_jax import run_lock  # pylint: disable=g-import-not-at-top
  args, _, _ = two_process_run
  workdir = tmp_path / "busy"
  with run_lock.hold(str(workdir)):  # the other run: this test's process
    procs = _launch(args + [f"--workdir={workdir}"], _free_port())
    errors = [p.communicate(timeout=300)[1] for p in procs]
  for p, err in zip(procs, errors):
    assert p.returncode == 2 and "Traceback" not in err, err[-3000:]
  assert f"another run is using --workdir {workdir} (host {socket.gethostname()}, process " \
         f"{os.getpid()}" in errors[0], errors[0][-3000:]
  assert "process 0 could not take the lock" in errors[1], errors[1][-3000:]
  assert sorted(os.listdir(workdir)) == [run_lock.LOCK_FILE]  # nothing else written
