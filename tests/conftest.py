"""Test set-up: eight fake CPU devices, so sharding is tested without an accelerator, and the
fixtures. The helpers tests import (paths, configs, entry points, tiny workdirs) are in helpers.py."""

import os
import shutil
import tempfile

# Must be set before JAX is imported anywhere. On a busy 2-core machine one of the eight device
# threads can reach a collective long after the others: wait instead of aborting at 40 s.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_cpu_collective_call_terminate_timeout_seconds=1200"
                           " --xla_cpu_collective_call_warn_stuck_timeout_seconds=300").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# JAX's persistent compilation cache, shared by the test processes (pytest-xdist's workers
# inherit the controller's environment) and by every `python -m script_jax...` a test starts:
# most end-to-end tests compile the same tiny programs, which costs more than running them.
# A fresh folder per run, removed at the end, unless JAX_COMPILATION_CACHE_DIR is set.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="script_jax_test_jax_cache_")
  os.environ["SCRIPT_JAX_TEST_OWN_CACHE"] = os.environ["JAX_COMPILATION_CACHE_DIR"]
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import pytest  # pylint: disable=g-import-not-at-top

from helpers import load_config  # pylint: disable=g-import-not-at-top


def pytest_sessionfinish(session):
  """The controller (not an xdist worker) removes the compilation cache it made."""
  own = os.environ.get("SCRIPT_JAX_TEST_OWN_CACHE")
  if own and not hasattr(session.config, "workerinput"):
    shutil.rmtree(own, ignore_errors=True)


@pytest.fixture
def tiny_config():
  return load_config("tiny")
