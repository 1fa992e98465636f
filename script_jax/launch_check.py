"""Can this machine use a workdir? Writes, reads back and removes a small file under it.

  python -m script_jax.launch_check --workdir=gs://BUCKET/DIR

`launch/tpu.sh check` (and `train`, before it starts the trainer) runs this on worker 0 of a TPU
VM, through the same file-system layer the trainer uses (script_jax/fs.py), so a bucket the VM's
service account may not write fails here, in seconds, instead of at the first checkpoint. Exit
status 0 when it can, CANNOT_USE_WORKDIR when it cannot, with one line on stderr saying why.
"""

from __future__ import annotations

import os
import socket
import sys
import time

from absl import app, flags  # pylint: disable=g-multiple-import

from script_jax import fs
from script_jax.cli_errors import remote_storage_problem

# launch/tpu.sh tells this status apart from a failed ssh; it names the same number.
CANNOT_USE_WORKDIR = 3

_WORKDIR = flags.DEFINE_string("workdir", None, "The folder to check, local or gs://.")


def probe(workdir: str) -> str:
  """Writes a small file under `workdir` with fs.write_atomically (as checkpoints' metadata is
  written: a temporary name, then a rename), reads it back, removes it; returns its path.

  Raises OSError (or TensorFlow's file-system errors on gs://) when any step fails.
  """
  fs.makedirs(workdir)
  path = fs.join(workdir, f".launch_check-{socket.gethostname()}-{os.getpid()}")
  written = f"script_jax launch check, {time.time()}\n"
  fs.write_atomically(path, written)
  try:
    read = fs.read_bytes(path).decode("utf-8")
    if read != written:
      raise OSError(f"{path}: read back {read!r}, not what was written ({written!r})")
  finally:
    fs.remove(path)
  return path


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  workdir = _WORKDIR.value
  if not workdir:
    raise app.UsageError("--workdir is needed")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up lines on gs://
  try:
    path = probe(workdir)
  except Exception as e:  # pylint: disable=broad-except
    reason = remote_storage_problem(e) or f"{type(e).__name__}: {e}"
    print(f"error: {socket.gethostname()} cannot write, read back and remove a file under "
          f"{workdir}: {reason}", file=sys.stderr)
    sys.exit(CANNOT_USE_WORKDIR)
  print(f"{socket.gethostname()}: wrote, read back and removed {path}")


if __name__ == "__main__":
  app.run(main)
