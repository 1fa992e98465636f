"""Two real processes on localhost joined by jax.distributed: the multi-host code path."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
from conftest import ROOT

from script_jax import checkpoints


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_train_and_checkpoint_together(tmp_path):
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="")  # one CPU device per process: 2 devices in all
  args = ["--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.num_train_steps=20",
          "--config.checkpoint_every_steps=10", "--config.log_every_steps=10",
          "--config.batch_size=8", "--config.optim.warmup_steps=5", "--distributed", f"--coordinator_address=localhost:{port}",
          "--num_processes=2"]
  procs = [subprocess.Popen([sys.executable, "-m", "script_jax.main", *args, f"--process_id={i}"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  errors = [p.communicate(timeout=900)[1] for p in procs]
  for p, err in zip(procs, errors):
    assert p.returncode == 0, err[-3000:]
  assert "JAX process 1/2, 2 devices" in errors[1]
  with open(tmp_path / "metrics.jsonl") as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == [10, 20]  # written once, by process 0
  config, _, params = checkpoints.load_pretrained(str(tmp_path))
  assert config.objective == "script"
  leaves = [np.asarray(x) for x in __import__("jax").tree.leaves(params)]
  assert all(np.isfinite(x).all() for x in leaves)
