"""What a user sees when a gs:// path cannot be used, through TensorFlow's own GCS client.

TF's client is served on localhost by tests/gcs_tls_proxy.py (a TLS-terminating proxy in front
of gcp-storage-emulator): a bucket that works, a missing bucket (the emulator's own 404), and
buckets the proxy refuses as Google does a caller without permission (403) or credentials
(401). A closed port stands for a host that refuses connections: TF retries, within
fs.GCS_WAIT_DEFAULTS. Each command prints one `error:` line with the path, the cause and the
fix, and no traceback.
"""

import os
import subprocess
import sys

import pytest

import gcs_tls_proxy
from script_jax import fs

pytestmark = pytest.mark.slow

pytest.importorskip("gcp_storage_emulator.server")
pytest.importorskip("cryptography")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFUSALS = {
    "locked": (403, "vm-sa@proj.iam.gserviceaccount.com does not have storage.objects.get "
               "access to the Google Cloud Storage object. Permission 'storage.objects.get' "
               "denied on resource (or it may not exist)."),
    "expired": (401, "Invalid Credentials"),
}


@pytest.fixture(scope="module")
def tf_gcs(tmp_path_factory):
  """The environment that sends a subprocess's gs:// to the emulator, and the proxy."""
  with gcs_tls_proxy.served_emulator(str(tmp_path_factory.mktemp("tls")), "bucket",
                                     REFUSALS) as served:
    yield served


def _run(module: str, args: list[str], env: dict) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def _error_line(result: subprocess.CompletedProcess) -> str:
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  lines = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, result.stderr[-3000:]
  return lines[0]


def test_the_bucket_check_writes_through_tfs_own_gcs_client(tf_gcs):
  env, proxy = tf_gcs
  result = _run("script_jax.launch_check", ["--workdir=gs://bucket/run"], env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "wrote, read back and removed gs://bucket/run/.launch_check-" in result.stdout
  methods = {method for method, path in proxy.requests if "/b/bucket/" in path}
  assert {"POST", "PUT", "GET", "DELETE"} <= methods  # upload, rename, read back, remove


@pytest.mark.parametrize("bucket,cause,fix", [
    ("no-such-bucket", "no such bucket", "gcloud storage buckets create gs://no-such-bucket"),
    ("locked", "this account may not use the bucket",
     "gcloud storage buckets add-iam-policy-binding gs://locked"),
    ("expired", "no valid credentials", "gcloud auth application-default login"),
])
def test_the_bucket_check_names_cause_and_fix(tf_gcs, bucket, cause, fix):
  env, _ = tf_gcs
  from script_jax import launch_check  # pylint: disable=g-import-not-at-top
  result = _run("script_jax.launch_check", [f"--workdir=gs://{bucket}/run"], env)
  assert result.returncode == launch_check.CANNOT_USE_WORKDIR
  line = _error_line(result)
  assert f"cannot use gs://{bucket}/run" in line and cause in line and fix in line, line


def test_pretraining_on_a_missing_bucket_is_one_error_not_a_hang(tf_gcs):
  """TF's own makedirs never returns under a missing bucket; fs.makedirs says so at once."""
  env, _ = tf_gcs
  result = _run("script_jax.main", ["--config=configs/tiny.py",
                                    "--workdir=gs://no-such-bucket/run"], env)
  assert result.returncode == 2
  line = _error_line(result)
  assert "cannot use gs://no-such-bucket/run: no such bucket" in line, line


def test_a_refusing_host_is_retried_within_the_bound(tmp_path):
  """Nothing listens on the port: TF retries GCS_WAIT_DEFAULTS' 5 times, then one line."""
  env = dict(os.environ, https_proxy=f"http://127.0.0.1:{gcs_tls_proxy.free_port()}",
             # Shorter back-off than the default's 1 s, so the test waits 3 s, not 31 s; the
             # number of retries is still the package's default.
             GCS_RETRY_CONFIG_INIT_DELAY_TIME_US="100000", TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("GCS_RETRY_CONFIG_MAX_RETRIES", None)
  result = _run("script_jax.metrics_log", ["--workdir=gs://bucket/run"], env)
  assert result.returncode == 2
  line = _error_line(result)
  retries = fs.GCS_WAIT_DEFAULTS["GCS_RETRY_CONFIG_MAX_RETRIES"]
  assert f"All {retries} retry attempts failed" in line, line
  assert "cannot use gs://bucket/run" in line and "cannot be reached" in line, line


def test_the_wait_bounds_are_defaults_a_user_can_change():
  code = "import os, script_jax; print(os.environ['GCS_RETRY_CONFIG_MAX_RETRIES'])"
  env = {k: v for k, v in os.environ.items() if not k.startswith("GCS_")}
  default = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, check=True, cwd=REPO)
  assert default.stdout.strip() == fs.GCS_WAIT_DEFAULTS["GCS_RETRY_CONFIG_MAX_RETRIES"]
  chosen = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=REPO, env=dict(env, GCS_RETRY_CONFIG_MAX_RETRIES="9"))
  assert chosen.stdout.strip() == "9"
