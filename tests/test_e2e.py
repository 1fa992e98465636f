"""End to end through the real entry point: tiny runs, exact resume, SIGTERM, kill -9, errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import ROOT, build_once, run_main, tiny_prepared_data

from script_jax import checkpoints
from script_jax import metrics_records

pytestmark = pytest.mark.slow

FAST = ["--config=configs/tiny.py", "--config.num_train_steps=40",
        "--config.checkpoint_every_steps=20", "--config.log_every_steps=10",
        "--config.batch_size=8", "--config.keep_checkpoints=5", "--config.optim.warmup_steps=10",
        "--config.eval_every_steps=20"]
EVAL_KEYS = ("eval_mlm_loss", "eval_mlm_accuracy")
CRITIC_EVAL_KEYS = ("eval_disc_loss", "eval_disc_accuracy", "eval_disc_original_share",
                    "eval_disc_auc", "eval_disc_precision", "eval_disc_recall",
                    "eval_sampled_accuracy")


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory):
  return tiny_prepared_data(tmp_path_factory)


def _all_records(workdir):
  return metrics_records.read_records(str(workdir))


def _metrics(workdir):
  """The training records (those of the logged steps)."""
  return [r for r in _all_records(workdir) if "loss" in r]


def _eval_records(workdir):
  return [r for r in _all_records(workdir) if "eval_mlm_loss" in r]


def _params(workdir, step=None):
  return jax.device_get(checkpoints.load_pretrained(str(workdir), step)[2])


def _assert_same_params(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("objective", ["script", "electra", "mlm"])
def test_tiny_run_of_each_objective_through_main(objective, tmp_path, shared_data):
  result = run_main(FAST + [f"--workdir={tmp_path}", f"--config.objective={objective}",
                            f"--config.data.prepared_dir={shared_data}"])
  assert result.returncode == 0, result.stderr[-3000:]
  records = _metrics(tmp_path)
  assert [r["step"] for r in records] == [10, 20, 30, 40]
  for key in ("loss", "mlm_loss", "mlm_accuracy", "steps_per_sec", "grad_norm",
              "learning_rate"):
    assert all(np.isfinite(r[key]) for r in records), key
  if objective != "mlm":
    assert all(0 <= r["disc_accuracy"] <= 1 for r in records)
    assert "replaced_fraction" in records[0]
  assert records[-1]["mlm_loss"] < records[0]["mlm_loss"]
  assert "ETA" in result.stderr  # progress on the console
  # Held-out metrics every eval_every_steps and at the end: their own records, on the console.
  evals = _eval_records(tmp_path)
  assert [r["step"] for r in evals] == [20, 40]
  keys = EVAL_KEYS + (CRITIC_EVAL_KEYS if objective != "mlm" else ())
  assert all(np.isfinite(r[k]) for r in evals for k in keys)
  assert (objective == "mlm") == ("eval_disc_auc" not in evals[0])
  assert all(0 <= r[k] <= 1 for r in evals for k in keys if k != "eval_mlm_loss" and
             k != "eval_disc_loss")
  assert evals[-1]["eval_mlm_loss"] < evals[0]["eval_mlm_loss"]
  assert "eval step 40/40 | mlm_loss" in result.stderr
  # rng_impl "auto" is decided when the run starts and recorded; it draws no rbg bits, so
  # rbg's TPU flag is not set.
  assert "rng_impl auto: threefry2x32 on cpu" in result.stderr
  assert json.loads((tmp_path / "run_config.json").read_text())["rng_impl"] == "threefry2x32"
  assert "xla_tpu_spmd_rng_bit_generator_unsafe" not in result.stderr
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["20", "40"]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))


def test_fsdp_with_replicas_through_main(tmp_path, shared_data):
  """mesh.fsdp over two groups of 4, scanned layers gathered one at a time: trains, evaluates
  and checkpoints through main on 8 devices; the checkpoint loads whole."""
  result = run_main(FAST + [f"--workdir={tmp_path}", f"--config.data.prepared_dir={shared_data}",
                            "--config.mesh.fsdp=True", "--config.mesh.fsdp_replicas=2",
                            "--config.model.scan_layers=True", "--config.model.remat=True",
                            "--config.num_train_steps=20", "--config.eval_every_steps=10"],
                    env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert result.returncode == 0, result.stderr[-3000:]
  assert "8 devices" in result.stderr
  records = _metrics(tmp_path)
  assert [r["step"] for r in records] == [10, 20]
  assert records[-1]["mlm_loss"] < records[0]["mlm_loss"]
  evals = _eval_records(tmp_path)
  assert [r["step"] for r in evals] == [10, 20]
  assert all(np.isfinite(r[k]) for r in evals for k in EVAL_KEYS + CRITIC_EVAL_KEYS)
  kernel = _params(tmp_path)["encoder"]["layers"]["layer"]["intermediate"]["kernel"]
  assert isinstance(kernel, np.ndarray) and kernel.shape == (2, 64, 256)  # whole on the host


def test_inverse_cdf_sampler_through_main(tmp_path, shared_data):
  result = run_main(FAST + [f"--workdir={tmp_path}", "--config.objective=electra",
                            "--config.sampler=inverse_cdf",
                            f"--config.data.prepared_dir={shared_data}"])
  assert result.returncode == 0, result.stderr[-3000:]
  records = _metrics(tmp_path)
  assert all(np.isfinite(r["disc_loss"]) and 0 < r["replaced_fraction"] <= 1 for r in records)
  assert records[-1]["mlm_loss"] < records[0]["mlm_loss"]


def test_resume_after_kill_between_checkpoints_is_exact(tmp_path, shared_data):
  """2N steps in one go == N steps, a crash after N (checkpoint 2N lost), resume to 2N."""
  data = f"--config.data.prepared_dir={shared_data}"
  one_go = tmp_path / "one_go"
  assert run_main(FAST + [f"--workdir={one_go}", data]).returncode == 0
  want = _params(one_go)

  # A kill -9 between checkpoints leaves checkpoint N, metrics past N, and no checkpoint 2N.
  crashed = tmp_path / "crashed"
  shutil.copytree(one_go, crashed)
  shutil.rmtree(crashed / "checkpoints" / "40")
  written = {p: (crashed / p).read_bytes() for p in map(str, (crashed / "metrics").iterdir())}
  result = run_main(FAST + [f"--workdir={crashed}", data])
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Resumed" in result.stderr
  _assert_same_params(_params(crashed), want)
  assert [r["step"] for r in _metrics(crashed)] == [10, 20, 30, 40]
  # The metrics files of the first run are left as they were; the resumed run added its own.
  assert {p: (crashed / p).read_bytes() for p in written} == written
  assert len(list((crashed / "metrics").iterdir())) > len(written)
  # Evaluation on: each evaluation step once, with the uninterrupted run's numbers.
  assert [r["step"] for r in _eval_records(crashed)] == [20, 40]
  drop_time = lambda records: [{k: v for k, v in r.items() if k != "eval_seconds"}
                               for r in records]
  assert drop_time(_eval_records(crashed)) == drop_time(_eval_records(one_go))


def test_a_folder_prepared_without_an_evaluation_split_still_trains_and_is_kept(
    tmp_path, shared_data):
  """A prepared folder from before data.eval_fraction: training goes on, a warning says how to
  get held-out metrics, and nothing in the folder is rewritten."""
  old = tmp_path / "old_data"
  shutil.copytree(shared_data, old)
  metadata = json.loads((old / "metadata.json").read_text())
  for shard in metadata.pop("eval")["shards"]:
    (old / shard["file"]).unlink()
  del metadata["recipe"]["eval_fraction"]
  (old / "metadata.json").write_text(json.dumps(metadata))
  before = {p.name: p.stat().st_mtime_ns for p in old.iterdir()}
  result = run_main(FAST + [f"--workdir={tmp_path / 'run'}", f"--config.data.prepared_dir={old}",
                            "--config.num_train_steps=20", "--config.model.num_layers=1"])
  assert result.returncode == 0, result.stderr[-3000:]
  assert "has no evaluation split" in result.stderr and "prepare the data again" in result.stderr
  assert _eval_records(tmp_path / "run") == [] and _metrics(tmp_path / "run")
  assert {p.name: p.stat().st_mtime_ns for p in old.iterdir()} == before


def _wait_for(predicate, timeout):
  end = time.time() + timeout
  while time.time() < end:
    if predicate():
      return True
    time.sleep(0.05)
  return False


def _signal_run_args(shared_data):
  return FAST[:1] + ["--config.num_train_steps=400", "--config.checkpoint_every_steps=100",
                     "--config.log_every_steps=10", "--config.batch_size=8",
                     "--config.keep_checkpoints=10", f"--config.data.prepared_dir={shared_data}"]


@pytest.fixture(scope="module")
def uninterrupted_signal_run(tmp_path_factory, shared_data):
  """The run both signal tests compare with, made once."""
  def build(folder):
    straight = folder / "straight"
    result = run_main(_signal_run_args(shared_data) + [f"--workdir={straight}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return str(straight)
  return build_once(tmp_path_factory, "uninterrupted_signal_run", build)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_real_signal_mid_run_then_resume_equals_uninterrupted(sig, tmp_path, shared_data,
                                                              uninterrupted_signal_run):
  args = _signal_run_args(shared_data)
  workdir = tmp_path / "interrupted"
  env = dict(os.environ, XLA_FLAGS="")
  proc = subprocess.Popen([sys.executable, "-m", "script_jax.main", *args,
                           f"--workdir={workdir}"], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  # Training has reached its first checkpoint (which flushes the metrics) when a file appears.
  assert _wait_for(lambda: bool(metrics_records.segment_paths(str(workdir))), 300)
  proc.send_signal(sig)
  _, stderr = proc.communicate(timeout=120)
  if sig == signal.SIGTERM:
    assert proc.returncode == 0, stderr[-3000:]
    assert "Stop requested" in stderr
    saved = checkpoints.make_manager(str(workdir), checkpoints.read_run_config(str(workdir)),
                                     read_only=True).latest_step()
    assert saved is not None and 0 < saved < 400
  else:
    assert proc.returncode == -signal.SIGKILL

  result = run_main(args + [f"--workdir={workdir}"])
  assert result.returncode == 0, result.stderr[-3000:]
  _assert_same_params(_params(workdir), _params(uninterrupted_signal_run))


def test_unknown_objective_is_a_clear_error_and_writes_nothing(tmp_path):
  result = run_main(FAST + [f"--workdir={tmp_path / 'w'}", "--config.objective=gan"])
  assert result.returncode == 2
  assert "unknown objective 'gan'" in result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "w").exists()


def test_batch_not_divisible_by_devices_is_a_clear_error(tmp_path):
  result = run_main(FAST + [f"--workdir={tmp_path}", "--config.batch_size=12"],
                    env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert result.returncode == 2
  assert "batch_size 12 is not divisible by the 8 data-parallel devices" in result.stderr
  assert "Traceback" not in result.stderr


def test_workdir_of_a_different_model_is_a_clear_error_and_kept(tmp_path, shared_data):
  data = f"--config.data.prepared_dir={shared_data}"
  assert run_main(FAST + [f"--workdir={tmp_path}", data]).returncode == 0
  before = _params(tmp_path)
  result = run_main(FAST + [f"--workdir={tmp_path}", data, "--config.model.hidden_size=32",
                            "--config.num_train_steps=60"])
  assert result.returncode == 2
  assert "model.hidden_size: workdir has 64, config asks for 32" in result.stderr
  assert "Traceback" not in result.stderr
  _assert_same_params(_params(tmp_path), before)


def test_nan_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path, shared_data):
  data = f"--config.data.prepared_dir={shared_data}"
  assert run_main(FAST + [f"--workdir={tmp_path}", data, "--config.num_train_steps=40",
                          "--config.checkpoint_every_steps=20"]).returncode == 0
  good = _params(tmp_path, 40)
  # Continue the same model with a learning rate that overflows the weights.
  config = json.loads((tmp_path / "run_config.json").read_text())
  result = run_main(FAST + [f"--workdir={tmp_path}", data, "--config.num_train_steps=80",
                            "--config.optim.learning_rate=1e38"])
  assert result.returncode == 2, result.stderr[-2000:]
  assert "loss nan" in result.stderr.lower() or "inf" in result.stderr.lower()
  assert "last good checkpoint" in result.stderr
  manager = checkpoints.make_manager(str(tmp_path), checkpoints.read_run_config(str(tmp_path)),
                                     read_only=True)
  assert manager.latest_step() == 40
  _assert_same_params(_params(tmp_path, 40), good)
  del config


def test_init_from_starts_from_another_run_whatever_its_layer_layout(tmp_path, shared_data):
  """Continued pretraining: an unrolled run's parameters start a scanned-layer run."""
  data = f"--config.data.prepared_dir={shared_data}"
  first, second = tmp_path / "first", tmp_path / "second"
  assert run_main(FAST + [f"--workdir={first}", data, "--config.num_train_steps=20"]
                  ).returncode == 0
  # Learning rate 0 (so no weight decay either): the second run's parameters stay the first's.
  result = run_main(FAST + [f"--workdir={second}", data, "--config.num_train_steps=20",
                            f"--config.init_from={first}", "--config.model.scan_layers=True",
                            "--config.optim.learning_rate=0.0"])
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"Initialised parameters from {first}" in result.stderr
  scanned = _params(second)
  assert "layers" in scanned["encoder"] and "layer_0" not in scanned["encoder"]
  from script_jax import models  # pylint: disable=g-import-not-at-top
  _assert_same_params(models.unstack_layers(scanned), _params(first))
  # Resuming the scanned workdir with unrolled layers is refused, not silently reshaped.
  again = run_main(FAST + [f"--workdir={second}", data, "--config.num_train_steps=40"])
  assert again.returncode == 2
  assert "model.scan_layers: workdir has True, config asks for False" in again.stderr


def test_unreachable_bucket_is_one_clear_error(tmp_path):
  """No network or credentials here: the gs:// workdir cannot be read, said in one line."""
  result = run_main(FAST + ["--workdir=gs://script-jax-no-such-bucket-7f3a/run"], timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  line = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
  assert len(line) == 1 and "cannot use gs://script-jax-no-such-bucket-7f3a/run" in line[0]
  assert "the storage service cannot be reached" in line[0] and "Cloud NAT" in line[0]
