"""The whole flow on non-local file systems: prepare, train, stop, resume, score.

Which client serves what (docs/cloud.md has the why):
  - everything the package reads and writes through script_jax.fs, tf.data's TFRecord reader and
    writer, and clu's TensorBoard writer: tf.io.gfile. Its `gs://` client has its endpoints
    compiled in (https://www.googleapis.com/storage/v1/), so it cannot be pointed at an emulator;
    the same tf.io.gfile code path is exercised on TF's in-memory file system, `ram://`.
  - orbax's checkpoints: tensorstore (array data) and etils.epath (folders, renames). Both are
    pointed at a GCS emulator on localhost (gcp-storage-emulator) and write to `gs://bucket/...`:
    tensorstore through TENSORSTORE_GCS_HTTP_URL, epath through its fsspec/gcsfs back end
    (EPATH_USE_TF=false, STORAGE_EMULATOR_HOST). tensorstore does not know `ram://`, so the
    run's checkpoint folder is mapped from ram://RUN to gs://bucket/RUN.
"""

import gzip
import http
import io
import os
import socket

import pytest
from helpers import load_config

import tensorflow as tf

from script_jax import checkpoints
from script_jax import fs
from script_jax import metrics_records

pytestmark = pytest.mark.slow

# gcsfs's newer file system asks a gRPC control plane for the bucket type (60 s of retries against
# an emulator); the plain JSON-API file system is what an emulator serves.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
emulator_server = pytest.importorskip("gcp_storage_emulator.server")
pytest.importorskip("gcsfs")

BUCKET = "bucket"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _send_generation_headers(monkeypatch):
  """Media downloads carry `x-goog-generation`, as on GCS.

  gcp-storage-emulator leaves the header out; tensorstore's OCDBT (orbax's default format) reads
  it to version its manifest and fails with "Malformed StorageGeneration" without it.
  """
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top
  download = objects.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
    except Exception:  # pylint: disable=broad-except
      pass  # the original handler answers 404
    return download(request, response, storage, *args, **kwargs)

  monkeypatch.setattr(objects, "download", download_with_generation)  # objects.get(alt=media)
  monkeypatch.setattr(emulator_server, "HANDLERS", tuple(
      (regex, {method: download_with_generation if handler is download else handler
               for method, handler in handlers.items()})
      for regex, handlers in emulator_server.HANDLERS))


def _honour_if_generation_match_0(monkeypatch):
  """Uploads with `ifGenerationMatch=0` fail with 412 when the object exists, as on GCS (the
  emulator ignores preconditions); run_lock's lease on gs:// relies on it."""
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top
  insert = objects.insert

  def insert_if_absent(request, response, storage, *args, **kwargs):
    if request.query.get("ifGenerationMatch") == ["0"]:
      name = request.query.get("name", [None])[0]
      if name is None and isinstance(request.data, dict):  # multipart: in the metadata part
        name = request.data.get("meta", {}).get("name")
      try:
        storage.get_file_obj(request.params["bucket_name"], name)
        response.status = http.HTTPStatus.PRECONDITION_FAILED  # it exists
        return None
      except Exception:  # pylint: disable=broad-except
        pass  # absent: upload it
    return insert(request, response, storage, *args, **kwargs)

  monkeypatch.setattr(objects, "insert", insert_if_absent)
  monkeypatch.setattr(emulator_server, "HANDLERS", tuple(
      (regex, {method: insert_if_absent if handler is insert else handler
               for method, handler in handlers.items()})
      for regex, handlers in emulator_server.HANDLERS))


@pytest.fixture
def gcs_emulator(monkeypatch):
  """A GCS emulator on localhost with bucket `bucket`; orbax's clients pointed at it."""
  _send_generation_headers(monkeypatch)
  _honour_if_generation_match_0(monkeypatch)
  port = _free_port()
  server = emulator_server.create_server("127.0.0.1", port, in_memory=True,
                                         default_bucket=BUCKET)
  server.start()
  url = f"http://127.0.0.1:{port}"
  monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", url)  # tensorstore: orbax's array data
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)  # gcsfs, epath's fsspec back end
  monkeypatch.setenv("EPATH_USE_TF", "false")  # epath: gcsfs, not TF's hard-wired GCS client
  # epath decides its back end once per process (a cached check): an earlier test of the
  # session may have decided for TF already.
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top
  gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
  try:
    yield url
  finally:
    server.stop()
    monkeypatch.undo()
    gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access


def _gcs_files() -> list[str]:
  import gcsfs  # pylint: disable=g-import-not-at-top
  gcs = gcsfs.GCSFileSystem(token="anon")  # endpoint from STORAGE_EMULATOR_HOST
  gcs.invalidate_cache()
  return sorted(gcs.find(BUCKET))


def _checkpoint_steps() -> list[str]:
  """The step folders orbax wrote to the emulator's bucket."""
  return sorted({p.split("/checkpoints/")[1].split("/")[0] for p in _gcs_files()
                 if "/checkpoints/" in p})


def _lines():
  from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
  return [l.strip() for t in topics.values() for l in t.splitlines() if len(l.split()) > 4][:400]


def test_prepare_train_stop_resume_score_off_the_local_disk(gcs_emulator, monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)  # a path mistaken for a local one would show up here
  root = f"ram://flow-{os.getpid()}"
  workdir = fs.join(root, "run")
  lines = _lines()
  # The corpus: a text file and a gzipped one, both on the non-local file system.
  with fs.open(fs.join(root, "corpus", "a.txt"), "w") as f:
    f.write("\n".join(lines[:200]) + "\n")
  buffer = io.BytesIO()
  with gzip.GzipFile(fileobj=buffer, mode="wb") as g:
    g.write(("\n".join(lines[200:]) + "\n").encode())
  with fs.open(fs.join(root, "corpus", "b.txt.gz"), "wb") as f:
    f.write(buffer.getvalue())

  make_manager = checkpoints.make_manager
  # tensorstore has no ram:// driver: the run's checkpoints go to the emulator's bucket.
  monkeypatch.setattr(checkpoints, "make_manager", lambda w, *a, **k: make_manager(
      w.replace(root, f"gs://{BUCKET}/" + root.split("://", 1)[1]), *a, **k))

  from script_jax import train  # pylint: disable=g-import-not-at-top

  def config(steps):
    return load_config(
        "tiny", **{"data.source": fs.join(root, "corpus"), "model.vocab_size": 512,
                   "data.num_shards": 2, "model.num_layers": 1,
                   "electra.generator_num_layers": 1, "seq_len": 32, "batch_size": 8,
                   "num_train_steps": steps, "optim.warmup_steps": 0,
                   "checkpoint_every_steps": 2, "log_every_steps": 1})

  train.train_and_evaluate(config(2), workdir)  # stops at step 2 ...
  data_dir = fs.join(workdir, "data")
  assert sorted(fs.listdir(data_dir)) == [
      "eval-00000-of-00001.tfrecord", "eval-00000-of-00001.tfrecord.json",
      "metadata.json", "spm.model", "spm.model.json",
      "train-00000-of-00002.tfrecord", "train-00000-of-00002.tfrecord.json",
      "train-00001-of-00002.tfrecord", "train-00001-of-00002.tfrecord.json"]
  assert _checkpoint_steps() == ["2"]
  train.train_and_evaluate(config(4), workdir)  # ... and resumes to step 4
  records = metrics_records.read_records(workdir)
  assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
  # Held-out evaluation read from the remote folder at the end of each run.
  assert [r["step"] for r in records if "eval_disc_auc" in r] == [2, 4]
  assert fs.exists(fs.join(workdir, checkpoints.RUN_CONFIG))
  assert tf.io.gfile.glob(fs.join(workdir, "events.out.tfevents*"))  # TensorBoard
  assert _checkpoint_steps() == ["2", "4"]
  assert checkpoints.make_manager(workdir, config(4), read_only=True).latest_step() == 4

  from script_jax.scoring import score  # pylint: disable=g-import-not-at-top
  with fs.open(fs.join(root, "sentences.txt"), "w") as f:
    f.write("The quick brown fox.\nA second sentence here.\n")
  assert score.run(workdir, fs.join(root, "sentences.txt"), fs.join(root, "scores.txt"),
                   batch_size=8) == 2
  with fs.open(fs.join(root, "scores.txt")) as f:
    assert len(f.read().splitlines()) == 2

  assert os.listdir(tmp_path) == []  # nothing landed on the local disk as "ram:" or "gs:"


def test_the_gs_lease_is_created_only_if_absent_through_the_storage_client(gcs_emulator):
  """run.lock on gs://: google-cloud-storage's if-generation-match=0 precondition, honoured by
  the service, so of two runs that start in the same instant one gets the lease."""
  pytest.importorskip("google.cloud.storage")
  path = f"gs://{BUCKET}/lease-test/run.lock"
  assert fs.create_if_absent(path, '{"pid": 1}')
  assert not fs.create_if_absent(path, '{"pid": 2}')
  from google.cloud import storage  # pylint: disable=g-import-not-at-top
  blob = storage.Client().bucket(BUCKET).blob("lease-test/run.lock")
  assert blob.download_as_text() == '{"pid": 1}'  # the first writer's, not replaced
