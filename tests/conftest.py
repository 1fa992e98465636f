"""Test set-up: eight fake CPU devices, so sharding is tested without an accelerator."""

import os
import sys

# Must be set before JAX is imported anywhere. On a busy 2-core machine one of the eight device
# threads can reach a collective long after the others: wait instead of aborting at 40 s.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_cpu_collective_call_terminate_timeout_seconds=1200"
                           " --xla_cpu_collective_call_warn_stuck_timeout_seconds=300").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


def load_config(name: str, **overrides):
  """configs/<name>.py's get_config(), with dotted-key overrides ("model.dtype"=...)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(f"config_{name}",
                                                os.path.join(CONFIGS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.fixture
def tiny_config():
  return load_config("tiny")


def run_main(args, timeout=600, env=None):
  """Runs `python -m script_jax.main ARGS` as a user would; returns the CompletedProcess."""
  import subprocess  # pylint: disable=g-import-not-at-top
  full_env = dict(os.environ)
  full_env["XLA_FLAGS"] = ""  # the entry point runs on the one real CPU device
  full_env.update(env or {})
  return subprocess.run([sys.executable, "-m", "script_jax.main", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout, env=full_env)
