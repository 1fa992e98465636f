"""script_jax.launch_check: the probe `launch/tpu.sh check` runs on worker 0, on real local paths.

Its command line (exit status, the one-line error) is run through the launcher in
tests/test_launch.py, where the fake gcloud hands the check's remote command to `sh`.
"""

import os

import pytest

from script_jax import launch_check


def test_probe_writes_reads_and_removes(tmp_path):
  workdir = tmp_path / "new" / "workdir"  # made, as the trainer would make it
  path = launch_check.probe(str(workdir))
  assert os.path.dirname(path) == str(workdir)
  assert os.listdir(workdir) == []  # the probe file and its temporary are gone


def test_probe_fails_where_a_file_stands_for_a_folder(tmp_path):
  (tmp_path / "taken").write_text("a file, not a folder")
  with pytest.raises(OSError):
    launch_check.probe(str(tmp_path / "taken" / "workdir"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_probe_fails_on_a_read_only_folder(tmp_path):
  workdir = tmp_path / "read_only"
  workdir.mkdir()
  workdir.chmod(0o555)
  try:
    with pytest.raises(PermissionError):
      launch_check.probe(str(workdir))
  finally:
    workdir.chmod(0o755)
  assert os.listdir(workdir) == []
