"""Fault injection through the real entry point: nothing a user does loses a run's work.

Each case runs `python -m script_jax.main` on the tiny config (issue 34): command-line and config
mistakes are one `error:` line with exit status 2 and write nothing; one live run per workdir; a
NaN state is never saved; a damaged checkpoint is skipped for the newest whole one; a damaged
shard is named before training; a failed save stops the run; Ctrl-C saves like SIGTERM.
The damage cases copy one shared 6-step run (checkpoints 2, 4, 6) and resume it to step 8.
"""

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import ROOT, build_once, run_main, run_module, tiny_prepared_data

from script_jax import checkpoints
from script_jax import run_lock

pytestmark = pytest.mark.slow

RUN = ["--config=configs/tiny.py", "--config.num_train_steps=6",
       "--config.checkpoint_every_steps=2", "--config.log_every_steps=2",
       "--config.batch_size=8", "--config.optim.warmup_steps=0", "--config.eval_every_steps=0",
       "--config.keep_checkpoints=5"]
RESUME = RUN + ["--config.num_train_steps=8"]


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory):
  return tiny_prepared_data(tmp_path_factory)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, shared_data):
  """A finished 6-step run with checkpoints 2, 4 and 6; tests copy it, never change it."""
  def build(folder):
    workdir = folder / "run"
    result = run_main(RUN + [f"--workdir={workdir}", f"--config.data.prepared_dir={shared_data}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return str(workdir)
  return build_once(tmp_path_factory, "nothing_lost_base", build)


def _copy(base_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(base_run, workdir)
  return workdir


def _steps(workdir):
  return sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())


def _one_error_line(result, *expected):
  """Exit status 2, no traceback, and one `error:` line that says each of `expected`."""
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  lines = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, result.stderr[-3000:]
  for text in expected:
    assert text in result.stderr, result.stderr[-3000:]
  return lines[0]


# ------------------------------------------------------------ item 8 (and 1): one line, exit 2

CONFIG_MISTAKES = {
    "unknown_key": (["--config.nosuch=1"], ["unknown config key 'nosuch'"]),
    "unknown_nested_key": (["--config.model.nosuch=1"], ["unknown config key 'nosuch'"]),
    "wrong_type": (["--config.batch_size=abc"], ["--config.batch_size=abc"]),
    "checkpoint_every_0": (["--config.checkpoint_every_steps=0"],
                           ["checkpoint_every_steps=0 must be 1 or more"]),
    "log_every_0": (["--config.log_every_steps=0"], ["log_every_steps=0 must be 1 or more"]),
    "batch_size_0": (["--config.batch_size=0"], ["batch_size=0 must be 1 or more"]),
    "keep_0": (["--config.keep_checkpoints=0"], ["keep_checkpoints=0 must be 1 or more"]),
    "keep_negative": (["--config.keep_checkpoints=-1"], ["keep_checkpoints=-1 must be 1 or more"]),
    "negative_steps": (["--config.num_train_steps=-5"], ["num_train_steps=-5 must be 1 or more"]),
}


def _run_main_concurrently(runs):
  """run_main for each list of flags, the processes side by side (most of each is imports)."""
  env = dict(os.environ, XLA_FLAGS="")
  procs = [subprocess.Popen([sys.executable, "-m", "script_jax.main", *flags], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for flags in runs]
  results = []
  for flags, proc in zip(runs, procs):
    stdout, stderr = proc.communicate(timeout=600)
    results.append(subprocess.CompletedProcess(flags, proc.returncode, stdout, stderr))
  return results


def test_config_mistakes_are_one_error_line_and_write_nothing(tmp_path):
  cases = sorted(CONFIG_MISTAKES)
  results = _run_main_concurrently(
      [RUN + CONFIG_MISTAKES[case][0] + [f"--workdir={tmp_path / case}"] for case in cases])
  for case, result in zip(cases, results):
    line = _one_error_line(result, *CONFIG_MISTAKES[case][1])
    assert "warmup" not in line  # a negative step count is not about the warmup
    assert not (tmp_path / case).exists(), case


def test_config_files_and_workdirs_that_cannot_be_used_are_one_error_line(tmp_path):
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(:\n")
  a_file = tmp_path / "a_file"
  a_file.write_text("not a folder\n")
  cases = [
      (["--config=configs/no_such.py", f"--workdir={tmp_path / 'w'}"],
       "the config file configs/no_such.py (--config) does not exist"),
      ([f"--config={broken}", f"--workdir={tmp_path / 'w'}"],
       "has a syntax error at line 1"),
      (["--config=configs/tiny.py"], "--workdir"),
      (RUN + [f"--workdir={a_file}"], "is a file, not a folder"),
  ]
  for (_, expected), result in zip(cases, _run_main_concurrently([c[0] for c in cases])):
    _one_error_line(result, expected)
  assert not (tmp_path / "w").exists()
  assert a_file.read_text() == "not a folder\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_read_only_workdir_is_one_error_line(tmp_path):
  workdir = tmp_path / "ro"
  workdir.mkdir()
  workdir.chmod(0o555)
  _one_error_line(run_main(RUN + [f"--workdir={workdir}"]), "cannot write in --workdir")


def test_keep_checkpoints_zero_on_a_workdir_with_checkpoints_keeps_them(base_run, tmp_path):
  workdir = _copy(base_run, tmp_path)
  result = run_main(RESUME + [f"--workdir={workdir}", "--config.keep_checkpoints=0"])
  _one_error_line(result, "keep_checkpoints=0 must be 1 or more")
  assert _steps(workdir) == [2, 4, 6]


def test_damaged_run_config_and_metrics_files_are_one_error_line(base_run, tmp_path,
                                                                   shared_data):
  workdir = _copy(base_run, tmp_path)
  metrics_file = sorted((workdir / "metrics").iterdir())[0]
  metrics_file.write_text(metrics_file.read_text()[:-20])
  result = run_module("metrics_log", [f"--workdir={workdir}"])
  result.stderr = result.stderr.decode()
  _one_error_line(result, f"{metrics_file}, line", "is not a whole metrics record")

  text = (workdir / "run_config.json").read_text()
  (workdir / "run_config.json").write_text(text[:len(text) // 2])
  result = run_main(RESUME + [f"--workdir={workdir}", f"--config.data.prepared_dir={shared_data}"])
  _one_error_line(result, "run_config.json is damaged")
  assert _steps(workdir) == [2, 4, 6]


# ------------------------------------------------------------ item 4: a refusal writes nothing

def test_a_refused_resume_leaves_run_config_as_it_was(base_run, tmp_path, shared_data):
  workdir = _copy(base_run, tmp_path)
  before = (workdir / "run_config.json").read_bytes()
  result = run_main(RESUME + [f"--workdir={workdir}", f"--config.data.prepared_dir={shared_data}",
                              "--config.seq_len=32", "--config.mask.max_predictions_per_seq=5"])
  _one_error_line(result, "seq_len")
  assert (workdir / "run_config.json").read_bytes() == before
  assert _steps(workdir) == [2, 4, 6]


# ------------------------------------------------------------ item 3: no NaN checkpoint

def test_a_non_finite_update_is_not_saved_and_the_named_checkpoint_is_verified(
    base_run, tmp_path, shared_data):
  workdir = _copy(base_run, tmp_path)
  result = run_main(RESUME + [f"--workdir={workdir}", f"--config.data.prepared_dir={shared_data}",
                              "--config.optim.learning_rate=1e39",
                              "--config.checkpoint_every_steps=1"])
  line = _one_error_line(result, "Step 7:", "NaN or Inf values in the parameters")
  assert "the last good checkpoint, step 6" in line
  assert _steps(workdir) == [2, 4, 6]
  _, _, params = checkpoints.load_pretrained(str(workdir), 6)  # raises on NaN parameters
  assert all(np.isfinite(x).all() for x in __import__("jax").tree.leaves(params))


def test_skip_mode_skips_non_finite_updates_and_stops_after_n_in_a_row(base_run, tmp_path,
                                                                       shared_data):
  workdir = _copy(base_run, tmp_path)
  result = run_main(RESUME + [f"--workdir={workdir}", f"--config.data.prepared_dir={shared_data}",
                              "--config.optim.learning_rate=1e39",
                              "--config.checkpoint_every_steps=1",
                              "--config.optim.on_nonfinite=skip",
                              "--config.optim.max_consecutive_skips=2"])
  line = _one_error_line(result, "Step 8: 2 updates in a row were NaN or Inf and were skipped",
                         "optim.max_consecutive_skips=2")
  assert "Step 7: loss" in result.stderr and "was skipped (1 in a row" in result.stderr
  assert "the last good checkpoint, step 7" in line
  assert _steps(workdir) == [2, 4, 6, 7]
  # Step 7's update was skipped: its checkpoint holds step 6's parameters, bit for bit.
  _, _, params6 = checkpoints.load_pretrained(str(workdir), 6)
  _, _, params7 = checkpoints.load_pretrained(str(workdir), 7)
  import jax  # pylint: disable=g-import-not-at-top
  for a, b in zip(jax.tree.leaves(params6), jax.tree.leaves(params7)):
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------ item 6: the newest whole checkpoint

def _save_a_nan_checkpoint(workdir, step):
  """Checkpoint `step`: checkpoint 6 with every floating-point value NaN (as older code saved)."""
  import jax  # pylint: disable=g-import-not-at-top
  from script_jax import models  # pylint: disable=g-import-not-at-top
  from script_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from script_jax import state as state_lib  # pylint: disable=g-import-not-at-top
  config = checkpoints.read_run_config(str(workdir))
  model = models.build_model(config)
  mesh = sharding_lib.create_mesh(config, jax.devices()[:1])
  state, _ = state_lib.init_state(config, model, mesh)
  manager = checkpoints.make_manager(str(workdir), config)
  state = checkpoints.restore_state(manager, 6, state_lib.abstract_like(state))
  nan = jax.tree.map(lambda x: x * np.nan if np.issubdtype(x.dtype, np.floating) else x, state)
  manager.save(step, args=checkpoints.ocp.args.StandardSave(
      nan.replace(step=jax.numpy.asarray(step, state.step.dtype))), force=True)
  manager.wait_until_finished()
  manager.close()


def test_resume_skips_damaged_and_nan_checkpoints_for_the_newest_whole_one(base_run, tmp_path,
                                                                           shared_data):
  workdir = _copy(base_run, tmp_path)
  _save_a_nan_checkpoint(workdir, 8)
  # Scoring with the NaN checkpoint is refused, not a column of nan.
  scored = run_module("scoring.score", [f"--workdir={workdir}", "--input=-", "--step=8"],
                      stdin=b"A sentence to score.\n")
  scored.stderr = scored.stderr.decode()
  _one_error_line(scored, "Checkpoint 8", "NaN or Inf parameters")

  data_files = sorted((workdir / "checkpoints/6/default/ocdbt.process_0/d").iterdir(),
                      key=lambda p: p.stat().st_size)
  with open(data_files[-1], "r+b") as f:  # the largest array file, cut short
    f.truncate(1000)
  (workdir / "checkpoints/4/default/_METADATA").unlink()
  result = run_main(RESUME + [f"--workdir={workdir}", f"--config.data.prepared_dir={shared_data}",
                              "--config.num_train_steps=10"])
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Checkpoint 8 holds" in result.stderr and "NaN or Inf values: skipped" in result.stderr
  assert "Checkpoint 6 is damaged" in result.stderr
  assert "Checkpoint 4 is damaged" in result.stderr
  assert "does not match" not in result.stderr  # damage is not called another model
  assert "at step 2" in result.stderr
  assert _steps(workdir) == [2, 4, 6, 8, 10]  # saved again from the resumed run
  assert sorted(os.listdir(workdir / checkpoints.DAMAGED_FOLDER)) == ["4", "6", "8"]


# ------------------------------------------------------------ item 5: damaged shards

def test_a_cut_short_shard_is_named_before_training(tmp_path, shared_data):
  data = tmp_path / "data"
  shutil.copytree(shared_data, data)
  shard = data / "train-00003-of-00008.tfrecord"
  assert json.loads((data / "metadata.json").read_text())["shards"][3]["bytes"] > 0
  shard.write_bytes(b"")
  result = run_main(RUN + [f"--workdir={tmp_path / 'w'}", f"--config.data.prepared_dir={data}"])
  _one_error_line(result, f"The shard {shard} has 0 bytes", "Prepare it again")
  assert not (tmp_path / "w" / "checkpoints").exists()


# ------------------------------------------------------------ item 7: a failed save

def test_a_failed_save_stops_the_run_and_keeps_the_earlier_checkpoints(base_run, tmp_path,
                                                                       shared_data):
  """A file-size limit below the checkpoint's largest file: the save at step 8 fails."""
  workdir = _copy(base_run, tmp_path)

  def small_files():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
  env = dict(os.environ, XLA_FLAGS="")
  result = subprocess.run(
      [sys.executable, "-m", "script_jax.main", *RESUME, "--config.num_train_steps=12",
       "--config.checkpoint_every_steps=8", f"--workdir={workdir}",
       f"--config.data.prepared_dir={shared_data}"], cwd=ROOT, capture_output=True, text=True,
      timeout=600, env=env, preexec_fn=small_files)
  assert result.returncode == 2, result.stderr[-3000:]
  lines = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1 and "Saving checkpoint 8 failed" in lines[0], result.stderr[-3000:]
  assert "Saving checkpoint 8 failed: File too large (" in lines[0], lines[0]
  assert "(newest: 6)" in lines[0], lines[0]
  # Not even tensorstore's "Event loop is closed" tracebacks from the abandoned writes.
  assert "Traceback" not in result.stderr and "never awaited" not in result.stderr
  assert _steps(workdir) == [2, 4, 6]


def test_a_full_disk_while_preparing_data_is_one_error_line_and_a_rerun_completes(
    tmp_path, shared_data):
  """Shards 3-7 written again under a file-size limit: the write fails (EFBIG, as ENOSPC
  would), one line says where and what to do, and the same command without the limit finishes."""
  data = tmp_path / "data"
  shutil.copytree(shared_data, data)
  for name in os.listdir(data):
    if name.startswith(tuple(f"train-0000{k}" for k in "34567") + ("eval-", "metadata")):
      os.remove(data / name)
  command = [sys.executable, "-m", "script_jax.data.prepare", "--config=configs/tiny.py",
             f"--output_dir={data}"]

  def small_files():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))
  env = dict(os.environ, XLA_FLAGS="")
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=env, preexec_fn=small_files)
  _one_error_line(result, "no room writing", "train-00003-of-00008.tfrecord",
                  "run the same command again")
  assert not (data / "metadata.json").exists()  # not called complete
  again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
  assert again.returncode == 0, again.stderr[-3000:]
  assert sorted(os.listdir(data)) == sorted(os.listdir(shared_data))


def test_no_room_is_recognised_from_the_os_and_from_tensorflow():
  from script_jax import cli_errors  # pylint: disable=g-import-not-at-top
  full = OSError(28, os.strerror(28), "/w/checkpoints/8/x")
  assert "no room writing /w/checkpoints/8/x: the disk is full" in cli_errors.no_room_problem(
      full)
  wrapped = RuntimeError("save failed")
  wrapped.__cause__ = full
  assert "the disk is full" in cli_errors.no_room_problem(wrapped)
  tf_style = RuntimeError(f"/w/data/train-00001.tfrecord.tmp-7; {os.strerror(122)}")
  assert ("no room writing /w/data/train-00001.tfrecord.tmp-7: the disk quota is used up"
          in cli_errors.no_room_problem(tf_style))
  assert cli_errors.no_room_problem(OSError(13, "Permission denied")) is None
  assert cli_errors.no_room_problem(ValueError("File too large, said the user")) is None


def test_the_reason_a_write_failed_is_found_anywhere_in_a_long_message():
  """tensorstore's message puts the reason between a long path and its source locations: the
  save's error line leads with it, however long the path (the CI's temp paths cut it out once)."""
  from script_jax import cli_errors  # pylint: disable=g-import-not-at-top
  long_path = "/tmp/" + "x" * 300 + "/checkpoints/8.orbax-checkpoint-tmp/opt_state/d/1"
  text = (f'OUT_OF_RANGE: Error writing "{long_path}": [OS error 27: {os.strerror(27)}] '
          "[source locations='tensorstore/internal/os/file_util_posix.cc:251']")
  assert cli_errors.write_failure_reason(text) == os.strerror(27) == "File too large"
  assert cli_errors.write_failure_reason(f"... {os.strerror(28)} ...") == "No space left on device"
  assert cli_errors.write_failure_reason("INVALID_ARGUMENT: shape mismatch") is None


# ------------------------------------------------------------ item 2 and 9: one run, Ctrl-C

def _start(args, log):
  env = dict(os.environ, XLA_FLAGS="")
  return subprocess.Popen([sys.executable, "-m", "script_jax.main", *args], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=open(log, "w"), text=True)


def _wait_for(predicate, timeout):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return True
    time.sleep(0.2)
  return False


def test_one_run_per_workdir_and_ctrl_c(base_run, tmp_path, shared_data):
  workdir = _copy(base_run, tmp_path)
  args = RUN + ["--config.num_train_steps=100000", "--config.checkpoint_every_steps=50000",
                "--config.log_every_steps=1", f"--workdir={workdir}",
                f"--config.data.prepared_dir={shared_data}"]
  log_a = tmp_path / "a.log"
  run_a = _start(args, log_a)
  try:
    assert _wait_for(lambda: "step 7/100000" in log_a.read_text(), 300), log_a.read_text()
    # A second run on the same workdir is refused, naming the first.
    second = run_main(args)
    line = _one_error_line(second, "another run is using --workdir",
                           f"process {run_a.pid}", socket.gethostname())
    assert "started" in line
    run_a.send_signal(signal.SIGINT)  # the first Ctrl-C: save, then stop
    assert run_a.wait(timeout=120) == 0, log_a.read_text()[-3000:]
  finally:
    run_a.kill()
  stderr = log_a.read_text()
  assert "Traceback" not in stderr and "Ctrl-C" in stderr
  saved = _steps(workdir)[-1]
  assert saved > 6 and (workdir / "run.lock").read_text() == ""  # released

  # A lock left by a dead process is taken over; a save that never finished is removed.
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True)
  (workdir / "run.lock").write_text(json.dumps({"host": socket.gethostname(),
                                                "pid": int(dead.stdout), "started": "then"}))
  unfinished = workdir / "checkpoints" / f"{saved + 1}.orbax-checkpoint-tmp-123"
  unfinished.mkdir()
  log_c = tmp_path / "c.log"
  run_c = _start(args, log_c)
  try:
    assert _wait_for(lambda: f"step {saved + 1}/100000" in log_c.read_text(), 300), (
        log_c.read_text()[-3000:])
    run_c.send_signal(signal.SIGINT)
    time.sleep(0.05)
    run_c.send_signal(signal.SIGINT)  # the second: at once, without saving
    assert run_c.wait(timeout=60) == 130, log_c.read_text()[-3000:]
  finally:
    run_c.kill()
  stderr = log_c.read_text()
  assert "Taking over" in stderr and f"process {int(dead.stdout)}" in stderr
  assert "exiting without saving" in stderr and "Traceback" not in stderr
  assert not unfinished.exists()
  assert run_lock.LOCK_FILE in os.listdir(workdir)


def test_two_deliveries_that_python_handles_once_are_counted_twice():
  """Deliveries during one C call reach the Python handler once (the second Ctrl-C of a user
  pressing twice during a long step was lost; once in CI). os.system is one C call, and the
  shell it waits for sends the signal twice."""
  from script_jax import train  # pylint: disable=g-import-not-at-top
  handled = []
  previous = signal.signal(signal.SIGUSR1, lambda *_: handled.append(counter.since_last_call()))
  counter = train.SignalDeliveries(signal.SIGUSR1)
  try:
    pid = os.getpid()
    assert os.system(f"kill -USR1 {pid}; sleep 0.05; kill -USR1 {pid}") == 0
    assert _wait_for(lambda: handled, 5)
    assert handled == [2], handled
    os.kill(pid, signal.SIGUSR1)  # one more, handled on its own
    assert _wait_for(lambda: len(handled) == 2, 5) and handled == [2, 1], handled
  finally:
    counter.close()
    signal.signal(signal.SIGUSR1, previous)
